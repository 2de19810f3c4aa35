"""GLM-4.5 / 4.5-Air / 4.6 / 4.7 (mode `glm4-moe`, transformers' `Glm4MoeForCausalLM`) and GLM-4.7-Flash (mode
`glm4-moe-lite`, `Glm4MoeLiteForCausalLM`, MLA attention): the mixture-of-experts GLMs, on transformers' own classes
(no model code of ours) and the checkpoint's own chat template (model/chat_template.py renders it; this module only
converts our tool forms to what these templates take and parses the model's calls back).

What transformers 5.24 does with them (read in models/glm4_moe*/modeling_*.py):
- experts are FUSED 3-D parameters, `mlp.experts.gate_up_proj` [experts, 2*moe_intermediate, hidden] and
  `mlp.experts.down_proj` [experts, hidden, moe_intermediate] (no per-expert Linear modules), run by
  `@use_experts_implementation` (config `experts_implementation`: eager loop, or grouped kernels);
- the router (`mlp.gate`) is a sigmoid top-k with `e_score_correction_bias` (aux-loss-free balancing); the official
  config.json has no `router_aux_loss_coef` and the class computes no auxiliary loss;
- the multi-token-prediction layer (`num_nextn_predict_layers`, stored as `model.layers.{num_hidden_layers}.*`) is not
  built; its weights are ignored on load, said in one log line (`_ignore_mtp_on_load`).

`write_tiny_checkpoint` writes a tiny checkpoint of either class in the shipped layout (see `tiny_config`), with an
MTP layer's tensors in model.safetensors, the tool/thinking tokens and the official chat template
(model/templates/PROVENANCE.md).
"""
from __future__ import annotations

import json
import os
import re

MOE_MODE, LITE_MODE = "glm4-moe", "glm4-moe-lite"
MODES = (MOE_MODE, LITE_MODE)
MODEL_TYPES = {"glm4_moe": MOE_MODE, "glm4_moe_lite": LITE_MODE}
ARCHITECTURES = {"Glm4MoeForCausalLM": MOE_MODE, "Glm4MoeLiteForCausalLM": LITE_MODE}
TEMPLATES = {MOE_MODE: "glm4_6_moe.jinja", LITE_MODE: "glm4_7_flash.jinja"}
# Tokens of the GLM-4.5 tokenizer beside GLM-4's (glm4_0414.SPECIAL_TOKENS): the tool-call, tool-response and
# thinking tags the chat templates write, and the /nothink switch GLM-4.5's template appends.
FORMAT_TOKENS = ("/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                 "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
# LoRA's default targets: attention (GQA on glm4-moe, MLA on glm4-moe-lite), the dense and shared-expert MLPs, and
# the routed experts' fused parameters (PEFT's target_parameters, a LoRA per expert over the 3-D tensor).
LORA_MODULES = {MOE_MODE: "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                LITE_MODE: "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj"}
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER_NAME = "mlp.gate."


def mode_of_config(config_dict: dict) -> str | None:
    """glm4-moe / glm4-moe-lite by model_type or architectures; None for any other config."""
    if config_dict.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config_dict["model_type"]]
    for architecture in config_dict.get("architectures") or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    return None


def read_template(mode: str) -> str:
    from .glm4_0414 import TEMPLATE_DIR
    with open(os.path.join(TEMPLATE_DIR, TEMPLATES[mode]), encoding="utf-8") as f:
        return f.read()


def build_tokenizer(mode: str):
    """The tiny byte-level BPE of glm4_0414 with the GLM-4.5 format tokens and the mode's official chat template."""
    from tokenizers import AddedToken

    from .glm4_0414 import build_tokenizer as build_glm4_tokenizer
    tokenizer = build_glm4_tokenizer(read_template(mode))
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in FORMAT_TOKENS
                          if t not in tokenizer.get_vocab()])
    return tokenizer


