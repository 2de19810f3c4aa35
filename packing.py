"""--packing: training samples concatenated into rows of at most --max_len tokens, so that short samples do not pay
for padding. Each sample keeps its own attention (it sees only itself), its own positions (0, 1, 2 ... from its first
token) and its own labels, so a packed row trains exactly what the same samples would train unpacked.

Rows are formed once, before training, by best-fit decreasing: samples longest first (ties in file order), each into
the open row with the least room that still holds it, a new row when none does. The rows stay the same every epoch;
the sampler shuffles their order. The collator hands the model `position_ids` and `cu_seqlens` (the offsets where
each sequence starts in the batch's flattened tokens, FlashAttention's convention); the model attends within those
sequences only (model/modeling_base.py: varlen attention on CUDA, SDPA with a block-diagonal causal mask elsewhere).
"""
from __future__ import annotations

import bisect
import logging

import torch
from torch.utils.data import Dataset

from model import template
from utils import add_bool_flag

logger = logging.getLogger("chatglm")


def add_flag(group) -> None:
    add_bool_flag(group, "--packing",
                  "concatenate training samples into rows of --max_len tokens (best-fit decreasing), each sample "
                  "attending only to itself with its own positions and labels: no compute spent on padding. "
                  "--per_device_train_batch_size then counts rows (glm2/glm3/glm4; not P-Tuning)")


def check_train_args(parser, args) -> None:
    """--packing: refused in one line where a packed row could not train what its samples train unpacked."""
    if not args.packing:
        return
    if args.mode == "glm":
        # ChatGLM-6B's 2-D positions and bidirectional prompt would need a per-sample prefix-LM mask
        parser.error("--packing supports --mode glm2, glm3 and glm4; ChatGLM-6B (glm) trains unpacked")
    if args.train_type == "ptuning":
        parser.error("--packing with --train_type ptuning is not supported (the prefix would be shared by all the "
                     "samples of a row): leave --packing off")
    if args.group_by_length:
        parser.error("--packing and --group_by_length: packed rows have no padding to save; pass one of them")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most `capacity`.

    Longest sample first (a stable sort: equal lengths keep their order), each into the row with the least room
    left that still holds it. Deterministic, so every rank and every resumed run forms the same rows."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than a row's {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            room, row = capacity - length, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            room -= length
        bisect.insort(free, (room, row))
    return rows


class PackedDataset(Dataset):
    """The samples of an InstructionDataset-like dataset (`examples`: dicts of input_ids and labels) packed into
    rows of at most `max_len` tokens. A row is a dict of the concatenated input_ids and labels, each sample's
    position_ids from 0, and `lengths` (its samples' lengths, in order).

    Labels are the samples' own, except that the first token of each sample carries none: unpacked it is never
    predicted (nothing comes before it), and packed the previous sample's last token must not learn to predict it.
    (Every template starts with prompt tokens, which are unlabelled anyway.)"""

    def __init__(self, dataset, max_len: int):
        self.unpacked = dataset  # what the samples are (monitor.py describes and previews them)
        examples = dataset.examples
        self.rows = [self._row([examples[i] for i in indices])
                     for indices in best_fit_decreasing([len(e["input_ids"]) for e in examples], max_len)]
        tokens = sum(len(e["input_ids"]) for e in examples)
        logger.info("--packing: %d samples in %d rows of at most %d tokens (%.1f%% filled)", len(examples),
                    len(self.rows), max_len, 100 * tokens / max(len(self.rows) * max_len, 1))

    @staticmethod
    def _row(samples: list[dict]) -> dict:
        input_ids, labels, position_ids = [], [], []
        for sample in samples:
            input_ids += sample["input_ids"]
            labels += [template.IGNORE_INDEX] + list(sample["labels"][1:])
            position_ids += range(len(sample["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "lengths": [len(s["input_ids"]) for s in samples]}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class PackedCollator:
    """Packed rows as one batch, right-padded to the longest row: input_ids, labels (-100 on padding), position_ids
    and cu_seqlens (int32 [sequences + 1]: where each sequence starts in the flattened [batch * length] tokens,
    then the total). A row's padding is a sequence of its own, so no sample sees it; its outputs carry no label."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:  # a rank's empty share of the epoch's last batch (dataset.EpochBatches): padding, no label
            rows = [{"input_ids": [self.pad_token_id], "labels": [template.IGNORE_INDEX], "position_ids": [0],
                     "lengths": [1]}]
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), template.IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        starts = []
        for r, row in enumerate(rows):
            used = len(row["input_ids"])
            input_ids[r, :used] = torch.tensor(row["input_ids"])
            labels[r, :used] = torch.tensor(row["labels"])
            position_ids[r, :used] = torch.tensor(row["position_ids"])
            position_ids[r, used:] = torch.arange(longest - used)
            offset = r * longest
            for length in row["lengths"]:
                starts.append(offset)
                offset += length
            if used < longest:  # the padding
                starts.append(offset)
        cu_seqlens = torch.tensor(starts + [len(rows) * longest], dtype=torch.int32)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu_seqlens}
