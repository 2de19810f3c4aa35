"""Preference training after supervised fine-tuning: DPO and ORPO in train.py's own loop (`--stage dpo|orpo`).

    deepspeed train.py --stage dpo --mode glm3 --model_name_or_path ChatGLM3-6B --train_path data/dpo_train.jsonl \\
        --dev_path data/dpo_dev.jsonl --train_type lora --pref_beta 0.1 --learning_rate 5e-5 --output_dir out-dpo

Data: JSON Lines (or a JSON array) of {"instruction", "input", "chosen", "rejected"} (the seed format, with an optional
"history"), or {"conversations": [... ending with a user or observation turn], "chosen": ..., "rejected": ...}. An
answer is text or, for glm3/glm4, an assistant message (tool calls in the forms tool_data.py reads). Both answers get
the chat template, the masks and the prompt truncation of supervised training on ONE shared prompt; only answer tokens
count. A pair whose longer answer cannot fit `--max_len` is left out whole (never one answer cut and not the other).

The objectives are small pure functions of per-sequence log-probabilities, as TRL keeps them; tests/test_preference.py
feeds TRL 1.16's DPOTrainer._compute_loss and ORPOTrainer.odds_ratio_loss the same log-probabilities:
- DPO, sigmoid loss (Rafailov et al. 2023), with the conservative label smoothing eps of cDPO:
  loss = -(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d), d = (pi_c - ref_c) - (pi_r - ref_r), the
  log-probabilities summed over each answer's tokens; rewards = beta * (pi - ref).
- ORPO (Hong et al. 2024): loss = NLL(chosen answer tokens, token mean) - beta * log sigmoid(log odds_c - log odds_r),
  odds from the per-token mean log-probabilities; rewards = beta * mean log-probability. TRL's ORPOTrainer puts the
  prompt tokens into its NLL too; here, as in the paper, only the answer is learned (the prompt is never a target).
Both are averaged over the pairs of the whole optimizer step (all ranks), as the token loss of SFT is over its tokens.

The reference of DPO: for lora (QLoRA too) and ptuning the same model with the adapter or prefix switched off, so no
second copy of the weights; for freeze / all the log-probabilities of the weights as loaded, computed once before the
first step and kept in every checkpoint's DeepSpeed state (a resumed run reads them instead of recomputing).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dataset import DataCollator, DataError, DataStats, fit_prompt, read_records, sample_to_messages
from model import template

logger = logging.getLogger("chatglm")
STAGES = ("sft", "dpo", "orpo")
ADAPTER_TYPES = ("lora", "ptuning")  # their DPO reference is the model with the adapter switched off
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected")


def add_flags(parser) -> None:
    group = parser.add_argument_group("preference training (after supervised fine-tuning; see docs/training.md)")
    group.add_argument("--stage", default="sft", choices=STAGES,
                       help="sft: learn the answers; dpo / orpo: learn to prefer each pair's 'chosen' answer to its "
                            "'rejected' one (data: instruction/input or conversations, with chosen and rejected)")
    group.add_argument("--pref_beta", type=float, default=0.1,
                       help="dpo: beta, how far the policy may move from the reference; orpo: lambda, the weight "
                            "of the odds-ratio term beside the chosen answer's NLL")
    group.add_argument("--pref_label_smoothing", type=float, default=0.0,
                       help="dpo: the share of pairs assumed to be labelled the wrong way round (conservative DPO), "
                            "in [0, 0.5)")
    group.add_argument("--ref_model_path", default=None,
                       help="dpo: the reference model's checkpoint directory (a full checkpoint of the same --mode, "
                            "e.g. the merged SFT model); its log-probabilities are computed once before training. "
                            "Default: the model being trained as loaded (lora / ptuning: with the adapter off)")


def check_flags(parser, args) -> None:
    if args.stage == "sft":
        return
    if not args.pref_beta > 0:
        parser.error(f"--pref_beta must be above 0, got {args.pref_beta}")
    if not 0 <= args.pref_label_smoothing < 0.5:
        parser.error(f"--pref_label_smoothing must be in [0, 0.5), got {args.pref_label_smoothing}")
    if args.ref_model_path and args.stage != "dpo":
        parser.error(f"--ref_model_path is DPO's reference; --stage {args.stage} has none: leave it out")
    if args.stage == "orpo" and args.pref_label_smoothing:
        parser.error("--pref_label_smoothing is DPO's; ORPO has no such term: leave it out with --stage orpo")
    if args.packing:  # a pair must stay in one micro-batch, and packed rows mix samples
        parser.error(f"--packing with --stage {args.stage} is not supported: the two answers of a pair are scored "
                     f"as whole sequences side by side; leave --packing out")
    if args.sequence_parallel_size > 1:
        parser.error(f"--sequence_parallel_size with --stage {args.stage} is not supported: an answer's "
                     f"log-probability needs the whole sequence on one rank; leave it at 1")


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
def _answer_message(mode: str, answer, where: str, which: str) -> dict:
    if isinstance(answer, str):
        return {"role": "assistant", "content": answer}
    if isinstance(answer, dict) and mode in template.MESSAGE_MODES:
        return {"role": "assistant", **{k: v for k, v in answer.items() if k != "role"}}
    kinds = "text or an assistant message" if mode in template.MESSAGE_MODES else "text"
    raise DataError(f"{where}: '{which}' must be {kinds}, got {type(answer).__name__}")


def pair_messages(mode: str, sample, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prompt, chosen answer messages, rejected answer messages) of one preference sample, converted as
    supervised samples are (`dataset.sample_to_messages`, tool calls included)."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    for which in ("chosen", "rejected"):
        if which not in sample:
            raise DataError(f"{where}: a preference sample needs '{which}' (and the other of chosen / rejected)")
    if not sample["chosen"] and not sample["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are both empty")
    if sample["chosen"] == sample["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer: the pair teaches nothing")
    rest = {k: v for k, v in sample.items() if k not in ("chosen", "rejected", "output")}
    whole = []
    for which in ("chosen", "rejected"):
        answer = _answer_message(mode, sample[which], where, which)
        if "conversations" in rest or "messages" in rest:
            key = "conversations" if "conversations" in rest else "messages"
            if not isinstance(rest[key], list) or not rest[key]:
                raise DataError(f"{where}: '{key}' must be a non-empty list of messages ending with a user turn")
            if rest[key][-1].get("role") not in ("user", "observation"):
                raise DataError(f"{where}: '{key}' must end with a user (or observation) turn: the answers to "
                                f"compare are 'chosen' and 'rejected'")
            converted = sample_to_messages(mode, {**rest, key: rest[key] + [answer]}, where, check_tools=True)
        else:
            if not isinstance(answer.get("content"), str):
                raise DataError(f"{where}: '{which}' must be text")
            converted = sample_to_messages(mode, {**rest, "output": answer["content"]}, where)
        whole.append(converted)
    chosen, rejected = whole
    # the answers are the assistant messages after the last other one (a parallel tool call is several)
    start = max(i for i, m in enumerate(chosen) if m["role"] != "assistant") + 1
    if chosen[:start] != rejected[:start]:  # cannot happen: both are converted from one prompt
        raise DataError(f"{where}: the prompt converts differently with the two answers")
    return chosen[:start], chosen[start:], rejected[start:]


class PreferenceDataset(Dataset):
    """Pairs tokenised once by the mode's chat template. An example holds the chosen answer as input_ids / labels and
    the rejected one as rejected_input_ids / rejected_labels (labels -100 on the shared prompt), and its index in the
    file's usable pairs (the key of a precomputed reference log-probability)."""

    SHOWN_UNFIT = 5

    def __init__(self, path: str, tokenizer, mode: str, max_len: int, max_src_len: int):
        self.stats = DataStats()
        self.examples = []
        for number, sample in read_records(path):
            where = f"{path}:{number}"
            prompt, chosen, rejected = pair_messages(mode, sample, where)
            self.stats.samples += 1
            example, truncated = self._encode(tokenizer, mode, prompt, chosen, rejected, max_len, max_src_len)
            if example is None:
                self.stats.unfit += 1
                if len(self.stats.unfit_where) < self.SHOWN_UNFIT:
                    self.stats.unfit_where.append(where)
                continue
            self.stats.truncated += truncated
            self.examples.append({**example, "index": len(self.examples)})
        limits = f"max_len={max_len} / max_src_len={max_src_len}"
        if self.stats.unfit:
            shown = ", ".join(self.stats.unfit_where) + (", ..." if self.stats.unfit > self.SHOWN_UNFIT else "")
            logger.warning("%s: %d pairs skipped: an answer does not fit %s beside its prompt (answers are never "
                           "cut; raise --max_len to keep them): %s", path, self.stats.unfit, limits, shown)
        if not self.examples:
            raise DataError(f"{path}: no usable pair ({self.stats.samples} read, {self.stats.unfit} too long; "
                            f"{limits})")
        logger.info("%s: %d pairs, %d with a shortened prompt%s", path, self.stats.samples, self.stats.truncated,
                    f", {self.stats.unfit} skipped as too long" if self.stats.unfit else "")

    @staticmethod
    def _encode(tokenizer, mode, prompt, chosen, rejected, max_len, max_src_len):
        """(example, prompt shortened) or (None, True) when an answer cannot fit."""
        # the prompt is cut once, for both answers (fit_prompt looks at everything before the last message)
        fitted, truncated = fit_prompt(tokenizer, mode, prompt + [{"role": "assistant", "content": ""}],
                                       max_src_len)
        if fitted is None:
            return None, True
        context = fitted[:-1]
        example = {}
        for prefix, answer in (("", chosen), ("rejected_", rejected)):
            ids, labels, _ = template.encode_messages(tokenizer, mode, context + answer, learn_all_turns=False)
            if len(ids) > max_len:
                return None, True
            example[prefix + "input_ids"], example[prefix + "labels"] = ids, labels
        return example, truncated

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


