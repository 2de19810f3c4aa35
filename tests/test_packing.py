"""--packing (packing.py): packed rows train exactly what the same samples train unpacked. Per sample, the model's
logits, losses and gradients are the unpacked ones; no token sees another sample; through train.main, a packed run's
gradients in 2 steps equal an unpacked run's over the same samples; resuming counts packed rows."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import same_training
from conftest import ROOT
from dataset import DataCollator, InstructionDataset
from model import MODE
from packing import PackedCollator, PackedDataset, best_fit_decreasing
from test_train import read_log, run_train, train_in_process  # noqa: F401  (the fixture)

PACKED_MODES = ("glm2", "glm3", "glm4")


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4, 6, 10, 10]
    rows = best_fit_decreasing(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    # longest first, each into the fullest row that holds it (ties: the earlier row): 10+2 | 10+1 | 9+3 | 8+4 |
    # 7+5 | 6 (first fit would have put the 2 and the 1 beside the 6)
    assert rows == [[9, 4], [10, 6], [1, 2], [5, 7], [3, 0], [8]]
    assert best_fit_decreasing(lengths, 12) == rows  # deterministic: every rank forms the same rows
    with pytest.raises(ValueError, match="more than a row"):
        best_fit_decreasing([13], 12)


def tiny_model(mode, tiny_dirs):
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    model = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=torch.float32)
    return model, tokenizer


def packed_batch(mode, tokenizer, max_len=256):
    data = InstructionDataset(str(ROOT / "data/train.jsonl"), tokenizer, mode, max_len=max_len, max_src_len=200)
    packed = PackedDataset(data, max_len)
    rows = packed.rows[:3]
    assert all(len(row["lengths"]) >= 3 for row in rows)  # several samples share each row
    return data, rows, PackedCollator(tokenizer.pad_token_id)(rows)


def segments(rows, width):
    """(row, start, length) of each sample in a collated batch."""
    for r, row in enumerate(rows):
        start = 0
        for length in row["lengths"]:
            yield r, start, length
            start += length


@pytest.mark.parametrize("mode", PACKED_MODES)
def test_each_packed_sample_computes_what_it_computes_alone(mode, tiny_dirs, one_thread):
    """Logits, summed loss and gradients of packed rows equal those of their samples run one by one (fp32); and
    changing one sample changes no other sample's logits."""
    model, tokenizer = tiny_model(mode, tiny_dirs)
    _, rows, batch = packed_batch(mode, tokenizer)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              cu_seqlens=batch["cu_seqlens"]).logits
    samples = []
    for r, start, length in segments(rows, width):
        ids = batch["input_ids"][r, start:start + length]
        samples.append((r, start, length))
        with torch.no_grad():
            alone = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(packed_logits[r, start:start + length], alone, atol=1e-5, rtol=1e-4)

    # no token attends across samples: a different first sample in row 0 leaves every other sample as it was
    changed = batch["input_ids"].clone()
    r0, s0, l0 = samples[0]
    changed[r0, s0 + 1:s0 + l0 - 1] = changed[r0, s0 + 1:s0 + l0 - 1].flip(0)
    with torch.no_grad():
        changed_logits = model(input_ids=changed, position_ids=batch["position_ids"],
                               cu_seqlens=batch["cu_seqlens"]).logits
    assert not torch.allclose(changed_logits[r0, s0:s0 + l0], packed_logits[r0, s0:s0 + l0], atol=1e-3)
    for r, start, length in samples[1:]:
        torch.testing.assert_close(changed_logits[r, start:start + length], packed_logits[r, start:start + length],
                                   atol=1e-6, rtol=0)

    # the summed loss and every gradient: packed rows against the same samples padded one per row
    model.train()
    loss = model(**batch, reduction="sum").loss
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    unpacked = DataCollator(tokenizer.pad_token_id)(
        [{"input_ids": batch["input_ids"][r, s:s + n].tolist(), "labels": batch["labels"][r, s:s + n].tolist()}
         for r, s, n in samples])
    # (the first label of each packed sample is -100, as the unpacked one is never predicted)
    reference = model(**unpacked, reduction="sum").loss
    reference.backward()
    assert (batch["labels"][:, 1:] != -100).sum() == (unpacked["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    for name, param in model.named_parameters():
        scale = param.grad.abs().max().item()  # summed over ~1000 tokens: fp32 rounding relative to the largest
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_packed_labels_are_the_samples_own_and_none_crosses_a_boundary(tiny_dirs):
    """Labels and positions as the collator hands them over. Positions are checked here directly: rotary attention
    depends only on position differences, so a sample shifted along its row computes the same logits up to
    rounding, which fp32 comparisons of logits cannot tell apart (in bf16 on a GPU the rounded cos/sin tables of
    large positions would)."""
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    data, rows, batch = packed_batch("glm3", tokenizer)
    by_ids = {tuple(e["input_ids"]): e["labels"] for e in data.examples}
    for r, start, length in segments(rows, batch["input_ids"].shape[1]):
        ids = tuple(batch["input_ids"][r, start:start + length].tolist())
        own = by_ids[ids]
        assert batch["labels"][r, start:start + length].tolist() == [-100] + own[1:]
        assert batch["position_ids"][r, start:start + length].tolist() == list(range(length))
    used = [sum(row["lengths"]) for row in rows]
    for r, n in enumerate(used):  # the padding: unlabelled
        assert (batch["labels"][r, n:] == -100).all() and (batch["input_ids"][r, n:] == tokenizer.pad_token_id).all()


def test_no_label_crosses_a_sample_boundary():
    """Samples labelled from their first token on: packed, the first label of each sample goes (the previous
    sample's last token would learn to predict it; unpacked nothing predicts it), so both layouts have the same
    targets."""
    class Samples:
        examples = [{"input_ids": list(range(10 + n, 10 + n + length)), "labels": list(range(10 + n, 10 + n + length))}
                    for n, length in enumerate([5, 3, 4, 2])]

    rows = PackedDataset(Samples(), 8).rows
    batch = PackedCollator(0)(rows)
    targets = sorted(batch["labels"][:, 1:][batch["labels"][:, 1:] != -100].tolist())
    assert targets == sorted(t for e in Samples.examples for t in e["labels"][1:])
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12, 14, 16]  # rows 5+3 and 4+2, the second padded by 2


def test_varlen_path_computes_what_the_mask_path_computes(tiny_dirs, monkeypatch, one_thread):
    """On CUDA in half precision the attention goes through torch.nn.attention.varlen.varlen_attn; here a reference
    with its signature (per-sequence causal SDPA over the flattened tokens) stands in for the CUDA kernel, so the
    layout around it (flattening, cu_seqlens, causal window, grouped heads) is checked on the CPU."""
    import torch.nn.attention.varlen as varlen

    from model import modeling_chatglm2

    calls = []

    def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                              enable_gqa=False, **_):
        assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        assert enable_gqa and key.shape[1] < query.shape[1]  # grouped KV heads as they are
        out = torch.empty_like(query)
        bounds = cu_seq_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            assert end - start <= max_q
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
            out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        calls.append(len(bounds) - 1)
        return out

    model, tokenizer = tiny_model("glm3", tiny_dirs)
    _, _, batch = packed_batch("glm3", tokenizer)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    with torch.no_grad():
        masked = model(**inputs).logits
        monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
        monkeypatch.setattr(modeling_chatglm2, "varlen_available", lambda device, dtype: True)
        flat = model(**inputs).logits
    assert calls and calls[0] == len(batch["cu_seqlens"]) - 1
    torch.testing.assert_close(flat, masked, atol=1e-5, rtol=1e-4)


