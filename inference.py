"""Loading what train.py or merge_lora.py wrote, or an official checkpoint, for generation: a full model, a LoRA
adapter on its base, or a P-Tuning prefix on its base, with one-line errors naming the directory or file."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from model.config import read_json
from utils import DTYPES, _DTYPE_NAMES, auto_precision

logger = logging.getLogger("chatglm")


# ------------------------------------------------------------------------------------------------------------------
# inference loading
# ------------------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the one-line message names the directory or file."""


def inference_device(device=None) -> "torch.device":
    """'cpu', 'cuda', 'cuda:N' or a bare GPU index ('0', 0) as a torch.device; None: the first GPU, else the CPU."""
    if device is None or device == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise CheckpointError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"--device {device!r}: no CUDA GPU is available on this machine (use --device cpu)")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise CheckpointError(f"--device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return resolved


def inference_dtype(dtype, device) -> "torch.dtype":
    """A torch dtype from None/'auto' (see auto_precision), a name (fp32, fp16, bf16) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return DTYPES[auto_precision(torch.device(device).type)]
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"dtype {dtype!r}: expected auto, fp32, fp16 or bf16") from None


def checkpoint_kind(model_path: str) -> str:
    """'lora' (a PEFT adapter), 'ptuning' (a prefix encoder) or 'full' (config.json + weights), by the files in it."""
    if not os.path.isdir(model_path):
        raise CheckpointError(f"{model_path}: no such checkpoint directory")
    names = set(os.listdir(model_path))
    if "adapter_config.json" in names:
        return "lora"
    if "prefix_encoder.safetensors" in names:
        return "ptuning"
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return "full"
    raise CheckpointError(f"{model_path}: neither a full model (config.json + *.safetensors), a LoRA adapter "
                          f"(adapter_config.json) nor a P-Tuning prefix (prefix_encoder.safetensors)")


def _base_of(mode: str, model_path: str, kind: str, base_model_path: str | None) -> str:
    """The base checkpoint under an adapter or prefix: the flag, else training_args.json, else adapter_config.json;
    checked to be a checkpoint directory of `mode`."""
    from model import check_checkpoint_dir

    where = "--base_model_path"
    base = base_model_path
    args_file = os.path.join(model_path, "training_args.json")
    if base is None and os.path.isfile(args_file):
        base, where = read_json(args_file, CheckpointError).get("model_name_or_path"), args_file
    adapter_file = os.path.join(model_path, "adapter_config.json")
    if base is None and kind == "lora":
        base, where = read_json(adapter_file, CheckpointError).get("base_model_name_or_path"), adapter_file
    if not base:
        raise CheckpointError(f"{model_path}: a {kind} checkpoint needs its base model: pass --base_model_path "
                              f"(no training_args.json names one)")
    if not os.path.isdir(base):
        raise CheckpointError(f"{model_path}: its base model {base} (from {where}) does not exist; "
                              f"pass --base_model_path")
    try:
        check_checkpoint_dir(base, mode)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_path}: base model from {where} is unusable: {e}") from None
    return base


def _load_prefix(model, model_path: str, config: dict) -> None:
    """Copy prefix_encoder.safetensors into the model's prefix encoder; every key and shape must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_file = os.path.join(model_path, "prefix_encoder.safetensors")
    try:
        saved = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: cannot be read ({e})") from None
    wanted = {name: param for name, param in model.named_parameters() if ".prefix_encoder." in f".{name}"}
    settings = f"pre_seq_len={config.get('pre_seq_len')}, prefix_projection={config.get('prefix_projection')}"
    if set(saved) != set(wanted):
        extra, missing = sorted(set(saved) - set(wanted)), sorted(set(wanted) - set(saved))
        raise CheckpointError(f"{weights_file}: its keys do not fit config.json ({settings}): "
                              f"unexpected {extra[:3]}, missing {missing[:3]}")
    for name, param in wanted.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{weights_file}: {name} has shape {tuple(saved[name].shape)}, but config.json "
                                  f"({settings}) needs {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(saved[name].to(param.dtype))


def check_adapter_loaded(peft_model, adapter_dir: str) -> None:
    """Fail unless every weight in the adapter file went into the model and every LoRA weight of the model came
    from it. peft only warns when the names do not match (an adapter of another model version), and would then
    answer with the untouched base."""
    from peft.utils import get_peft_model_state_dict

    weights_file = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as f:
            saved = set(f.keys())
    elif os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
        weights_file = os.path.join(adapter_dir, "adapter_model.bin")
        saved = set(torch.load(weights_file, map_location="cpu", weights_only=True))
    else:
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin)")
    # Only the LoRA matrices are compared (an adapter may also carry modules_to_save copies, which peft handles).
    saved = {key for key in saved if "lora_" in key}
    expected = {key for key in get_peft_model_state_dict(peft_model, save_embedding_layers=False) if "lora_" in key}
    if saved != expected:
        unexpected, missing = sorted(saved - expected), sorted(expected - saved)
        raise CheckpointError(f"{weights_file}: the adapter does not fit the base model: {len(unexpected)} weights "
                              f"match no module (e.g. {unexpected[:1]}), {len(missing)} LoRA weights are not in "
                              f"the file (e.g. {missing[:1]})")


