"""Merge a LoRA adapter saved by train.py into its base model: a standalone checkpoint that loads without peft.

    python merge_lora.py --mode glm3 --ori_model_dir ChatGLM3-6B/ \\
        --model_dir output-glm3/latest --output_dir ChatGLM3-6B-merged --dtype auto --device cpu

The output directory is the base directory with the merged weights (model.export.write_full_checkpoint): every
non-weight file of --ori_model_dir (THUDM's .py files, tokenizer files, generation_config.json ...) byte for byte,
its config.json unchanged except `torch_dtype` when --dtype differs from the base's, the weights under the base's
names, in its dtype, sharded like the base; plus merge_lora.json (what was merged). Whatever loaded the base loads
it: THUDM's code with trust_remote_code, vLLM, `MODE[mode].model.from_pretrained`, predict.py.

Before anything is written, every merged layer is checked entry by entry against W + scale * B @ A computed in
float64 from the same weights (after checking, on random inputs, that this is what peft's unmerged forward adds): a
correct merge differs from it only by the rounding to the merge dtype, at most u |W'| + (rank + 3) u scale |B| @ |A|
per entry (u: the dtype's unit roundoff). A wrong merge (a layer skipped, a wrong scale) moves entries by the size of
the delta; no sum over the layer's width enters, so this tells the two apart at any width and in any dtype. Beyond
the bound the script fails loudly and writes nothing. (Layer by layer in float64 chunks: a float64 copy of a 6B model
would need 48 GB.) The logits of the merged model and of base + adapter on a few fixed prompts, in the merge dtype,
are reported as information: their difference is rounding, which grows with the model's width and depth. For a
QLoRA adapter (its training_args.json records --quantization_bit) the merged model is also compared with what was
trained, the adapter on the base quantized as in training: the base's quantization error lies between them (where
bitsandbytes cannot be imported, that comparison is skipped with a warning; the merge itself needs no bitsandbytes).
The output appears only once complete (written to a temporary directory beside it, then renamed). It never writes
into the base or the adapter directory and refuses an output directory that exists and is not empty.
"""
from __future__ import annotations

import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
import argparse
import copy
import json
import logging
import os
import sys

import torch

import quantization
from model import MODE, check_checkpoint_dir, template
from model.config import read_json, resolve_mode
from model.glm4_moe import shipped_names
from model.modeling_base import check_safetensors_headers
from model.export import ExportError, atomic_directory, stored_dtype, write_full_checkpoint
from inference import (CheckpointError, attach_lora, check_trained_mode, checkpoint_errors, inference_device,
                       load_tokenizer, recorded_quantization_bit)
from utils import DTYPES, PRECISIONS, HelpFormatter, setup_logging

logger = logging.getLogger("chatglm")

# The usual end-to-end logit difference of a merge on small models (fp32: 1e-5, fp16: 1e-2, bf16: 5e-2, times the
# largest logit where that exceeds 1): reported beside the measured difference, not enforced, because rounding grows
# with width and depth (a correct merge of a tiny model 128 wide exceeds it in fp32). The check is per layer.
LOGIT_ROUNDING = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (query, history as (question, answer) pairs): the prompts on which merged and unmerged logits are compared.
CHECK_PROMPTS = [
    ("你好", []),
    ("你现在是一个信息抽取模型，请你帮我抽取出相关三元组。文本：发动机水温高，风扇低速转动。", []),
    ("What should I check first when the engine overheats?", []),
    ("那风扇一直高速转呢？", [("发动机水温高怎么办？", "先停车降温，再检查冷却液液位、风扇和节温器。")]),
]


EPILOG = ("Every flag with its default and choices: docs/cli/merge_lora.md. The guide: "
          "docs/inference.md#merging-a-lora-adapter; serving the result: docs/serving.md.")


