"""Configurations of the two ChatGLM networks, with the field names of the official config.json files.

ChatGLM-6B (`glm`) and ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B (`glm2`, `glm3`, `glm4`) all declare
`model_type: "chatglm"` in their config.json, so the version is told apart by the fields that only one network has
(see `detect_version`). Fields we do not use (`auto_map`, `quantization_bit`, dropout switches ...) are kept on the
object and written back on save.
"""
from __future__ import annotations

import json
import os

from transformers import PreTrainedConfig

from .textfile import read_text

# Our own marker, written into every config.json this project saves, so that a glm2 directory loaded as glm3 (same
# network, different tokenizer and template) is caught too. Official directories do not have it.
VERSION_KEY = "chatglm_version"


class ChatGLMConfig(PreTrainedConfig):
    """ChatGLM-6B (mode `glm`). Defaults are the official chatglm-6b config.json (v1.1, vocabulary 130528)."""

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size=130528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        inner_hidden_size=16384,
        max_sequence_length=2048,
        position_encoding_2d=True,
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
        use_cache=True,
        pre_seq_len=None,
        prefix_projection=False,
        quantization_bit=0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.inner_hidden_size = inner_hidden_size
        self.max_sequence_length = max_sequence_length
        self.position_encoding_2d = position_encoding_2d
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.use_cache = use_cache
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.quantization_bit = quantization_bit
        kwargs.setdefault(VERSION_KEY, "glm")
        # ChatGLM-6B's config.json says nothing about tying, and the transformers 4.x it was written for defaults
        # `tie_word_embeddings` to True (PretrainedConfig.__init__): THUDM's model holds ONE matrix for lm_head and
        # word_embeddings. transformers 5 has no such default (PreTrainedModel reads it with getattr(..., False)),
        # so it is set here; an explicit `"tie_word_embeddings": false` in a config.json still unties them.
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


class ChatGLM2Config(PreTrainedConfig):
    """ChatGLM2-6B and ChatGLM3-6B (modes `glm2`, `glm3`): one network. Defaults are the official chatglm2-6b values.

    `rope_ratio` (ChatGLM3-6B-32k and later) multiplies the rotary base 10000.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    def __init__(
        self,
        num_layers=28,
        padded_vocab_size=65024,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,
        num_attention_heads=32,
        seq_length=32768,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        bias_dropout_fusion=True,
        multi_query_attention=True,
        multi_query_group_num=2,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        original_rope=True,
        rope_ratio=1.0,
        quantization_bit=0,
        pre_seq_len=None,
        prefix_projection=False,
        use_cache=True,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.original_rope = original_rope
        self.rope_ratio = rope_ratio
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.use_cache = use_cache
        kwargs.setdefault(VERSION_KEY, "glm2")
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


class ChatGLM4Config(ChatGLM2Config):
    """GLM-4-9B / GLM-4-9B-Chat (mode `glm4`): the ChatGLM2/3 network; defaults are the official glm-4-9b-chat
    config.json (rope base 10000 * rope_ratio 500, RMSNorm eps 1.5625e-7, vocabulary padded to 151552, eos the
    three ids that end a turn: <|endoftext|>, <|user|>, <|observation|>)."""

    def __init__(self, num_layers=40, padded_vocab_size=151552, seq_length=131072, layernorm_epsilon=1.5625e-7,
                 rope_ratio=500, eos_token_id=(151329, 151336, 151338), pad_token_id=151329, **kwargs):
        kwargs.setdefault(VERSION_KEY, "glm4")
        super().__init__(num_layers=num_layers, padded_vocab_size=padded_vocab_size, seq_length=seq_length,
                         layernorm_epsilon=layernorm_epsilon, rope_ratio=rope_ratio,
                         eos_token_id=list(eos_token_id) if isinstance(eos_token_id, tuple) else eos_token_id,
                         pad_token_id=pad_token_id, **kwargs)


# Fields that only one of the two networks has: enough to tell an official config.json apart.
_GLM_ONLY = {"inner_hidden_size", "position_encoding_2d", "max_sequence_length", "gmask_token_id"}
_GLM2_ONLY = {"padded_vocab_size", "multi_query_attention", "kv_channels", "ffn_hidden_size", "seq_length"}


def _is_glm4(config_dict: dict) -> bool:
    """An official GLM-4 config.json: its 151552-token vocabulary, its list of eos ids (151329 <|endoftext|> first)
    or its name (THUDM/glm-4-9b-chat, glm-4-9b, glm-4-9b-chat-1m). ChatGLM3-6B-32k/128k also have rope_ratio, so
    rope_ratio alone tells nothing."""
    eos = config_dict.get("eos_token_id")
    name = str(config_dict.get("_name_or_path", "")).lower().replace("_", "-")
    return (config_dict.get("padded_vocab_size", 0) >= 151552 or (isinstance(eos, list) and 151329 in eos)
            or "glm-4" in name or "glm4" in name)


def detect_version(config_dict: dict) -> str | None:
    """'glm', 'glm2', 'glm3', 'glm4' or 'glm4-0414' as far as a config.json tells; None when it is no GLM config.

    Our own saves carry `chatglm_version`. An official glm2/glm3 config differs only in `_name_or_path`
    ("THUDM/chatglm2-6b" vs "THUDM/chatglm3-6b"); without either hint a ChatGLM2-style config reads as 'glm2/3'.
    GLM-4 is told by its vocabulary, eos list or name (`_is_glm4`).
    """
    if config_dict.get(VERSION_KEY) in ("glm", "glm2", "glm3", "glm4"):
        return config_dict[VERSION_KEY]
    from .glm4_0414 import MODE_NAME, is_glm4_0414_config
    if is_glm4_0414_config(config_dict):  # transformers' own GLM-4 (GLM-4-0414, GLM-Z1)
        return MODE_NAME
    from .glm4_moe import mode_of_config
    if mode_of_config(config_dict):  # GLM-4.5 .. 4.7 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite)
        return mode_of_config(config_dict)
    keys = set(config_dict)
    if keys & _GLM_ONLY and not keys & _GLM2_ONLY:
        return "glm"
    if keys & _GLM2_ONLY:
        if _is_glm4(config_dict):
            return "glm4"
        name = str(config_dict.get("_name_or_path", "")).lower()
        if "chatglm3" in name:
            return "glm3"
        if "chatglm2" in name:
            return "glm2"
        return "glm2/3"
    return None


def read_json(path: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path`. Invalid JSON, or JSON that is not an object, raises `error` with one line naming
    the file (and line): the caller picks the error class its entry point reports. Read as every file is
    (`textfile.read_text`: UTF-8, a leading byte-order mark dropped)."""
    try:
        value = json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value


