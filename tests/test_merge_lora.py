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
    assert "merge check: 8 merged layers equal W + scale * B @ A within the rounding to float32" in result.stdout
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
    assert report["merge_check"]["share_of_rounding_bound"] <= 1.0 and report["quantization_bit"] is None

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


def wide_checkpoint(mode: str, tiny_dir, output_dir, hidden_size: int = 128) -> str:
    """A tiny checkpoint of `mode` twice as wide as model.tiny's (hidden 128, head size 32 for glm2/3/4), new strong
    random weights drawn as model.tiny draws them, the same tokenizer files."""
    from safetensors.torch import save_file

    from model.tiny import draw_strong_weights

    output_dir = Path(shutil.copytree(tiny_dir, output_dir))
    config = json.loads((output_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    if mode == "glm":
        config.update(hidden_size=hidden_size, inner_hidden_size=4 * hidden_size)
    else:
        config.update(hidden_size=hidden_size, kv_channels=hidden_size // heads, ffn_hidden_size=2 * hidden_size)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
    spec = MODE[mode]
    model = spec.model(spec.config.from_pretrained(str(output_dir)))
    draw_strong_weights(model, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return str(output_dir)


@pytest.fixture(scope="module")
def wide_glm2(tiny_dirs, tmp_path_factory):
    """(base, adapter): a glm2 checkpoint 128 wide and a LoRA adapter on it. In fp32 a correct merge of it moves the
    logits by ~2e-4, beyond the old end-to-end tolerance of 1e-5 x the largest logit (1.4e-4): issue 19, point 15."""
    directory = tmp_path_factory.mktemp("wide")
    base = wide_checkpoint("glm2", tiny_dirs["glm2"], directory / "base")
    return base, make_lora_adapter("glm2", base, directory / "adapter")


@pytest.mark.parametrize("dtype,stored", [("fp32", "F32"), ("bf16", "BF16"), ("fp16", "F16")])
def test_wide_model_merges_in_every_dtype(dtype, stored, wide_glm2, tmp_path, capsys):
    """A correct merge of a wider model passes in every dtype (the merge check no longer measures rounding that grows
    with width), and what is written is base + adapter."""
    base, adapter = wide_glm2
    out = tmp_path / "merged"
    assert merge_in_process("--mode", "glm2", "--ori_model_dir", base, "--model_dir", adapter, "--output_dir", out,
                            "--dtype", dtype) == 0, capsys.readouterr().err[-3000:]
    assert "merge check: 8 merged layers equal W + scale * B @ A" in capsys.readouterr().out
    report = json.loads((out / "merge_lora.json").read_text())
    assert report["merge_check"]["layers"] == 8 and report["merge_check"]["share_of_rounding_bound"] <= 1.0
    assert report["quantization_bit"] is None and "max_abs_logit_difference_vs_trained" not in report
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}
    if dtype == "fp32":  # in float64, the written model is base + adapter up to the fp32 rounding of its weights
        merged = MODE["glm2"].model.from_pretrained(str(out), dtype=torch.float64).eval()
        reference = unmerged("glm2", base, adapter).to(torch.float64)
        prompts = prompt_ids("glm2", MODE["glm2"].tokenizer.from_pretrained(base))
        expected, got = logits(reference, prompts), logits(merged, prompts)
        scale = max(x.abs().max().item() for x in expected)
        assert max((a - b).abs().max().item() for a, b in zip(expected, got)) < 1e-5 * scale


def corrupt_merge(monkeypatch, factor: float, layers: int = 1):
    """Make peft's merge add `factor` times the delta to the first `layers` layers it merges: a wrong merge."""
    from peft.tuners.lora import layer as lora_layer

    delta_weight = lora_layer.Linear.get_delta_weight
    calls = []

    def wrong_delta(self, adapter):
        calls.append(adapter)
        return delta_weight(self, adapter) * (factor if len(calls) <= layers else 1.0)

    monkeypatch.setattr(lora_layer.Linear, "get_delta_weight", wrong_delta)


@pytest.mark.parametrize("dtype,factor", [("fp32", 1.001), ("bf16", 0.0), ("fp16", 2.0)],
                         ids=["fp32-delta-off-by-0.1%", "bf16-layer-not-merged", "fp16-delta-twice"])
def test_wrong_merge_is_refused_and_writes_nothing(dtype, factor, wide_glm2, tmp_path, monkeypatch, capsys):
    """The check still catches a wrong merge of a single layer of the wide model, in each dtype: a delta off by 0.1%
    in fp32, a layer left unmerged in bf16, a delta added twice in fp16."""
    base, adapter = wide_glm2
    corrupt_merge(monkeypatch, factor)
    out = tmp_path / "merged"
    assert merge_in_process("--mode", "glm2", "--ori_model_dir", base, "--model_dir", adapter, "--output_dir", out,
                            "--dtype", dtype) == 1
    err = capsys.readouterr().err
    assert "MERGE CHECK FAILED: 1 of 8 merged layers are not base layer + adapter: " \
           "transformer.encoder.layers.0.self_attention.query_key_value differs by" in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_nan_merge_is_refused(wide_glm2, tmp_path, monkeypatch, capsys):
    base, adapter = wide_glm2
    corrupt_merge(monkeypatch, float("nan"))
    assert merge_in_process("--mode", "glm2", "--ori_model_dir", base, "--model_dir", adapter, "--output_dir",
                            tmp_path / "merged") == 1
    assert "MERGE CHECK FAILED: transformer.encoder.layers.0.self_attention.query_key_value: NaNs detected" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_check_writes_nothing(tiny_dirs, adapters, tmp_path, monkeypatch, capsys):
    corrupt_merge(monkeypatch, 0.0, layers=8)  # no layer merged at all
    out = tmp_path / "merged"
    assert merge_in_process("--mode", "glm2", "--ori_model_dir", tiny_dirs["glm2"], "--model_dir",
                            adapters["glm2"], "--output_dir", out) == 1
    assert "MERGE CHECK FAILED: 8 of 8 merged layers" in capsys.readouterr().err
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