def build_parser() -> argparse.ArgumentParser:
    """merge_lora.py's flags (docs/cli/generate.py writes docs/cli/merge_lora.md from them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=EPILOG)
    group = parser.add_argument_group("input")
    group.add_argument("--mode", default=None, choices=sorted(MODE),
                       help="GLM version: glm, glm2, glm3, glm4 or glm4-0414 (GLM-4-0414 / GLM-Z1; default: read "
                            "from the checkpoint's config.json, logged)")
    group.add_argument("--ori_model_dir", required=True, help="base model directory the adapter was trained on")
    group.add_argument("--model_dir", required=True,
                       help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", required=True, help="new directory for the merged model (absent or empty)")
    group.add_argument("--dtype", default="auto", choices=PRECISIONS,
                       help="dtype of the merged weights; auto: the base checkpoint's own")
    group.add_argument("--device", default="cpu", help="where to merge and check: cpu, cuda or cuda:N")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(parser, args, "ori_model_dir")
    return args


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


# ------------------------------------------------------------------------------------------------------------------
# the per-layer check: each merged weight against W + scale * B @ A computed in float64 from the same weights
# ------------------------------------------------------------------------------------------------------------------
PROBES = 4  # random +-1 input rows on which peft's unmerged forward must add exactly x @ (scale * B @ A)^T
ROWS_AT_ONCE = 1 << 22  # weight entries compared per float64 chunk (32 MiB each), to bound the check's memory


def lora_layers(peft_model) -> dict:
    """name (as in the merged model) -> peft LoRA layer, for every layer the adapter wraps; plain LoRA on Linear
    layers only (what train.py writes), since the check below knows that delta."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or is_fused_experts(module):
            continue
        if type(module.get_base_layer()) is not torch.nn.Linear:
            raise CheckpointError(f"--model_dir: the adapter wraps {name} "
                                  f"({type(module.get_base_layer()).__name__}); merge_lora.py merges LoRA on Linear "
                                  f"layers only")
        if module.lora_variant or any(module.lora_bias.values()):
            raise CheckpointError(f"--model_dir: the adapter on {name} is a LoRA variant (DoRA, lora_bias ...); "
                                  f"merge_lora.py merges plain LoRA")
        layers[name] = module
    if not layers and not fused_expert_layers(peft_model):
        raise CheckpointError("--model_dir: the adapter wraps no layer of the base")
    return layers


def is_fused_experts(module) -> bool:
    """PEFT's LoRA on a parameter (target_parameters: the fused 3-D experts of glm4-moe*), one update per expert."""
    from peft.tuners.lora import ParamWrapper
    return isinstance(module, ParamWrapper)


def fused_expert_layers(peft_model) -> dict:
    return {name: module for name, module in peft_model.base_model.model.named_modules() if is_fused_experts(module)}


