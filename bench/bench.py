"""Training speed and memory: our ChatGLM3 (or GLM-4) through train.py's own step, beside the peer a user would
otherwise pick (transformers' GlmForCausalLM, the same network, with PEFT LoRA, SDPA and gradient checkpointing).

    python bench/bench.py                          # GPU: ChatGLM3-6B shape in bf16, every case of the table
    python bench/bench.py --shape glm-4-9b         # GPU: GLM-4-9B shape, --mode glm4 (rope_ratio 500)
    python bench/bench.py --shape tiny --steps 3   # any machine: tiny shape (CPU: fp32, no memory column)
    python bench/bench.py --cases lora:2048x4:ckpt lora:1560x1:ckpt --output bench/RESULTS.md
    python bench/bench.py --cases qlora4:1560x1:ckpt qlora8:1560x1:ckpt   # QLoRA: --quantization_bit 4 / 8
    python bench/bench.py --cases all:2048x2:ckpt --ds_file ds_zero3_offload_optimizer.json   # full, ZeRO-3
    python bench/bench.py --cases long             # GPU: GLM-4-9B LoRA, checkpointing, 16K / 32K / 64K tokens
    deepspeed --num_gpus 2 bench/bench.py --cases long   # and 128K with --sequence_parallel_size 2 (":sp2")

Random weights are built directly on the device; batches are random token ids with every position labelled.
Each case runs train.py's parse_args -> fill_ds_config -> apply_train_type -> build_engine (deepspeed.initialize,
training mode) -> train_step, so what is measured is the training loop itself. QLoRA cases (qlora4, qlora8: LoRA
with --quantization_bit 4 / 8) and ZeRO-3 cases (all, with ds_zero3_offload.json) write the random weights as a
checkpoint first and load it through train.build_model, so the base is quantized, or partitioned, exactly as
train.py does it. The peer runs for the lora and all cases, under the same DeepSpeed config; only the model
differs (for all: GlmForCausalLM built on the device, partitioned by deepspeed.initialize). Each model of a case is
measured in a fresh process, one after the other (run_in_child says why).
A `:real` case (e.g. lora:2048x4:ckpt:real) trains on samples of real lengths instead of full rows: lengths drawn
(seeded, with replacement) from bench/real_lengths.json, the tokenized lengths of ../shared/data/spo_train.jsonl
(median 185, mean 211, max 1249 tokens; the file says how they were made), each cut to the case's length, with
random token ids. The same samples run four ways, each reporting real (non-padding) tokens/s: ours padded (batches
of SEQxBATCH's batch samples, padded to the longest, as train.py's default), ours packed (--packing: the samples in
rows of SEQ tokens, batches of that many rows), the peer padded, and the peer padding-free (transformers'
DataCollatorWithFlattening: each batch's samples in one row, sequences told apart by position_ids, which
GlmForCausalLM's SDPA masks block-diagonally). Each batch is one optimizer step, so a packed run takes fewer,
larger steps over the same samples; compare peak memory too (lora:2048x1:ckpt:real packs into one row of 2048 a
batch). MFU is left out for these cases.
`--ds_file` gives every case another DeepSpeed JSON (e.g. ds_zero3_offload_optimizer.json for all). MFU counts
model FLOPs only: 6N per token for full training, 4N for LoRA/freeze/ptuning (no weight gradients for the frozen
base), plus attention, recomputation not counted.
A case ending in ":spN" trains with --sequence_parallel_size N: it runs in the N processes of the deepspeed launcher
(each rank measures its slice of the same samples; rank 0 prints the table), ours only.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  train.py's own functions
from model import MODE  # noqa: E402
from model.compat import enable_activation_checkpointing  # noqa: E402
from utils import DTYPES, PRECISIONS, add_bool_flag  # noqa: E402
from dataset import DataCollator  # noqa: E402
from packing import PackedCollator, PackedDataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # the official chatglm3-6b and glm-4-9b-chat config.json, and a tiny one for machines without a GPU
    "chatglm3-6b": dict(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                        kv_channels=128, num_attention_heads=32, multi_query_group_num=2, seq_length=8192),
    "glm-4-9b": dict(num_layers=40, padded_vocab_size=151552, hidden_size=4096, ffn_hidden_size=13696,
                     kv_channels=128, num_attention_heads=32, multi_query_group_num=2, seq_length=131072),
    "tiny": dict(num_layers=2, padded_vocab_size=1088, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
                 num_attention_heads=4, multi_query_group_num=2, seq_length=4096),
}
SHAPE_MODES = {"chatglm3-6b": "glm3", "glm-4-9b": "glm4", "tiny": "glm3"}  # --mode unless given
DEFAULT_CASES = ["lora:1560x1:ckpt", "lora:1560x1:ckpt:compile", "lora:2048x4:ckpt", "lora:2048x4:ckpt:compile",
                 "lora:2048x4:nockpt", "lora:2048x4:nockpt:compile", "freeze:1560x1:ckpt", "ptuning:1560x1:ckpt",
                 "all:2048x2:ckpt", "qlora4:1560x1:ckpt", "qlora8:1560x1:ckpt", "qlora4:2048x4:ckpt",
                 "lora:2048x4:ckpt:real", "lora:2048x1:ckpt:real", "lora:2048x4:ckpt:compile:real"]
# --cases long: GLM-4-9B LoRA with checkpointing, one sample of 16K / 32K / 64K tokens; 128K over 2 ranks
LONG_CASES = ["lora:16384x1:ckpt", "lora:32768x1:ckpt", "lora:65536x1:ckpt"]
LONG_CASES_SP = ["lora:131072x1:ckpt:sp2"]
QLORA = {"qlora4": 4, "qlora8": 8}  # case name -> --quantization_bit (train type lora)
LORA_TARGETS = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"
PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


REAL_LENGTHS = os.path.join(ROOT, "bench", "real_lengths.json")
REAL_WHO = ("ours", "ours-packed", "peer", "peer-flat")  # the four ways a :real case runs its samples


def parse_case(case: str):
    """train_type:SEQxBATCH:ckpt|nockpt[:compile][:real][:spN] -> (train_type, seq, batch, ckpt, compile)."""
    train_type, shape, ckpt, *options = case.split(":")
    seq, batch = (int(x) for x in shape.split("x"))
    return train_type, seq, batch, ckpt == "ckpt", "compile" in options


def is_real(case: str) -> bool:
    return "real" in case.split(":")[3:]


def sequence_parallel_size(case: str) -> int:
    """N of a case's ":spN" option, else 1."""
    sizes = [int(option[2:]) for option in case.split(":")[3:] if option.startswith("sp")]
    return sizes[0] if sizes else 1