def test_packed_rows_are_refused_by_a_model_that_cannot_take_them(tiny_dirs):
    model, tokenizer = tiny_model("glm", tiny_dirs)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="packed rows"):
        model(input_ids=ids, position_ids=torch.arange(4)[None], cu_seqlens=torch.tensor([0, 2, 4]))


# ---------------------------------------------------------------------------------------------------------------
# through train.main
# ---------------------------------------------------------------------------------------------------------------
def run_args(mode, train_type, base, out, batch, *extra, steps=2, dev=True):
    args = ["--model_name_or_path", base, "--output_dir", out, "--mode", mode, "--train_type", train_type,
            "--train_path", ROOT / "data/train.jsonl", "--max_len", 256, "--max_src_len", 200,
            "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", 1, "--learning_rate", 1e-3,
            "--num_train_epochs", 2, "--max_steps", steps, "--show_loss_step", 1, "--warmup_ratio", 0.0,
            "--weight_decay", 0.01, "--seed", 7]
    if dev:
        args += ["--dev_path", ROOT / "data/dev.jsonl", "--eval_step", steps]
    if train_type == "lora":
        args += ["--lora_module_name", "query_key_value,dense_h_to_4h,dense_4h_to_h,dense", "--lora_dim", 8,
                 "--lora_alpha", 16, "--lora_dropout", 0.0]
    if train_type == "freeze":
        args += ["--freeze_module_name", "layers.1.,final_layernorm"]
    return [*args, *extra]