class PairCollator:
    """A micro-batch of k pairs as 2k right-padded rows, the k chosen answers first, then the k rejected ones in the
    same order (TRL's concatenated layout): one forward scores both answers of every pair. `pair_index` keys the
    precomputed reference; `real` is False for the evaluation shard's padding pairs (labels all -100)."""

    def __init__(self, pad_token_id: int):
        self.pad = DataCollator(pad_token_id)

    def __call__(self, pairs):
        if not pairs:  # a rank's empty share of the epoch's last batch (dataset.EpochBatches): one padding pair
            pad, ignore = self.pad.pad_token_id, template.IGNORE_INDEX
            pairs = [{"input_ids": [pad], "labels": [ignore], "rejected_input_ids": [pad],
                      "rejected_labels": [ignore], "index": 0}]
        rows = [{"input_ids": p["input_ids"], "labels": p["labels"]} for p in pairs] + \
               [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs]
        batch = self.pad(rows)
        batch["pair_index"] = torch.tensor([p["index"] for p in pairs])
        batch["real"] = torch.tensor([any(label != template.IGNORE_INDEX for label in p["labels"]) for p in pairs])
        return batch


def preview_lines(args, tokenizer, colour: bool) -> list[str]:
    """monitor.py's --preview for pairs: the first --preview pairs of --train_path, each answer on the shared
    prompt, learned tokens marked."""
    from monitor import render

    stops = set(template.stop_token_ids(tokenizer, args.mode))
    lines = [f"preview of the first {args.preview} pairs of {args.train_path}: learned tokens "
             + ("in green" if colour else "in [[ ]]")]
    for number, (line, record) in enumerate(read_records(args.train_path)[:args.preview], start=1):
        where = f"{args.train_path}:{line}"
        prompt, chosen, rejected = pair_messages(args.mode, record, where)
        example, truncated = PreferenceDataset._encode(tokenizer, args.mode, prompt, chosen, rejected,
                                                       args.max_len, args.max_src_len)
        if example is None:
            lines.append(f"--- pair {number} ({where}): left out: an answer does not fit --max_len {args.max_len} "
                         f"beside its prompt (--max_src_len {args.max_src_len})")
            continue
        lines.append(f"--- pair {number} ({where}): prompt "
                     + ("shortened to fit --max_src_len" if truncated else "whole"))
        for which in ("", "rejected_"):
            ids, labels = example[which + "input_ids"], example[which + "labels"]
            learned = sum(label != template.IGNORE_INDEX for label in labels)
            lines.append(f"{which[:-1] or 'chosen'}: {len(ids)} tokens, {learned} learned")
            lines.append(render(tokenizer, ids, labels, stops, colour))
    return lines