def tiny_config(mode: str, tokenizer):
    """Tiny dims with the official structure: one dense first layer (first_k_dense_replace 1), then MoE layers of
    4 routed experts (2 per token) and a shared expert, one MTP layer declared (num_nextn_predict_layers 1). Every
    Linear input is a multiple of 64 and every output of 32: bitsandbytes' CPU 4-bit kernel packs whole blocks."""
    from transformers import Glm4MoeConfig, Glm4MoeLiteConfig

    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    common = dict(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                  norm_topk_prob=True, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, num_nextn_predict_layers=1)
    if mode == MOE_MODE:  # GLM-4.5-Air's ratios: partial rotary 0.5, GQA, attention bias, no qk norm
        return Glm4MoeConfig(**common, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                             attention_bias=True, use_qk_norm=False, routed_scaling_factor=1.0, bos_token_id=None)
    # GLM-4.7-Flash: MLA (q/kv low-rank), routed_scaling_factor 1.8
    return Glm4MoeLiteConfig(**common, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32,
                             qk_nope_head_dim=32, v_head_dim=16, routed_scaling_factor=1.8, bos_token_id=None)


def write_tiny_checkpoint(mode: str, output_dir: str, seed: int = 0) -> str:
    """A tiny checkpoint of the mode's class in output_dir (FileExistsError when it is not empty), with the tensors
    of one MTP layer (model.layers.{num_hidden_layers}.*) in model.safetensors as the official files have them."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from .export import atomic_directory
    from .glm4_0414 import template_into_tokenizer_config
    from .tiny import draw_strong_weights

    with atomic_directory(output_dir) as staging:
        tokenizer = build_tokenizer(mode)
        tokenizer.save_pretrained(staging)
        template_into_tokenizer_config(staging, tokenizer.chat_template)
        torch.manual_seed(seed)
        config = tiny_config(mode, tokenizer)
        model = AutoModelForCausalLM.from_config(config)
        draw_strong_weights(model, seed)
        model.save_pretrained(staging)
        weights_file = os.path.join(staging, "model.safetensors")
        weights = load_file(weights_file)
        mtp = f"model.layers.{config.num_hidden_layers}."
        generator = torch.Generator().manual_seed(seed)
        weights.update({mtp + name: torch.randn(shape, generator=generator, dtype=torch.float32).to(
            weights["model.norm.weight"].dtype) for name, shape in (
            ("eh_proj.weight", (config.hidden_size, 2 * config.hidden_size)), ("enorm.weight", (config.hidden_size,)),
            ("hnorm.weight", (config.hidden_size,)), ("shared_head.norm.weight", (config.hidden_size,)))})
        save_file(weights, weights_file, metadata={"format": "pt"})
    return output_dir


def _ignore_mtp_on_load() -> None:
    """transformers ignores the MTP layer only by the official layer numbers (`_keys_to_ignore_on_load_unexpected`
    of Glm4MoePreTrainedModel: model.layers.46 / 92; Glm4MoeLite: 47), so any other depth (a pruned or tiny model)
    prints a table of "unexpected" keys. Each model instance instead ignores the layers its own config declares past
    num_hidden_layers, and says so in one log line."""
    import logging

    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoePreTrainedModel
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLitePreTrainedModel

    for cls in (Glm4MoePreTrainedModel, Glm4MoeLitePreTrainedModel):
        if getattr(cls, "_mtp_ignored", False):
            continue
        original = cls.post_init

        def post_init(self, _original=original):
            _original(self)
            first, count = self.config.num_hidden_layers, getattr(self.config, "num_nextn_predict_layers", 0) or 0
            if count and hasattr(self, "model"):  # the CausalLM (its state dict names start with model.)
                layers = "|".join(str(first + i) for i in range(count))
                self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {
                    rf"^model\.layers\.({layers})\."}
                logging.getLogger("chatglm").info(
                    "%s: the multi-token-prediction layer (num_nextn_predict_layers=%d, model.layers.%s) is not "
                    "built by transformers: its weights are ignored on load and absent from outputs",
                    type(self).__name__, count, layers)
        cls.post_init = post_init
        cls._mtp_ignored = True


_ignore_mtp_on_load()


# ------------------------------------------------------------------------------------------------------------------
# tool calls: our messages -> the template's `tool_calls`; the model's text -> {"name", "parameters"}
# ------------------------------------------------------------------------------------------------------------------
def takes_tool_calls(chat_template: str | None) -> bool:
    """Whether a chat template renders OpenAI `tool_calls` (GLM-4.5 and later) rather than ChatGLM's metadata."""
    return bool(chat_template) and "tool_calls" in chat_template and "<arg_key>" in chat_template