def saved_weights(checkpoint: Path) -> dict:
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


@pytest.mark.parametrize("mode,train_type,extra", [
    ("glm2", "lora", []),
    ("glm3", "lora", ["--gradient_checkpointing"]),
    ("glm4", "freeze", []),
    ("glm3", "all", ["--gradient_checkpointing", "--ds_file", ROOT / "ds_zero3_offload.json"]),
    pytest.param("glm4", "lora", ["--quantization_bit", 4], id="glm4-qlora4",
                 marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                          reason="bitsandbytes missing")),
])
def test_two_packed_steps_train_what_two_unpacked_steps_train(mode, train_type, extra, tiny_dirs, tmp_path,
                                                              train_in_process, real_f_linear):
    """Every step sees the whole training set (one batch: all 24 samples unpacked, all rows packed), so both runs
    sum the same tokens per step: the logged losses, the gradient norms, the dev loss and the weight changes of 2
    SGD-like steps (same_training.linear_steps) agree to fp32 rounding. LoRA dropout is off (its masks would differ
    with the layout)."""
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    data = InstructionDataset(str(ROOT / "data/train.jsonl"), tokenizer, mode, max_len=256, max_src_len=200)
    rows = len(PackedDataset(data, 256))
    assert rows < len(data) // 2  # fewer, fuller rows
    ds_file = extra[extra.index("--ds_file") + 1] if "--ds_file" in extra else same_training.default_ds_file()
    linear = same_training.linear_steps(ds_file, tmp_path)
    train_in_process(*run_args(mode, train_type, tiny_dirs[mode], tmp_path / "unpacked", len(data), *extra), *linear)
    train_in_process(*run_args(mode, train_type, tiny_dirs[mode], tmp_path / "packed", rows, *extra), *linear,
                     "--packing")
    assert_trained_alike(tmp_path / "packed", tmp_path / "unpacked", tiny_dirs[mode], data, evals=2)


def assert_trained_alike(packed_dir: Path, unpacked_dir: Path, base_dir, data, evals=0) -> None:
    """Steps 1 and 2 of the two runs: the same logged losses, gradient norms, dev losses and weight changes."""
    (unpacked_losses, unpacked_eval), (packed_losses, packed_eval) = read_log(unpacked_dir), read_log(packed_dir)
    assert packed_losses.keys() == unpacked_losses.keys() == {1, 2}
    tokens = same_training.labelled_tokens(data.examples)  # the sums of one step: every labelled token
    for step in (1, 2):
        assert packed_losses[step] == pytest.approx(unpacked_losses[step], rel=tokens * same_training.FP32)
    packed_norms, unpacked_norms = same_training.grad_norms(packed_dir), same_training.grad_norms(unpacked_dir)
    assert packed_norms.keys() == unpacked_norms.keys() == {1, 2}
    for step in (1, 2):
        assert packed_norms[step] == pytest.approx(unpacked_norms[step], rel=tokens * same_training.FP32)
    assert packed_eval == pytest.approx(unpacked_eval, rel=tokens * same_training.FP32) and len(packed_eval) == evals
    unpacked = saved_weights(unpacked_dir / "epoch-2-step-2")
    start = load_file(Path(base_dir, "model.safetensors")) | same_training.lora_start(unpacked)
    same_training.assert_same_updates(saved_weights(packed_dir / "epoch-2-step-2"), unpacked, start, tokens)


