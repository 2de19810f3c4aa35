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
                       help=f"{help} (bare {flag} means True; default {default})")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one voice in the console. Handlers a host process already put on the
    root logger (pytest's, a notebook's) stay; ours is added only where there is none."""
    level = logging.INFO if rank <= 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=level)
    logging.getLogger().setLevel(level)


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
