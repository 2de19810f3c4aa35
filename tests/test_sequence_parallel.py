"""--sequence_parallel_size: DeepSpeed's Ulysses sequence parallelism through train.py, on the CPU (gloo runs the
all-to-all). Two ranks sharing every sample must train exactly as one rank holding it whole."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train import common_args, read_log, run_train


def grad_norms(output_dir) -> dict:
    """train/grad_norm per step from train.py's tensorboard log: the global norm DeepSpeed computed before clipping,
    so a gradient of the wrong scale shows here even where Adam's update would hide it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "runs"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/grad_norm")}


def weights(output_dir, train_type) -> dict:
    name = "adapter_model.safetensors" if train_type == "lora" else "model.safetensors"
    return load_file(output_dir / "epoch-1-step-2" / name)


@pytest.mark.parametrize("train_type,ds_file,extra", [
    ("all", "ds_zero2_no_offload.json", ["--gradient_checkpointing"]),
    ("lora", "ds_zero3_offload.json", ["--gradient_checkpointing"]),
])
def test_two_ranks_sharing_each_sample_train_as_one_rank(train_type, ds_file, extra, tiny_dirs, tmp_path):
    """glm4 (4 heads, 2 key/value groups): 2 optimizer steps of 2 x 2 samples (accumulation 2), dropout 0, then the
    dev set. One rank reads the batches [s0 s1] [s2 s3] ..., the pair of sequence-parallel ranks [s0 s2] [s1 s3] ...
    (DeepSpeed's adapter takes one batch from each rank in turn): the same samples in every accumulation window, so
    the same summed loss, the same gradient (norm) and the same weights after 2 steps, within fp32 rounding."""
    args = [*common_args("glm4", train_type, epochs=1), "--ds_file", ROOT / ds_file, "--per_device_train_batch_size",
            2, "--max_steps", 2, "--eval_step", 2, *extra]
    if train_type == "all":
        args += ["--learning_rate", 1e-3]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(tiny_dirs["glm4"], one, *args, ranks=1)
    result = run_train(tiny_dirs["glm4"], two, *args, "--sequence_parallel_size", 2, ranks=2)
    assert "sequence parallel: each sample over 2 ranks (Ulysses attention in 2 layers), data parallel over 1" \
        in result.stderr

    (losses_one, evals_one), (losses_two, evals_two) = read_log(one), read_log(two)
    assert sorted(losses_one) == sorted(losses_two) == [1, 2]
    for step in (1, 2):
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5, abs=1e-6), step
    assert len(evals_one) == len(evals_two) == 1
    assert evals_two[0] == pytest.approx(evals_one[0], rel=1e-5)

    norms_one, norms_two = grad_norms(one), grad_norms(two)
    assert sorted(norms_one) == [1, 2]
    for step in (1, 2):
        assert norms_two[step] == pytest.approx(norms_one[step], rel=1e-4), (step, norms_one, norms_two)

    trained_one, trained_two = weights(one, train_type), weights(two, train_type)
    base = {}
    for path in Path(tiny_dirs["glm4"]).glob("*.safetensors"):
        base.update(load_file(path))
    assert trained_one.keys() == trained_two.keys()
    moved = 0.0
    for name, tensor in trained_one.items():
        tensor, other = tensor.clone(), trained_two[name].clone()
        if name.endswith("query_key_value.bias"):
            noise = unrotated_key_bias(tiny_dirs["glm4"])
            tensor[noise], other[noise] = 0, 0
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=name)
        if name in base:
            moved = max(moved, (tensor.float() - base[name].float()).abs().max().item())
    assert train_type == "lora" or moved > 1e-4  # training changed the weights that are compared


def unrotated_key_bias(base_dir):
    """The key-bias entries in the half of each head that rotary leaves alone: adding a constant to every key of a
    head adds the same amount to all of a query's scores, which softmax ignores, so their true gradient is 0 and
    they only see rounding noise, which Adam (dividing by the noise's own size) turns into steps of the order of the
    learning rate, different for every order of summation."""
    import json

    config = json.loads((Path(base_dir) / "config.json").read_text())
    heads, groups, dim = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    keys = torch.arange(heads * dim, (heads + groups) * dim)
    return keys[(keys - heads * dim) % dim >= dim // 2]


@pytest.mark.parametrize("flags,message", [
    (["--mode", "glm", "--sequence_parallel_size", "2"], "--mode glm is not supported"),
    (["--mode", "glm4", "--train_type", "ptuning", "--sequence_parallel_size", "2"],
     "does not work with --train_type ptuning"),
    (["--mode", "glm4", "--sequence_parallel_size", "2"], "must divide the number of ranks (3)"),
    (["--mode", "glm4", "--sequence_parallel_size", "3"], "has 4 attention heads and 2 key/value groups"),
    (["--mode", "glm4", "--sequence_parallel_size", "0"], "must be at least 1"),
])
def test_refused_in_one_line_before_anything_loads(flags, message, tiny_dirs, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model_name_or_path", str(tiny_dirs["glm4" if "glm4" in flags else "glm"]), "--train_path",
                    str(ROOT / "data/train.jsonl"), "--output_dir", str(out), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error, error
    assert not out.exists()


def test_four_heads_split_over_four_ranks_is_accepted(tiny_dirs, tmp_path, monkeypatch):
    """2 key/value groups over 4 ranks: DeepSpeed repeats each group on 2 ranks."""
    import train

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = train.parse_args(["--model_name_or_path", str(tiny_dirs["glm4"]), "--mode", "glm4", "--train_path",
                             str(ROOT / "data/train.jsonl"), "--output_dir", str(tmp_path / "out"),
                             "--sequence_parallel_size", "4"])
    assert args.sequence_parallel_size == 4


def test_batches_are_padded_to_a_multiple_of_the_ranks():
    from dataset import DataCollator
    from sequence_parallel import PadToMultiple

    collate = PadToMultiple(DataCollator(pad_token_id=0), 4, pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                     {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, -100, -100], [-100, 6] + [-100] * 6]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    # the last batch of an evaluation, one sample short: a row of padding without labels
    batch = PadToMultiple(DataCollator(pad_token_id=0), 4, pad_token_id=0, rows=2)([{"input_ids": [5, 6, 7],
                                                                                       "labels": [-100, 6, 7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100] * 4]


def test_resume_with_sequence_parallelism_continues_the_run(tiny_dirs, tmp_path):
    """A 2-rank --sequence_parallel_size 2 run resumed from its step-1 checkpoint trains step 2 on the same slices
    (the loader skips the step-1 window through DeepSpeed's adapter) to the same loss and weights."""
    import json
    import shutil

    args = [*common_args("glm4", "lora", epochs=1), "--per_device_train_batch_size", 2, "--max_steps", 2,
            "--save_model_step", 1, "--sequence_parallel_size", 2]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(tiny_dirs["glm4"], full, *args, ranks=2)
    losses, _ = read_log(full)
    cut.mkdir()
    shutil.copytree(full / "epoch-1-step-1", cut / "epoch-1-step-1")
    (cut / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": losses[1]}) + "\n")
    run_train(tiny_dirs["glm4"], cut, *args, "--resume", ranks=2)
    resumed, _ = read_log(cut)
    assert resumed[2] == pytest.approx(losses[2], rel=1e-6)
    torch.testing.assert_close(weights(cut, "lora"), weights(full, "lora"), rtol=0, atol=1e-7)