# ------------------------------------------------------------------------------------------------------------------
# the losses: pure functions of log-probabilities
# ------------------------------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, their count), in fp32: position t predicts
    labels[t + 1]."""
    targets = labels[:, 1:].to(logits.device)
    mask = targets != template.IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             label_smoothing: float = 0.0):
    """Per-pair DPO loss (sigmoid, conservative with label_smoothing) and the implicit rewards (chosen, rejected)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps, rejected_mean_logps, chosen_nll, beta: float):
    """Per-pair ORPO loss: the chosen answer's NLL (token mean) minus beta * log sigmoid(log odds ratio), and the
    rewards beta * mean log-probability (chosen, rejected)."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps)
                                                            - log1mexp(rejected_mean_logps))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach()


# ------------------------------------------------------------------------------------------------------------------
# the objective train.py's loop calls
# ------------------------------------------------------------------------------------------------------------------
@contextmanager
def adapter_off(model):
    """The model as it was before training: a PEFT model with its adapters disabled, or a P-Tuning model without
    its prefix (every body that owns one runs as if pre_seq_len were 0)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    bodies = [m for m in model.modules() if getattr(m, "pre_seq_len", 0) and hasattr(m, "prefix_encoder")]
    lengths = [m.pre_seq_len for m in bodies]
    try:
        for m in bodies:
            m.pre_seq_len = 0
        yield
    finally:
        for m, length in zip(bodies, lengths):
            m.pre_seq_len = length