def check_trained_mode(checkpoint_dir: str, mode: str) -> None:
    """A checkpoint train.py wrote records its --mode in training_args.json: it must be `mode`."""
    args_file = os.path.join(checkpoint_dir, "training_args.json")
    if os.path.isfile(args_file):
        trained_mode = read_json(args_file, CheckpointError).get("mode")
        if trained_mode and trained_mode != mode:
            raise CheckpointError(f"{args_file}: this checkpoint was trained with --mode {trained_mode}, "
                                  f"but --mode is {mode}")


def recorded_quantization_bit(checkpoint_dir: str) -> int | None:
    """The --quantization_bit a checkpoint was trained with (4 or 8: QLoRA), from the training_args.json train.py
    writes beside it; None when it records none (no record, or a run without quantization)."""
    import quantization

    args_file = os.path.join(checkpoint_dir, "training_args.json")
    if not os.path.isfile(args_file):
        return None
    bits = read_json(args_file, CheckpointError).get("quantization_bit")
    if bits is None:
        return None
    if bits not in quantization.BITS:
        raise CheckpointError(f"{args_file}: quantization_bit is {bits!r}, expected one of "
                              f"{', '.join(map(str, quantization.BITS))} or null")
    return bits


def choose_quantization(asked: int | None, trained: int | None) -> tuple[int | None, str]:
    """(bits to load the base in, or None for full precision; why, for the log). asked: --quantization_bit (None: as
    the checkpoint was trained; 0: full precision); trained: what its training_args.json records."""
    if asked is None:
        if trained:
            return trained, "as the adapter was trained (training_args.json); --quantization_bit 0 loads it unquantized"
        return None, ""
    if trained and asked != trained:
        return asked or None, f"--quantization_bit {asked}; the adapter was trained on a {trained}-bit base"
    return asked or None, "as the adapter was trained" if trained else ""


def planned_quantization(model_path: str | None, asked: int | None) -> tuple[int | None, str]:
    """(bits the base of `model_path` loads in, or None for full precision; why, for the log): --quantization_bit
    `asked`, else what a LoRA adapter records (choose_quantization). The rule load_for_inference follows, and that
    utils.keep_bitsandbytes_out reads before anything loads. model_path None: the flag alone."""
    trained = None
    if model_path is not None and checkpoint_kind(str(model_path)) == "lora":
        trained = recorded_quantization_bit(str(model_path))
    return choose_quantization(asked, trained)


def check_bitsandbytes(model_path: str, bits: int | None, asked: int | None) -> None:
    """A quantized load (`bits`; `asked`: --quantization_bit, None where the adapter's record decided) needs
    bitsandbytes: where it cannot be imported, one line that says so and how to load the base unquantized, instead
    of transformers' traceback."""
    import quantization

    problem = quantization.bitsandbytes_problem() if bits else None
    if problem:
        source = f"--quantization_bit {asked}" if asked else "as the adapter was trained, training_args.json"
        raise CheckpointError(f"{model_path}: the base loads {bits}-bit ({source}), but {problem}: install it, or "
                              f"pass --quantization_bit 0 to load the base unquantized")


def attach_lora(model, adapter_dir: str, where: str, **peft_kwargs):
    """The PEFT adapter in `adapter_dir` on top of `model` (not merged), every weight checked to fit; `where`
    starts the one-line error."""
    import warnings

    from peft import PeftModel

    from model.modeling_base import check_safetensors_headers

    try:
        check_safetensors_headers(adapter_dir)  # a truncated adapter file, named, not safetensors' bare message
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    try:
        with warnings.catch_warnings():  # names that fit no module: check_adapter_loaded says it in one line
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, **peft_kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: the adapter does not fit the base: {first_line}") from None
    check_adapter_loaded(peft_model, adapter_dir)
    return peft_model


