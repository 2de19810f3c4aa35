"""Merge a LoRA adapter saved by train.py into its base model: a standalone checkpoint that loads without peft.

    python merge_lora.py --mode glm3 --ori_model_dir ChatGLM3-6B/ \\
        --model_dir output-glm3/epoch-2-step-100 --output_dir ChatGLM3-6B-merged [--dtype auto] [--device cpu]

The output directory is the base directory with the merged weights (model.export.write_full_checkpoint): every
non-weight file of --ori_model_dir (THUDM's .py files, tokenizer files, generation_config.json ...) byte for byte,
its config.json unchanged except `torch_dtype` when --dtype differs from the base's, the weights under the base's
names, in its dtype, sharded like the base; plus merge_lora.json (what was merged). Whatever loaded the base loads
it: THUDM's code with trust_remote_code, vLLM, `MODE[mode].model.from_pretrained`, predict.py.

Before anything is written, the merged model is checked against base + adapter on a few fixed prompts: the largest
logit difference must stay within the tolerance of the dtype (fp32: 1e-5, fp16: 1e-2, bf16: 5e-2; multiplied by the
largest logit where that exceeds 1); otherwise the script fails loudly and writes nothing. The output appears only
once complete (written to a temporary directory beside it, then renamed). It never writes into the base or the
adapter directory and refuses an output directory that exists and is not empty.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from model import MODE, check_checkpoint_dir, template
from model.config import read_json
from model.modeling_base import check_safetensors_headers
from model.export import ExportError, atomic_directory, stored_dtype, write_full_checkpoint
from inference import (CheckpointError, attach_lora, check_trained_mode, checkpoint_errors, inference_device,
                       load_tokenizer)
from utils import DTYPES, PRECISIONS, setup_logging

logger = logging.getLogger("chatglm")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (query, history as (question, answer) pairs): the prompts on which merged and unmerged logits must agree.
CHECK_PROMPTS = [
    ("你好", []),
    ("你现在是一个信息抽取模型，请你帮我抽取出相关三元组。文本：发动机水温高，风扇低速转动。", []),
    ("What should I check first when the engine overheats?", []),
    ("那风扇一直高速转呢？", [("发动机水温高怎么办？", "先停车降温，再检查冷却液液位、风扇和节温器。")]),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--mode", required=True, choices=sorted(MODE), help="ChatGLM version: glm, glm2, glm3 or glm4")
    group.add_argument("--ori_model_dir", required=True, help="base model directory the adapter was trained on")
    group.add_argument("--model_dir", required=True,
                       help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", required=True, help="new directory for the merged model (absent or empty)")
    group.add_argument("--dtype", default="auto", choices=PRECISIONS,
                       help="dtype of the merged weights; auto: the base checkpoint's own")
    group.add_argument("--device", default="cpu", help="where to merge and check: cpu, cuda or cuda:N")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# checks on the directories
# ------------------------------------------------------------------------------------------------------------------
def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_dirs(args) -> None:
    """Every problem with the three directories, as one CheckpointError line, before anything loads."""
    try:
        check_checkpoint_dir(args.ori_model_dir, args.mode)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--ori_model_dir: {e}") from None
    adapter_config = os.path.join(args.model_dir, "adapter_config.json")
    if not os.path.isdir(args.model_dir):
        raise CheckpointError(f"--model_dir {args.model_dir}: no such directory")
    if not os.path.isfile(adapter_config):
        raise CheckpointError(f"--model_dir {args.model_dir}: no adapter_config.json, so this is no LoRA adapter "
                              f"(P-Tuning and full checkpoints need no merging)")
    config = read_json(adapter_config, CheckpointError)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{adapter_config}: peft_type is {config.get('peft_type')!r}, not LORA")
    check_trained_mode(args.model_dir, args.mode)
    recorded = config.get("base_model_name_or_path")
    if recorded and os.path.isdir(recorded) and os.path.realpath(recorded) != os.path.realpath(args.ori_model_dir):
        logger.warning("the adapter was trained on %s, merging it into --ori_model_dir %s", recorded,
                       args.ori_model_dir)

    output = os.path.realpath(args.output_dir)
    for flag, directory in (("--ori_model_dir", args.ori_model_dir), ("--model_dir", args.model_dir)):
        directory = os.path.realpath(directory)
        if _inside(output, directory):
            raise CheckpointError(f"--output_dir {args.output_dir} is {flag} or inside it; choose a new directory")
        if _inside(directory, output):
            raise CheckpointError(f"--output_dir {args.output_dir} contains {flag}; choose a new directory")
    if os.path.exists(output) and not os.path.isdir(output):
        raise CheckpointError(f"--output_dir {args.output_dir} is a file; choose a new directory")
    if os.path.isdir(output) and os.listdir(output):
        raise CheckpointError(f"--output_dir {args.output_dir} exists and is not empty; choose a new directory")


# ------------------------------------------------------------------------------------------------------------------
# the merge and its check
# ------------------------------------------------------------------------------------------------------------------
def check_prompt_ids(tokenizer, mode: str) -> list[list[int]]:
    prompts = []
    for query, pairs in CHECK_PROMPTS:
        prompts.append(template.encode_prompt(tokenizer, mode, query, pairs))
    return prompts


@torch.inference_mode()
def prompt_logits(model, prompts: list[list[int]], device) -> list[torch.Tensor]:
    """fp32 logits of every position of every prompt, each prompt run alone (no padding)."""
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def merge(args):
    """(merged model, report dict); raises CheckpointError or, when the check fails, MergeCheckError."""
    spec = MODE[args.mode]
    device = inference_device(args.device)
    with checkpoint_errors():
        check_safetensors_headers(args.ori_model_dir)  # a truncated base named in one line, before its dtypes are read
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else stored_dtype(args.ori_model_dir)
        logger.info("loading %s on %s as %s", args.ori_model_dir, device, str(dtype).replace("torch.", ""))
        base = spec.model.from_pretrained(args.ori_model_dir, dtype=dtype).to(device).eval()
        model = attach_lora(base, args.model_dir, f"--model_dir {args.model_dir}", autocast_adapter_dtype=False)
        model = model.to(device).eval()
        tokenizer = load_tokenizer(spec, args.model_dir, args.ori_model_dir)

    prompts = check_prompt_ids(tokenizer, args.mode)
    expected = prompt_logits(model, prompts, device)
    with model.disable_adapter():
        plain = prompt_logits(model, prompts, device)
    adapter_effect = max_difference(expected, plain)
    merged = model.merge_and_unload(safe_merge=True)
    got = prompt_logits(merged, prompts, device)
    difference = max_difference(expected, got)
    scale = max(x.abs().max().item() for x in expected)
    tolerance = TOLERANCE[dtype] * max(1.0, scale)
    report = {"base": os.path.abspath(args.ori_model_dir), "adapter": os.path.abspath(args.model_dir),
              "dtype": str(dtype).replace("torch.", ""), "check_prompts": len(prompts),
              "max_abs_logit_difference": difference, "tolerance": tolerance, "adapter_effect": adapter_effect}
    logger.info("merged vs base+adapter on %d prompts: max abs logit difference %.3e (tolerance %.1e); "
                "the adapter itself moves the logits by up to %.3e", len(prompts), difference, tolerance,
                adapter_effect)
    if adapter_effect == 0.0:
        logger.warning("the adapter changes no logit on the check prompts: are its lora_B weights all zero?")
    if not difference <= tolerance:  # also catches NaN
        raise MergeCheckError(f"MERGE CHECK FAILED: the merged model's logits differ from base+adapter by "
                              f"{difference:.3e} (tolerance {tolerance:.1e}); nothing was written")
    return merged, report


class MergeCheckError(RuntimeError):
    pass


def save(merged, report, args) -> None:
    """Write the base directory with the merged weights into a temporary directory beside --output_dir, then rename
    it into place."""
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None  # auto: each tensor as the base stores it
    try:
        with atomic_directory(os.path.abspath(args.output_dir)) as staging:
            changed = write_full_checkpoint(merged.state_dict(), args.ori_model_dir, staging, dtype=dtype)
            with open(os.path.join(staging, "merge_lora.json"), "w", encoding="utf-8") as f:
                json.dump({**report, "config_fields_changed": changed}, f, indent=2)
    except (ExportError, FileExistsError) as e:
        raise CheckpointError(str(e)) from None
    logger.info("wrote the merged model to %s", os.path.abspath(args.output_dir))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(rank=0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        check_dirs(args)
        merged, report = merge(args)
        save(merged, report, args)
    except (CheckpointError, OSError) as e:
        print(f"merge_lora.py: error: {e}", file=sys.stderr)
        return 2
    except MergeCheckError as e:
        logger.error("%s", e)
        print(f"merge_lora.py: {e}", file=sys.stderr)
        return 1
    print(f"max abs logit difference merged vs base+adapter: {report['max_abs_logit_difference']:.3e} "
          f"(tolerance {report['tolerance']:.1e})")
    return 0


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    keep_bitsandbytes_out([])  # merging never quantizes; peft would import it regardless
    sys.exit(main())
