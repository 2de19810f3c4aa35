"""--sequence_parallel_size N: each sample's sequence split over N ranks with DeepSpeed's Ulysses sequence
parallelism (deepspeed.runtime.sequence_parallel, the Arctic Long Sequence Training work).

What DeepSpeed provides and this module only wires up:
- parallel_state_sp: the process groups (N consecutive ranks share a sample; data parallel over the world / N
  groups);
- UlyssesSPAttentionHF: around each attention, an all-to-all turns [local tokens, all heads] into [all tokens,
  heads / N] for the core attention (our SDPA) and back;
- UlyssesSPDataLoaderAdapter: gathers one batch from each rank of a group, shifts its labels over the whole sequence
  (shift_labels) and gives each rank its slice of every batch in turn.

The engine itself gets no `mpu`, so for DeepSpeed every rank is a data-parallel rank: ZeRO partitions over all
ranks (as it would with the mpu) and every gradient reduction divides by the world size. With the mpu, DeepSpeed
0.19.8 divides by world / N in ZeRO-2 and in ZeRO-3's contiguous-bucket path, but by the world size in ZeRO-3's
reduce-scatter path (the default: stage3.py's __avg_scatter_grads, reduce_scatter_coalesced), so the gradient's
scale would depend on the path a bucket takes (tests/test_sequence_parallel.py caught ZeRO-3 at half the gradient).
train.py divides each rank's summed loss by the labelled tokens of all ranks and multiplies by the world size: the
gradient of the token mean, as without sequence parallelism.

Everything else in the network (embeddings, norms, MLP, rotary from the sliced position_ids, the LM head and the
chunked loss) works on the local slice unchanged. The model's hook is SelfAttention.attention_function
(model/modeling_chatglm2.py).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from model.config import read_json
from model.template import IGNORE_INDEX

logger = logging.getLogger("chatglm")
SUPPORTED_MODES = ("glm2", "glm3", "glm4")  # the network of model/modeling_chatglm2.py


def check_flags(parser, args) -> None:
    """In parse_args, before anything is loaded: the refusals, each in one line."""
    size = args.sequence_parallel_size
    if size < 1:
        parser.error(f"--sequence_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    if args.mode not in SUPPORTED_MODES:
        # ChatGLM-6B's prompt is attended bidirectionally (a prefix-LM mask): Ulysses attention is causal-only
        parser.error(f"--sequence_parallel_size {size}: --mode {args.mode} is not supported (ChatGLM-6B's "
                     f"bidirectional prompt needs a full attention mask); use it with {', '.join(SUPPORTED_MODES)}")
    if args.train_type == "ptuning":
        # the P-Tuning prefix would be keys every shard sees, outside the all-to-all's sequence layout
        parser.error(f"--sequence_parallel_size {size} does not work with --train_type ptuning: use lora, freeze or "
                     f"all")
    if args.packing:
        parser.error(f"--sequence_parallel_size {size} does not work with --packing yet")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % size:
        parser.error(f"--sequence_parallel_size {size} must divide the number of ranks ({world_size})")
    config_file = os.path.join(args.model_name_or_path, "config.json")
    if os.path.isfile(config_file):  # an unreadable checkpoint directory is named by train.py's own checks
        try:
            heads, groups = attention_heads(read_json(config_file))
        except (ValueError, KeyError, TypeError):
            return
        # Ulysses gives every rank heads / N query heads and splits (or, when fewer, repeats) the key/value groups
        # (UlyssesSPAttentionHF's rule)
        if heads % size or (groups % size and size % groups):
            parser.error(f"--sequence_parallel_size {size}: {args.model_name_or_path} has {heads} attention heads "
                         f"and {groups} key/value groups; N must divide the heads, and divide the groups or be a "
                         f"multiple of them")


def attention_heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config["multi_query_group_num"] if config.get("multi_query_attention") else heads


# ------------------------------------------------------------------------------------------------------------------
# groups and the attention
# ------------------------------------------------------------------------------------------------------------------
def initialize(size: int):
    """DeepSpeed's sequence-parallel groups (once per process): parallel_state_sp, or None without sequence
    parallelism."""
    if size == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    return mpu


def install(model, args) -> None:
    """With --sequence_parallel_size above 1, put DeepSpeed's Ulysses attention around the core attention of every
    layer of `model` (a LoRA-wrapped model too). One UlyssesSPAttentionHF serves all layers, as in DeepSpeed's own
    registration; the sequence length may change from batch to batch."""
    mpu = initialize(args.sequence_parallel_size)
    if mpu is None:
        return
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    layers = [m for m in model.modules() if hasattr(type(m), "attention_function")]
    body = next(m for m in model.modules() if hasattr(type(m), "position_ids_for"))
    first = layers[0]
    ulysses = UlyssesSPAttentionHF(attn=type(first).attention_function, batch_size=args.per_device_train_batch_size,
                                   attn_head_count=first.num_heads, attn_head_size=first.head_dim,
                                   kv_head_count=first.num_groups, num_hidden_layers=len(layers),
                                   process_group=mpu.get_sequence_parallel_group(), seq_length_is_variable=True)
    positions = {}

    def remember_positions(_body, _args, kwargs):
        positions["local"] = kwargs.get("position_ids")

    # Ulysses gathers the position ids of the whole sequence for the core attention (which needs them only for
    # packed samples); they reach the body, not the layers, so the body's call hands them over.
    body.register_forward_pre_hook(remember_positions, with_kwargs=True)

    def ulysses_attention(module, query, key, value, allowed, **kwargs):
        if allowed is not None:  # a mask over the local keys means nothing after the all-to-all
            raise ValueError("sequence parallelism needs right-padded batches without an attention mask")
        if positions.get("local") is None:
            raise ValueError("sequence parallelism needs position_ids in every forward")
        return ulysses(module, query, key, value, None, position_ids=positions["local"], **kwargs)

    for layer in layers:
        layer.attention_function = ulysses_attention
    world_size = torch.distributed.get_world_size()
    logger.info("sequence parallel: each sample over %d ranks (Ulysses attention in %d layers), data parallel over %d",
                ulysses.world_size, len(layers), world_size // ulysses.world_size)


@contextlib.contextmanager
def whole_sequences(model):
    """Inside: every layer of `model` attends with its plain core attention (the class's attention_function), not
    with the Ulysses wrapper install() put on the instance; restored on leaving.

    For generation (monitor.py's sample answers): it runs on whole, unsliced prompts (nothing shards them), and
    the wrapper's all-to-all would wait for the other ranks of the group, which are elsewhere (evaluating, at
    save_checkpoint's barrier): the run hung until the process group's timeout (issue 34). Bypassed, each rank
    computes the whole attention itself, so rank 0 generates alone as without sequence parallelism, and under
    ZeRO-3 the ranks generate in step only for ZeRO-3's own weight gathering (Monitor.synced), as without it. The
    alternative, every rank of the group generating one slice of each sequence, would need the prompt padded to a
    multiple of N and re-sliced at every new token, for a few short prompts. Without sequence parallelism (no
    wrapper installed) this does nothing."""
    wrapped = [module for module in model.modules() if "attention_function" in vars(module)]
    saved = [vars(module).pop("attention_function") for module in wrapped]
    try:
        yield
    finally:
        for module, function in zip(wrapped, saved):
            module.attention_function = function


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
def pad_batch(batch: dict, extra: int, pad_token_id: int) -> dict:
    """`extra` more tokens on the right of every row: the pad id, label -100, position 0."""
    if extra:
        fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0}
        for name, value in fill.items():
            if name in batch:
                batch[name] = torch.nn.functional.pad(batch[name], (0, extra), value=value)
    return batch


class PadToMultiple:
    """Around a collator: pads each batch on the right to a multiple of `multiple` tokens (pad id, label -100) and
    adds position_ids (0, 1, ... for right-padded samples: what the model computes itself without them), which
    DeepSpeed's adapter requires so that every slice keeps its tokens' global positions. A batch of fewer than `rows`
    samples (the last one of an evaluation) gets rows of padding without labels: Ulysses attention is built for one
    micro-batch size, and the adapter expects the same one on every rank."""

    def __init__(self, collate, multiple: int, pad_token_id: int, rows: int = 1):
        self.collate, self.multiple, self.pad_token_id, self.rows = collate, multiple, pad_token_id, rows

    def __call__(self, examples):
        batch = self.collate(examples)
        missing = self.rows - batch["input_ids"].shape[0]
        if missing > 0:
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
            batch = {name: torch.cat([value, value.new_full((missing, value.shape[1]), fill[name])])
                     if name in fill else value for name, value in batch.items()}
        if "position_ids" in batch:
            return pad_batch(batch, -batch["input_ids"].shape[1] % self.multiple, self.pad_token_id)
        batch = pad_batch(batch, -batch["input_ids"].shape[1] % self.multiple, self.pad_token_id)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
        return batch


class SameLengthInGroup:
    """The batches of a loader, each padded to the longest batch of its sequence-parallel group. gloo's all_gather
    (which DeepSpeed's adapter uses to pass the batches around the group) needs tensors of one shape on every rank,
    where NCCL takes them uneven; so this costs the extra padding only on gloo (the CPU)."""

    def __init__(self, loader, group, pad_token_id: int):
        self.loader, self.group, self.pad_token_id = loader, group, pad_token_id

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            length = torch.tensor([batch["input_ids"].shape[1]])
            torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX, group=self.group)
            yield pad_batch(batch, int(length) - batch["input_ids"].shape[1], self.pad_token_id)


class ShardedLoader:
    """A DataLoader whose batches each rank of a sequence-parallel group receives in slices: DeepSpeed's
    UlyssesSPDataLoaderAdapter, started afresh on every iter() (the wrapped loader's sampler then draws the epoch's
    order, as train.py sets it). With N ranks to a group, the group trains on the N ranks' batches one after the
    other, so there are N times as many (sliced) batches per rank: with one group, the batches come in the order a
    single rank would read them. Each batch holds input_ids, position_ids and shift_labels (no labels)."""

    def __init__(self, loader, mpu):
        from deepspeed.accelerator import get_accelerator

        self.loader, self.mpu = loader, mpu
        self.size = mpu.get_sequence_parallel_world_size()
        self.device = get_accelerator().current_device_name()
        pad_token_id = loader.collate_fn.pad_token_id
        rows = loader.batch_size or loader.batch_sampler.batch_size  # training: dataset.EpochBatches
        loader.collate_fn = PadToMultiple(loader.collate_fn, self.size, pad_token_id, rows)
        group = mpu.get_sequence_parallel_group()
        self.batches = SameLengthInGroup(loader, group, pad_token_id) \
            if torch.distributed.get_backend(group) == "gloo" else loader

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __len__(self):
        return len(self.loader) * self.size

    def __iter__(self):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        return UlyssesSPDataLoaderAdapter(self.batches, sp_rank=self.mpu.get_sequence_parallel_rank(),
                                          sp_group=self.mpu.get_sequence_parallel_group(),
                                          sp_world_size=self.size, device=self.device)


def shard(loader, mpu):
    """The loader as train.py uses it: unchanged without sequence parallelism, else a ShardedLoader."""
    return loader if mpu is None or loader is None else ShardedLoader(loader, mpu)
