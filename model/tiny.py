"""Write a tiny random ChatGLM checkpoint in the official directory layout, for tests, the README demo and CI.

    python -m model.tiny --mode glm3 --output_dir tiny-glm3

The directory holds config.json, model.safetensors, the tokenizer file of that version (ice_text.model or
tokenizer.model: a real, small sentencepiece model trained on model/tiny_corpus.txt; for glm4 a tiktoken ranks file
trained on the same corpus by model.tiktoken_build) and tokenizer_config.json. It trains on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from . import MODE, template
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


def write_tiny_checkpoint(mode: str, output_dir: str, seed: int = 0) -> str:
    """Build the tokenizer and a randomly initialised model of `mode`; save both into output_dir (replaced whole)."""
    spec = MODE[mode]
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        build = build_ranks_file if mode == "glm4" else lambda path: build_tokenizer_file(mode, path)
        build(os.path.join(staging, spec.tokenizer_file))
        tokenizer = spec.tokenizer.from_pretrained(staging)
        torch.manual_seed(seed)
        model = spec.model(tiny_config(mode, tokenizer))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)  # appears only once complete
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODE), default="glm3", help="ChatGLM version of the checkpoint")
    parser.add_argument("--output_dir", default=None, help="where to write it (default: tiny-<mode>)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args()
    path = write_tiny_checkpoint(args.mode, args.output_dir or f"tiny-{args.mode}", args.seed)
    print(f"wrote a tiny {args.mode} checkpoint to {path}")


if __name__ == "__main__":
    main()
