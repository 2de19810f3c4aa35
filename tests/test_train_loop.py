"""What train.py's loop does when a run resumes, changes its length or flags, or meets a window without labels:
train.main in this process (a world of one, gloo) on the tiny checkpoints, a few steps each."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train import common_args, deepspeed_engines, train_in_process  # noqa: F401 (fixtures)

STEPS_PER_EPOCH = 3  # data/train.jsonl: 24 samples, 4 per micro-batch, 2 micro-batches a step (common_args)


def run_args(tiny_dirs, out, mode="glm2", train_type="lora", epochs=1, **flags):
    argv = [*common_args(mode, train_type, epochs), "--model_name_or_path", tiny_dirs[mode], "--output_dir", out]
    for flag, value in flags.items():
        if f"--{flag}" in argv:
            argv[argv.index(f"--{flag}") + 1] = value
        else:
            argv += [f"--{flag}", value]
    return argv


def log_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def lr_of_steps(out):
    return {r["step"]: r["lr"] for r in log_records(out) if "lr" in r}


def schedule(peak, total, ratio):
    """README's formula: step s (from 1) of T runs at peak * min(s / W, (T + 1 - s) / (T - W)), W = ceil(ratio T)."""
    warmup = math.ceil(ratio * total)
    return {s: peak * min(s / warmup if warmup else float("inf"), (total + 1 - s) / (total - warmup))
            for s in range(1, total + 1)}


# ---------------------------------------------------------------------------------------------------------------
# --resume (issue 19, points 5 and 14)
# ---------------------------------------------------------------------------------------------------------------
def test_resume_runs_the_schedule_of_its_own_flags(tiny_dirs, tmp_path, train_in_process):
    """One epoch at 1e-1, then --resume with --learning_rate 1e-2 and two epochs: steps 4-6 run at the README
    formula's lr for the new peak and T = 6 (DeepSpeed's load_checkpoint would restore the old LambdaLR's base_lrs and
    last lr: 0.0, 0.04, 0.02), never at lr 0."""
    out = tmp_path / "out"
    train_in_process(*run_args(tiny_dirs, out, learning_rate=1e-1, warmup_ratio=0.1, show_loss_step=1))
    assert lr_of_steps(out) == pytest.approx(schedule(1e-1, 3, 0.1), rel=1e-9)
    train_in_process(*run_args(tiny_dirs, out, epochs=2, learning_rate=1e-2, warmup_ratio=0.1, show_loss_step=1),
                     "--resume")
    used = lr_of_steps(out)
    assert sorted(used) == list(range(1, 7))
    expected = schedule(1e-2, 6, 0.1)  # W = 1: 6e-3, 4e-3, 2e-3 for steps 4-6
    assert {s: used[s] for s in (4, 5, 6)} == pytest.approx({s: expected[s] for s in (4, 5, 6)}, rel=1e-9)
    assert all(lr > 0 for lr in used.values())


@pytest.fixture(scope="module")
def one_epoch(tiny_dirs, tmp_path_factory):
    """A LoRA run of 3 steps stopped after its first checkpoint at step 2 (written by --save_model_step 2)."""
    from test_train import run_train
    out = tmp_path_factory.mktemp("one_epoch") / "out"
    run_train(tiny_dirs["glm2"], out, *common_args("glm2", "lora", epochs=1), "--save_model_step", 2)
    shutil.rmtree(out / "epoch-1-step-3")
    return out


@pytest.mark.parametrize("missing", ["rng_rank0.pt", "state/mp_rank_00_model_states.pt",
                                     "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_without_a_file_of_the_deepspeed_state_stops_in_one_line_before_loading(
        missing, one_epoch, tiny_dirs, tmp_path, train_in_process, deepspeed_engines):
    out = tmp_path / "out"
    shutil.copytree(one_epoch, out, symlinks=True)  # output_dir/latest stays a link
    (out / "epoch-1-step-2" / "deepspeed" / missing).unlink()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        train_in_process(*run_args(tiny_dirs, out, save_model_step=2), "--resume")
    message = str(stop.value)
    assert "\n" not in message and message.startswith("--resume: epoch-1-step-2 lacks ") and missing in message
    assert not deepspeed_engines  # stopped before DeepSpeed started
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# the run's length and its evaluations (points 11 and 12)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps,evals", [(2, [2]), (5, [3, 5])])
def test_max_steps_sets_the_run_length_and_the_run_ends_with_an_evaluation(max_steps, evals, tiny_dirs, tmp_path,
                                                                           train_in_process):
    """--max_steps beyond --num_train_epochs repeats the data in new epochs (as HF Trainer's max_steps); one that ends
    inside an epoch still evaluates on --dev_path at the last step: at each epoch end and the run's end, once."""
    out = tmp_path / "out"
    train_in_process(*run_args(tiny_dirs, out, max_steps=max_steps))
    records = log_records(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, max_steps + 1))
    assert [r["step"] for r in records if "eval_loss" in r] == evals
    tags = sorted(p.name for p in out.iterdir() if p.name.startswith("epoch-"))
    assert tags == (["epoch-1-step-2"] if max_steps == 2 else ["epoch-1-step-3", "epoch-2-step-5"])


