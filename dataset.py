"""Training data: reading instruction files (JSONL or a JSON array), turning samples into the mode's chat template
with labels and truncation, the dev-set shard, the collator and the training epoch's batches."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

import tool_data
from model import template
from model.textfile import read_text

logger = logging.getLogger("chatglm")


# ------------------------------------------------------------------------------------------------------------------
# data files
# ------------------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Bad input data: the message names file and line."""


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON counts as whitespace between values


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for a JSON Lines file (one sample per line, numbered by its line) or a JSON array
    (numbered by the line on which each element starts), read by `model.textfile.read_text` (UTF-8, a leading
    byte-order mark dropped). Every problem is a DataError naming `file:line` (or the file, when it cannot be read
    at all)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data file (JSON Lines or a JSON array)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    text = read_text(path, DataError)
    if text.lstrip().startswith("["):
        return _array_records(path, text)
    if text.lstrip().startswith("{") and text.strip().count("\n"):  # one object over several lines?
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise DataError(f"{path}: the file holds one JSON object spread over several lines; it must hold a "
                            f"JSON array of samples or one JSON object per line (JSON Lines)")
    records = []
    lines = text.split("\n")  # JSON Lines separates on \n only (a JSON string may hold U+2028, \x85 ...)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: {e.msg} (column {e.colno}){_spans_lines(lines, number)}") from None
    return records


def _array_records(path: str, text: str) -> list[tuple[int, dict]]:
    """The elements of a JSON array, each with the line on which it starts."""
    try:
        json.loads(text)  # the whole file first: a syntax error names its line and column as json finds them
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: {e.msg} (column {e.colno})") from None
    decoder = json.JSONDecoder()
    records, line, counted = [], 1, 0  # `line` is the line of offset `counted`
    position = _JSON_WHITESPACE.match(text, text.index("[") + 1).end()
    while text[position] != "]":
        item, end = decoder.raw_decode(text, position)
        line += text.count("\n", counted, position)
        counted = position
        records.append((line, item))
        position = _JSON_WHITESPACE.match(text, end).end()
        if text[position] == ",":
            position = _JSON_WHITESPACE.match(text, position + 1).end()
    return records


def _spans_lines(lines: list[str], number: int) -> str:
    """A hint when the JSON value that starts on line `number` (counted from 1) goes on over later lines: valid
    JSON, but not JSON Lines."""
    text = "\n".join(lines[number - 1:])
    try:
        _, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip(" \t\r")))
    except json.JSONDecodeError:
        return ""
    last = number + text.count("\n", 0, end)
    if last == number:
        return ""
    return f"; the sample on lines {number}-{last} must be on one line (JSON Lines), or make the file a JSON array"


