"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B with DeepSpeed: freeze, LoRA, P-Tuning v2 or full training.

One GPU, several, or several machines (DeepSpeed's launcher and a hostfile):

    deepspeed train.py --train_path data/train.jsonl --model_name_or_path ChatGLM3-6B/ \\
        --mode glm3 --train_type lora --lora_dim 16 --lora_alpha 64 --lora_dropout 0.1 \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --max_len 1560 --max_src_len 1024 \\
        --learning_rate 1e-4 --weight_decay 0.1 --num_train_epochs 2 --warmup_ratio 0.1 \\
        --ds_file ds_zero2_no_offload.json --gradient_checkpointing --show_loss_step 10 --output_dir ./output-glm3

On a machine without a GPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus 1 train.py ...` (or plain `python train.py`
for one process). Checkpoints go to output_dir/epoch-E-step-S/; output_dir/latest links to the newest one.
"""
from __future__ import annotations

import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
import argparse
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, suppress

import numpy as np
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import dist_guard
import monitor
import packing
import preference
import quantization
import sequence_parallel
from model import MODE, UPSTREAM_MODES, check_checkpoint_dir, chat_template, template
from model import glm4_moe
from model.glm4_0414 import num_layers
from model.config import read_json, resolve_mode
from model.compat import enable_activation_checkpointing
from model.modeling_base import LMHead, check_safetensors_headers
from dataset import DataCollator, DataError, EpochBatches, EvalShard, InstructionDataset
from inference import CheckpointError, checkpoint_errors
from utils import (DTYPES, PRECISIONS, HelpFormatter, add_bool_flag, auto_precision, count_parameters, setup_logging,
                   str2bool)

logger = logging.getLogger("chatglm")
TRAIN_TYPES = ("freeze", "lora", "ptuning", "all")
HERE = os.path.dirname(os.path.abspath(__file__))
# Every Linear layer of a transformer block: attention in and out, MLP up and down (the same names in ChatGLM-6B's
# modeling_chatglm.py and in modeling_chatglm2.py for ChatGLM2/3 and GLM-4), LoRA's usual targets.
LORA_MODULES = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"
EPILOG = ("Every flag with its default and choices: docs/cli/train.md. The guide: docs/training.md (data: "
          "docs/data.md, tool calling: docs/tools.md).")
LATEST = "latest"  # output_dir/latest -> the newest checkpoint (point_latest)
# absolute in training_args.json
PATH_FLAGS = ("model_name_or_path", "train_path", "dev_path", "ds_file", "ref_model_path")
# What a resumed run must share with the run that wrote its checkpoint: the flags that decide which parameters train
# and which samples come in which order, and the precision (resolved: auto differs by GPU), whose DeepSpeed state
# does not load in another (a bf16 engine looks for bf16_zero_pp_rank_* files, an fp32 one saves zero_pp_rank_*).
# Epochs, --max_steps, the lr, logging and saving may change.
RESUME_FIXED = {
    "any": ("model_name_or_path", "mode", "train_type", "quantization_bit", "train_path", "max_len", "max_src_len",
            "is_skip", "last_turn_only", "group_by_length", "packing", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed", "world_size", "sequence_parallel_size", "precision", "stage",
            "pref_beta", "pref_label_smoothing", "ref_model_path"),
    "lora": ("lora_dim", "lora_alpha", "lora_module_name"),
    "ptuning": ("pre_seq_len", "prefix_projection"),
    "freeze": ("freeze_module_name",),
}


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (docs/cli/generate.py writes docs/cli/train.md from them); parse_args checks the values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=EPILOG)
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", required=True, help="official ChatGLM checkpoint directory")
    group.add_argument("--mode", default=None, choices=sorted(MODE),
                       help="GLM version: glm, glm2, glm3, glm4 or glm4-0414 (GLM-4-0414 / GLM-Z1; default: read "
                            "from the checkpoint's config.json, logged)")
    group.add_argument("--train_type", default="lora", choices=TRAIN_TYPES, help="what trains")
    group.add_argument("--freeze_module_name", default=None,
                       help="freeze: comma-separated name parts; only parameters containing one of them train "
                            "(default: the model's last four layers, from its config.json num_layers: "
                            "layers.27.,layers.26.,layers.25.,layers.24. on a 28-layer model)")
    group.add_argument("--lora_dim", type=int, default=8, help="lora: rank r")
    group.add_argument("--lora_alpha", type=int, default=30, help="lora: scaling alpha")
    group.add_argument("--lora_dropout", type=float, default=None,
                       help="lora: dropout on the LoRA input (default 0.1; glm4-moe* with --lora_experts: 0, PEFT's "
                            "LoRA on fused expert parameters takes none)")
    group.add_argument("--lora_module_name", default=None,
                       help="lora: comma-separated names of the Linear layers LoRA adapts (default: all four of "
                            f"every block, named alike in every ChatGLM mode: {LORA_MODULES}; glm4-0414: "
                            f"{UPSTREAM_LORA_TARGETS})")
    group.add_argument("--thinking", default="learn", choices=chat_template.THINKING_CHOICES,
                       help="glm4-0414 (GLM-Z1): the final answer's thinking (reasoning_content or <think>...</think>) "
                            "is learned (learn) or only context (mask)")
    glm4_moe.add_flags(group)
    group.add_argument("--pre_seq_len", type=int, default=16, help="ptuning: number of prefix tokens")
    add_bool_flag(group, "--prefix_projection", "ptuning: encode the prefix through a two-layer MLP")
    add_bool_flag(group, "--gradient_checkpointing", "recompute activations in backward (less memory)")
    group.add_argument("--checkpoint_every_n_layers", type=int, default=1,
                       help="with --gradient_checkpointing: checkpoint only every N-th layer (less recomputation, "
                            "more memory)")
    quantization.add_flag(group, "lora only (QLoRA), ZeRO stage 0-2")
    group.add_argument("--compile", type=str2bool, nargs="?", const=True, default=None, metavar="True|False",
                       help="torch.compile each block's norms, attention and MLP (faster steps on a GPU; the first "
                            "steps pay the compilation, shown in the progress bar; not with ZeRO-3). Default: on "
                            "where it works (CUDA with Triton and a C compiler, not ZeRO-3 or QLoRA), else off with "
                            "one log line; --compile False turns it off")

    group = parser.add_argument_group("data")
    group.add_argument("--train_path", required=True, help="training data: JSONL or JSON array")
    group.add_argument("--dev_path", default=None,
                       help="evaluation data; eval loss every --eval_step, at each epoch end and at the run's end")
    group.add_argument("--max_len", type=int, default=1024, help="longest sample in tokens")
    group.add_argument("--max_src_len", type=int, default=256,
                       help="longest prompt in tokens; longer prompts lose their oldest rounds first, never the "
                            "question being answered (see docs/data.md#truncation)")
    add_bool_flag(group, "--is_skip", "drop over-long samples instead of truncating")
    add_bool_flag(group, "--group_by_length",
                  "batch samples of similar length together (less padding; order still random)")
    add_bool_flag(group, "--last_turn_only",
                  "multi-turn data: learn only the last answer (otherwise every assistant turn)")
    packing.add_flag(group)

    group = parser.add_argument_group("optimisation")
    group.add_argument("--per_device_train_batch_size", type=int, default=1, help="micro-batch per GPU")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per step")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    group.add_argument("--weight_decay", type=float, default=0.1,
                       help="AdamW weight decay on weight matrices; 1-D parameters (norm weights, biases) get none")
    group.add_argument("--num_train_epochs", type=int, default=1, help="passes over the training data")
    group.add_argument("--max_steps", type=int, default=None,
                       help="the run's length in optimizer steps, in place of --num_train_epochs: the data repeats "
                            "in new epochs as needed, or the run ends inside an epoch (as HF Trainer's max_steps)")
    group.add_argument("--warmup_ratio", type=float, default=0.1,
                       help="share of the T optimizer steps warming up: W = ceil(ratio * T); step s (1-based) runs at "
                            "lr * min(s / W, (T + 1 - s) / (T - W)): linear up to the peak at step W, then linear "
                            "down, reaching 0 just after the last step")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 where the GPU supports it, else fp16; fp32 on CPU")
    group.add_argument("--seed", type=int, default=1234, help="random seed")

    group = parser.add_argument_group("run")
    group.add_argument("--ds_file", default="ds_zero2_no_offload.json",
                       help="DeepSpeed JSON (ZeRO, offload, clipping, optimizer); a shipped one's bare name works from "
                            "any directory. Its optimizer params are kept; lr and weight_decay come from the flags, "
                            "and what it leaves out or sets to \"auto\" is filled: type AdamW, betas [0.9, 0.95], "
                            "eps 1e-8")
    group.add_argument("--sequence_parallel_size", type=int, default=1,
                       help="split each sample's tokens over N ranks (DeepSpeed Ulysses; glm2/glm3/glm4, not "
                            "ptuning) for samples too long for one GPU; N must divide the ranks and the attention "
                            "heads; data parallel over ranks / N (see docs/training.md)")
    group.add_argument("--output_dir", required=True, help="where checkpoints and logs go")
    group.add_argument("--save_model_step", type=int, default=None, help="also save every N optimizer steps")
    group.add_argument("--save_total_limit", type=int, default=None,
                       help="keep only the newest N checkpoints in output_dir (default: keep all)")
    group.add_argument("--show_loss_step", type=int, default=10, help="log loss, lr, tokens/s every N steps")
    group.add_argument("--eval_step", type=int, default=None, help="evaluate on --dev_path every N steps")
    add_bool_flag(group, "--resume", "continue from the last checkpoint in output_dir")
    dist_guard.add_flag(group)
    group.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    monitor.add_flags(parser)
    preference.add_flags(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(parser, args, "model_name_or_path")
    check_mode_flags(parser, args)
    glm4_moe.check_flags(parser, args)
    args.ds_file = find_ds_file(parser, args.ds_file)
    if args.max_src_len >= args.max_len:
        parser.error(f"--max_src_len ({args.max_src_len}) must be smaller than --max_len ({args.max_len})")
    for flag in ("max_src_len", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                 "show_loss_step", "max_steps", "save_model_step", "save_total_limit", "eval_step", "pre_seq_len",
                 "lora_dim", "checkpoint_every_n_layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")
    if not 0 <= args.warmup_ratio <= 1:
        parser.error(f"--warmup_ratio must be between 0 and 1, got {args.warmup_ratio}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for flag in ("learning_rate", "lora_alpha"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag} must be above 0, got {getattr(args, flag)}")
    if not args.weight_decay >= 0:
        parser.error(f"--weight_decay must be at least 0, got {args.weight_decay}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.eval_step and not args.dev_path:
        parser.error("--eval_step evaluates on --dev_path: give one, or leave --eval_step out")
    if args.precision == "fp16" and not torch.cuda.is_available():
        parser.error("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has none): use bf16 or fp32")
    quantization.check_train_args(parser, args)
    packing.check_train_args(parser, args)
    monitor.check_flags(parser, args)
    sequence_parallel.check_flags(parser, args)
    preference.check_flags(parser, args)
    dist_guard.check_flag(parser, args)
    if args.compile and quantization.zero_stage(args.ds_file) == 3:
        # ZeRO-3 gathers each parameter in module hooks that torch.compile must not trace: the parts would fall
        # back to eager piece by piece, recompiling for every layer
        parser.error(f"--compile with ZeRO-3 ({args.ds_file}) is not supported: use a ZeRO-2 config such as "
                     f"ds_zero2_no_offload.json, or leave --compile off")
    if args.compile is None:  # the default: on where it works (compile_off_reason)
        args.compile = compile_off_reason(args) is None
    return args


# LoRA's default targets on transformers' Glm4ForCausalLM (GLM-4-0414's module names): attention and MLP.
UPSTREAM_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"


def check_mode_flags(parser, args) -> None:
    """What a mode's model supports, in one line each before anything loads; the mode's LoRA default targets.
    glm4-0414 runs on transformers' own Glm4ForCausalLM: it has no P-Tuning prefix, and neither our packed
    attention (cu_seqlens) nor our sequence-parallel attention hooks are wired into its attention."""
    upstream = args.mode in UPSTREAM_MODES
    if args.lora_module_name is None:
        args.lora_module_name = glm4_moe.LORA_MODULES.get(args.mode) or (
            UPSTREAM_LORA_TARGETS if upstream else LORA_MODULES)
    if not upstream:
        return
    if args.train_type == "ptuning":
        parser.error(f"--train_type ptuning is not supported for --mode {args.mode} (transformers' Glm4ForCausalLM "
                     f"has no prefix encoder): use lora, freeze or all")
    if args.packing:
        parser.error(f"--packing is not supported for --mode {args.mode} yet: leave it out")
    if args.sequence_parallel_size > 1:
        parser.error(f"--sequence_parallel_size is not supported for --mode {args.mode} yet: leave it at 1")


def compile_off_reason(args) -> str | None:
    """Why the default leaves --compile off here, or None where it compiles: on CUDA with Triton and a C compiler
    (inductor's GPU kernels and their launchers need both), not under ZeRO-3 (parse_args says why) and not with
    QLoRA (bitsandbytes' layers have not been measured compiled)."""
    import importlib.util

    if not torch.cuda.is_available():
        return "no GPU"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not any(shutil.which(name) for name in (os.environ.get("CC") or "cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH for Triton"
    if quantization.zero_stage(args.ds_file) == 3:
        return "ZeRO-3"
    if args.quantization_bit:
        return "QLoRA"
    return None


def find_ds_file(parser, ds_file: str) -> str:
    """--ds_file as given, or a shipped JSON (ds_zero2_no_offload.json ...) by its bare name from any directory;
    refused in one line unless it holds a JSON object."""
    if not os.path.exists(ds_file) and os.path.dirname(ds_file) == "" and os.path.isfile(os.path.join(HERE, ds_file)):
        ds_file = os.path.join(HERE, ds_file)
    if not os.path.isfile(ds_file):
        parser.error(f"--ds_file {ds_file}: no such file")
    try:
        read_json(ds_file)
    except ValueError as error:
        parser.error(f"--ds_file {error}")
    return ds_file


# ------------------------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------------------------
def check_inputs(args, world_size: int) -> str | None:
    """Before anything is loaded or written, in one line each: the checkpoint directory is one of --mode, the
    output directory is usable, and a --resume continues the run its checkpoint came from. Returns the checkpoint tag
    to resume from, or None."""
    with checkpoint_errors():
        check_checkpoint_dir(args.model_name_or_path, args.mode)
        check_safetensors_headers(args.model_name_or_path)
        if args.train_type == "freeze" and args.freeze_module_name is None:
            args.freeze_module_name = last_layers(MODE[args.mode].config.from_pretrained(args.model_name_or_path))
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise SystemExit(f"--output_dir {args.output_dir} is a file; choose a directory")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.resume:
        raise SystemExit(f"--output_dir {args.output_dir} exists and is not empty: pass --resume to continue "
                         f"it, or choose another directory")
    tag = last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if tag:
        check_resume(args, tag, world_size)
    return tag


def last_layers(config, count: int = 4) -> str:
    """The default --freeze_module_name: the name parts of the model's last `count` layers, from its config.json
    (layers.27.,layers.26.,layers.25.,layers.24. on ChatGLM-6B to ChatGLM3-6B; layers.39. ... on GLM-4-9B)."""
    layers = num_layers(config)
    return ",".join(f"layers.{i}." for i in range(layers - 1, max(layers - count, 0) - 1, -1))


def run_record(args, world_size: int) -> dict:
    """training_args.json: the flags, with the paths made absolute, --precision as it resolved (auto: what this
    machine chose), and the number of ranks."""
    paths = {flag: os.path.abspath(getattr(args, flag)) for flag in PATH_FLAGS if getattr(args, flag)}
    return {**vars(args), **paths, "precision": pick_precision(args.precision), "world_size": world_size}


def check_resume(args, tag: str, world_size: int) -> None:
    """--resume: the checkpoint must come from this run (RESUME_FIXED), and no later checkpoint name may be taken by
    a directory that is not a complete checkpoint (the resumed run would fail to save there after training)."""
    step = checkpoint_step(tag)
    later = sorted(name for name in os.listdir(args.output_dir) if (checkpoint_step(name) or 0) > step)
    if later:
        raise SystemExit(f"--resume: {os.path.join(args.output_dir, later[0])} is later than the last complete "
                         f"checkpoint {tag} but has no deepspeed/ state to resume from; move it out of --output_dir")
    missing = missing_resume_files(os.path.join(args.output_dir, tag, "deepspeed"), world_size,
                                   quantization.zero_stage(args.ds_file))
    if missing:
        raise SystemExit(f"--resume: {tag} lacks {missing}, which resuming needs (each rank's random state and "
                         f"DeepSpeed state): resume from an earlier checkpoint (move this one out of --output_dir)")
    record_file = os.path.join(args.output_dir, tag, "training_args.json")
    if not os.path.isfile(record_file):
        return
    try:
        before = read_json(record_file)
    except ValueError as error:
        raise SystemExit(f"--resume: {error}") from None
    now = run_record(args, world_size)
    for flag in RESUME_FIXED["any"] + RESUME_FIXED.get(args.train_type, ()):
        if flag in PATH_FLAGS and before.get(flag):  # older records: relative paths
            before[flag] = os.path.abspath(before[flag])
        if flag == "precision" and before.get(flag) == "auto":  # older records: what auto chose is not known
            continue
        if flag in before and before[flag] != now[flag]:
            what = "ranks" if flag == "world_size" else f"--{flag}"
            auto = " (--precision auto on this machine)" if flag == "precision" and args.precision == "auto" else ""
            raise SystemExit(f"--resume: {what} is {now[flag]!r}{auto}, but {tag} was trained with {before[flag]!r} "
                             f"({record_file}); resume with the same value, or train into a new --output_dir")


def missing_resume_files(state_dir: str, world_size: int, zero_stage: int) -> str | None:
    """The first file of a checkpoint's deepspeed/ that a resume on `world_size` ranks reads and is not there: each
    rank's random state (save_checkpoint's rng_rankR.pt) and DeepSpeed's files in its tag directory: the model states
    (ZeRO-3: one per rank) and, under ZeRO, each rank's optimizer partition ([bf16_]zero_pp_rank_R_mp_rank_00_...,
    engine._get_ckpt_name / _get_zero_ckpt_name)."""
    tag_dir = os.path.join(state_dir, "state")
    names = set(os.listdir(tag_dir)) if os.path.isdir(tag_dir) else set()
    for rank in range(world_size):
        rng = os.path.join(state_dir, f"rng_rank{rank}.pt")
        if not os.path.isfile(rng):
            return rng
        model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
        optim = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        for name, needed in ((model, [model]), (optim, [optim, "bf16_" + optim] if zero_stage else [])):
            if needed and not names & set(needed):
                return os.path.join(tag_dir, name)
    return None


def init_distributed(timeout_minutes: float | None = None):
    """One process without the launcher is a world of one; gloo where there is no GPU. Collectives wait
    `timeout_minutes` (--dist_timeout, dist_guard's default without it) for the other ranks."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = None if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=dist_guard.timeout(timeout_minutes))
    dist_guard.setup()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        unlink_shm_buffer()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def unlink_shm_buffer():
    """DeepSpeed's CPU all-reduce maps one 66 MB POSIX shared-memory buffer per rank (/dev/shm/
    deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) and never unlinks it, so every CPU run would leave its
    buffers in RAM until reboot. Every rank has mapped every peer's buffer once init_distributed returns (it waits for
    them), so after a barrier each rank unlinks its own name: the mappings live on until the processes end, even when
    they are killed."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    with suppress(FileNotFoundError):  # no buffer: not all ranks local, or DeepSpeed's op not built
        os.unlink(name)


def pick_precision(choice: str) -> str:
    return choice if choice != "auto" else auto_precision("cuda" if torch.cuda.is_available() else "cpu")


OPTIMIZER_DEFAULTS = {"betas": [0.9, 0.95], "eps": 1e-8}  # where the DeepSpeed JSON leaves them out or "auto"


def fill_ds_config(args, world_size: int) -> dict:
    """The one place flags reach the DeepSpeed JSON: batch keys, optimizer lr and weight decay, precision. The JSON
    keeps what it owns (ZeRO stage, offload, clipping, the optimizer's type, betas, eps ...: OPTIMIZER_DEFAULTS only
    where it leaves them out or says "auto"); the lr schedule is train.py's own (`lr_factor`), so a "scheduler" in
    the JSON is dropped."""
    config = read_json(args.ds_file)  # checked in parse_args
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    config["steps_per_print"] = 10 ** 9  # our own logging line instead
    precision = pick_precision(args.precision)
    config["fp16"] = {**config.get("fp16", {}), "enabled": precision == "fp16"}
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    optimizer = config.setdefault("optimizer", {})
    if optimizer.get("type", "auto") == "auto":
        optimizer["type"] = "AdamW"
    params = optimizer.setdefault("params", {})
    # the flags own the lr (the schedule's peak) and weight decay (parameter_groups); the rest is the JSON's
    params.update(lr=args.learning_rate, weight_decay=args.weight_decay)
    for key, default in OPTIMIZER_DEFAULTS.items():
        if params.get(key, "auto") == "auto":
            params[key] = default
    if config.pop("scheduler", None):
        logger.info("%s: its \"scheduler\" is replaced by the --warmup_ratio schedule", args.ds_file)
    zero = config.get("zero_optimization", {})
    for key in ("offload_param", "offload_optimizer"):  # JSONs written for HF's Trainer say "auto": no offload here
        if zero.get(key, {}).get("device") == "auto":
            zero[key]["device"] = "none"
    return config


def build_model(args, ds_config):
    """Load the checkpoint (under deepspeed.zero.Init for ZeRO-3) and decide what trains."""
    dtype = DTYPES[pick_precision(args.precision)]
    extra = {"pre_seq_len": args.pre_seq_len, "prefix_projection": args.prefix_projection} \
        if args.train_type == "ptuning" else {}
    zero3_context = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        # Lets from_pretrained build the model under deepspeed.zero.Init: each rank only holds its shard.
        from transformers.integrations import HfDeepSpeedConfig
        zero3_context = HfDeepSpeedConfig(ds_config)  # must stay alive while loading
    with checkpoint_errors():
        if args.quantization_bit:  # QLoRA (ZeRO-3 was refused in parse_args)
            model = quantization.prepare_for_training(quantization.load_quantized(
                MODE[args.mode].model, args.model_name_or_path, args.quantization_bit, dtype))
        else:
            model = MODE[args.mode].model.from_pretrained(args.model_name_or_path, dtype=dtype, **extra)
    del zero3_context
    return apply_train_type(model, args)


def apply_train_type(model, args):
    """Decide what trains (freeze: parameters whose name contains one of --freeze_module_name; lora: PEFT adapters;
    ptuning: the prefix encoder; all: everything) and switch on gradient checkpointing."""
    if args.train_type == "lora":
        from peft import LoraConfig, get_peft_model
        targets = [name.strip() for name in args.lora_module_name.split(",") if name.strip()]
        heads = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LMHead)}
        if set(targets) & heads:
            # the loss is computed inside the LM head's own forward (LMHead), which a LoRA wrapper replaces
            raise SystemExit(f"--lora_module_name: LoRA on the LM head ({', '.join(sorted(set(targets) & heads))}) "
                             f"is not supported; train it with --train_type freeze or all")
        try:
            model = get_peft_model(model, LoraConfig(r=args.lora_dim, lora_alpha=args.lora_alpha,
                                                     lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                                                     target_modules=targets, **glm4_moe.lora_options(args)))
        except ValueError as e:  # e.g. a module name that matches nothing
            raise SystemExit(f"--lora_module_name {args.lora_module_name!r}: {str(e).splitlines()[0]}") from None
    else:
        freeze = args.freeze_module_name or last_layers(model.config)  # set by check_inputs in train.py's runs
        keep = {"freeze": freeze.split(","), "ptuning": ["prefix_encoder."], "all": [""]}
        names = [name for name in keep[args.train_type] if name or args.train_type == "all"]
        # every name of a shared parameter counts (ChatGLM-6B's lm_head.weight is transformer.word_embeddings.weight)
        chosen = {id(param) for name, param in model.named_parameters(remove_duplicate=False)
                  if any(part in name for part in names)}
        for param in model.parameters():
            param.requires_grad = id(param) in chosen
        glm4_moe.freeze_router(model, args)
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit(f"--freeze_module_name {freeze!r} matches no parameter of the model")
    if args.gradient_checkpointing:
        # also makes the embeddings' output require grad, so a frozen base still back-propagates into LoRA/prefix
        enable_activation_checkpointing(model, args.checkpoint_every_n_layers)
        model.config.use_cache = False
    if args.compile:
        logger.info("--compile: the norms, attention and MLP of %d blocks compile in the first steps",
                    compile_blocks(model))
    elif compile_off_reason(args):
        logger.info("torch.compile off (%s): eager steps", compile_off_reason(args))
    trainable, total = count_parameters(model)
    logger.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
                100 * trainable / total)
    return model


def compile_blocks(model) -> int:
    """torch.compile the parts of every transformer block in place (nn.Module.compile on its norms, attention and MLP,
    LoRA layers included), as litgpt and torchtune compile per layer: the blocks share one class and one shape, so
    one compiled graph serves them all. The parts, not the block: gradient checkpointing wraps the block's forward
    (GradientCheckpointingLayer), and the parts run compiled inside it, in the recomputation too. Returns the
    number of blocks."""
    blocks = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for block in blocks:
        for part in block.children():
            part.compile()
    return len(blocks)


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process: Dynamo's tracing with the forward's compilation, and the
    backward's, which inductor compiles at the first backward (torch's own timers; 0 where a release lacks them)."""
    from torch._dynamo import utils as dynamo_utils

    metrics = getattr(dynamo_utils, "compilation_time_metrics", {})
    return sum(sum(metrics.get(key, ())) for key in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))


def build_engine(model, ds_config, args, total_steps: int):
    """deepspeed.initialize on the model build_model made, left in training mode (bench/bench.py measures this)."""
    import deepspeed

    size_buckets(ds_config, model)
    check_host_memory(ds_config, model, args.ds_file)
    factor = lr_factor(total_steps, warmup_steps(args, total_steps))
    sequence_parallel.install(model, args)
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and args.mode in glm4_moe.MODES:
        logger.info("ZeRO-3: %s are leaf modules (parameters gathered per MoE block)",
                    ", ".join(glm4_moe.set_zero3_leaf_modules(model)))
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=parameter_groups(model, args.weight_decay),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
    # from_pretrained returns the model in eval mode: without this, dropout (LoRA, P-Tuning) would be off and
    # gradient checkpointing (which only checkpoints in training mode) would do nothing.
    engine.train()
    engine.upstream_loss = args.mode in UPSTREAM_MODES  # batch_loss: transformers' own loss interface
    engine.router_aux = glm4_moe.RouterAuxLoss.for_model(engine.module, args.mode)  # None without an aux loss
    if args.quantization_bit:  # still quantized after DeepSpeed's casts and moves
        logger.info(quantization.describe(quantization.check_storage(engine.module, args.quantization_bit)))
        if args.mode in glm4_moe.MODES:
            logger.info(glm4_moe.quantization_note(engine.module))
    return engine


def restart_schedule(engine, step: int) -> None:
    """--resume: the lr schedule built from this run's flags (its --learning_rate and T, build_engine's LambdaLR), at
    `step` steps done. The checkpoint's optimizer state brought back the old run's lr (and initial_lr) into the
    param groups; the scheduler state, not loaded, would have brought its base_lrs and T too."""
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    scheduler._last_lr = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler._last_lr):
        group["initial_lr"], group["lr"] = base, lr


def offloaded_host_bytes(ds_config: dict, model) -> int:
    """The least host memory this node's ranks pin for what the DeepSpeed JSON offloads to the CPU: per trainable
    parameter its fp32 master copy, two Adam moments and fp32 gradient (16 bytes, of the offloaded "ratio" of them:
    ZeRO-3's partial offload); per parameter its 16-bit copy with offload_param. ZeRO spreads both over all ranks.
    Measured on an H100 machine (ChatGLM3-6B, bench/RESULTS.md), the peak RSS was this plus 25 to 31 GiB."""
    zero = ds_config.get("zero_optimization", {})
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    offload_param = (zero.get("offload_param") or {}).get("device") == "cpu"
    if not (offload_optimizer or offload_param):
        return 0
    trainable, parameters = count_parameters(model)
    total = 0
    if offload_optimizer:
        total += 16 * float(zero["offload_optimizer"].get("ratio", 1.0)) * trainable
    if offload_param:
        total += 2 * parameters
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(total * local_ranks / torch.distributed.get_world_size())


def check_host_memory(ds_config: dict, model, ds_file: str) -> None:
    """Refuse to start, in one line, when this node cannot hold even the state the JSON offloads: the kernel would
    otherwise kill the run minutes later, after loading, with no message."""
    import psutil  # a dependency of DeepSpeed

    need = offloaded_host_bytes(ds_config, model)
    if not need:
        return
    available = psutil.virtual_memory().available
    if need > available:
        raise SystemExit(f"--ds_file {ds_file}: what it offloads to the CPU needs at least {need / 2 ** 30:.1f} GiB of "
                         f"this node's memory and {available / 2 ** 30:.1f} GiB is available: keep part of the "
                         f'optimizer state on the GPU (ZeRO-3: "ratio" below 1 in offload_optimizer), offload less, '
                         f"or use more nodes")
    if torch.distributed.get_rank() == 0:
        logger.info("offloaded to the CPU: at least %.1f GiB of this node's memory (%.1f GiB available)",
                    need / 2 ** 30, available / 2 ** 30)


DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket, in elements


def size_buckets(ds_config: dict, model) -> None:
    """Fill ZeRO's "auto" (or absent) bucket sizes: no larger than the trainable parameters, at most DeepSpeed's
    default. ZeRO-2 allocates its gradient reduce buckets at full size on every backward (two with overlap_comm): the
    default 5e8 elements are 1.9 GiB in bf16, against the ~15M gradients of a LoRA run. A bucket still holds the
    largest gradient, as DeepSpeed needs. (DeepSpeed itself reads any other "auto" as its default.)"""
    zero = ds_config.get("zero_optimization", {})
    trainable, _ = count_parameters(model)
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = max(1, min(DEEPSPEED_BUCKET, trainable))


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices (and embeddings) only; 1-D parameters
    (LayerNorm/RMSNorm weights, biases) are not decayed, as in HF Trainer, DeepSpeed-Chat and litgpt. Under ZeRO-3
    a partitioned parameter keeps its real shape in ds_shape."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_steps(args, total_steps: int) -> int:
    return math.ceil(args.warmup_ratio * total_steps)


def lr_factor(total_steps: int, warmup: int):
    """The share of the peak lr at each optimizer step, as torch's LambdaLR wants it (called with the number of steps
    already taken, so the step about to run is s = done + 1, counted from 1): min(s / W, (T + 1 - s) / (T - W)).
    Linear warmup from peak / W at step 1 to the peak at step W, then linear decay from the peak at step W + 1 to
    peak / (T - W) at the last step T (0 would be reached at step T + 1): no step runs at lr 0."""
    def factor(done: int) -> float:
        s = done + 1
        rising = s / warmup if warmup else math.inf
        falling = (total_steps + 1 - s) / (total_steps - warmup) if total_steps > warmup else math.inf
        return max(0.0, min(rising, falling))
    return factor


def build_data(args, tokenizer):
    """Training and dev sets, labelled alike (the dev loss measures what training learns)."""
    shortest = template.template_length(tokenizer, args.mode)
    if args.max_src_len <= shortest:
        raise SystemExit(f"--max_src_len {args.max_src_len} leaves no room for a question: the {args.mode} prompt "
                         f"template alone takes {shortest} tokens")

    def load(path):
        if args.stage != "sft":  # pairs of answers (preference.py)
            return preference.PreferenceDataset(path, tokenizer, args.mode, args.max_len, args.max_src_len)
        return InstructionDataset(path, tokenizer, args.mode, args.max_len, args.max_src_len, args.is_skip,
                                  learn_all_turns=not args.last_turn_only, thinking=args.thinking)
    train_set = load(args.train_path)
    if args.packing:  # evaluation stays unpacked: its loss is the same either way
        train_set = packing.PackedDataset(train_set, args.max_len)
    return train_set, load(args.dev_path) if args.dev_path else None


def make_loader(dataset, args, rank, world_size, shuffle, pad_token_id):
    """Training (shuffle=True): this rank's micro-batches in a new order every epoch, every sample once an epoch
    (dataset.EpochBatches: the last batch may be smaller, or empty on some ranks). Evaluation: this rank's
    EvalShard, every sample once over all ranks."""
    from torch.utils.data import DataLoader

    packed = isinstance(dataset, packing.PackedDataset)
    collate = packing.PackedCollator(pad_token_id) if packed else DataCollator(pad_token_id)
    if isinstance(dataset, preference.PreferenceDataset):
        collate = preference.PairCollator(pad_token_id)
    # Pinned batches reach the GPU without a stream sync (a copy from pageable memory waits for the device's queue).
    pin_memory = torch.cuda.is_available()
    if not shuffle:
        return DataLoader(EvalShard(dataset, rank, world_size), batch_size=args.per_device_train_batch_size,
                          shuffle=False, collate_fn=collate, pin_memory=pin_memory)
    lengths = [len(item["input_ids"]) for item in (dataset.rows if packed else dataset.examples)]
    batches = EpochBatches(lengths, args.per_device_train_batch_size, world_size, rank, seed=args.seed,
                           group_by_length=args.group_by_length)
    # Its own generator: iter() draws a base seed from it, not from the global one, whose state a checkpoint
    # restores (dropout draws from that), so resuming at any point replays the same random numbers.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                      generator=torch.Generator().manual_seed(args.seed), pin_memory=pin_memory)


def reference_model(args):
    """--ref_model_path: DPO's reference, loaded whole on each rank in the run's precision for one pass over the data
    (each rank scores only its share, so no collective is needed)."""
    with checkpoint_errors():
        check_checkpoint_dir(args.ref_model_path, args.mode)
        return MODE[args.mode].model.from_pretrained(args.ref_model_path,
                                                     dtype=DTYPES[pick_precision(args.precision)])


def reference_loaders(args, train_set, dev_set, rank, world_size, pad_token_id) -> dict:
    """Every pair of the training and dev sets once over all ranks (evaluation shards), for DPO's precomputed
    reference: {split: (loader, pairs)}."""
    sets = {"train": train_set, "dev": dev_set} if dev_set else {"train": train_set}
    return {split: (make_loader(data, args, rank, world_size, False, pad_token_id), len(data))
            for split, data in sets.items()}


# ------------------------------------------------------------------------------------------------------------------
# one optimizer step
# ------------------------------------------------------------------------------------------------------------------
def real_tokens(batch, pad_token_id: int) -> int:
    """Tokens of a right-padded host batch that are not padding."""
    return int((batch["input_ids"] != pad_token_id).sum())


def labelled_tokens(batch) -> int:
    """Tokens that carry a label (each position predicts the next token's label), counted on the host. A
    sequence-parallel slice brings its labels already shifted (shift_labels)."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != template.IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != template.IGNORE_INDEX).sum())


def batch_loss(engine, batch, train: bool = False):
    """Summed loss of a host batch. Labels stay on the host: the loss finds the labelled positions there without
    waiting for the device. Packed rows (packing.py) bring their position_ids and cu_seqlens; a sequence-parallel
    slice its position_ids and shift_labels."""
    inputs = {name: batch[name].to(engine.device, non_blocking=True)
              for name in ("input_ids", "position_ids", "cu_seqlens") if name in batch}
    if train and getattr(engine, "router_aux", None):  # MoE with an auxiliary loss in its config (glm4_moe)
        return engine.router_aux.loss(engine, inputs, batch["labels"], labelled_tokens(batch))
    if getattr(engine, "upstream_loss", False):
        # transformers' own causal-LM loss (ForCausalLMLoss): given num_items_in_batch it sums, then divides by it
        return engine(**inputs, labels=batch["labels"], num_items_in_batch=1).loss
    return engine(**inputs, labels=batch.get("labels"), shift_labels=batch.get("shift_labels"), reduction="sum").loss


class TokenLoss:
    """Supervised fine-tuning's objective: the summed cross-entropy of a batch's labelled tokens, a step's mean taken
    over its tokens. preference.PreferenceObjective has the same interface (units: pairs)."""

    names = ()  # the metrics it logs beside the loss
    units = staticmethod(labelled_tokens)

    @staticmethod
    def loss(engine, batch, split: str = "train"):
        return (batch_loss(engine, batch, train=split == "train"),
                torch.zeros(0, dtype=torch.float64, device=engine.device))

    @staticmethod
    def describe(sums, units: float) -> dict:
        return {}

    @staticmethod
    def state() -> dict:  # nothing of its own for a checkpoint to keep
        return {}


def train_step(engine, window, world_size: int, objective):
    """One optimizer step over the accumulation window (a list of micro-batches on the host).

    The gradient is the mean over every labelled token of the window on all ranks, so long and short answers
    weigh per token. The window is --gradient_accumulation_steps micro-batches, or fewer at an epoch's end (every
    sample trains, dataset.EpochBatches): its last micro-batch is marked as DeepSpeed's accumulation boundary, so
    the optimizer steps there however long the window is. Returns (summed loss of this rank, labelled tokens of
    all ranks), both on the device: nothing is read back to the host here. A window without a labelled token on
    any rank (answers truncated away, say) contributes a zero gradient rather than 0 / 0: the optimizer step still
    runs, so the schedule and the step count stay on plan (AdamW's momentum and weight decay move the weights that step, as on any other). With
    sequence parallelism too: each labelled token lives on one rank, and DeepSpeed averages the gradients over all
    ranks (sequence_parallel.py says why it gets no mpu)."""
    # torch.full writes the count with a kernel; torch.tensor would copy it from pageable memory (a stream sync).
    tokens = torch.full((), float(sum(objective.units(b) for b in window)), device=engine.device)
    torch.distributed.all_reduce(tokens)
    loss_total = torch.zeros(1 + len(objective.names), dtype=torch.float64, device=engine.device)
    for index, batch in enumerate(window):
        # set before the forward (DeepSpeed's set_gradient_accumulation_boundary): ZeRO reduces the gradients and
        # the optimizer steps after the window's last micro-batch, not after every --gradient_accumulation_steps
        engine.set_gradient_accumulation_boundary(index == len(window) - 1)
        loss_sum, stats = objective.loss(engine, batch)
        # DeepSpeed divides by its accumulation steps (the flag's, whatever the window's length) and averages over
        # ranks; undo both.
        engine.backward(loss_sum * (engine.gradient_accumulation_steps() * world_size) / tokens.clamp(min=1))
        engine.step()
        loss_total += torch.cat([loss_sum.detach().double().reshape(1), stats])
    return loss_total, tokens


# ------------------------------------------------------------------------------------------------------------------
# evaluation and saving
# ------------------------------------------------------------------------------------------------------------------
def evaluate(engine, loader, objective) -> tuple[float, dict]:
    """Mean loss per labelled token (per pair in preference training) over the whole dev set (all ranks), and the
    objective's metrics."""
    engine.eval()
    total = torch.zeros(2 + len(objective.names), dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for batch in loader:
            loss_sum, stats = objective.loss(engine, batch, "dev")
            total[0] += loss_sum.double()
            total[1] += objective.units(batch)
            total[2:] += stats
    torch.distributed.all_reduce(total)
    engine.train()
    loss, units, *sums = total.tolist()
    return loss / max(units, 1), objective.describe(sums, units)


def gathered_state_dict(engine, only_trainable: bool) -> dict:
    """Full weights on rank 0, gathered one parameter at a time under ZeRO-3 so the host never holds more than the
    16-bit model."""
    import deepspeed

    state = {}
    for name, param in engine.module.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if torch.distributed.get_rank() == 0:
                state[name] = param.detach().cpu().clone()
    return state


def save_checkpoint(engine, tokenizer, args, tag: str, resume_state: dict):
    """Write output_dir/<tag>/ under a temporary name and rename it once complete (model.export's `begin_staging` /
    `publish`): an interrupted save never leaves a directory that looks whole. Holds the model in the form predict.py
    loads (LoRA adapter, P-Tuning prefix, or for freeze/all the base directory with the new weights:
    `model.export.write_full_checkpoint`) plus DeepSpeed's resumable state. Its barriers are dist_guard's: the ranks
    meet here after rank 0's sample answers and wait here while rank 0 writes, and one that never comes is named."""
    from safetensors.torch import save_file

    from model.export import begin_staging, publish, staging_path, write_full_checkpoint

    rank = torch.distributed.get_rank()
    final = os.path.join(args.output_dir, tag)
    staging = begin_staging(final) if rank == 0 else staging_path(final)
    dist_guard.barrier()
    state = gathered_state_dict(engine, only_trainable=args.train_type in ("lora", "ptuning"))
    if rank == 0:
        model = engine.module
        if args.train_type == "lora":
            # modules kept whole in the adapter (--train_router: the MoE router) save their buffers too
            state.update({name: buffer.detach().cpu().clone() for name, buffer in model.named_buffers()
                          if ".modules_to_save." in name})
            model.save_pretrained(staging, state_dict=state)
            tokenizer.save_pretrained(staging)
        elif args.train_type == "ptuning":
            model.config.save_pretrained(staging)
            save_file({k: v.contiguous() for k, v in state.items()},
                      os.path.join(staging, "prefix_encoder.safetensors"))
            tokenizer.save_pretrained(staging)
        else:  # the base's files (tokenizer included) with the new weights in the base's dtype
            write_full_checkpoint(glm4_moe.shipped_names(model, state), args.model_name_or_path, staging,
                                  tied=model.all_tied_weights_keys)
        with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
            json.dump(run_record(args, torch.distributed.get_world_size()), f, indent=2)
    dist_guard.barrier()
    engine.save_checkpoint(os.path.join(staging, "deepspeed"), tag="state", client_state=resume_state,
                           exclude_frozen_parameters=args.train_type != "all")
    torch.save(rng_state(), os.path.join(staging, "deepspeed", f"rng_rank{rank}.pt"))
    dist_guard.barrier()
    if rank == 0:
        publish(staging, final)
        point_latest(args.output_dir, tag)
        logger.info("saved %s (%s points to it)", final, os.path.join(args.output_dir, LATEST))
        if args.save_total_limit:
            prune_checkpoints(args.output_dir, args.save_total_limit, keep=tag)
    dist_guard.barrier()
    return final


def point_latest(output_dir: str, tag: str) -> None:
    """output_dir/latest: a relative symbolic link to the checkpoint just written, replaced atomically (a new link
    under a temporary name, renamed over the old one), so `--model_path output_dir/latest` always names the newest
    complete checkpoint (the one --resume continues from; --save_total_limit never deletes it)."""
    link = os.path.join(output_dir, LATEST)
    staging = os.path.join(output_dir, f".tmp-{LATEST}-{os.getpid()}")
    try:
        with suppress(FileNotFoundError):
            os.remove(staging)
        os.symlink(tag, staging)
        os.replace(staging, link)
    except OSError as error:  # a file system without symbolic links: the checkpoint itself is complete
        logger.warning("could not point %s at %s (%s); the newest checkpoint is the one with the highest step",
                       link, tag, error)


def checkpoint_step(name: str) -> int | None:
    """S of a checkpoint directory name epoch-E-step-S, else None."""
    step = name.rsplit("-", 1)[1] if name.startswith("epoch-") and "-step-" in name else ""
    return int(step) if step.isdigit() else None


def checkpoint_tags(output_dir) -> list[str]:
    """The complete checkpoints (epoch-E-step-S with DeepSpeed state) in output_dir, oldest step first."""
    tags = [d for d in os.listdir(output_dir) if checkpoint_step(d) is not None and
            os.path.isdir(os.path.join(output_dir, d, "deepspeed"))]
    return sorted(tags, key=checkpoint_step)


def prune_checkpoints(output_dir, limit: int, keep: str) -> None:
    """--save_total_limit: delete all but the newest `limit` checkpoints; `keep` (the one just written) never goes."""
    tags = [tag for tag in checkpoint_tags(output_dir) if tag != keep]
    for tag in tags[:max(len(tags) - (limit - 1), 0)]:
        shutil.rmtree(os.path.join(output_dir, tag))
        logger.info("removed %s (--save_total_limit %d)", os.path.join(output_dir, tag), limit)


def log_eval(engine, loader, writer, step, where, log_file, objective):
    dev_loss, metrics = evaluate(engine, loader, objective)
    logger.info("%s | eval loss %.4f%s", where, dev_loss, "".join(f" | {k} {v:.4f}" for k, v in metrics.items()))
    if writer:
        for name, value in {"loss": dev_loss, **metrics}.items():
            writer.add_scalar(f"eval/{name}", value, step)
        append_jsonl(log_file, {"step": step, "eval_loss": dev_loss, **{f"eval_{k}": v for k, v in metrics.items()}})


RUN_RECORDS = ("train_log.jsonl", "samples.jsonl")  # the run's JSON Lines records (monitor.py writes samples.jsonl)


def record_step(line: str) -> int | None:
    """The "step" of one line of RUN_RECORDS; None for a line that is not a whole record (cut by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) else None


def drop_records_after(output_dir: str, step: int) -> None:
    """--resume from the checkpoint of `step`: the lines of RUN_RECORDS that the interrupted run wrote after it (its
    later steps and evaluations, whose checkpoints are gone) are dropped, so that the resumed run continues the
    records from `step` instead of logging those steps a second time. What was logged at `step` itself stays: its
    evaluation and sample answers came before its checkpoint. Each file is replaced whole (atomic_write_text): a
    crash leaves the old file or the new one, never half of either."""
    from model.export import atomic_write_text
    from model.textfile import read_text

    for name in RUN_RECORDS:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            continue
        lines = [line for line in read_text(path).splitlines() if line.strip()]
        kept = [line for line in lines if (logged := record_step(line)) is not None and logged <= step]
        if len(kept) < len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))
            logger.info("%s: %d records after step %d dropped (the run resumes at step %d)", path,
                        len(lines) - len(kept), step, step)


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint(output_dir):
    """The tag of the checkpoint with the highest step in output_dir, or None."""
    tags = checkpoint_tags(output_dir)
    return tags[-1] if tags else None


class StepClock:
    """Wall time spent in training steps only: evaluation and saving run `paused` (the device is synchronised first,
    so that step work still queued is not billed to them)."""

    def __init__(self):
        self.seconds, self.since = 0.0, time.perf_counter()

    @contextmanager
    def paused(self):
        from deepspeed.accelerator import get_accelerator
        get_accelerator().synchronize()
        self.seconds += time.perf_counter() - self.since
        yield
        self.since = time.perf_counter()

    def lap(self) -> float:
        """Step seconds since the last lap (call after the host has waited for the device, as reading a loss does)."""
        now = time.perf_counter()
        seconds, self.seconds, self.since = self.seconds + now - self.since, 0.0, now
        return seconds


# ------------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------------
def train(args):
    rank, world_size = init_distributed(args.dist_timeout)
    setup_logging(rank)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    resume_tag = check_inputs(args, world_size)
    torch.distributed.barrier()  # every rank has looked before anything is written
    os.makedirs(args.output_dir, exist_ok=True)

    with checkpoint_errors():
        tokenizer = MODE[args.mode].tokenizer.from_pretrained(args.model_name_or_path)
    train_set, dev_set = build_data(args, tokenizer)
    samples = train_set.unpacked if args.packing else train_set
    watch = monitor.Monitor(args, tokenizer, samples, rank, world_size)  # data shape, warnings, --preview
    mpu = sequence_parallel.initialize(args.sequence_parallel_size)  # DeepSpeed's groups; None without
    train_loader = sequence_parallel.shard(make_loader(train_set, args, rank, world_size, True,
                                                       tokenizer.pad_token_id), mpu)
    dev_loader = sequence_parallel.shard(make_loader(dev_set, args, rank, world_size, False, tokenizer.pad_token_id)
                                         if dev_set else None, mpu)
    accumulation = args.gradient_accumulation_steps
    # every sample trains once an epoch: a last, shorter accumulation window takes the micro-batches left over
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    # --max_steps sets the run's length instead of the epochs, as HF Trainer's does: epochs repeat or stop early
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs

    ds_config = fill_ds_config(args, world_size)
    engine = build_engine(build_model(args, ds_config), ds_config, args, total_steps)
    objective = preference.PreferenceObjective(args) if args.stage != "sft" else TokenLoss()

    step, epoch, batch_index = 0, 0, 0  # optimizer steps done; where in which epoch the next window starts
    saved_reference = None
    if resume_tag:
        path = os.path.join(args.output_dir, resume_tag, "deepspeed")
        # not the scheduler's state: it holds the old run's lr and T, and this run's schedule is the flags'
        _, client = engine.load_checkpoint(path, tag="state", load_module_strict=False,
                                           load_lr_scheduler_states=False)
        step, epoch, batch_index = client["step"], client["epoch"], client["batches_in_epoch"]
        saved_reference = client.get("reference_logps")
        restart_schedule(engine, step)
        set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False))
        logger.info("resumed from %s at step %d", resume_tag, step)
        if step >= total_steps:
            logger.info("%s already reached step %d of %d: nothing to do", resume_tag, step, total_steps)
            return os.path.join(args.output_dir, resume_tag)

    if args.stage == "dpo":  # freeze / all, --ref_model_path: the reference's log-probabilities (preference.py)
        objective.prepare(engine, reference_loaders(args, train_set, dev_set, rank, world_size,
                                                    tokenizer.pad_token_id), saved_reference,
                          reference_model(args) if args.ref_model_path and not saved_reference else None)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        if resume_tag:
            drop_records_after(args.output_dir, step)
        # resumed: TensorBoard hides the events the interrupted run wrote after `step` (purge_step)
        writer = SummaryWriter(os.path.join(args.output_dir, "runs"), purge_step=step + 1 if resume_tag else None)
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    postfix = {"compile": "the first steps"} if args.compile else {}
    progress.set_postfix(postfix)
    # summed loss, labelled tokens or pairs (of all ranks, / world_size), real tokens, the objective's metric sums:
    # all-reduced when logged
    window_loss = torch.zeros(3 + len(objective.names), dtype=torch.float64, device=engine.device)
    clock, last_good = StepClock(), None
    log_file = os.path.join(args.output_dir, "train_log.jsonl")  # one JSON line per logging step, rank 0

    while step < total_steps:
        train_loader.batch_sampler.set_epoch(epoch)  # a new order every epoch, the same on every rank
        batches = itertools.islice(iter(train_loader), batch_index, None)  # resuming: minus what was seen
        while step < total_steps and batch_index < len(train_loader):
            window = [next(batches) for _ in range(min(accumulation, len(train_loader) - batch_index))]
            lr = engine.get_lr()[0]  # what this step's optimizer update uses (the schedule moves after it)
            loss_sums, tokens = train_step(engine, window, world_size, objective)
            window_loss[0] += loss_sums[0]
            window_loss[1] += tokens / world_size
            window_loss[3:] += loss_sums[1:]
            window_loss[2] += sum(real_tokens(b, tokenizer.pad_token_id) for b in window)  # this rank's
            batch_index += len(window)
            step += 1
            if args.compile:  # torch.compile's seconds so far: the first steps (and a new shape) compile
                postfix["compile"] = f"{compile_seconds():.0f}s"
                progress.set_postfix(postfix, refresh=False)
            progress.update(1)
            epoch_done = batch_index == len(train_loader)
            if step % args.show_loss_step == 0 or step == total_steps:
                torch.distributed.all_reduce(window_loss)
                loss_sum, labelled, window_tokens, *sums = window_loss.tolist()  # the host reads the sums only here
                metrics = objective.describe(sums, labelled)
                loss = loss_sum / labelled if labelled else None  # None: no labelled token in the whole window
                if loss is not None and not math.isfinite(loss):
                    raise SystemExit(f"step {step}: loss is {loss}; stopping. Last good checkpoint: {last_good}")
                window_tokens = int(window_tokens)
                seconds = clock.lap()
                speed = window_tokens / max(seconds, 1e-9)
                shown = "n/a (no labelled tokens)" if loss is None else f"{loss:.4f}"
                logger.info("step %d | loss %s | lr %.3e | tokens/s %.0f%s", step, shown, lr, speed,
                            "".join(f" | {k} {v:.4f}" for k, v in metrics.items())
                            + (engine.router_aux.shown(writer, step) if engine.router_aux else ""))
                postfix.update(loss=shown, lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                progress.set_postfix(postfix)
                if writer:
                    for name, value in (("loss", loss), ("lr", lr), ("tokens_per_s", speed),
                                        ("grad_norm", engine.get_global_grad_norm()), *metrics.items()):
                        if value is not None:
                            writer.add_scalar(f"train/{name}", float(value), step)
                    append_jsonl(log_file, {"step": step, "loss": loss, "lr": lr, "tokens": window_tokens,
                                            "seconds": seconds, "tokens_per_s": speed, **metrics})
                window_loss.zero_()
            # at most one evaluation and one checkpoint per step, however the conditions coincide
            if dev_loader and ((args.eval_step and step % args.eval_step == 0) or epoch_done or step == total_steps):
                with clock.paused(), dist_guard.stage(f"step {step} (evaluation and sample answers)"):
                    log_eval(engine, dev_loader, writer, step, f"step {step}" + " (epoch end)" * epoch_done,
                             log_file, objective)
                    watch.at_evaluation(engine, step, writer)  # sample answers, loss.png
            if (args.save_model_step and step % args.save_model_step == 0) or epoch_done or step == total_steps:
                # a checkpoint at the end of an epoch resumes at the start of the next one
                resume_at = (epoch + 1, 0) if epoch_done else (epoch, batch_index)
                tag = f"epoch-{epoch + 1}-step-{step}"
                with clock.paused(), dist_guard.stage(f"step {step} (saving {tag})"):
                    last_good = save_checkpoint(engine, tokenizer, args, tag,
                                                {"step": step, "epoch": resume_at[0], "batches_in_epoch": resume_at[1],
                                                 **objective.state()})
        epoch, batch_index = epoch + 1, 0
    with dist_guard.stage(f"step {step} (the closing sample answers)"):
        watch.at_end(engine, step, writer)
    progress.close()
    if writer:
        writer.close()
    return last_good


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.preview_only:  # the data as the model would see it: no DeepSpeed, no weights, nothing written
            return monitor.preview_only(args, build_data, checkpoint_errors)
        return train(args)
    except DataError as error:
        raise SystemExit(str(error)) from None
    except CheckpointError as error:  # in train.py only --model_name_or_path is loaded through checkpoint_errors
        raise SystemExit(f"--model_name_or_path: {error}") from None


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    keep_bitsandbytes_out(parse_args().quantization_bit)  # (main parses it again) before peft is imported
    try:
        main()
    finally:
        # Left to interpreter shutdown, gloo's worker threads can still hold asynchronous work (ZeRO-3 issues it)
        # whose tensors need the interpreter: the process then aborts after a successful run with "terminate called
        # without an active exception" (pytorch/pytorch#190489, #179291); seen twice in CPU test runs of two ranks.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