def train_args(train_type, batch, ckpt, layers, mode="glm3", compile_blocks=False, ds_file=None, sp=1):
    """The flags a user would pass to train.py for this case."""
    ds_file = ds_file or ("ds_zero3_offload.json" if train_type == "all" else "ds_zero2_no_offload.json")
    bits = QLORA.get(train_type)
    argv = ["--quantization_bit", str(bits)] if bits else []
    argv += ["--model_name_or_path", "-", "--mode", mode, "--train_type", "lora" if bits else train_type,
             "--train_path", "-",
            "--output_dir", "-", "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-5",
            "--lora_dim", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--lora_module_name", LORA_TARGETS,
            "--pre_seq_len", "128", "--freeze_module_name", ",".join(f"layers.{layers - i}." for i in range(1, 5)),
            "--ds_file", os.path.join(ROOT, ds_file)]
    if ckpt:
        argv.append("--gradient_checkpointing")
    argv += ["--compile", str(compile_blocks)]  # explicit: train.py's default compiles where it can
    if sp > 1:
        argv += ["--sequence_parallel_size", str(sp)]
    return train.parse_args(argv)


def flops_per_token(config, seq, train_type):
    """Model FLOPs per trained token (forward x3 for full training, x2 when only adapters/prefix/some layers train)."""
    hidden, layers, heads = config.hidden_size, config.num_layers, config.num_attention_heads
    head_dim = config.kv_channels
    groups = config.multi_query_group_num
    matmul_params = layers * (hidden * (heads + 2 * groups) * head_dim + heads * head_dim * hidden
                              + 3 * hidden * config.ffn_hidden_size) + hidden * config.padded_vocab_size
    attention = 2 * 2 * layers * seq * heads * head_dim / 2  # QK^T and AV, causal half
    forward = 2 * matmul_params + attention
    return forward * (3 if train_type == "all" else 2)


def build_ours(config, dtype, device, mode="glm3"):
    with torch.device(device):
        model = MODE[mode].model(config)
    return model.to(dtype)