@contextlib.contextmanager
def checkpoint_errors():
    """The model layer's own one-line errors for a bad directory or file (OSError, ValueError: a missing or
    truncated file, a tokenizer file of another version) as CheckpointError, which the scripts print in one line."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(spec, checkpoint_dir: str, base_dir: str):
    """The tokenizer saved with the checkpoint (train.py writes it), else the base's."""
    has_own = os.path.isfile(os.path.join(checkpoint_dir, spec.tokenizer_file))
    return spec.tokenizer.from_pretrained(checkpoint_dir if has_own else base_dir)


def load_for_inference(mode: str, model_path: str, base_model_path: str | None = None, device="cpu",
                       dtype=None, quantization_bit: int | None = None):
    """(model, tokenizer) ready to generate from a checkpoint directory train.py wrote, or an official one.

    - full model (freeze / all training, merge_lora.py output, official checkpoints): loaded as it is;
    - LoRA adapter (adapter_config.json): the base, with the adapter on top (a peft model, not merged);
    - P-Tuning prefix (prefix_encoder.safetensors + config.json): the base built with the saved pre_seq_len and
      prefix_projection, then the prefix weights.
    The base is `base_model_path`, else the training_args.json's model_name_or_path, else (LoRA) the
    adapter_config.json's base_model_name_or_path. dtype None: fp32 on the CPU, bf16 on a GPU that has it, else fp16.
    quantization_bit 4 or 8 loads the (base) model quantized through bitsandbytes (quantization.py), computing in
    dtype; an adapter or prefix on top stays in full precision. None (the default) loads a LoRA adapter on the base
    quantized as it was trained (its training_args.json's quantization_bit: QLoRA), anything else unquantized; 0
    loads the base unquantized in any case. The log line says which. The model comes back in eval mode on `device`.
    Problems raise CheckpointError with one line.
    """
    from model import MODE, UPSTREAM_MODES, check_checkpoint_dir
    from model import glm4_moe
    from model.glm4_0414 import with_chat

    if mode not in MODE:
        raise CheckpointError(f"--mode {mode!r}: expected one of {', '.join(sorted(MODE))}")
    spec = MODE[mode]
    model_path = str(model_path)
    kind = checkpoint_kind(model_path)
    check_trained_mode(model_path, mode)
    device = inference_device(device)
    dtype = inference_dtype(dtype, device)
    asked = quantization_bit
    quantization_bit, why = planned_quantization(model_path, asked)
    check_bitsandbytes(model_path, quantization_bit, asked)

    def load(path, **kwargs):
        if quantization_bit:
            import quantization
            return quantization.load_quantized(spec.model, path, quantization_bit, dtype, device, **kwargs)
        return spec.model.from_pretrained(path, dtype=dtype, **kwargs)

    with checkpoint_errors():
        if kind == "full":
            check_checkpoint_dir(model_path, mode)
            model = load(model_path)
            base = model_path
        elif kind == "ptuning":
            config = check_checkpoint_dir(model_path, mode)
            if not config.get("pre_seq_len"):
                raise CheckpointError(f"{os.path.join(model_path, 'config.json')}: prefix_encoder.safetensors is "
                                      f"here, but config.json sets no pre_seq_len")
            base = _base_of(mode, model_path, kind, base_model_path)
            model = load(base, pre_seq_len=config["pre_seq_len"],
                         prefix_projection=bool(config.get("prefix_projection")))
            _load_prefix(model, model_path, config)
        else:
            base = _base_of(mode, model_path, kind, base_model_path)
            model = attach_lora(load(base), model_path, f"{model_path} (on {base})")
        tokenizer = load_tokenizer(spec, model_path, base)
    if not quantization_bit:  # a quantized model was loaded onto the device already
        model = model.to(device)
    else:
        # Nothing of it trains here; and bitsandbytes' CPU inference kernel adds a bias in place, which autograd
        # refuses for a bias that requires grad when called outside inference_mode/no_grad.
        model.requires_grad_(False)
    model.eval()
    if mode in UPSTREAM_MODES:  # transformers' own class: chat() / stream_chat() in the checkpoint's chat format
        with_chat(model)
        glm4_moe.with_chat(model)  # GLM-4.5 / GLM-4.7-Flash classes
    quantized = f", base {quantization_bit}-bit" if quantization_bit else (", base not quantized" if why else "")
    logger.info("loaded %s checkpoint %s (%s, base %s) on %s as %s%s%s", mode, model_path, kind, base, device,
                str(dtype).replace("torch.", ""), quantized, f" ({why})" if why else "")
    return model, tokenizer
