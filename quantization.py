"""QLoRA: LoRA over a base loaded 4-bit (NF4) or 8-bit (LLM.int8) through bitsandbytes.

Everything about the quantized base lives here, so train.py, predict.py and inference.py only call in:

- `add_flag` / `check_train_args`: the `--quantization_bit 4|8` flag and the combinations it allows (LoRA only; ZeRO
  stage 0-2; one line naming the flag otherwise);
- `bnb_config`: the BitsAndBytesConfig handed to transformers' `from_pretrained(quantization_config=...)`;
- `load_quantized`: the base loaded quantized on the device this process trains or answers on;
- `prepare_for_training`: PEFT's `prepare_model_for_kbit_training` (freezes the base, upcasts what is not quantized;
  gradient checkpointing stays with train.py's own switch);
- `storage_report` / `check_storage`: what was quantized, counted in bytes, and the proof that nothing was silently
  dequantized or left full size.

What stays unquantized (the established QLoRA practice, as in the QLoRA paper, PEFT and LLaMA-Factory): only the
nn.Linear layers of the transformer blocks are quantized (query_key_value, dense, dense_h_to_4h, dense_4h_to_h). The
word embedding and the norms are no Linear layers, so bitsandbytes never touches them; the LM head (`lm_head` of
ChatGLM-6B, `transformer.output_layer` of ChatGLM2/3 and GLM-4) is skipped (`llm_int8_skip_modules`) because its quantization
error would land on every logit and because our LMHead computes the loss in chunks straight from its fp weight;
the P-Tuning prefix encoder is skipped too (it is trained, in fp32).
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("chatglm")

BITS = (4, 8)
# Module names never quantized (matched by transformers from the start of the module's name, up to a dot).
# (transformers only replaces modules whose type is exactly nn.Linear, so our LMHead subclass would stay as it is
# anyway; naming it keeps it so should that rule change. check_storage verifies it after every set-up.)
SKIP_MODULES = ["lm_head", "transformer.output_layer", "transformer.prefix_encoder"]
HEAD_NAMES = ("lm_head", "output_layer")  # the LM head of ChatGLM-6B, and of ChatGLM2/3 and GLM-4
SUPPORTED = "--quantization_bit works with --train_type lora under ZeRO stage 0, 1 or 2 (e.g. ds_zero2_no_offload.json)"


# ------------------------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------------------------
def add_flag(group, what: str, off: bool = False) -> None:
    """--quantization_bit 4|8 (off: also 0, full precision, for a default that is not "unquantized")."""
    group.add_argument("--quantization_bit", type=int, choices=((0,) if off else ()) + BITS, default=None,
                       help=f"load the base quantized through bitsandbytes: 4 (NF4, double quantization) or 8 "
                            f"(LLM.int8); {what}")


def zero_stage(ds_file: str) -> int | None:
    """The ZeRO stage a DeepSpeed JSON asks for, or None when the file cannot be read (train.py reports that)."""
    from model.config import read_json

    try:
        return int(read_json(ds_file).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_train_args(parser, args) -> None:
    """Refuse, in one line before anything loads, the combinations QLoRA does not support.

    Only LoRA: the other train types would update (freeze, all) or sit beside (ptuning) base weights that are frozen
    4/8-bit integers. No ZeRO-3: it partitions every parameter into flat fp16/bf16 shards, which would cut a
    Params4bit's packed bytes apart from its quantization state (absmax, quant_map) and lose the int8 SCB scales."""
    if args.quantization_bit is None:
        return
    if args.train_type != "lora":
        parser.error(f"--quantization_bit {args.quantization_bit} trains LoRA adapters over a quantized base: "
                     f"use --train_type lora, not {args.train_type} ({SUPPORTED})")
    if zero_stage(args.ds_file) == 3:
        parser.error(f"--quantization_bit {args.quantization_bit} with ZeRO-3 ({args.ds_file}) is not supported: "
                     f"{SUPPORTED}")
    if importlib_missing("bitsandbytes"):
        parser.error(f"--quantization_bit {args.quantization_bit} needs bitsandbytes: {INSTALL}")


INSTALL = "pip install 'bitsandbytes>=0.50,<1'"


def importlib_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


def bitsandbytes_problem() -> str | None:
    """Why a quantized load cannot run here (bitsandbytes not installed, or its import fails), or None where it can.
    Imports bitsandbytes: for where a quantized load follows."""
    if importlib_missing("bitsandbytes"):
        return f"bitsandbytes is not installed ({INSTALL})"
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # a broken install: a missing native library, say
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"bitsandbytes fails to import ({first_line})"
    return None


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------
def bnb_config(bits: int, compute_dtype: torch.dtype):
    """4: NF4 with double quantization (the QLoRA paper's recipe), computing in `compute_dtype` (the training or
    inference precision: bf16 where the GPU has it, else fp16; fp32 on the CPU); 8: LLM.int8 with its default outlier
    threshold 6.0, weights kept int8 only (no fp16 copy)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(SKIP_MODULES))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
                                  llm_int8_skip_modules=list(SKIP_MODULES))
    raise ValueError(f"--quantization_bit {bits}: expected one of {BITS}")


def local_device() -> torch.device:
    """This process's device: the launcher's LOCAL_RANK GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def load_quantized(model_class, path: str, bits: int, dtype: torch.dtype, device=None, **kwargs):
    """`model_class.from_pretrained` (our strict loader) with the base quantized as it loads: each weight is quantized
    on `device` as it arrives, so the full-precision base never sits there whole."""
    device = torch.device(device) if device is not None else local_device()
    extra = {"device_map": {"": device}} if device.type == "cuda" else {}  # on the CPU: loaded (and quantized) there
    model = model_class.from_pretrained(path, dtype=dtype, quantization_config=bnb_config(bits, dtype), **extra,
                                        **kwargs)
    check_storage(model, bits)
    return model