# ---------------------------------------------------------------------------------------------------------------
# flags filled in for the user (points 8 and 13)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,betas,eps", [
    ({"betas": [0.8, 0.99], "eps": 1e-6}, (0.8, 0.99), 1e-6),
    ({"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}, (0.9, 0.95), 1e-8),  # the shipped JSONs
    ({}, (0.9, 0.95), 1e-8),
])
def test_the_ds_file_optimizer_params_are_kept_and_only_the_missing_filled(params, betas, eps, tiny_dirs, tmp_path,
                                                                             train_in_process, deepspeed_engines):
    config = json.loads((ROOT / "ds_zero2_no_offload.json").read_text())
    config["optimizer"]["params"] = params
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(config))
    train_in_process(*run_args(tiny_dirs, tmp_path / "out", max_steps=1, ds_file=ds_file, weight_decay=0.05))
    groups = deepspeed_engines[0].optimizer.param_groups
    assert {(tuple(g["betas"]), g["eps"]) for g in groups} == {(betas, eps)}
    assert {g["weight_decay"] for g in groups} == {0.05}  # the flag's (LoRA trains matrices only)


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A tiny glm4 checkpoint with 6 layers (the default tiny has 2, fewer than the four the default trains)."""
    import model.tiny
    from model.tiny import write_tiny_checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(model.tiny.TINY_SIZES, "num_layers", 6)
        return write_tiny_checkpoint("glm4", str(tmp_path_factory.mktemp("six") / "glm4"))


def test_freeze_trains_the_last_four_layers_of_the_model_by_default(six_layers, tmp_path, train_in_process,
                                                                     deepspeed_engines, capsys):
    import train

    argv = run_args({"glm4": six_layers}, tmp_path / "out", mode="glm4", train_type="freeze", max_steps=1)
    del argv[argv.index("--freeze_module_name"):argv.index("--freeze_module_name") + 2]
    train_in_process(*argv)
    trained = {name for name, p in deepspeed_engines[0].module.named_parameters() if p.requires_grad}
    assert trained and {name.split("layers.")[1].split(".")[0] for name in trained} == {"2", "3", "4", "5"}
    assert all(".layers." in name for name in trained)
    record = json.loads((tmp_path / "out" / "epoch-1-step-1" / "training_args.json").read_text())
    assert record["freeze_module_name"] == "layers.5.,layers.4.,layers.3.,layers.2."
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "(default: the model's last four layers" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------------------------
# a window without labels (point 7, the loop's half)
# ---------------------------------------------------------------------------------------------------------------
def test_windows_without_labelled_tokens_train_nothing_and_log_no_loss(tiny_dirs, tmp_path, monkeypatch,
                                                                       train_in_process):
    """Every sample without a label (an answer the template cannot learn from): each step's window has 0 labelled
    tokens on all ranks. It contributes a zero gradient, not 0 / 0: no NaN loss stops the run, the logged loss is
    null, and LoRA's B stays at its initial zeros (AdamW's moments stay 0, no weight decay here)."""
    import train
    from model import template

    real_build_data = train.build_data

    def unlabelled(args, tokenizer):
        train_set, dev_set = real_build_data(args, tokenizer)
        for example in train_set.examples:
            example["labels"] = [template.IGNORE_INDEX] * len(example["labels"])
        return train_set, dev_set

    monkeypatch.setattr(train, "build_data", unlabelled)
    out = tmp_path / "out"
    train_in_process(*run_args(tiny_dirs, out))
    steps = [r for r in log_records(out) if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["loss"] is None for r in steps)
    adapter = load_file(out / "epoch-1-step-3" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in adapter.values())
    assert all(not w.any() for name, w in adapter.items() if "lora_B" in name)


# ---------------------------------------------------------------------------------------------------------------
# the run's records after a resume from an earlier checkpoint (issue 37, point 9)
# ---------------------------------------------------------------------------------------------------------------
def test_resume_from_an_earlier_checkpoint_continues_the_records_from_its_step(tiny_dirs, tmp_path,
                                                                             train_in_process):
    """A run of 3 steps evaluating and answering a sample prompt every step, checkpoints at steps 2 and 3; the step
    3 checkpoint is deleted and the run resumed from step 2. train_log.jsonl and samples.jsonl held step 3 and its
    evaluation twice (appended again); now the resumed run continues them from step 2: every step, evaluation and
    answer once, what was logged up to step 2 unchanged."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"你好"\n', encoding="utf-8")
    argv = run_args(tiny_dirs, out, save_model_step=2, eval_step=1, sample_prompts=prompts, max_new_tokens=2)
    train_in_process(*argv)
    first = {name: (out / name).read_text(encoding="utf-8").splitlines() for name in ("train_log.jsonl",
                                                                                        "samples.jsonl")}
    shutil.rmtree(out / "epoch-1-step-3")
    train_in_process(*argv, "--resume")
    records = log_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2, 3]
    samples = (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in samples] == [1, 2, 3]
    kept = {"train_log.jsonl": [line for line in first["train_log.jsonl"] if json.loads(line)["step"] <= 2],
            "samples.jsonl": first["samples.jsonl"][:2]}
    assert (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()[:len(kept["train_log.jsonl"])] == \
        kept["train_log.jsonl"]
    assert samples[:2] == kept["samples.jsonl"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging file left behind


# ---------------------------------------------------------------------------------------------------------------
# every sample trains once an epoch (issue 37, point 1)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,accumulation,extra,steps", [
    (3, 1, (), 2),  # micro-batches of 3 and 2
    (1, 2, (), 3),  # accumulation windows of 2, 2 and 1 micro-batches
    (3, 1, ("--packing", "--max_len", 90, "--max_src_len", 80), 2),  # 5 rows of one sample: 3 + 2 rows
], ids=["last-batch", "last-window", "packed-rows"])
def test_every_sample_trains_once_an_epoch(batch, accumulation, extra, steps, tiny_dirs, tmp_path,
                                           train_in_process):
    """5 samples in micro-batches of 3: the loader dropped the last 2 samples (drop_last) and the epoch ran one step
    of 3 samples; in batches of 1 with 2 to accumulate, the epoch's 5th micro-batch found no whole window. Now the
    last batch and the last window are smaller and every sample trains: the logged tokens are all the samples'
    (rows', with --packing), and the lr schedule's T counts the extra step (README's formula)."""
    import train

    data = tmp_path / "five.jsonl"
    data.write_text("".join((ROOT / "data/train.jsonl").read_text(encoding="utf-8").splitlines(True)[:5]),
                    encoding="utf-8")
    out = tmp_path / "out"
    argv = run_args(tiny_dirs, out, train_path=data, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accumulation, warmup_ratio=0.5, learning_rate=1e-2)
    train_in_process(*argv, *extra)
    records = [r for r in log_records(out) if "lr" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    args = train.parse_args([str(a) for a in (*argv, *extra)])
    tokenizer = train.MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    train_set, _ = train.build_data(args, tokenizer)
    if extra:
        assert [len(row["lengths"]) for row in train_set.rows] == [1] * 5
    samples = train_set.unpacked if extra else train_set
    assert len(samples) == 5 and sum(r["tokens"] for r in records) == sum(len(e["input_ids"]) for e in samples)
    assert {r["step"]: r["lr"] for r in records} == pytest.approx(schedule(1e-2, steps, 0.5), rel=1e-9)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch")) == [f"epoch-1-step-{steps}"]


def test_a_shorter_last_window_weighs_its_tokens_like_a_whole_one(tiny_dirs, tmp_path, train_in_process):
    """The epoch's last window of 1 micro-batch (5 samples, batch 1, 2 to accumulate) must give the token mean's
    gradient of what it holds, as a window of 1 does when 1 is what the flag asks. DeepSpeed divides every backward
    by its --gradient_accumulation_steps whatever the window's length, so a window of 1 out of 2 would get half the
    gradient if train.py did not undo that. At an lr of 1e-9 the weights stay put (LoRA B ~ 0, no dropout), so
    the last sample's gradient norm (train/grad_norm, DeepSpeed's, before clipping) is the same in both runs: both
    see the samples in one order (seed and batch size 1 alike)."""
    from same_training import grad_norms

    data = tmp_path / "five.jsonl"
    data.write_text("".join((ROOT / "data/train.jsonl").read_text(encoding="utf-8").splitlines(True)[:5]),
                    encoding="utf-8")
    runs = {}
    for accumulation, last in ((2, 3), (1, 5)):
        out = tmp_path / f"accumulate{accumulation}"
        train_in_process(*run_args(tiny_dirs, out, train_path=data, per_device_train_batch_size=1,
                                   gradient_accumulation_steps=accumulation, learning_rate=1e-9))
        losses = {r["step"]: r["loss"] for r in log_records(out) if "lr" in r}
        runs[accumulation] = (losses[last], grad_norms(out)[last])
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-5)  # the same sample
    assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-4)