def forward_logps(engine, batch):
    """(summed log-probabilities, labelled tokens) of each row of a pair batch."""
    # no labels: every model returns its logits (ours and transformers' own classes alike)
    logits = engine(input_ids=batch["input_ids"].to(engine.device), use_cache=False).logits
    return sequence_logps(logits, batch["labels"])


class ReferenceEngine:
    """A reference model (--ref_model_path) called as train.py calls its DeepSpeed engine."""

    def __init__(self, module, device):
        self.module, self.device = module.to(device), device

    def __call__(self, **inputs):
        return self.module(**inputs)

    def eval(self):
        self.module.eval()

    def train(self):
        pass


class PreferenceObjective:
    """DPO or ORPO over pair batches, for train.py's train_step and evaluate: `units` counts a batch's pairs (the
    divisor of the step's mean), `loss` returns the summed loss of its pairs and the sums of METRICS."""

    def __init__(self, args):
        self.stage, self.beta, self.smoothing = args.stage, args.pref_beta, args.pref_label_smoothing
        self.adapter_reference = args.train_type in ADAPTER_TYPES and not args.ref_model_path
        self.reference = {}  # "train" / "dev": [pairs, 2] log-probabilities of the weights as loaded (freeze / all)

    names = METRICS

    @staticmethod
    def units(batch) -> int:
        return int(batch["real"].sum())

    def reference_logps(self, engine, batch, split: str):
        if self.stage != "dpo":
            return None
        if not self.adapter_reference:
            table = self.reference[split][batch["pair_index"]].to(engine.device)
            return table[:, 0], table[:, 1]
        was_training = engine.module.training
        engine.module.eval()  # the reference has no dropout
        with torch.no_grad(), adapter_off(engine.module):
            logps, _ = forward_logps(engine, batch)
        engine.module.train(was_training)
        return logps.chunk(2)

    def loss(self, engine, batch, split: str = "train"):
        """(summed loss of the batch's pairs, sums of METRICS); `split` names the data set whose precomputed
        reference the pairs' indices refer to."""
        reference = self.reference_logps(engine, batch, split)
        real = batch["real"].to(engine.device)
        logps, counts = forward_logps(engine, batch)
        chosen, rejected = logps.chunk(2)
        chosen_count, rejected_count = counts.chunk(2)
        if self.stage == "dpo":
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *reference, self.beta,
                                                                self.smoothing)
        else:
            # a padding pair has no token (mean 0, where log(1 - e^0) is -inf): give it a finite stand-in, since a
            # NaN would survive the masking below, and so would its gradient
            chosen_mean = torch.where(real, chosen / chosen_count.clamp(min=1), -1.0)
            rejected_mean = torch.where(real, rejected / rejected_count.clamp(min=1), -1.0)
            losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_mean, rejected_mean, -chosen_mean,
                                                                 self.beta)
            chosen, rejected = chosen_mean, rejected_mean  # ORPO reports the mean log-probabilities
        stats = torch.stack([chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                             chosen.detach(), rejected.detach()])
        return (losses * real).sum(), (stats * real).sum(dim=1).double()

    def describe(self, sums, pairs: float) -> dict:
        """Mean of each metric over `pairs` pairs, and the margin."""
        values = {name: value / max(pairs, 1) for name, value in zip(METRICS, sums)}
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        return values

    def prepare(self, engine, loaders: dict, saved: dict | None, reference_model=None) -> None:
        """freeze / all (or --ref_model_path): the reference log-probabilities of every pair, read from a resumed
        checkpoint or computed now, before the first step (the weights are still those loaded), by
        `reference_model` where one is given. Each rank scores its evaluation shard of the data; the sums over
        ranks give every rank the whole table."""
        if self.stage != "dpo" or self.adapter_reference:
            return
        if saved:
            self.reference = {split: table.cpu() for split, table in saved.items()}
            logger.info("reference log-probabilities read from the checkpoint")
            return
        if reference_model is not None:
            engine = ReferenceEngine(reference_model, engine.device)
        engine.eval()
        for split, (loader, size) in loaders.items():
            table = torch.zeros(size, 2, dtype=torch.float32, device=engine.device)
            with torch.no_grad():
                for batch in loader:
                    logps, _ = forward_logps(engine, batch)
                    real = batch["real"]
                    index = batch["pair_index"][real].to(engine.device)
                    table[index] = torch.stack(logps.chunk(2), dim=1)[real.to(engine.device)]
            torch.distributed.all_reduce(table)
            self.reference[split] = table.cpu()
        engine.train()
        logger.info("reference log-probabilities of the loaded weights: %s",
                    ", ".join(f"{split} {len(table)} pairs" for split, table in self.reference.items()))

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run does not recompute the reference."""
        return {"reference_logps": self.reference} if self.reference else {}