def build_peer(config, dtype, device):
    from transformers import GlmConfig, GlmForCausalLM
    peer_config = GlmConfig(vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
                            intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                            num_attention_heads=config.num_attention_heads,
                            num_key_value_heads=config.multi_query_group_num, head_dim=config.kv_channels,
                            rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5,
                                             "rope_theta": 10000.0 * config.rope_ratio},
                            attention_bias=True, rms_norm_eps=config.layernorm_epsilon,
                            max_position_embeddings=config.seq_length, pad_token_id=0)
    peer_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = GlmForCausalLM(peer_config)
    return model.to(dtype)


def build_through_checkpoint(config, args, ds_config, dtype, device):
    """The random model saved as a checkpoint, then loaded by train.build_model, for the cases whose loading is part
    of what is measured: QLoRA (the base quantized as it loads: transformers' BitsAndBytesConfig, PEFT's k-bit
    preparation) and ZeRO-3 (built under deepspeed.zero.Init, each parameter partitioned as it loads). The
    full-precision copy is freed first. QLoRA's checkpoint is written to /dev/shm where there is one; ZeRO-3's to
    disk, since its offloaded optimizer state needs the host's memory."""
    ram = "/dev/shm" if args.quantization_bit and os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=ram) as directory:
        model = build_ours(config, dtype, device, args.mode)
        model.config.chatglm_version = args.mode  # what from_pretrained's version check reads
        model.save_pretrained(directory, max_shard_size="2GB")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the set-up peak is the real load's, not this random build's
        args.model_name_or_path = directory
        return train.build_model(args, ds_config)


def random_window(vocab, seq, batch, accumulation, seed=0, sp=1):
    """Host batches as train.py's DataLoader yields them: pinned where there is a GPU. With sequence parallelism,
    this rank's slices, cut by DeepSpeed's adapter as train.py's loader cuts them (sequence_parallel.py)."""
    generator = torch.Generator().manual_seed(seed)
    window = []
    for _ in range(accumulation):
        ids = torch.randint(3, vocab, (batch, seq), generator=generator)
        window.append({"input_ids": ids, "labels": ids.clone(),
                       "position_ids": torch.arange(seq).expand(batch, -1).clone()})
    if sp > 1:
        import itertools

        import sequence_parallel
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        mpu = sequence_parallel.initialize(sp)
        adapter = UlyssesSPDataLoaderAdapter(window, sp_rank=mpu.get_sequence_parallel_rank(),
                                             sp_group=mpu.get_sequence_parallel_group(), sp_world_size=sp,
                                             device=get_accelerator().current_device_name())
        window = list(itertools.islice(adapter, accumulation))
    if not torch.cuda.is_available():
        return [{k: v.contiguous() for k, v in batch_.items()} for batch_ in window]
    return [{k: v.contiguous().pin_memory() for k, v in batch_.items()} for batch_ in window]


def real_lengths(path: str = REAL_LENGTHS) -> list[int]:
    from model.config import read_json
    return read_json(path)["lengths"]


