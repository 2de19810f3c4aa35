"""--sequence_parallel_size: DeepSpeed's Ulysses sequence parallelism through train.py, on the CPU (gloo runs the
all-to-all). Two ranks sharing every sample must train exactly as one rank holding it whole."""
from pathlib import Path

import pytest
from safetensors.torch import load_file

import same_training
from conftest import ROOT
from dataset import InstructionDataset
from model import MODE
from test_train import common_args, read_log, run_train, train_in_process  # noqa: F401  (the fixture)


def weights(output_dir, train_type, tag="epoch-1-step-2") -> dict:
    name = "adapter_model.safetensors" if train_type == "lora" else "model.safetensors"
    return load_file(output_dir / tag / name)


def run_args(train_type, ds_file, directory) -> list:
    """glm4 (4 heads, 2 key/value groups): 2 optimizer steps of 2 x 2 samples (accumulation 2), dropout 0, a
    checkpoint after each step, then the dev set; SGD-like steps (same_training.linear_steps)."""
    return [*common_args("glm4", train_type, epochs=1), "--per_device_train_batch_size", 2, "--max_steps", 2,
            "--eval_step", 2, "--save_model_step", 1, "--gradient_checkpointing",
            *same_training.linear_steps(ROOT / ds_file, directory)]


@pytest.fixture(scope="module")
def two_rank_lora(tiny_dirs, tmp_path_factory):
    """The 2-rank --sequence_parallel_size 2 LoRA run under ZeRO-3 (the launcher), shared by the equality and the
    resume test: (its flags, its output directory, its stderr)."""
    directory = tmp_path_factory.mktemp("sequence-parallel")
    args = [*run_args("lora", "ds_zero3_offload.json", directory), "--sequence_parallel_size", 2]
    result = run_train(tiny_dirs["glm4"], directory / "two", *args, ranks=2)
    return args, directory / "two", result.stderr


@pytest.mark.parametrize("train_type,ds_file", [("all", "ds_zero2_no_offload.json"), ("lora", "ds_zero3_offload.json")])
def test_two_ranks_sharing_each_sample_train_as_one_rank(train_type, ds_file, tiny_dirs, tmp_path, request,
                                                         train_in_process, real_f_linear):
    """One rank reads the batches [s0 s1] [s2 s3] ..., the pair of sequence-parallel ranks [s0 s2] [s1 s3] ...
    (DeepSpeed's adapter takes one batch from each rank in turn): the same samples in every accumulation window, so
    the same summed loss, the same gradient (norm) and the same weight changes after 2 steps, within fp32 rounding.
    The one-rank run goes in this process; the pair under the launcher."""
    args = run_args(train_type, ds_file, tmp_path)
    one = tmp_path / "one"
    train_in_process(*args, "--model_name_or_path", tiny_dirs["glm4"], "--output_dir", one)
    if train_type == "lora":
        _, two, stderr = request.getfixturevalue("two_rank_lora")
    else:
        two = tmp_path / "two"
        stderr = run_train(tiny_dirs["glm4"], two, *args, "--sequence_parallel_size", 2, ranks=2).stderr
    assert "sequence parallel: each sample over 2 ranks (Ulysses attention in 2 layers), data parallel over 1" \
        in stderr

    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    data = InstructionDataset(str(ROOT / "data/train.jsonl"), tokenizer, "glm4", max_len=256, max_src_len=200)
    rounding = same_training.labelled_tokens(data.examples) * same_training.FP32  # every sum is over fewer tokens
    (losses_one, evals_one), (losses_two, evals_two) = read_log(one), read_log(two)
    assert sorted(losses_one) == sorted(losses_two) == [1, 2]
    for step in (1, 2):
        assert losses_two[step] == pytest.approx(losses_one[step], rel=rounding), step
    assert len(evals_one) == len(evals_two) == 1
    assert evals_two[0] == pytest.approx(evals_one[0], rel=rounding)

    norms_one, norms_two = same_training.grad_norms(one), same_training.grad_norms(two)
    assert sorted(norms_one) == [1, 2]
    for step in (1, 2):
        assert norms_two[step] == pytest.approx(norms_one[step], rel=rounding), (step, norms_one, norms_two)

    trained_one, trained_two = weights(one, train_type), weights(two, train_type)
    start = load_file(Path(tiny_dirs["glm4"], "model.safetensors")) | same_training.lora_start(trained_one)
    same_training.assert_same_updates(trained_two, trained_one, start,
                                      same_training.labelled_tokens(data.examples))


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


def test_resume_with_sequence_parallelism_continues_the_run(two_rank_lora, tiny_dirs, tmp_path):
    """The 2-rank --sequence_parallel_size 2 run resumed from its step-1 checkpoint trains step 2 on the same slices
    (the loader skips the step-1 window through DeepSpeed's adapter) to the same loss and weights: the same
    computation on the same machine: equal up to storing the weights (4 ulp)."""
    import json
    import shutil

    args, full, _ = two_rank_lora
    losses, _ = read_log(full)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "epoch-1-step-1", cut / "epoch-1-step-1")
    (cut / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": losses[1]}) + "\n")
    run_train(tiny_dirs["glm4"], cut, *args, "--resume", ranks=2)
    resumed, _ = read_log(cut)
    assert resumed[2] == pytest.approx(losses[2], rel=4 * same_training.FP32)
    for name, weight in weights(full, "lora").items():
        assert (weights(cut, "lora")[name] - weight).abs().max() <= 4 * same_training.FP32 * weight.abs().max(), name