def with_tool_calls(messages: list[dict]) -> list[dict]:
    """Our tool forms (tool_data.py: consecutive `metadata` call messages, each answered by an observation) as the
    GLM-4.5 templates take them: an assistant message with `tool_calls` [{"function": {"name", "arguments"}}] (a text
    answer right before the calls becomes its content) and `tool` results."""
    converted = []
    for message in messages:
        if message["role"] == "assistant" and str(message.get("metadata") or "").strip():
            content = message.get("content")
            arguments = json.loads(content) if isinstance(content, str) and content.strip() else (content or {})
            call = {"type": "function", "function": {"name": message["metadata"].strip(), "arguments": arguments}}
            previous = converted[-1] if converted else None
            if previous and previous["role"] == "assistant" and not previous.get("_answered"):
                previous.setdefault("tool_calls", []).append(call)
                continue
            message = {k: v for k, v in message.items() if k not in ("metadata", "content")}
            converted.append({**message, "content": "", "tool_calls": [call]})
            continue
        if message["role"] == "observation":
            message = {**message, "role": "tool"}
        if converted and converted[-1]["role"] == "assistant":
            converted[-1]["_answered"] = True
        converted.append(dict(message))
    for message in converted:
        message.pop("_answered", None)
    return without_old_thinking(converted)


def without_old_thinking(messages: list[dict]) -> list[dict]:
    """The thinking of assistant turns before the last user turn left out, as the GLM-4.5 templates render them
    (`loop.index0 > ns.last_user_index`): rendered message by message, a later user turn would otherwise change
    what was rendered before it (model/chat_template.py reads labels off a left-to-right rendering)."""
    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    last_user = users[-1] if users else -1
    kept = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and index < last_user:
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
            if isinstance(message.get("content"), str) and "</think>" in message["content"]:
                message["content"] = message["content"].split("</think>")[-1].lstrip("\n")
        kept.append(message)
    return kept