def adapter_factors(layer) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(scale, B, A) of each active adapter of a LoRA layer, in float64: its delta is scale * B @ A (out x in)."""
    factors = []
    for name in layer.active_adapters:
        if name in layer.lora_A:
            b, a = layer.lora_B[name].weight.to(torch.float64), layer.lora_A[name].weight.to(torch.float64)
            if layer.fan_in_fan_out:
                raise CheckpointError("--model_dir: a fan_in_fan_out adapter; merge_lora.py merges nn.Linear LoRA")
            factors.append((float(layer.scaling[name]), b, a))
    return factors


def row_chunks(weight: torch.Tensor):
    step = max(1, ROWS_AT_ONCE // max(1, weight.shape[1]))
    return [slice(start, start + step) for start in range(0, weight.shape[0], step)]


def exact_merge(weight: torch.Tensor, factors, rows: slice) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of W + sum scale * B @ A in float64, and of sum |scale| |B| @ |A| (the size of the products the merge
    rounds), and the summed rank."""
    exact = weight[rows].to(torch.float64)
    size = torch.zeros_like(exact)
    for scale, b, a in factors:
        exact += scale * (b[rows] @ a)
        size += abs(scale) * (b[rows].abs() @ a.abs())
    return exact, size, sum(a.shape[0] for _, _, a in factors)


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative change of a value stored in `dtype` (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


@torch.no_grad()
def check_forward_is_delta(name: str, layer, factors, generator) -> None:
    """peft's unmerged forward (in float64, on a copy of the layer) must be x @ (W + scale * B @ A)^T + bias: what the
    merged weight is compared with is then what base + adapter computes. Only float64 rounding may differ."""
    base = layer.get_base_layer()
    device = base.weight.device
    probes = (torch.randint(0, 2, (PROBES, base.in_features), generator=generator) * 2 - 1).to(device, torch.float64)
    forward = copy.deepcopy(layer).to(torch.float64)(probes)
    bias = base.bias.to(torch.float64) if base.bias is not None else 0.0
    for rows in row_chunks(base.weight):
        exact, size, rank = exact_merge(base.weight, factors, rows)
        ours = probes @ exact.T + (bias[rows] if torch.is_tensor(bias) else 0.0)
        allowed = 4 * (base.in_features + rank + 2) * 2.0 ** -53 * (probes.abs() @ (exact.abs() + size).T + 1)
        if not ((forward[:, rows] - ours).abs() <= allowed).all():
            raise MergeCheckError(f"MERGE CHECK FAILED: peft's forward of {name} is not its base layer + "
                                  f"scale * B @ A; nothing was written")


@torch.no_grad()
def merged_weight_share(before: torch.Tensor, factors, after: torch.Tensor) -> tuple[float, float]:
    """(largest |merged - exact| as a share of what rounding can explain, largest |merged - exact|), entry by entry.

    A correct merge stores W' = fl(W + fl(scale * B @ A)) in W's dtype: the final rounding moves an entry by at most
    u |W'| (u: the dtype's unit roundoff), the product (rank terms summed, scaled and cast; peft forms it in the
    adapter's dtype or fp32, never coarser than W's) by at most (rank + 3) u scale (|B| @ |A|); plus fp16/bf16's
    subnormal spacing. 1% on top as a margin. A wrong merge (a layer skipped, a wrong scale, another layer's delta)
    moves entries by the size of the delta, far beyond that at any width: no sum over the layer's inputs enters."""
    u = unit_roundoff(after.dtype)
    spacing = torch.finfo(after.dtype).tiny * torch.finfo(after.dtype).eps
    share = largest = 0.0
    for rows in row_chunks(after):
        exact, size, rank = exact_merge(before, factors, rows)
        merged = after[rows].to(torch.float64)
        difference = (merged - exact).abs()
        bound = 1.01 * (u * merged.abs() + (rank + 3) * u * size + spacing)
        chunk_share, chunk_largest = (difference / bound).max().item(), difference.max().item()
        if chunk_share != chunk_share:  # NaN in the merged weights: no bound holds
            return chunk_share, chunk_largest
        share, largest = max(share, chunk_share), max(largest, chunk_largest)
    return share, largest


def merge_and_check(peft_model):
    """peft's safe merge of every LoRA layer, each checked entry by entry against W + scale * B @ A in float64 before
    the next; then the LoRA wrappers removed (peft's unload). Returns (merged model, report); MergeCheckError if a
    layer is wrong."""
    generator = torch.Generator().manual_seed(0)
    layers = lora_layers(peft_model)
    worst = {"share_of_rounding_bound": 0.0, "layer": None, "max_abs_difference": 0.0}
    failures = []
    for name, layer in layers.items():
        factors = adapter_factors(layer)
        check_forward_is_delta(name, layer, factors, generator)
        before = layer.get_base_layer().weight.data  # peft's safe merge writes a new tensor: this stays W
        try:
            layer.merge(safe_merge=True)
        except ValueError as e:  # peft's own check: NaN or inf in the merged weight
            raise MergeCheckError(f"MERGE CHECK FAILED: {name}: {e}; nothing was written") from None
        after = layer.get_base_layer().weight.data
        share, largest = merged_weight_share(before, factors, after)
        del before
        if not share <= 1.0:  # also catches NaN
            failures.append(f"{name} differs by up to {largest:.3e}, {share:.3g} times what rounding to "
                            f"{str(after.dtype).replace('torch.', '')} can explain")
        if not share <= worst["share_of_rounding_bound"]:
            worst = {"share_of_rounding_bound": share, "layer": name, "max_abs_difference": largest}
    if failures:
        raise MergeCheckError(f"MERGE CHECK FAILED: {len(failures)} of {len(layers)} merged layers are not base "
                              f"layer + adapter: {'; '.join(failures[:3])}; nothing was written")
    experts = fused_expert_layers(peft_model)
    for name, layer in experts.items():  # peft's own merge; checked by the logits of the whole model (merge())
        try:
            layer.merge(safe_merge=True)
        except ValueError as e:
            raise MergeCheckError(f"MERGE CHECK FAILED: {name}: {e}; nothing was written") from None
    return peft_model.unload(), {"layers": len(layers), "fused_expert_parameters": len(experts), **worst}


# ------------------------------------------------------------------------------------------------------------------
# QLoRA: what was trained is the adapter on the quantized base
# ------------------------------------------------------------------------------------------------------------------
def trained_logits(args, spec, dtype, device, bits: int, prompts) -> list[torch.Tensor]:
    """Logits of the adapter on the base quantized as in training (--quantization_bit `bits`), computing in `dtype`;
    the model is freed before the full-precision one loads."""
    with checkpoint_errors():
        model = quantization.load_quantized(spec.model, args.ori_model_dir, bits, dtype, device)
        model = attach_lora(model, args.model_dir, f"--model_dir {args.model_dir}")
    model.requires_grad_(False)  # bitsandbytes' CPU kernel adds the bias in place, which autograd refuses
    logits = prompt_logits(model.eval(), prompts, device)
    del model
    return logits


def merge(args):
    """(merged model, report dict); raises CheckpointError or, when the check fails, MergeCheckError."""
    spec = MODE[args.mode]
    device = inference_device(args.device)
    bits = recorded_quantization_bit(args.model_dir)
    with checkpoint_errors():
        check_safetensors_headers(args.ori_model_dir)  # a truncated base named in one line, before its dtypes are read
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else stored_dtype(args.ori_model_dir)
        tokenizer = load_tokenizer(spec, args.model_dir, args.ori_model_dir)
    prompts = check_prompt_ids(tokenizer, args.mode)
    trained = None
    problem = quantization.bitsandbytes_problem() if bits else None
    if problem:  # the merge itself needs no bitsandbytes; only the comparison with what was trained does
        logger.warning("the adapter was trained on a %d-bit base (QLoRA), but %s: the comparison of the merged "
                       "model with what was trained is skipped", bits, problem)
    elif bits:
        logger.info("the adapter was trained on a %d-bit base (QLoRA): loading it so as well, to compare", bits)
        trained = trained_logits(args, spec, dtype, device, bits, prompts)
    with checkpoint_errors():
        logger.info("loading %s on %s as %s", args.ori_model_dir, device, str(dtype).replace("torch.", ""))
        base = spec.model.from_pretrained(args.ori_model_dir, dtype=dtype).to(device).eval()
        model = attach_lora(base, args.model_dir, f"--model_dir {args.model_dir}", autocast_adapter_dtype=False)
        model = model.to(device).eval()

    expected = prompt_logits(model, prompts, device)
    with model.disable_adapter():
        plain = prompt_logits(model, prompts, device)
    adapter_effect = max_difference(expected, plain)
    merged, layer_check = merge_and_check(model)
    got = prompt_logits(merged, prompts, device)
    difference = max_difference(expected, got)
    scale = max(x.abs().max().item() for x in expected)
    usual = LOGIT_ROUNDING[dtype] * max(1.0, scale)
    report = {"base": os.path.abspath(args.ori_model_dir), "adapter": os.path.abspath(args.model_dir),
              "dtype": str(dtype).replace("torch.", ""), "quantization_bit": bits, "merge_check": layer_check,
              "check_prompts": len(prompts), "max_abs_logit_difference": difference, "tolerance": usual,
              "adapter_effect": adapter_effect}
    logger.info("merged weights vs W + scale * B @ A in float64: %d layers within the rounding to %s (at most %.3g "
                "of the bound, %s)", layer_check["layers"], report["dtype"], layer_check["share_of_rounding_bound"],
                layer_check["layer"])
    logger.info("merged vs base+adapter on %d prompts in %s: max abs logit difference %.3e (small models usually "
                "stay within %.1e; rounding grows with width and depth); the adapter itself moves the logits by up "
                "to %.3e", len(prompts), report["dtype"], difference, usual, adapter_effect)
    if trained is not None:
        report["max_abs_logit_difference_vs_trained"] = max_difference(trained, got)
        logger.info("merged vs what was trained (the adapter on the %d-bit base): max abs logit difference %.3e "
                    "(information: the merged model is the full-precision base + adapter; the base's quantization "
                    "error lies between them)", bits, report["max_abs_logit_difference_vs_trained"])
    if adapter_effect == 0.0:
        logger.warning("the adapter changes no logit on the check prompts: are its lora_B weights all zero?")
    return merged, report


class MergeCheckError(RuntimeError):
    pass


def save(merged, report, args) -> None:
    """Write the base directory with the merged weights into a temporary directory beside --output_dir, then rename
    it into place."""
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else None  # auto: each tensor as the base stores it
    try:
        with atomic_directory(os.path.abspath(args.output_dir)) as staging:
            changed = write_full_checkpoint(shipped_names(merged, merged.state_dict()), args.ori_model_dir, staging,
                                            dtype=dtype, tied=merged.all_tied_weights_keys)
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
    check = report["merge_check"]
    print(f"merge check: {check['layers']} merged layers equal W + scale * B @ A within the rounding to "
          f"{report['dtype']} (at most {check['share_of_rounding_bound']:.3g} of the bound)")
    print(f"max abs logit difference merged vs base+adapter: {report['max_abs_logit_difference']:.3e} "
          f"({report['dtype']})")
    if "max_abs_logit_difference_vs_trained" in report:
        print(f"max abs logit difference merged vs what was trained ({report['quantization_bit']}-bit base + "
              f"adapter): {report['max_abs_logit_difference_vs_trained']:.3e}")
    return 0


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    command_line = parse_args()  # (main parses it again) what this process loads decides, before peft is imported
    keep_bitsandbytes_out(None, command_line.model_dir)  # a QLoRA adapter: its quantized base, to compare
    sys.exit(main())