def prepare_for_training(model):
    """PEFT's k-bit preparation: freezes the base and upcasts the unquantized fp16/bf16 weights (embedding, norms,
    biases, LM head) to fp32 for a stable loss; under mixed precision DeepSpeed casts them back to the training
    dtype at deepspeed.initialize, as for every train type. Gradient checkpointing is left to train.py
    (enable_activation_checkpointing: non-reentrant, the current transformers name), so peft's call of the
    deprecated gradient_checkpointing_enable never runs.

    bitsandbytes' Linear4bit, on a CPU with AVX512-BF16, repacks its weight into an inference-only layout the first
    time it runs in eval mode without gradients (Linear4bit.forward, `packing_format_for_cpu`), and only saving a
    checkpoint (its _save_to_state_dict) packs it back: a training step after an evaluation or the sample answers
    that no checkpoint followed failed with "a view of a leaf Variable that requires grad is being used in an
    in-place operation" (found by tests/test_option_pairs.py). Each layer unpacks its weight as saving does when it
    runs in training mode again; evaluation keeps bitsandbytes' fast layout (the numbers predict.py gets)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for _, layer in quantized_layers(model):
        layer.register_forward_pre_hook(_trainable_layout)
    return model


def _trainable_layout(layer, _inputs) -> None:
    """Before a training forward: the 4-bit weight back from bitsandbytes' CPU inference layout, if it was packed."""
    state = getattr(layer.weight, "quant_state", None)
    if layer.training and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


# ------------------------------------------------------------------------------------------------------------------
# what is stored quantized, in bytes
# ------------------------------------------------------------------------------------------------------------------
def quantized_layers(model):
    """(name, module) of every bitsandbytes Linear of the model (under a PEFT wrapper too)."""
    import bitsandbytes as bnb

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(weight) -> int:
    """Bytes of a Params4bit's quantization state (absmax, quant_map, and with double quantization the nested
    absmax / quant_map of the absmax), or of an Int8Params' row scales (SCB)."""
    parts = []
    state = getattr(weight, "quant_state", None)
    while state is not None:  # the nested state (state2) quantizes the absmax itself
        parts += [state.absmax, state.code]
        state = getattr(state, "state2", None)
    parts.append(getattr(weight, "SCB", None))
    return sum(tensor_bytes(part) for part in parts if isinstance(part, torch.Tensor))


def storage_report(model, bits: int) -> dict:
    """What the quantized base occupies: layers, weights (elements), bytes stored (packed weights + their
    quantization state) and what the same weights take in bf16."""
    layers = quantized_layers(model)
    elements = sum(module.in_features * module.out_features for _, module in layers)
    stored = sum(tensor_bytes(module.weight) + quant_state_bytes(module.weight) for _, module in layers)
    return {"bits": bits, "layers": len(layers), "weights": elements, "stored_bytes": stored,
            "bf16_bytes": 2 * elements}


def check_storage(model, bits: int) -> dict:
    """Raise unless the base is stored quantized as asked: every Linear of the blocks a bitsandbytes layer whose
    weight is packed (4-bit: Params4bit, uint8, half a byte a weight; 8-bit: Int8Params, int8, a byte a weight),
    and the LM head (our LMHead) left as it was. Catches a silent dequantization or upcast anywhere in set-up (e.g.
    a cast of the whole model, or a loader that drops the quantization config)."""
    import bitsandbytes as bnb

    from model.modeling_base import LMHead

    expected = {4: (bnb.nn.Params4bit, torch.uint8, 0.5), 8: (bnb.nn.Int8Params, torch.int8, 1.0)}[bits]
    problems = []
    heads = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in HEAD_NAMES]
    if not heads:
        problems.append(f"no LM head ({' or '.join(HEAD_NAMES)}) found")
    for name, module in heads:  # must stay unquantized: our LMHead (its chunked loss reads the weight), or
        # transformers' plain nn.Linear head (glm4-0414)
        if not isinstance(module, (LMHead, torch.nn.Linear)) or isinstance(module, (bnb.nn.Linear4bit,
                                                                                 bnb.nn.Linear8bitLt)) \
                or not module.weight.is_floating_point():
            problems.append(f"{name} (the LM head) is {type(module).__name__} {module.weight.dtype}, not an "
                            f"unquantized LMHead")
    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_NAMES:
            continue
        if not isinstance(module, torch.nn.Linear) or any(f".{skip}." in f".{name}." for skip in SKIP_MODULES):
            continue
        if ".lora_" in f".{name}":  # the adapters themselves, trained in full precision
            continue
        weight = module.weight
        kind, dtype, bytes_per_weight = expected
        full = module.in_features * module.out_features
        if not isinstance(weight, kind) or weight.dtype != dtype or tensor_bytes(weight) != full * bytes_per_weight:
            problems.append(f"{name}.weight is {type(weight).__name__} {str(weight.dtype).replace('torch.', '')} "
                            f"of {tensor_bytes(weight)} bytes, not {kind.__name__} of {int(full * bytes_per_weight)}")
    if problems:
        raise RuntimeError(f"--quantization_bit {bits}: the base is not stored quantized: {'; '.join(problems[:3])}")
    report = storage_report(model, bits)
    if not report["layers"]:
        raise RuntimeError(f"--quantization_bit {bits}: no layer of the base was quantized")
    return report


def describe(report: dict) -> str:
    return (f"quantized base: {report['layers']} linear layers in {report['bits']}-bit, {report['weights']} weights "
            f"stored in {report['stored_bytes']} bytes (bf16: {report['bf16_bytes']} bytes)")