CALL_PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
ARGUMENT_PATTERN = re.compile(r"<arg_key>\s*(.*?)\s*</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def parse_calls(response: str) -> tuple[str, list[dict]]:
    """(text before the first call, calls as {"name", "parameters"}) of what the model wrote; an argument value is
    JSON where it parses (the template writes non-strings with tojson), else the string itself."""
    calls = []
    for match in CALL_PATTERN.finditer(response):
        body = match.group(1)
        name = body.split("<arg_key>", 1)[0].strip()
        parameters = {}
        for key, value in ARGUMENT_PATTERN.findall(body):
            value = value.strip("\n")
            try:
                parameters[key] = json.loads(value)
            except json.JSONDecodeError:
                parameters[key] = value
        calls.append({"name": name, "parameters": parameters})
    text = response.split("<tool_call>", 1)[0].strip()
    return text, calls


# ------------------------------------------------------------------------------------------------------------------
# training: what trains in the MoE blocks, the router's auxiliary loss, ZeRO-3 leaf modules
# ------------------------------------------------------------------------------------------------------------------
def add_flags(group) -> None:
    """train.py's flags of the MoE modes."""
    from utils import add_bool_flag
    add_bool_flag(group, "--train_router",
                  "glm4-moe*: the router (mlp.gate, each MoE layer's expert scores) trains too (lora: saved whole "
                  "in the adapter); frozen by default in every train type")
    add_bool_flag(group, "--lora_experts",
                  "glm4-moe*, lora: LoRA on the routed experts' fused weights (mlp.experts.gate_up_proj, down_proj: "
                  "PEFT target_parameters, one low-rank update per expert)", default=True)


def check_flags(parser, args) -> None:
    """One-line refusals of the MoE flags outside their modes."""
    if args.mode not in MODES and (args.train_router or not args.lora_experts):
        parser.error(f"--train_router / --lora_experts are for --mode {' or '.join(MODES)}, not {args.mode}")
    experts = args.mode in MODES and args.train_type == "lora" and args.lora_experts
    if args.lora_dropout is None:
        args.lora_dropout = 0.0 if experts else 0.1
    elif experts and args.lora_dropout:
        # peft/tuners/lora/layer.py ParamWrapper: "lora.ParamWrapper does not work with lora_dropout != 0"
        parser.error(f"--lora_dropout {args.lora_dropout}: LoRA on the fused experts (PEFT target_parameters) takes "
                     f"no dropout; pass --lora_dropout 0, or --lora_experts False")


def lora_options(args) -> dict:
    """LoraConfig arguments beside target_modules: the experts' fused parameters, the router kept whole."""
    if args.mode not in MODES:
        return {}
    return {"target_parameters": list(EXPERT_PARAMETERS) if args.lora_experts else None,
            "modules_to_save": ["mlp.gate"] if args.train_router else None}


def router_parameters(model) -> list:
    """The routers' weights (mlp.gate.weight of every MoE layer; e_score_correction_bias is a buffer)."""
    return [param for name, param in model.named_parameters() if ROUTER_NAME in name and "modules_to_save" not in name]


def freeze_router(model, args) -> None:
    """freeze / all: the router stays frozen unless --train_router (changing it reroutes tokens away from what
    the experts learned; GLM-4.5's recipe keeps it fixed after the bias balancing)."""
    if args.mode in MODES and not args.train_router:
        for param in router_parameters(model):
            param.requires_grad = False


def aux_loss_coef(config) -> float:
    """The router's auxiliary load-balancing coefficient as the checkpoint's config.json sets it; the official
    GLM-4.5-Air and GLM-4.7-Flash configs set none (their routers balance through e_score_correction_bias): 0."""
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def router_aux_loss(outputs, config, attention_mask=None):
    """Switch-Transformer load-balancing loss over the router logits of every MoE layer (transformers'
    load_balancing_loss_func, as Mixtral/Qwen-MoE add it), unscaled."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    return load_balancing_loss_func(outputs.router_logits, config.n_routed_experts, config.num_experts_per_tok,
                                    attention_mask)


def set_zero3_leaf_modules(model) -> list[str]:
    """DeepSpeed ZeRO-3: the MoE blocks as leaf modules (deepspeed.utils.set_z3_leaf_modules), so their parameters
    are gathered once per block rather than per expert actually hit: ranks hitting different experts would
    otherwise wait on each other's gathers (the documented fix for ZeRO-3 hangs with routed experts)."""
    from deepspeed.utils import set_z3_leaf_modules
    classes = sorted({type(module) for module in model.modules() if type(module).__name__ in (
        "Glm4MoeMoE", "Glm4MoeLiteMoE")}, key=lambda cls: cls.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]


class RouterAuxLoss:
    """The router's load-balancing loss in the training loss, as the checkpoint's config sets it
    (`router_aux_loss_coef` with output_router_logits): coef x aux per labelled token, so that train.py's division of
    the summed loss by the labelled tokens leaves coef x aux in the mean. Logged apart (`shown`)."""

    def __init__(self, config, coef: float):
        self.config, self.coef = config, coef
        self.sum, self.count = 0.0, 0

    @classmethod
    def for_model(cls, model, mode: str):
        """None (with one log line saying why) where the config sets no auxiliary loss."""
        import logging
        if mode not in MODES:
            return None
        config = model.config
        coef = aux_loss_coef(config)
        log = logging.getLogger("chatglm")
        if not coef:
            log.info("router aux loss: off (config.json sets no router_aux_loss_coef; the router balances experts "
                     "through e_score_correction_bias, as GLM-4.5 was trained)")
            return None
        log.info("router aux loss: router_aux_loss_coef %g from config.json, added to the loss, logged apart", coef)
        return cls(config, coef)

    def loss(self, engine, inputs: dict, labels, labelled: int):
        outputs = engine(**inputs, labels=labels, num_items_in_batch=1, output_router_logits=True)
        aux = router_aux_loss(outputs, self.config)
        self.sum += float(aux.detach())
        self.count += 1
        return outputs.loss + self.coef * aux * labelled

    def shown(self, writer=None, step: int = 0) -> str:
        """' | router aux %.4f' (the mean since the last call, unscaled); the tensorboard scalar train/router_aux."""
        mean = self.sum / max(self.count, 1)
        self.sum, self.count = 0.0, 0
        if writer:
            writer.add_scalar("train/router_aux", mean, step)
        return f" | router aux {mean:.4f} (x {self.coef:g} in the loss)"


def shipped_names(model, state_dict: dict) -> dict:
    """A state dict of transformers' MoE classes under the names the checkpoint stores: transformers 5 loads the
    official per-expert tensors (mlp.experts.N.gate_proj/up_proj/down_proj.weight) into the fused 3-D parameters and
    its save_pretrained splits them back (`revert_weight_conversion`); write_full_checkpoint keeps the base's names,
    so full saves and merges do the same. Other models' state dicts pass through unchanged."""
    if type(model).__name__ not in ARCHITECTURES:
        return state_dict
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, state_dict)


