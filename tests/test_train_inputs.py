"""Bad input to train.py, as users pass it: one line naming the flag or file, no traceback, nothing written. And
--resume refuses a checkpoint of another run instead of crashing inside DeepSpeed or training on the wrong data."""
import shutil

import pytest
import torch

from conftest import ROOT
from test_train import common_args, deepspeed_engines, run_train, train_in_process  # noqa: F401 (fixtures)

TRAIN = ROOT / "data/train.jsonl"


def one_line_error(result, expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 2},\n "gradient_clipping": }\n')
    return path


def truncated_checkpoint(tiny_dirs, tmp_path):
    base = tmp_path / "truncated"
    shutil.copytree(tiny_dirs["glm3"], base)
    with open(base / "model.safetensors", "r+b") as f:
        f.truncate(100)
    return base


FLAG_CASES = {  # name -> (extra flags or a function of tmp_path giving them, expected part of the last line)
    "missing ds_file": (["--ds_file", "nope.json"], "--ds_file nope.json: no such file"),
    "invalid ds_file": (lambda tmp: ["--ds_file", bad_json(tmp)], "bad.json:2: not valid JSON"),
    "negative lr": (["--learning_rate", "-1"], "--learning_rate must be above 0, got -1.0"),
    "zero lr": (["--learning_rate", "0"], "--learning_rate must be above 0, got 0.0"),
    "negative alpha": (["--lora_alpha", "-30"], "--lora_alpha must be above 0, got -30"),
    "negative decay": (["--weight_decay", "-0.1"], "--weight_decay must be at least 0, got -0.1"),
    "negative seed": (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
    "eval without dev": (["--eval_step", "2"], "--eval_step evaluates on --dev_path"),
}
if not torch.cuda.is_available():
    FLAG_CASES["fp16 on the CPU"] = (["--precision", "fp16"], "--precision fp16 needs a GPU")

CHECKPOINT_CASES = {  # name -> (a function of (tiny_dirs, tmp_path) giving the extra flags, expected last line part)
    "no checkpoint": (lambda dirs, tmp: ["--model_name_or_path", "/nonexistent/ckpt"],
                      "--model_name_or_path: /nonexistent/ckpt: no such checkpoint directory"),
    "other version": (lambda dirs, tmp: ["--model_name_or_path", dirs["glm4"]],
                      "this is a glm4 checkpoint, but --mode is glm3"),
    "truncated weights": (lambda dirs, tmp: ["--model_name_or_path", truncated_checkpoint(dirs, tmp)],
                          "model.safetensors: not a readable safetensors file"),
    "output is a file": (lambda dirs, tmp: ["--output_dir", (tmp / "a_file").absolute()], "is a file"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_stop_in_one_line_before_anything_starts(case, tiny_dirs, tmp_path, capsys):
    """train.main in this process: the flags are refused before DeepSpeed or any file is touched."""
    import train

    extra, expected = FLAG_CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    argv = ["--model_name_or_path", tiny_dirs["glm3"], "--output_dir", tmp_path / "out", "--mode", "glm3",
            "--train_path", TRAIN, *extra]
    with pytest.raises(SystemExit) as stop:
        train.main([str(a) for a in argv])
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_bad_checkpoint_or_output_dir_stops_in_one_line_and_writes_nothing(case, tiny_dirs, tmp_path):
    extra, expected = CHECKPOINT_CASES[case]
    (tmp_path / "a_file").write_text("mine")
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--mode", "glm3", "--train_path", TRAIN,
                       *extra(tiny_dirs, tmp_path), expect_ok=False)
    one_line_error(result, expected)
    assert not (tmp_path / "out").exists() and (tmp_path / "a_file").read_text() == "mine"


def test_a_shipped_ds_file_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-",
                             "--ds_file", "ds_zero3_offload.json"])
    assert args.ds_file == str(ROOT / "ds_zero3_offload.json")


