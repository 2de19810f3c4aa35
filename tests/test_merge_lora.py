"""merge_lora.py on tiny checkpoints: the merged model is base + adapter, loads without peft, and bad input fails."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from dropin_checks import MERGE_EXTRAS, assert_dropin
from model import MODE, template

LORA_MODULES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
PROMPTS = [("你好", []), ("发动机水温高，风扇低速转动。", []), ("喷油嘴堵塞。", [("你好", "你好！")])]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lora_adapter(mode: str, base: str, output_dir, seed: int = 1) -> str:
    """A LoRA adapter on the tiny base whose lora_B weights are random (not the zero init), so that it matters; saved
    as train.py saves one (adapter files, tokenizer, training_args.json)."""
    from peft import LoraConfig, get_peft_model

    model = MODE[mode].model.from_pretrained(base)
    tokenizer = MODE[mode].tokenizer.from_pretrained(base)
    torch.manual_seed(seed)  # lora_A's initialisation
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    Path(output_dir, "training_args.json").write_text(json.dumps(
        {"mode": mode, "train_type": "lora", "model_name_or_path": os.path.abspath(base)}))
    return str(output_dir)


def unmerged(mode: str, base: str, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(MODE[mode].model.from_pretrained(base), adapter).eval()


def prompt_ids(mode: str, tokenizer) -> list[list[int]]:
    return [template.encode_prompt(tokenizer, mode, query, history) for query, history in PROMPTS]


@torch.no_grad()
def logits(model, prompts):
    return [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


@torch.no_grad()
def greedy(model, prompts, tokenizer):
    return [model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist() for ids in prompts]


def snapshot(directory) -> dict:
    """Every file of a directory with its bytes: to prove a run left it untouched."""
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def run_merge(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def merge_in_process(*args) -> int:
    import merge_lora

    return merge_lora.main([str(a) for a in args])


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("adapters")
    return {mode: make_lora_adapter(mode, tiny_dirs[mode], base / mode) for mode in ("glm", "glm2", "glm3", "glm4")}


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_merged_model_is_base_plus_adapter(mode, tiny_dirs, adapters, tmp_path):
    base, adapter = tiny_dirs[mode], adapters[mode]
    before = (snapshot(base), snapshot(adapter))
    out = tmp_path / "merged"
    result = run_merge("--mode", mode, "--ori_model_dir", base, "--model_dir", adapter, "--output_dir", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "max abs logit difference merged vs base+adapter" in result.stdout
    assert (snapshot(base), snapshot(adapter)) == before  # neither input directory was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory left behind

    # the base directory with new weights: same files, byte for byte, plus merge_lora.json; nothing of peft
    assert_dropin(base, out, MERGE_EXTRAS)
    # the official weight names and dtype of the base, nothing of peft
    with safe_open(str(out / "model.safetensors"), "pt") as merged_file, \
            safe_open(str(Path(base, "model.safetensors")), "pt") as base_file:
        assert set(merged_file.keys()) == set(base_file.keys())
        assert {merged_file.get_slice(k).get_dtype() for k in merged_file.keys()} == {"F32"}
    report = json.loads((out / "merge_lora.json").read_text())
    assert report["max_abs_logit_difference"] <= report["tolerance"]

    merged = MODE[mode].model.from_pretrained(str(out)).eval()  # plain, strict load: no peft involved
    tokenizer = MODE[mode].tokenizer.from_pretrained(str(out))
    reference = unmerged(mode, base, adapter)
    plain = MODE[mode].model.from_pretrained(base).eval()
    prompts = prompt_ids(mode, tokenizer)
    expected, got, without = logits(reference, prompts), logits(merged, prompts), logits(plain, prompts)
    assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= report["tolerance"]
    assert max((a - b).abs().max().item() for a, b in zip(expected, without)) > 1e-3  # the adapter matters
    assert greedy(merged, prompts, tokenizer) == greedy(reference, prompts, tokenizer)


def test_bf16_merge_and_empty_output_dir(tiny_dirs, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty directory is fine
    assert merge_in_process("--mode", "glm3", "--ori_model_dir", tiny_dirs["glm3"], "--model_dir",
                            adapters["glm3"], "--output_dir", out, "--dtype", "bf16") == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    report = json.loads((out / "merge_lora.json").read_text())
    assert report["dtype"] == "bfloat16" and report["max_abs_logit_difference"] <= report["tolerance"]
    assert MODE["glm3"].model.from_pretrained(str(out)).dtype == torch.bfloat16


def test_failed_check_writes_nothing(tiny_dirs, adapters, tmp_path, monkeypatch, capsys):
    import merge_lora

    monkeypatch.setattr(merge_lora, "TOLERANCE", {torch.float32: -1.0})  # no difference can pass
    out = tmp_path / "merged"
    assert merge_in_process("--mode", "glm2", "--ori_model_dir", tiny_dirs["glm2"], "--model_dir",
                            adapters["glm2"], "--output_dir", out) == 1
    assert "MERGE CHECK FAILED" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def bad_merge(capsys, *args) -> str:
    assert merge_in_process(*args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("merge_lora.py")]
    assert len(lines) == 1 and lines[0].startswith("merge_lora.py: error: "), err  # one line (besides library warnings)
    return lines[0]


def test_refuses_to_write_into_or_over_its_inputs(tiny_dirs, adapters, tmp_path, capsys):
    base, adapter = tiny_dirs["glm3"], adapters["glm3"]
    before = (snapshot(base), snapshot(adapter))
    common = ("--mode", "glm3", "--ori_model_dir", base, "--model_dir", adapter, "--output_dir")
    assert "is --model_dir or inside it" in bad_merge(capsys, *common, adapter)
    assert "is --ori_model_dir or inside it" in bad_merge(capsys, *common, Path(base) / "merged")
    assert "contains --model_dir" in bad_merge(capsys, *common, Path(adapter).parent)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert "exists and is not empty" in bad_merge(capsys, *common, full)
    assert (full / "keep.txt").read_text() == "x"
    assert f"--output_dir {full / 'keep.txt'} is a file" in bad_merge(capsys, *common, full / "keep.txt")
    assert (full / "keep.txt").read_text() == "x"
    assert (snapshot(base), snapshot(adapter)) == before


def test_bad_inputs(tiny_dirs, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    # the "adapter" is a full checkpoint
    err = bad_merge(capsys, "--mode", "glm3", "--ori_model_dir", tiny_dirs["glm3"], "--model_dir",
                    tiny_dirs["glm2"], "--output_dir", out)
    assert "no adapter_config.json" in err
    # the base is of another version than --mode
    err = bad_merge(capsys, "--mode", "glm3", "--ori_model_dir", tiny_dirs["glm2"], "--model_dir",
                    adapters["glm3"], "--output_dir", out)
    assert "this is a glm2 checkpoint, but --mode is glm3" in err
    err = bad_merge(capsys, "--mode", "glm4", "--ori_model_dir", tiny_dirs["glm3"], "--model_dir",
                    adapters["glm4"], "--output_dir", out)
    assert "this is a glm3 checkpoint, but --mode is glm4" in err
    # the adapter was trained for another version
    err = bad_merge(capsys, "--mode", "glm2", "--ori_model_dir", tiny_dirs["glm2"], "--model_dir",
                    adapters["glm3"], "--output_dir", out)
    assert "trained with --mode glm3, but --mode is glm2" in err
    # an adapter of ChatGLM-6B's shapes on a ChatGLM2 base (its training_args.json removed)
    stray = Path(shutil.copytree(adapters["glm"], tmp_path / "stray"))
    (stray / "training_args.json").unlink()
    err = bad_merge(capsys, "--mode", "glm2", "--ori_model_dir", tiny_dirs["glm2"], "--model_dir", stray,
                    "--output_dir", out)
    assert "the adapter does not fit the base" in err
    # a missing base
    err = bad_merge(capsys, "--mode", "glm3", "--ori_model_dir", tmp_path / "nowhere", "--model_dir",
                    adapters["glm3"], "--output_dir", out)
    assert "no such checkpoint directory" in err
    assert not out.exists()