def test_two_ranks_under_zero3_pack_and_train_what_one_unpacked_rank_trains(tiny_dirs, tmp_path, train_in_process,
                                                                           real_f_linear):
    """2 ranks under ZeRO-3 (the deepspeed launcher, gloo), 4 packed rows each: every step is all 8 rows, so the run
    trains what one rank trains on all 24 samples unpacked."""
    tokenizer = MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    data = InstructionDataset(str(ROOT / "data/train.jsonl"), tokenizer, "glm2", max_len=256, max_src_len=200)
    assert len(PackedDataset(data, 256)) == 8
    zero3 = same_training.linear_steps(ROOT / "ds_zero3_offload.json", tmp_path)
    train_in_process(*run_args("glm2", "lora", tiny_dirs["glm2"], tmp_path / "unpacked", len(data), dev=False), *zero3)
    two = run_args("glm2", "lora", tiny_dirs["glm2"], tmp_path / "packed", 4, dev=False)
    run_train(tiny_dirs["glm2"], tmp_path / "packed", *two[4:], *zero3, "--packing", ranks=2)
    assert_trained_alike(tmp_path / "packed", tmp_path / "unpacked", tiny_dirs["glm2"], data)


def test_packed_blocks_compile_and_train_as_eager(tiny_dirs, tmp_path, monkeypatch, train_in_process):
    """--compile with --packing: the blocks' parts, traced by torch.compile with the packed mask as an input (the
    "eager" backend: Dynamo's graphs run as captured; inductor on the CPU would take minutes), train what the eager
    packed run trains."""
    def run(name, *extra):
        train_in_process(*run_args("glm2", "lora", tiny_dirs["glm2"], tmp_path / name, 3, "--packing", *extra,
                                   dev=False))
        return read_log(tmp_path / name)[0]

    eager = run("eager", "--compile", "False")
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=counting_backend))
    compiled = run("compiled", "--compile")
    assert any("scaled_dot_product_attention" in g.code for g in graphs)  # the attention ran as a graph
    assert compiled == pytest.approx(eager, rel=1e-6)


def test_resuming_a_packed_run_continues_at_the_next_packed_row(tiny_dirs, tmp_path, train_in_process):
    """One row a step: the resumed run's steps 3-4 (and its weights) are the uninterrupted run's, which holds only
    if the saved data position counts packed rows."""
    def run(out, *extra):
        train_in_process(*run_args("glm2", "lora", tiny_dirs["glm2"], out, 1, "--packing", "--lora_dropout", 0.1,
                                   "--save_model_step", 2, *extra, steps=4, dev=False))

    full, cut = tmp_path / "full", tmp_path / "cut"
    run(full)
    losses, _ = read_log(full)
    cut.mkdir()  # what a run stopped after its step-2 checkpoint left behind
    shutil.copytree(full / "epoch-1-step-2", cut / "epoch-1-step-2")
    (cut / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": losses[s]}) + "\n" for s in (1, 2)))
    run(cut, "--resume")
    resumed, _ = read_log(cut)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-6)
    for name, weight in saved_weights(full / "epoch-1-step-4").items():
        torch.testing.assert_close(saved_weights(cut / "epoch-1-step-4")[name], weight, atol=1e-7, rtol=0)


@pytest.mark.parametrize("extra,message", [
    (["--mode", "glm"], "--packing supports --mode glm2, glm3 and glm4"),
    (["--train_type", "ptuning"], "--packing with --train_type ptuning is not supported"),
    (["--group_by_length"], "--packing and --group_by_length"),
])
def test_packing_refuses_what_it_cannot_train_in_one_line(extra, message, capsys):
    import train
    argv = ["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-", "--packing",
            *extra]
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_packing_is_a_resume_fixed_flag():
    import train
    assert "packing" in train.RESUME_FIXED["any"]