def check_checkpoint_dir(path: str, mode: str) -> dict:
    """Fail with one clear line unless `path` is a checkpoint directory of the version `mode` names."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: {path} is not a ChatGLM checkpoint directory")
    config_dict = read_json(config_file)
    version = detect_version(config_dict)
    if version is None:
        raise ValueError(f"{config_file}: not a ChatGLM config (model_type={config_dict.get('model_type')!r})")
    if {"glm4-0414", "glm4-moe", "glm4-moe-lite"} & {version, mode}:
        if version != mode:
            raise ValueError(f"{config_file}: this is a {version} checkpoint, but --mode is {mode}")
        return config_dict
    family = "glm" if mode == "glm" else "glm2/3"
    found_family = "glm" if version == "glm" else "glm2/3"
    # 'glm2/3' (an official config without a name) fits glm2 and glm3, never glm4 (told apart by _is_glm4).
    if family != found_family or (version != "glm2/3" and version != mode) or \
            (version == "glm2/3" and mode == "glm4"):
        raise ValueError(f"{config_file}: this is a {version} checkpoint, but --mode is {mode}")
    return config_dict


def detect_mode(path: str, flag: str) -> str:
    """The mode of a checkpoint directory when --mode is left out: a directory train.py wrote says it in its
    training_args.json; otherwise config.json (model_type, architectures, the ChatGLM fields: `detect_version`).
    Raises ValueError with one line (naming `flag` and what was found) when the project cannot tell or train it."""
    record = os.path.join(path, "training_args.json")
    if os.path.isfile(record):
        mode = read_json(record).get("mode")
        if isinstance(mode, str):
            return mode
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{flag} {path}: no config.json (nor training_args.json) to tell the model by; pass --mode")
    config_dict = read_json(config_file)
    version = detect_version(config_dict)
    if version is None:
        raise ValueError(f"{config_file}: model_type={config_dict.get('model_type')!r}, architectures="
                         f"{config_dict.get('architectures')}: not a model this project trains "
                         f"(ChatGLM-6B .. GLM-4-9B, GLM-4-0414, GLM-Z1)")
    if version == "glm2/3":
        raise ValueError(f"{config_file}: a ChatGLM2-6B / ChatGLM3-6B config (one network, two chat formats): pass "
                         f"--mode glm2 or --mode glm3")
    return version


def resolve_mode(parser, args, path_flag: str) -> None:
    """args.mode from the directory of --`path_flag` when --mode was left out, with one log line saying so;
    parser.error (one line) when it cannot be told."""
    if args.mode is not None:
        return
    path = getattr(args, path_flag)
    try:
        args.mode = detect_mode(path, f"--{path_flag}")
    except (ValueError, OSError) as error:
        parser.error(f"--mode left out: {error}")
    if os.environ.get("RANK", "0") == "0":  # parsed before logging is set up, on every rank: say it once
        print(f"{parser.prog}: --mode left out: {path} is a {args.mode} checkpoint, using --mode {args.mode}",
              flush=True)