def write_real_lengths(tokenizer_dir: str, data: str, path: str = REAL_LENGTHS) -> None:
    """bench/real_lengths.json from a data file, tokenized by train.py's dataset (glm4 template, max_len 2048)."""
    import hashlib
    import json

    from dataset import InstructionDataset
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tokenizer_dir)
    dataset = InstructionDataset(data, tokenizer, "glm4", 2048, 1024)
    lengths = [len(e["input_ids"]) for e in dataset.examples]
    with open(os.path.join(tokenizer_dir, "tokenizer.model"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    table = {"what": f"token lengths of the {len(lengths)} samples of {data}, each as train.py tokenizes it: the glm4 "
                     f"chat template, --max_len 2048 --max_src_len 1024 ({dataset.stats.truncated} cut), in file order",
             "tokenizer": f"tokenizer.model of {tokenizer_dir}, sha256 {digest}",
             "written_by": "python bench/bench.py --write_real_lengths TOKENIZER_DIR DATA",
             "summary": {"samples": len(lengths), "min": min(lengths), "median": sorted(lengths)[len(lengths) // 2],
                         "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
             "lengths": lengths}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, ensure_ascii=False, indent=1)
        f.write("\n")


def real_windows(vocab, seq, batch, samples: int, seed=0) -> dict:
    """The same `samples` samples (lengths drawn from real_lengths(), cut to `seq`; random ids, every token
    labelled) as each of REAL_WHO takes them: who -> (list of host batches, real tokens in them)."""
    from types import SimpleNamespace

    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(seed)
    table = real_lengths()
    lengths = [min(table[i], seq) for i in torch.randint(len(table), (samples,), generator=generator).tolist()]
    examples = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
    groups = [examples[i:i + batch] for i in range(0, len(examples), batch)]
    rows = PackedDataset(SimpleNamespace(examples=examples), seq).rows
    flatten = DataCollatorWithFlattening(return_tensors="pt")
    windows = {"ours": [DataCollator(0)(g) for g in groups],
               "ours-packed": [PackedCollator(0)(rows[i:i + batch]) for i in range(0, len(rows), batch)],
               "peer": [DataCollator(0)(g) for g in groups],
               "peer-flat": [{k: v for k, v in flatten(g).items() if k in ("input_ids", "labels", "position_ids")}
                             for g in groups]}
    pin = torch.cuda.is_available()
    return {who: ([{k: v.pin_memory() for k, v in b.items()} if pin else b for b in window], sum(lengths))
            for who, window in windows.items()}


def measure(engine, step_fn, window, steps, warmup, device, tokens=None):
    """(tokens/s, peak GiB, last loss) over `steps` runs of the window; `tokens`: what one run counts (default every
    position of every batch, padding included: the random full rows have none)."""
    for _ in range(warmup):
        step_fn(engine, window)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step_fn(engine, window)
    float(loss)  # one host read at the end: waits for the device
    elapsed = time.perf_counter() - start
    tokens = steps * (tokens if tokens is not None else sum(b["input_ids"].numel() for b in window))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return tokens / elapsed, peak, float(loss)


def host_peak_gib() -> float:
    """The process's peak resident host memory: what the offloaded optimizer state and pinned buffers cost the host."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def memory_trace(engine, step_fn, window) -> str:
    """One more step with the allocator's figures around its phases (GiB now / peak since the step began), to see
    whether the peak comes from the forward, the backward or the optimizer step."""
    marks = []

    def mark(name):
        torch.cuda.synchronize()
        now, peak = torch.cuda.memory_allocated() / 2 ** 30, torch.cuda.max_memory_allocated() / 2 ** 30
        marks.append(f"{name} {now:.1f}/{peak:.1f}")

    forward, backward, step = engine.forward, engine.backward, engine.step

    def traced(name, function):
        def call(*args, **kwargs):
            mark(f"before {name}")
            result = function(*args, **kwargs)
            mark(f"after {name}")
            return result
        return call

    engine.forward, engine.backward, engine.step = (traced("forward", forward), traced("backward", backward),
                                                    traced("step", step))
    torch.cuda.reset_peak_memory_stats()
    try:
        step_fn(engine, window)
    finally:
        engine.forward, engine.backward, engine.step = forward, backward, step
    return "memory GiB (now/peak): " + "; ".join(marks)


def device_timeline(intervals, long_gap_us: float = 100.0) -> tuple[float, float]:
    """(busy, idle in long gaps), in the intervals' unit (us), from the (start, end) of every kernel and copy: busy is
    the length of their union, however many streams overlap; idle gaps shorter than `long_gap_us` are launch latency,
    longer ones are the device waiting for the host."""
    busy, long_idle, reach = 0.0, 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start >= reach:
            if reach is not None and start - reach > long_gap_us:
                long_idle += start - reach
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    return busy, long_idle


def profile_steps(engine, step_fn, window, steps, device, trace_path=None) -> str:
    """`steps` more steps under torch.profiler: whether the device idles while the host prepares work (busy share of
    the wall time, kernels launched per step, the idle time in gaps longer than 100 us), then the ops that take the
    most device time (CPU: host time). The profiler slows the host, so the busy share is a lower bound.
    `trace_path` (*.json.gz) keeps the whole trace for chrome://tracing or Perfetto."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step_fn(engine, window)
        synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    device_events = [(e.time_range.start, e.time_range.end) for e in profiler.events()
                     if e.device_type == DeviceType.CUDA]
    summary = f"profile: {wall_us / steps / 1e3:.1f} ms a step"
    if device_events:
        busy, idle = device_timeline(device_events)
        summary += (f"; device busy {busy / steps / 1e3:.1f} ms ({busy / wall_us:.0%} of the wall time), "
                    f"{len(device_events) / steps:.0f} kernels and copies a step, idle in gaps over 100 us "
                    f"{idle / steps / 1e3:.1f} ms a step")
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=60)
    return "\n".join([summary] + [f"profile| {line}" for line in table.splitlines() if line.strip()])


def our_step(world_size):
    def step(engine, window):
        loss_sums, tokens = train.train_step(engine, window, world_size, train.TokenLoss())
        return loss_sums[0] / tokens
    return step


def peer_step(engine, window):
    for batch in window:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        # No KV cache in training (ours builds none either). It also matters: transformers only reads packed
        # sequences from position_ids where there is no cache; with one, a padding-free row attends across samples.
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
    return loss.detach()


def models_to_run(case: str, with_peer: bool) -> list[str]:
    """Ours always; the peer for the train types it has (LoRA through PEFT, and full training), without sequence
    parallelism. A :real case runs ours padded and packed, and the peer padded and padding-free."""
    peer = with_peer and sequence_parallel_size(case) == 1 and parse_case(case)[0] in ("lora", "all")
    if is_real(case):
        return list(REAL_WHO) if peer else ["ours", "ours-packed"]
    return ["ours", "peer"] if peer else ["ours"]


def run_case(case, shape, dtype_name, steps, warmup, models, peak_tflops, mode="glm3", trace=False,
             ds_file=None, peer_ds_file=None, profile=0, profile_dir=None):
    """Rows (who, tokens/s, MFU, peak GiB, loss) for each of `models` ("ours", "peer"), in this process."""
    import deepspeed

    train_type, seq, batch, ckpt, compile_blocks = parse_case(case)
    sp = sequence_parallel_size(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = MODE[mode].config(**SHAPES[shape], pre_seq_len=128 if train_type == "ptuning" else None,
                               prefix_projection=False)

    def flags_and_ds_config(json_file):
        flags = train_args(train_type, batch, ckpt, config.num_layers, mode, compile_blocks, json_file, sp)
        flags.precision = dtype_name
        return flags, train.fill_ds_config(flags, sp)

    args, ds_config = flags_and_ds_config(ds_file)
    dtype = DTYPES[train.pick_precision(dtype_name)]
    window = random_window(config.padded_vocab_size, seq, batch, args.gradient_accumulation_steps, sp=sp)
    real = real_windows(config.padded_vocab_size, seq, batch, samples=8 * batch) if is_real(case) else {}
    rows = []
    for who in models:
        window, tokens = real.get(who, (window, None))
        who_name, who = who, who.split("-")[0]  # ours-packed is ours, peer-flat the peer, on other batches
        torch.manual_seed(0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if who == "ours" and (args.quantization_bit or ds_config["zero_optimization"].get("stage") == 3):
            model = build_through_checkpoint(config, args, copy.deepcopy(ds_config), dtype, device)
            step_fn = our_step(sp)
        elif who == "ours":
            model = train.apply_train_type(build_ours(config, dtype, device, mode), args)
            step_fn = our_step(sp)
        else:  # for all, every weight trains: ZeRO-3 partitions the built model in deepspeed.initialize
            model = build_peer(config, dtype, device)
            if train_type == "lora":
                from peft import LoraConfig, get_peft_model
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                         target_modules=PEER_TARGETS))
            if ckpt:
                enable_activation_checkpointing(model)
            step_fn = peer_step
        if who == "ours":  # train.py's own engine set-up (bucket sizes, training mode, the storage check)
            engine = train.build_engine(model, copy.deepcopy(ds_config), args, total_steps=steps + warmup + 1)
        else:
            peer_config = flags_and_ds_config(peer_ds_file)[1] if peer_ds_file else copy.deepcopy(ds_config)
            train.size_buckets(peer_config, model)  # the same bucket sizes as ours
            engine, *_ = deepspeed.initialize(model=model, config=peer_config,
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            engine.train()
        if device == "cuda":
            print(f"{case} {who_name}: set-up peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB, "
                  f"{torch.cuda.memory_allocated() / 2 ** 30:.1f} GiB held before the first step", flush=True)
        try:
            speed, peak, loss = measure(engine, step_fn, window, steps, warmup, device, tokens)
            print(f"{case} {who_name}: host peak RSS {host_peak_gib():.1f} GiB", flush=True)
            if trace and device == "cuda":
                print(f"{case} {who_name}: {memory_trace(engine, step_fn, window)}", flush=True)
            if profile:
                trace_path = (os.path.join(profile_dir, f"{case.replace(':', '-')}-{who_name}.json.gz")
                              if profile_dir else None)
                print(f"{case} {who_name}: {profile_steps(engine, step_fn, window, profile, device, trace_path)}",
                      flush=True)
            mfu = speed * flops_per_token(config, seq, train_type) / (peak_tflops * 1e12) \
                if device == "cuda" and not real else None
            rows.append((who_name, speed, mfu, peak, loss))
        except torch.OutOfMemoryError:
            rows.append((who_name, None, None, None, None))
        del engine, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _run_one(case, who, options):
    """A child's whole work: a world of one, then one model of one case."""
    train.init_distributed()
    try:
        return run_case(case, models=[who], **options)[0]
    finally:
        torch.distributed.destroy_process_group()  # before interpreter shutdown, as train.py does


def run_in_child(case, who, options):
    """Measure one model of a case in a fresh process and return its row ((who, None, ...) if the process died,
    e.g. killed for host memory).

    A DeepSpeed engine is not freed when the last Python name for it goes: no Python referrer path reaches it after
    gc.collect(), so something outside Python's view keeps it and its model alive (likely the hooks it registers on
    autograd's C++ nodes). Measured in one process, the second model of a case carried the first one's weights (the
    peer's 23.9 GiB "before its first step" on the GPU was ours, 11.8, plus its own, about 12.1)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_run_one, case, who, options).result()
    except BrokenProcessPool:
        print(f"{case} {who}: the measuring process died", flush=True)
        return (who, None, None, None, None)


def sdpa_backends(dtype, device) -> str:
    """Which SDPA kernels take training's attention at ChatGLM3 head shape, grouped KV heads as they are: causal
    without a mask (lora, freeze, all) and with an explicit mask (P-Tuning's always-visible prefix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, 512, 128, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 512, 128, device=device, dtype=dtype)
    kv_prefix = torch.randn(1, 2, 512 + 128, 128, device=device, dtype=dtype)
    allowed = torch.ones(512, 512 + 128, device=device, dtype=torch.bool).tril(128)[None, None]
    cases = {"causal": (q, kv, kv, dict(is_causal=True)),
             "prefix-mask": (q, kv_prefix, kv_prefix, dict(attn_mask=allowed))}
    report = []
    for name, (query, key, value, extra) in cases.items():
        accepted = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True, **extra)
                accepted.append(backend.name.lower())
            except RuntimeError:
                pass
        report.append(f"{name}: {', '.join(accepted) or 'none'}")
    return "SDPA kernels that accept it (GQA): " + "; ".join(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: chatglm3-6b on a GPU, tiny otherwise)")
    parser.add_argument("--mode", choices=("glm2", "glm3", "glm4"), default=None,
                        help="our model class and config defaults (default: glm4 for glm-4-9b, else glm3)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="train_type:SEQxBATCH:ckpt|nockpt[:compile][:real] (default: DEFAULT_CASES; :compile "
                             "passes train.py's --compile; :real trains samples of real lengths, padded and packed)")
    parser.add_argument("--write_real_lengths", nargs=2, metavar=("TOKENIZER_DIR", "DATA"), default=None,
                        help="write bench/real_lengths.json: DATA's samples tokenized with the GLM-4 tokenizer in "
                             "TOKENIZER_DIR, then exit")
    parser.add_argument("--ds_file", default=None,
                        help="DeepSpeed JSON for every case, relative to the repository (default: "
                             "ds_zero3_offload.json for all, ds_zero2_no_offload.json otherwise)")
    parser.add_argument("--peer_ds_file", default=None,
                        help="DeepSpeed JSON for the peer (default: the same as ours), e.g. to measure ours with "
                             "partial optimizer offload beside the peer with plain optimizer offload")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="as train.py: bf16 on a GPU that has it, fp32 on CPU")
    add_bool_flag(parser, "--no_peer", "skip the transformers + PEFT peer")
    parser.add_argument("--peak_tflops", type=float, default=790.0,
                        help="the chip's measured dense bf16 peak, for MFU (H100 SXM: about 790)")
    parser.add_argument("--output", default=None, help="append the table (with date and device) to this file")
    add_bool_flag(parser, "--memory_trace",
                  "GPU: after timing, print allocated/peak memory around forward, backward and step")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many more steps of each model: the device's busy share of "
                             "the wall time, kernels a step, and the ops that take the most time")
    parser.add_argument("--profile_dir", default=None,
                        help="with --profile: also write each model's whole trace here (CASE-WHO.json.gz)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (:spN cases)")
    args = parser.parse_args()
    if args.write_real_lengths:
        write_real_lengths(*args.write_real_lengths)
        return
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    gpu = torch.cuda.is_available()
    long = args.cases == ["long"]
    shape = args.shape or ("glm-4-9b" if long and gpu else "chatglm3-6b" if gpu else "tiny")
    mode = args.mode or ("glm4" if long else SHAPE_MODES[shape])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if long:
        cases = (LONG_CASES if world_size == 1 else LONG_CASES_SP) if shape != "tiny" else \
            (["lora:512x1:ckpt"] if world_size == 1 else ["lora:512x1:ckpt:sp2"])
    else:
        cases = args.cases or (DEFAULT_CASES if shape != "tiny" else
                               ["lora:256x2:ckpt", "lora:256x2:nockpt", "freeze:256x2:ckpt", "ptuning:256x2:ckpt",
                                "all:256x2:nockpt", "qlora4:256x2:ckpt", "qlora8:256x2:ckpt"])
    device_name = torch.cuda.get_device_name() if gpu else "CPU"
    if gpu:
        print(sdpa_backends(DTYPES[train.pick_precision(args.precision)], "cuda"), flush=True)
    lines = [f"## {datetime.date.today()} on {device_name}, shape {shape} (--mode {mode}), precision "
             f"{train.pick_precision(args.precision)}",
             "", "| case | ours tokens/s | ours MFU | ours peak GiB | peer tokens/s | peer peak GiB | speed ratio |",
             "|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    options = dict(shape=shape, dtype_name=args.precision, steps=args.steps, warmup=args.warmup,
                   peak_tflops=args.peak_tflops, mode=mode, trace=args.memory_trace, ds_file=args.ds_file,
                   peer_ds_file=args.peer_ds_file, profile=args.profile, profile_dir=args.profile_dir)
    real_lines = ["", "Real lengths (bench/real_lengths.json): real (non-padding) tokens/s",
                  "", "| case | ours padded | ours packed | peer padded | peer padding-free | packed / ours padded | "
                      "packed / peer padded | peak GiB ours padded / packed |", "|---|---|---|---|---|---|---|---|"]
    rank = 0
    if world_size > 1:  # under the launcher: the sequence-parallel cases, in this process, on every rank
        rank, _ = train.init_distributed()
    for case in cases:
        if sequence_parallel_size(case) != world_size:
            print(f"{case}: skipped, it runs on {sequence_parallel_size(case)} rank(s): "
                  f"`deepspeed --num_gpus {sequence_parallel_size(case)} bench/bench.py --cases {case}`", flush=True)
            continue
        rows = {}
        for who in models_to_run(case, not args.no_peer):  # each in its own process: see run_in_child
            if world_size > 1:
                _, *rows[who] = run_case(case, models=[who], **options)[0]
            else:
                _, *rows[who] = run_in_child(case, who, options)
        if is_real(case):
            speed = {who: rows.get(who, [None])[0] for who in REAL_WHO}
            packed = speed["ours-packed"]
            real_lines.append(
                f"| {case} | " + " | ".join(fmt(speed[who], '.0f') for who in REAL_WHO) + " | "
                f"{fmt(packed / speed['ours'] if packed and speed['ours'] else None, '.2f')} | "
                f"{fmt(packed / speed['peer'] if packed and speed['peer'] else None, '.2f')} | "
                f"{fmt(rows['ours'][2], '.1f')} / {fmt(rows['ours-packed'][2], '.1f')} |")
            print(real_lines[-1], flush=True)
            continue
        ours, peer = rows["ours"], rows.get("peer")
        ratio = ours[0] / peer[0] if peer and peer[0] and ours[0] else None
        lines.append(f"| {case} | {fmt(ours[0], '.0f')} | {fmt(ours[1], '.1%')} | {fmt(ours[2], '.1f')} | "
                     f"{fmt(peer[0] if peer else None, '.0f')} | {fmt(peer[2] if peer else None, '.1f')} | "
                     f"{fmt(ratio, '.2f')} |")
        if rank == 0:
            print(lines[-1], flush=True)
    if rank != 0:
        return
    if len(real_lines) > 5:
        lines += real_lines
    lines.append("")
    lines.append(f"Command: `python bench/bench.py {' '.join(sys.argv[1:])}`".rstrip())
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    try:
        main()
    finally:  # the launcher's ranks: before interpreter shutdown, as train.py does
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
