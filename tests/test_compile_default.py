"""--compile's default: on where torch.compile works (CUDA with Triton and a C compiler, not ZeRO-3 or QLoRA), off
with one log line elsewhere; its seconds shown in the progress bar. (No GPU here: CUDA, Triton and the compiler are
faked for the decision; whether inductor then runs is only measured on a GPU.)"""
import importlib.util
import logging
import shutil

import pytest
import torch

from conftest import ROOT
from test_train import train_in_process  # noqa: F401  (the fixture)

BASE = ["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-"]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine with CUDA, Triton and a C compiler, as far as train.compile_off_reason can tell."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name in ("cc", "gcc") else None)
    return monkeypatch


def test_the_default_compiles_on_a_gpu_with_triton_and_a_compiler(fake_gpu):
    import train
    assert train.parse_args(BASE).compile is True
    assert train.parse_args([*BASE, "--compile", "False"]).compile is False
    zero3 = train.parse_args([*BASE, "--ds_file", str(ROOT / "ds_zero3_offload.json")])  # no error: just off
    assert zero3.compile is False and train.compile_off_reason(zero3) == "ZeRO-3"
    if importlib.util.find_spec("bitsandbytes") is not None:
        qlora = train.parse_args([*BASE, "--quantization_bit", "4"])
        assert qlora.compile is False and train.compile_off_reason(qlora) == "QLoRA"
    fake_gpu.setattr(shutil, "which", lambda name: None)
    assert train.parse_args(BASE).compile is False
    assert "no C compiler" in train.compile_off_reason(train.parse_args(BASE))
    fake_gpu.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert train.compile_off_reason(train.parse_args(BASE)) == "Triton is not installed"


def test_the_default_is_off_on_the_cpu_and_says_so_in_one_line(tiny_dirs, tmp_path, caplog, train_in_process):
    import train
    args = train.parse_args(BASE)
    assert args.compile is False and train.compile_off_reason(args) == "no GPU"
    assert train.parse_args([*BASE, "--compile"]).compile is True  # asked for: compiles on the CPU too
    caplog.set_level(logging.INFO, logger="chatglm")
    train_in_process("--model_name_or_path", tiny_dirs["glm2"], "--mode", "glm2", "--train_path",
                     ROOT / "data/train.jsonl", "--output_dir", tmp_path / "out", "--max_len", 256, "--max_src_len",
                     200, "--max_steps", 1)
    assert [r.message for r in caplog.records if "compile" in r.message] == ["torch.compile off (no GPU): eager steps"]


def test_compile_seconds_are_torch_compiles_own_timers():
    import train
    before = train.compile_seconds()
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    compiled(torch.randn(8))
    assert train.compile_seconds() > before


def test_the_progress_bar_shows_the_compile_seconds(tiny_dirs, tmp_path, monkeypatch, capsys, train_in_process):
    """Compilation itself is faked (nn.Module.compile does nothing here; inductor on the CPU takes minutes): what is
    checked is that the bar says the first steps compile, then how long compiling took."""
    import train
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(train, "compile_seconds", lambda: 7.2)
    train_in_process("--model_name_or_path", tiny_dirs["glm2"], "--mode", "glm2", "--train_path",
                     ROOT / "data/train.jsonl", "--output_dir", tmp_path / "out", "--max_len", 256, "--max_src_len",
                     200, "--max_steps", 2, "--show_loss_step", 2, "--compile")
    bar = capsys.readouterr().err
    assert "compile=the first steps" in bar
    assert "compile=7s" in bar and "compile=7s, loss=" in bar
