"""Shared helpers: reading instruction data, the training dataset and collator, boolean flags, logging setup."""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from model import template

logger = logging.getLogger("chatglm")


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


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one voice in the console."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank <= 0 else logging.WARNING, force=True)


# ------------------------------------------------------------------------------------------------------------------
# data files
# ------------------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Bad input data: the message names file and line."""


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for a JSONL file or a JSON array; a parse error names `file:line`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: {e.msg}") from None
        # line of each array element is not kept by json; number them from 1 in order
        return [(i + 1, item) for i, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: {e.msg} (column {e.colno})") from None
    return records


def sample_to_messages(mode: str, sample, where: str) -> list[dict]:
    """A sample of the seed format (instruction, input, output, optional history) or a ChatGLM3 `conversations`
    list, as template messages. `where` ("file:line") prefixes every error."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    if "conversations" in sample:
        conversation = sample["conversations"]
        if not isinstance(conversation, list) or not conversation:
            raise DataError(f"{where}: 'conversations' must be a non-empty list")
        messages = []
        for turn in conversation:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                    or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: every conversation turn needs string 'role' and 'content'")
            if turn["role"] not in template.ROLES:
                raise DataError(f"{where}: unknown role {turn['role']!r}")
            messages.append(turn)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with an assistant turn")
        return messages
    if "output" not in sample:
        raise DataError(f"{where}: sample has no 'output'")
    for field in ("instruction", "input", "output"):
        if field in sample and not isinstance(sample[field], str):
            raise DataError(f"{where}: '{field}' must be a string, got {type(sample[field]).__name__}")
    history = sample.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise DataError(f"{where}: 'history' must be a list of [query, answer] string pairs")
    query = sample.get("instruction", "") + sample.get("input", "")
    messages = template.history_to_messages(mode, query, history)
    return messages + [{"role": "assistant", "content": sample["output"]}]


# ------------------------------------------------------------------------------------------------------------------
# training dataset
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    skipped: int = 0


class InstructionDataset(Dataset):
    """Tokenised once (reused across epochs) by the mode's chat template; labels are -100 on every prompt token.

    Truncation as the seed did it: the prompt to `max_src_len`, keeping its answer cue ("答：" + the special tokens);
    then the answer so that the sample fits `max_len`, keeping its end token. With `is_skip`, such samples are
    dropped instead."""

    def __init__(self, path: str, tokenizer, mode: str, max_len: int, max_src_len: int, is_skip: bool = False,
                 learn_all_turns: bool = True):
        self.stats = DataStats()
        self.examples = []
        cue = template.answer_cue_length(tokenizer, mode)
        for number, sample in read_records(path):
            messages = sample_to_messages(mode, sample, f"{path}:{number}")
            ids, labels, answer_start = template.encode_messages(tokenizer, mode, messages, learn_all_turns)
            self.stats.samples += 1
            truncated = False
            prompt_ids, prompt_labels = ids[:answer_start], labels[:answer_start]
            if len(prompt_ids) > max_src_len:
                keep = max_src_len - cue
                prompt_ids = prompt_ids[:keep] + prompt_ids[-cue:]
                prompt_labels = prompt_labels[:keep] + prompt_labels[-cue:]
                truncated = True
            answer_ids, answer_labels = ids[answer_start:], labels[answer_start:]
            room = max_len - len(prompt_ids)
            if len(answer_ids) > room:
                answer_ids = answer_ids[:room - 1] + answer_ids[-1:]
                answer_labels = answer_labels[:room - 1] + answer_labels[-1:]
                truncated = True
            if truncated:
                self.stats.truncated += 1
                if is_skip:
                    self.stats.skipped += 1
                    continue
            self.examples.append({"input_ids": prompt_ids + answer_ids, "labels": prompt_labels + answer_labels})
        if not self.examples:
            raise DataError(f"{path}: no usable sample ({self.stats.samples} read, {self.stats.skipped} skipped "
                            f"as longer than max_len={max_len} / max_src_len={max_src_len})")
        logger.info("%s: %d samples, %d truncated%s", path, self.stats.samples, self.stats.truncated,
                    f", {self.stats.skipped} skipped (--is_skip)" if is_skip else "")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


class DataCollator:
    """Pads a batch to its longest sample. Training pads on the right: every pad then comes after all real tokens,
    so the causal mask alone keeps them out of every real token's attention, no attention_mask is needed and SDPA
    keeps its fused causal kernel; padded labels are -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), template.IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"])
        return {"input_ids": input_ids, "labels": labels}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts; under ZeRO-3 a partitioned parameter reports its full size as ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