_CHAT_CLASSES: dict = {}


def with_chat(model):
    """The loaded Glm4Moe(Lite)ForCausalLM (or the one under a PEFT wrapper) given chat() / stream_chat() in the
    checkpoint's own chat format, for predict.py and web_demo.py, as glm4_0414.with_chat does for Glm4ForCausalLM:
    its class becomes a subclass that only adds those methods (inference only: nothing is saved from it)."""
    for module in model.modules():
        mode = ARCHITECTURES.get(type(module).__name__)
        if mode and not hasattr(module, "chat"):
            module.__class__ = _chat_class(type(module), mode)
    return model


def _chat_class(base, mode: str):
    if base not in _CHAT_CLASSES:
        from .modeling_base import ChatMixin
        # the GLM-4.5 generation_config.json's sampling defaults are the caller's to pass; ours as for glm4
        _CHAT_CLASSES[base] = type(f"{base.__name__}ForChat", (ChatMixin, base), {
            "mode": mode, "chat_defaults": {"max_length": 8192, "num_beams": 1, "do_sample": True, "top_p": 0.8,
                                            "temperature": 0.8}})
    return _CHAT_CLASSES[base]


def quantization_note(model) -> str:
    """QLoRA: what bitsandbytes leaves unquantized in the MoE blocks. Its 4-bit/8-bit layers replace nn.Linear only;
    transformers 5.24's experts are fused 3-D nn.Parameters (no Linear per expert), so they stay in the load dtype."""
    experts = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")
               and p.dim() == 3]
    if not experts:
        return "no fused expert parameters"
    count = sum(p.numel() for p in experts)
    return (f"QLoRA: the routed experts' fused weights ({len(experts)} tensors, {count} weights, "
            f"{sum(p.numel() * p.element_size() for p in experts)} bytes) stay {str(experts[0].dtype)[6:]}: "
            f"bitsandbytes quantizes nn.Linear layers only (attention, dense and shared-expert MLPs)")
