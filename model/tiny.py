"""Write a tiny random ChatGLM checkpoint in the official directory layout, for tests, the README demo and CI.

    python -m model.tiny --mode glm3 --output_dir tiny-glm3

(`--mode glm4-0414` writes transformers' Glm4ForCausalLM with a tokenizers-made tokenizer.json and GLM-Z1's chat
template instead: model/glm4_0414.py.)

The directory looks like THUDM's current files: config.json with the official fields (THUDM's `_name_or_path`,
`model_type` chatglm, `architectures` ["ChatGLMModel"], the official `auto_map`, `torch_dtype`) plus our
`chatglm_version` marker, model.safetensors under the official weight names (ChatGLM-6B: lm_head.weight and
transformer.word_embeddings.weight stored equal, the one tied matrix, as THUDM's checkpoint stores both), the tokenizer file of that version (ice_text.model or tokenizer.model: a real, small
sentencepiece model trained on model/tiny_corpus.txt; for glm4 a tiktoken ranks file trained on the same corpus by
model.tiktoken_build) and the official tokenizer_config.json of that version (which THUDM's
tokenizer class reads; for GLM-4 the current layout: `added_tokens_decoder` with this vocabulary's ids and a
`chat_template` of our own, see `glm4_tokenizer_config`). THUDM's .py files are not included (they are not ours to ship): copy them in to load the
directory with `trust_remote_code`. It trains on a CPU in seconds.

The weights are drawn like the official reference tensors (uniform in [-0.5, 0.5], norm weights in [0.5, 1.5])
rather than a training initialisation (std 0.02), so that every part of the network moves the logits: a wrong
residual scale or a rotary base off by one changes them by more than 1e-3 (tests/test_parity.py).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from . import MODE, glm4_0414, glm4_moe, template
from .config import VERSION_KEY
from .export import atomic_directory
from .sp_build import build_tokenizer_file
from .tiktoken_build import build_ranks_file

TINY_SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 2}


def tiny_config(mode: str, tokenizer):
    spec = MODE[mode]
    if mode == "glm":
        return spec.config(vocab_size=len(tokenizer), inner_hidden_size=256, max_sequence_length=2048,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                           pad_token_id=tokenizer.pad_token_id, chatglm_version=mode, **TINY_SIZES)
    padded = (len(tokenizer) + 63) // 64 * 64  # the official vocabulary is padded too (65024)
    if mode == "glm4":  # GLM-4's own defaults (rope_ratio, eps) stay; the eos list is the tiny tokenizer's stop ids
        return spec.config(padded_vocab_size=padded, kv_channels=16, multi_query_group_num=2, ffn_hidden_size=128,
                           seq_length=2048, eos_token_id=template.stop_token_ids(tokenizer, mode),
                           pad_token_id=tokenizer.pad_token_id, chatglm_version=mode, **TINY_SIZES)
    return spec.config(padded_vocab_size=padded, kv_channels=16, multi_query_group_num=2, ffn_hidden_size=128,
                       seq_length=2048, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       chatglm_version=mode, **TINY_SIZES)


# What THUDM's config.json files declare beside the network's fields (chatglm-6b, chatglm2-6b, chatglm3-6b,
# glm-4-9b-chat).
_AUTO_MAP = {
    "glm": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "glm2": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
    "glm3": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "glm4": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
}
_GLM_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "layernorm_epsilon", "inner_hidden_size",
               "max_sequence_length", "position_encoding_2d", "bos_token_id", "eos_token_id", "mask_token_id",
               "gmask_token_id", "pad_token_id", "use_cache")
_GLM2_FIELDS = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                "seq_length", "hidden_dropout", "attention_dropout", "layernorm_epsilon", "rmsnorm",
                "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear", "add_qkv_bias",
                "bias_dropout_fusion", "multi_query_attention", "multi_query_group_num", "apply_query_key_layer_scaling",
                "attention_softmax_in_fp32", "fp32_residual_connection", "original_rope", "use_cache", "eos_token_id",
                "pad_token_id", "tie_word_embeddings")
# config.json's `_name_or_path` in THUDM's repos: converters (e.g. chatglm.cpp's) choose the ChatGLM3 path by it, and
# detect_version tells glm2 from glm3 by it.
OFFICIAL_NAMES = {"glm": "THUDM/chatglm-6b", "glm2": "THUDM/chatglm2-6b", "glm3": "THUDM/chatglm3-6b",
                  "glm4": "THUDM/glm-4-9b-chat"}


def _jinja_text(text: str) -> str:
    """`text` as a Jinja expression that prints it: a newline written as template text right after a block tag
    would be dropped under transformers' trim_blocks=True, a string literal is printed as it is."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _glm4_chat_template() -> str:
    """Our Jinja chat template for GLM-4, written for this project: the GLM-4 chat format of model/template.py
    ([gMASK]<sop>; per message with content <|role|>{metadata}\n{content}; a message with `tools` first <|system|>
    and the tool prompt, each function as `tojson(indent=4)`; <|assistant|> to ask for an answer), built from the
    same constants, so that transformers' apply_chat_template over a tiny glm4 directory gives template.py's ids
    (tests/test_official_layout.py)."""
    before_name, rest = template.GLM4_TOOL_SECTION.split("{name}")
    between, after = rest.split("{description}")
    return ("[gMASK]<sop>"
            "{% for message in messages %}"
            "{% if message.tools is defined %}"
            "<|system|>" + _jinja_text(template.GLM4_TOOL_SYSTEM_PROMPT) +
            "{% for tool in message.tools %}"
            "{% if tool.type != 'function' %}{{ raise_exception('only function tools are supported') }}{% endif %}"
            + _jinja_text(before_name) + "{{ tool.function.name }}" + _jinja_text(between)
            + "{{ tool.function | tojson(indent=4) }}" + _jinja_text(after) +
            "{% endfor %}"
            "{% endif %}"
            "{% if message.content %}"
            "<|{{ message.role }}|>{{ message.metadata or '' }}" + _jinja_text("\n") + "{{ message.content }}"
            "{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def glm4_tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json of a glm4 directory in the current glm-4-9b-chat layout: THUDM's current
    tokenization_chatglm.py knows its 14 special tokens only from `added_tokens_decoder` (here with the ids of
    this tokenizer file) and the prompt format only from `chat_template`."""
    from .tokenization_glm4 import GLM4_SPECIAL_TOKENS

    added = {str(tokenizer.get_command(token)): {"content": token, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
             for token in GLM4_SPECIAL_TOKENS}
    return {**OFFICIAL_TOKENIZER_CONFIGS["glm4"], "added_tokens_decoder": added,
            "additional_special_tokens": list(GLM4_SPECIAL_TOKENS), "chat_template": _glm4_chat_template(),
            "model_max_length": 128000}


# THUDM's tokenizer_config.json of each version (without its hub name_or_path; glm4's is completed by
# glm4_tokenizer_config).
OFFICIAL_TOKENIZER_CONFIGS = {
    "glm": {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
            "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "remove_space": False,
            "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}},
    "glm2": {"remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}},
    "glm3": {"remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}},
    "glm4": {"remove_space": False, "do_lower_case": False, "clean_up_tokenization_spaces": False,
             "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left",
             "tokenizer_class": "ChatGLM4Tokenizer",
             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}},
}


def official_config_dict(mode: str, config) -> dict:
    """config.json of `config` as THUDM writes it: `_name_or_path` (THUDM's repo), the network's fields,
    `model_type`, `architectures`, `auto_map`, `torch_dtype` (fp32 here), plus our version marker."""
    fields = _GLM_FIELDS if mode == "glm" else _GLM2_FIELDS + (("rope_ratio",) if mode == "glm4" else ())
    values = {"_name_or_path": OFFICIAL_NAMES[mode], "architectures": ["ChatGLMModel"], "auto_map": _AUTO_MAP[mode],
              "model_type": "chatglm"}
    values.update({name: getattr(config, name) for name in fields})
    values.update({"torch_dtype": "float32", VERSION_KEY: mode})
    return dict(sorted(values.items()))


def draw_strong_weights(model, seed: int) -> None:
    """Every weight matrix and bias uniform in [-0.5, 0.5], norm weights in [0.5, 1.5] (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() > 1 or name.endswith(".bias"):
                param.uniform_(-0.5, 0.5, generator=generator)
            else:
                param.uniform_(0.5, 1.5, generator=generator)


def write_tiny_checkpoint(mode: str, output_dir: str, seed: int = 0) -> str:
    """Build the tokenizer and a random model of `mode`; write both into output_dir, which must not exist or be
    empty (FileExistsError otherwise: nothing of the user's is overwritten)."""
    from safetensors.torch import save_file

    spec = MODE[mode]
    with atomic_directory(output_dir) as staging:  # its publish refuses a target that holds anything
        tokenizer_file = os.path.join(staging, spec.tokenizer_file)
        build_ranks_file(tokenizer_file) if mode == "glm4" else build_tokenizer_file(mode, tokenizer_file)
        tokenizer = spec.tokenizer.from_pretrained(staging)
        torch.manual_seed(seed)
        model = spec.model(tiny_config(mode, tokenizer))
        draw_strong_weights(model, seed)
        # Every key of the state dict, each its own copy: a tied ChatGLM-6B stores lm_head.weight and
        # transformer.word_embeddings.weight, equal, as the official checkpoint does.
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        tokenizer_config = glm4_tokenizer_config(tokenizer) if mode == "glm4" else OFFICIAL_TOKENIZER_CONFIGS[mode]
        for name, content in (("config.json", official_config_dict(mode, model.config)),
                              ("tokenizer_config.json", tokenizer_config)):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODE), default="glm3", help="ChatGLM version of the checkpoint")
    parser.add_argument("--output_dir", default=None,
                        help="where to write it, a new or empty directory (default: tiny-<mode>)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args()
    output_dir = args.output_dir or f"tiny-{args.mode}"
    try:
        if args.mode in glm4_moe.MODES:  # transformers' Glm4Moe(Lite)ForCausalLM, the official template
            path = glm4_moe.write_tiny_checkpoint(args.mode, output_dir, args.seed)
        elif args.mode == glm4_0414.MODE_NAME:  # Glm4ForCausalLM, GLM-Z1's chat template (model/templates)
            path = glm4_0414.write_tiny_checkpoint(output_dir, args.seed)
        else:
            path = write_tiny_checkpoint(args.mode, output_dir, args.seed)
    except FileExistsError:
        parser.error(f"--output_dir {output_dir} exists and is not an empty directory; choose a new one")
    print(f"wrote a tiny {args.mode} checkpoint to {path}")


if __name__ == "__main__":
    main()