@pytest.fixture(scope="module")
def two_steps(tiny_dirs, tmp_path_factory):
    """A LoRA run of 4 steps (3 an epoch) as if stopped after its checkpoint at the epoch end, and its flags."""
    args = [*common_args("glm3", "lora", epochs=2), "--max_steps", 4]
    out = tmp_path_factory.mktemp("two_steps") / "out"
    run_train(tiny_dirs["glm3"], out, *args)
    shutil.rmtree(out / "epoch-2-step-4")
    return args, out


def with_flag(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("flag,value,before", [("--lora_dim", 4, 8), ("--per_device_train_batch_size", 2, 4),
                                               ("--train_type", "ptuning", "'lora'")])
def test_resume_refuses_a_checkpoint_of_another_run(flag, value, before, two_steps, tiny_dirs, tmp_path):
    args, trained = two_steps
    out = tmp_path / "out"
    shutil.copytree(trained, out, symlinks=True)  # output_dir/latest stays a link
    result = run_train(tiny_dirs["glm3"], out, *with_flag(args, flag, value), "--resume", expect_ok=False)
    one_line_error(result, f"--resume: {flag} is {value!r}, but epoch-1-step-3 was trained with {before}")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in trained.iterdir())


def test_resume_refuses_a_later_incomplete_checkpoint_before_training(two_steps, tiny_dirs, tmp_path):
    """A later checkpoint without its deepspeed/ state (deleted to save space) would make the resumed run fail
    when it saves there, after all its training: refused at the start instead."""
    args, trained = two_steps
    out = tmp_path / "out"
    shutil.copytree(trained, out, symlinks=True)  # output_dir/latest stays a link
    (out / "epoch-2-step-4").mkdir()
    (out / "epoch-2-step-4" / "adapter_model.safetensors").write_text("kept")
    log = (out / "train_log.jsonl").read_text()
    result = run_train(tiny_dirs["glm3"], out, *args, "--resume", expect_ok=False)
    one_line_error(result, "epoch-2-step-4 is later than the last complete checkpoint epoch-1-step-3")
    assert (out / "train_log.jsonl").read_text() == log  # nothing trained


def test_resume_with_the_same_flags_continues(two_steps, tiny_dirs, tmp_path):
    args, trained = two_steps
    out = tmp_path / "out"
    shutil.copytree(trained, out, symlinks=True)  # output_dir/latest stays a link
    run_train(tiny_dirs["glm3"], out, *args, "--resume")
    assert (out / "epoch-2-step-4" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("precision,auto_picks", [("bf16", None), ("auto", "bf16")], ids=["explicit", "auto"])
def test_resume_refuses_another_precision_naming_the_flag(precision, auto_picks, two_steps, tiny_dirs, tmp_path,
                                                          monkeypatch, train_in_process, deepspeed_engines):
    """The checkpoint trained in fp32 (auto on the CPU). Resumed as bf16, DeepSpeed's bf16 engine looked for
    bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt and failed with FileNotFoundError after loading the model; so
    did --precision auto on a machine where auto picks bf16 (another GPU type; here utils.auto_precision is
    made to pick it). Refused in one line before DeepSpeed starts, the resolved precision compared."""
    import train

    args, trained = two_steps
    out = tmp_path / "out"
    shutil.copytree(trained, out, symlinks=True)  # output_dir/latest stays a link
    if auto_picks:
        monkeypatch.setattr(train, "auto_precision", lambda device_type: auto_picks)
    with pytest.raises(SystemExit) as stop:
        train_in_process(*args, "--model_name_or_path", tiny_dirs["glm3"], "--output_dir", out, "--resume",
                         "--precision", precision)
    message = str(stop.value)
    assert "\n" not in message and message.startswith(
        "--resume: --precision is 'bf16'" + " (--precision auto on this machine)" * bool(auto_picks)
        + ", but epoch-1-step-3 was trained with 'fp32'"), message
    assert not deepspeed_engines
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in trained.iterdir())