def sample_to_messages(mode: str, sample, where: str, check_tools: bool = False) -> list[dict]:
    """A sample of the seed format (instruction, input, output, optional history) or a ChatGLM3/GLM-4 `conversations`
    (or `messages`) list, as template messages; tool calls in the forms THUDM's demos write are converted to the
    template's representation (`tool_data`). `where` ("file:line") prefixes every error. `check_tools` (training
    data) also refuses what would teach a broken call: arguments that are not a JSON object, a call to a tool the
    sample does not declare, an observation without a call."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    if "conversations" in sample or "messages" in sample:
        try:
            messages, turns = tool_data.converted_messages(mode, sample)
            for message in messages:
                if message["role"] not in template.ROLES:
                    raise ValueError(f"unknown role {message['role']!r}")
            if messages[-1]["role"] != "assistant":
                raise ValueError("the conversation must end with an assistant turn")
            template.check_conversation(mode, messages)
            if check_tools and mode in template.MESSAGE_MODES:
                tool_data.check_calls(mode, messages, turns)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
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
class SampleFate(NamedTuple):
    """What became of one record of a data file, in file order: its `file:line`, its index in the dataset's examples
    (None when dropped), whether truncation cut it, and why it was dropped: "is_skip" (truncated, --is_skip) or
    "unfit" (too long even after truncation); None when kept."""
    where: str
    index: int | None
    truncated: bool
    dropped: str | None


@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    skipped: int = 0  # truncated samples dropped by --is_skip
    unfit: int = 0  # samples that cannot fit even after truncation (always dropped)
    unfit_where: list = field(default_factory=list)  # their first few `file:line`


# Free text that truncation may shorten: what the user says and what a tool returns. Never cut: system messages (the
# instruction of the whole conversation, and the tools), assistant turns (learned targets: answers and tool calls),
# and the template's own tokens (role tokens, [gMASK] sop ...).
SHORTENED_ROLES = ("user", "observation")


def fit_prompt(tokenizer, mode: str, messages: list[dict], max_src_len: int) -> tuple[list[dict] | None, bool]:
    """The conversation with its prompt (everything before the final answer) cut to at most `max_src_len` tokens,
    and whether anything was cut; (None, True) when it cannot be made to fit.

    1. Whole old rounds go first, oldest first (a round: a user turn and what follows it up to the next user turn,
       tool calls and observations included). System messages (with their tools) and the last round stay.
    2. Then free text is shortened: observations (tools' results) first, then user turns, each oldest first, lose
       characters from their start (glm4 keeps at least one: its template would drop an emptied message with its
       role token).
    System text, tools, assistant turns (answers and tool calls, learned targets) and the template's own tokens are
    never cut, so the result is always a conversation `chat()` could have been given, and every call it teaches
    names a declared tool with its whole arguments."""
    context, answer = list(messages[:-1]), messages[-1]

    def fits(candidate):
        return len(template.encode_context(tokenizer, mode, candidate)) <= max_src_len

    if fits(context):
        return messages, False
    context = _drop_old_rounds(context, fits)
    # glm4's template leaves out a message with empty content, role token and all: keep one character there
    least = 1 if mode == "glm4" else 0
    # tools' results first (data the answer draws on), then what the user said (the request), each oldest first
    order = [i for role in SHORTENED_ROLES[::-1] for i, m in enumerate(context) if m["role"] == role]
    for index in order:
        message = context[index]
        if fits(context):
            break
        if len(message["content"]) <= least:
            continue
        text = message["content"]

        def with_text(kept):
            return context[:index] + [{**message, "content": kept}] + context[index + 1:]
        low, high = 1, len(text) - least  # the fewest leading characters to drop: fits(text[high:])
        if fits(with_text(text[high:])):
            while low < high:
                middle = (low + high) // 2
                if fits(with_text(text[middle:])):
                    high = middle
                else:
                    low = middle + 1
        context[index] = {**message, "content": text[high:]}
    if not fits(context):
        return None, True
    return context + [answer], True


def _drop_old_rounds(context: list[dict], fits) -> list[dict]:
    """The context without its oldest rounds, as few as make it fit (all but the last round at most)."""
    last_user = max((i for i, m in enumerate(context) if m["role"] == "user"), default=0)
    rounds, current = [], None  # indices of the old rounds, oldest first
    for index in range(last_user):
        if context[index]["role"] == "system":
            continue
        if context[index]["role"] == "user" or current is None:
            current = []
            rounds.append(current)
        current.append(index)
    dropped = set()
    for old_round in rounds:
        if fits([m for i, m in enumerate(context) if i not in dropped]):
            break
        dropped.update(old_round)
    return [m for i, m in enumerate(context) if i not in dropped]


class InstructionDataset(Dataset):
    """Tokenised once (reused across epochs) by the mode's chat template; labels are -100 on every prompt token.

    Over-long samples: the prompt is cut to `max_src_len` by `fit_prompt` (old rounds, then user and observation
    text; never system text, tools, tool calls or role tokens), then a text answer so that the sample fits
    `max_len`, keeping its end token. With `is_skip`, such samples are dropped instead. A sample that cannot fit
    (its system text, tools and calls alone are too long, or its final answer is a tool call longer than `max_len`
    allows) is dropped and counted; the log names the first few."""

    SHOWN_UNFIT = 5  # how many `file:line` of unfit samples the log names

    def __init__(self, path: str, tokenizer, mode: str, max_len: int, max_src_len: int, is_skip: bool = False,
                 learn_all_turns: bool = True, thinking: str = "learn"):
        shortest = template.template_length(tokenizer, mode)
        if max_src_len <= shortest or max_src_len >= max_len:
            raise ValueError(f"max_src_len={max_src_len} must exceed the {mode} template's own {shortest} tokens "
                             f"and stay below max_len={max_len}")
        self.stats = DataStats()
        self.examples = []
        self.fates: list[SampleFate] = []  # one per record read (monitor.py's --preview tells them)
        for number, sample in read_records(path):
            where = f"{path}:{number}"
            messages = sample_to_messages(mode, sample, where, check_tools=True)
            self.stats.samples += 1
            example, truncated = self._encode(tokenizer, mode, messages, max_len, max_src_len, learn_all_turns,
                                              thinking)
            if example is None:
                self.stats.unfit += 1
                if len(self.stats.unfit_where) < self.SHOWN_UNFIT:
                    self.stats.unfit_where.append(where)
                self.fates.append(SampleFate(where, None, True, "unfit"))
                continue
            if truncated:
                self.stats.truncated += 1
                if is_skip:
                    self.stats.skipped += 1
                    self.fates.append(SampleFate(where, None, True, "is_skip"))
                    continue
            self.fates.append(SampleFate(where, len(self.examples), truncated, None))
            self.examples.append(example)
        limits = f"max_len={max_len} / max_src_len={max_src_len}"
        if self.stats.unfit:
            shown = ", ".join(self.stats.unfit_where) + (", ..." if self.stats.unfit > self.SHOWN_UNFIT else "")
            logger.warning("%s: %d samples skipped: longer than %s even after truncation (system text, tools and "
                           "tool calls are never cut; raise --max_src_len / --max_len to keep them): %s", path,
                           self.stats.unfit, limits, shown)
        if not self.examples:
            raise DataError(f"{path}: no usable sample ({self.stats.samples} read, {self.stats.skipped} skipped "
                            f"as truncated (--is_skip), {self.stats.unfit} too long even after truncation; "
                            f"{limits})")
        logger.info("%s: %d samples, %d truncated%s%s", path, self.stats.samples, self.stats.truncated,
                    f", {self.stats.skipped} skipped (--is_skip)" if is_skip else "",
                    f", {self.stats.unfit} skipped as too long" if self.stats.unfit else "")

    @staticmethod
    def _encode(tokenizer, mode, messages, max_len, max_src_len, learn_all_turns, thinking="learn"):
        """({"input_ids", "labels"}, truncated), or (None, True) when the sample cannot fit."""
        messages, truncated = fit_prompt(tokenizer, mode, messages, max_src_len)
        if messages is None:
            return None, True
        ids, labels, answer_start = template.encode_messages(tokenizer, mode, messages, learn_all_turns, thinking)
        if answer_start > max_src_len:  # cannot happen after fit_prompt; kept as a guard on the template
            return None, True
        if len(ids) > max_len:
            if tool_data.is_call(messages[-1]):  # a call is never cut: its arguments would be broken
                return None, True
            # the answer's text, cut so that it fits, keeping its end token
            ids, labels = ids[:max_len - 1] + ids[-1:], labels[:max_len - 1] + labels[-1:]
            truncated = True
        return {"input_ids": ids, "labels": labels}, truncated

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


class EvalShard(Dataset):
    """One rank's share of an evaluation set: samples rank, rank + world_size, ... The shares are padded to the same
    length with a copy of sample 0 whose labels are all -100, so every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively) and no sample is counted twice."""

    def __init__(self, dataset, rank: int, world_size: int):
        self.dataset = dataset
        padded = -(-len(dataset) // world_size) * world_size
        self.indices = list(range(rank, padded, world_size))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        position = self.indices[index]
        if position < len(self.dataset):
            return self.dataset[position]
        example = self.dataset[0]  # every label list blanked (a preference pair has two)
        return {key: [template.IGNORE_INDEX] * len(value) if key.endswith("labels") else value
                for key, value in example.items()}


class DataCollator:
    """Pads a batch to its longest sample. Training pads on the right: every pad then comes after all real tokens,
    so the causal mask alone keeps them out of every real token's attention, no attention_mask is needed and SDPA
    keeps its fused causal kernel; padded labels are -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        if not batch:  # a rank's empty share of the epoch's last batch (EpochBatches): one pad token, no label
            batch = [{"input_ids": [self.pad_token_id], "labels": [template.IGNORE_INDEX]}]
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), template.IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"])
        return {"input_ids": input_ids, "labels": labels}


class EpochBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of one training epoch, as lists of sample indices (a DataLoader's batch_sampler):
    over all ranks, every sample of the data set trains exactly once per epoch.

    Every epoch a new order (seeded by seed + epoch, the same on every rank) is cut into global batches of
    batch_size x world_size samples, each dealt out to the ranks. The last global batch may hold fewer: the ranks
    share it (smaller micro-batches), and a rank left without a sample gets an empty micro-batch, which the
    collators turn into one row of padding without labels, so that every rank runs the same number of forwards and
    backwards (DeepSpeed reduces gradients collectively). train.py weighs every window by its labelled tokens, so a
    smaller last batch weighs what it holds.

    Random order (default): torch.randperm, each global batch dealt round-robin (rank r takes its samples r, r + W,
    ...): for whole batches the order DistributedSampler gives. `group_by_length`: the order is cut into
    mega-batches of `mega` global batches, each sorted by length (longest first) and cut into global batches dealt
    in contiguous slices, so each micro-batch holds samples of similar length (little padding); the whole global
    batches are then shuffled, the incomplete one (if any) comes last."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int = 0,
                 group_by_length: bool = False, mega: int = 50):
        self.lengths, self.batch_size, self.world_size, self.rank = lengths, batch_size, world_size, rank
        self.seed, self.group_by_length, self.mega, self.epoch = seed, group_by_length, mega, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_size = self.batch_size * self.world_size
        if not self.group_by_length:
            return [order[start:start + global_size] for start in range(0, len(order), global_size)]
        span = global_size * self.mega
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + global_size] for i in range(0, len(chunk), global_size)]
        whole = [b for b in batches if len(b) == global_size]
        permutation = torch.randperm(len(whole), generator=generator).tolist()
        return [whole[i] for i in permutation] + [b for b in batches if len(b) < global_size]

    def _share(self, batch: list[int]) -> list[int]:
        """This rank's part of a global batch (all of them batch_size long but the last one's)."""
        if not self.group_by_length:
            return batch[self.rank::self.world_size]
        size = -(-len(batch) // self.world_size)
        return batch[self.rank * size:(self.rank + 1) * size]

    def __iter__(self):
        for batch in self._global_batches():
            yield self._share(batch)

    def __len__(self):
        return -(-len(self.lengths) // (self.batch_size * self.world_size))
