"""Small shared helpers: boolean flags, logging set-up, the precision names and rule, parameter counts.

Reading and batching training data lives in dataset.py; loading checkpoints for inference in inference.py."""
from __future__ import annotations

import argparse
import logging

import torch

# ------------------------------------------------------------------------------------------------------------------
# command line and logging
# ------------------------------------------------------------------------------------------------------------------
def str2bool(value) -> bool:
    """A real boolean flag: `--prefix_projection True` / `False` (also true/false/1/0/yes/no)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_bool_flag(group, flag: str, help: str, default: bool = False) -> None:
    """A boolean flag in both forms users write: bare `--flag` (True) and `--flag True` / `--flag False`."""
    group.add_argument(flag, type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=f"{help} (bare {flag} means True; default: %(default)s)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: the docstring's examples as written, and each flag's default after its help (as
    argparse.ArgumentDefaultsHelpFormatter does), except for required flags and defaults that are None or empty."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or action.required or action.default in (None, "", argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"



def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one voice in the console. Handlers a host process already put on the
    root logger (pytest's, a notebook's) stay; ours is added only where there is none. Library messages the user
    cannot act on stay out (`quiet_libraries`); our own warnings stay in."""
    level = logging.INFO if rank <= 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=level)
    logging.getLogger().setLevel(level)
    quiet_libraries()


# What libraries print that needs no action from a user of this tool, each with the reason it is noise.
QUIET_LOGGERS = {
    # peft imports bitsandbytes whenever it is installed (peft/helpers.py), QLoRA or not; on a CPU with AVX512-BF16
    # bitsandbytes then warns that the optional `kernels` package for its 4-bit CPU kernel is missing. Its errors
    # still show.
    "bitsandbytes": logging.ERROR,
}
QUIET_WARNINGS = {
    # peft reads the model's old `is_gradient_checkpointing` property; transformers deprecates it. Nothing of ours
    # to change (tests/conftest.py lists it among the library-internal deprecations too).
    "`is_gradient_checkpointing` is deprecated": FutureWarning,
    # DeepSpeed's ZeRO-3 gathers parameters and reduces gradients with the torch.distributed names torch now
    # deprecates, once per rank and run.
    "`torch.distributed.all_gather_into_tensor` is deprecated": FutureWarning,
    "`torch.distributed.reduce_scatter_tensor` is deprecated": FutureWarning,
}


def keep_bitsandbytes_out(quantization_bit: int | None, checkpoint_dir: str | None = None) -> None:
    """For the process of train.py, predict.py, merge_lora.py or web_demo.py, called first thing (before anything
    imports peft) with what it will load: its --quantization_bit (None where the flag is absent) and the checkpoint
    it loads on a base (predict.py / web_demo.py --model_path, merge_lora.py --model_dir). Unless that load quantizes
    (the flag, else a QLoRA adapter's recorded quantization_bit: inference.planned_quantization, the rule the
    loading follows), make bitsandbytes unimportable for this process (sys.modules[name] = None: `import` raises
    ImportError and importlib.util.find_spec answers None). peft imports bitsandbytes whenever it is installed
    (peft/helpers.py) and takes it as absent then: the seconds of its import and its notices are saved. A checkpoint
    that cannot be read leaves bitsandbytes importable: loading it reports the problem in one line. Not for a host
    process (pytest, a notebook): it may quantize later, and peft caches what it found."""
    import sys

    from inference import CheckpointError, planned_quantization  # here: inference imports this module

    try:
        bits, _ = planned_quantization(checkpoint_dir, quantization_bit)
    except CheckpointError:
        return
    if not bits:
        sys.modules.setdefault("bitsandbytes", None)


def quiet_libraries() -> None:
    """Keep the messages above out of the console: their loggers raised to ERROR, the warnings ignored by their exact
    message (so that every other warning, a deprecation in our own code included, still shows or fails a test)."""
    import re
    import warnings

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in QUIET_WARNINGS.items():
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


# ------------------------------------------------------------------------------------------------------------------
# precision and parameter counts
# ------------------------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)  # the choices of every --precision / --dtype flag; auto_precision says what auto is
_DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16}


def auto_precision(device_type: str) -> str:
    """What "auto" means for training and inference alike: fp32 on the CPU; bf16 on a GPU that has it, else fp16."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts; under ZeRO-3 a partitioned parameter reports its full size as ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
