"""Outputs are drop-in official checkpoints: a base laid out like THUDM's (remote-code .py files, a custom auto_map,
generation_config.json, README/licence, sharded weights with the rotary inv_freq buffer) goes through merge_lora.py
and train.py (--train_type all), and the output is that directory with new weights."""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from dropin_checks import MERGE_EXTRAS, TRAIN_EXTRAS, assert_dropin, read_weights
from model import MODE, detect_version
from model.export import CHANGED_CONFIG_FIELDS, atomic_directory, publish, staging_path
from model.tiny import OFFICIAL_TOKENIZER_CONFIGS, glm4_tokenizer_config
from test_merge_lora import make_lora_adapter, merge_in_process
from test_train import run_train

MODES = ["glm", "glm2", "glm3", "glm4"]
OFFICIAL_NAMES = {"glm": "THUDM/chatglm-6b", "glm2": "THUDM/chatglm2-6b", "glm3": "THUDM/chatglm3-6b",
                  "glm4": "THUDM/glm-4-9b-chat"}
CUSTOM_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                   "AutoModel": "modeling_chatglm.CustomChatGLM",
                   "AutoModelForCausalLM": "modeling_chatglm.CustomChatGLM"}

pytestmark = pytest.mark.usefixtures("one_thread")


def official_like_base(tiny_dir, directory) -> Path:
    """The tiny checkpoint dressed as a THUDM directory: stand-in remote-code files, a custom auto_map and hub name in
    config.json (fp32 weights, so torch_dtype says float32), generation_config.json, README, licence, the weights in
    two shards with an index, plus the inv_freq buffer the official ChatGLM2/3 checkpoints store."""
    directory = Path(directory)
    shutil.copytree(tiny_dir, directory)
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py"):
        (directory / name).write_text(f"# stand-in for THUDM's {name}\nVALUE = {len(name)}\n")
    (directory / "README.md").write_text("# a model card\n")
    (directory / "MODEL_LICENSE").write_text("licence text\n")
    (directory / "generation_config.json").write_text('{"do_sample": true, "eos_token_id": 2}\n')
    config = json.loads((directory / "config.json").read_text())
    mode = config["chatglm_version"]
    del config["chatglm_version"]  # official configs have no marker: the hub name tells the version
    config.update({"_name_or_path": OFFICIAL_NAMES[mode], "auto_map": CUSTOM_AUTO_MAP})
    # THUDM's formatting, not ours: the output must keep these bytes
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    weights = load_file(directory / "model.safetensors")
    os.remove(directory / "model.safetensors")
    if mode != "glm":
        weights["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, part in shards.items():
        save_file({k: weights[k] for k in part}, directory / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def official_bases(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return {mode: official_like_base(tiny_dirs[mode], root / mode) for mode in MODES}


def logits_of(model, tokenizer, mode):
    from model import template

    ids = template.encode_prompt(tokenizer, mode, "发动机水温高怎么办？", [])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# ------------------------------------------------------------------------------------------------ the tiny base
@pytest.mark.parametrize("mode", MODES)
def test_tiny_checkpoint_looks_official(mode, tiny_dirs):
    directory = Path(tiny_dirs[mode])
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["ChatGLMModel"] and config["model_type"] == "chatglm"
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    assert config["auto_map"]["AutoConfig"] == "configuration_chatglm.ChatGLMConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert detect_version(config) == mode
    # THUDM's tokenizer_config.json: no eos/pad/unk entries for glm2/glm3 (THUDM's class has read-only properties);
    # GLM-4's names <|endoftext|> as eos and pad, as THUDM's does
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    # (GLM-4: the current glm-4-9b-chat layout, its special tokens in added_tokens_decoder and a chat_template)
    expected = glm4_tokenizer_config(MODE[mode].tokenizer.from_pretrained(str(directory))) if mode == "glm4" \
        else OFFICIAL_TOKENIZER_CONFIGS[mode]
    assert tokenizer_config == expected
    if mode in ("glm2", "glm3"):
        assert not {"eos_token", "pad_token", "unk_token", "bos_token"} & set(tokenizer_config)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["config.json", "model.safetensors", MODE[mode].tokenizer_file, "tokenizer_config.json"])
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in directory.iterdir())  # readable by all


@pytest.mark.parametrize("mode", MODES)
def test_official_like_dirs_are_told_apart(mode, official_bases):
    config = json.loads(Path(official_bases[mode], "config.json").read_text())
    assert "chatglm_version" not in config and detect_version(config) == mode
    # and our loader reads them (sharded, with the inv_freq it computes itself)
    MODE[mode].model.from_pretrained(str(official_bases[mode]))


# ----------------------------------------------------------------------------------------------- deployment tests
@pytest.mark.parametrize("mode", MODES)
def test_merge_output_is_the_base_with_merged_weights(mode, official_bases, tmp_path):
    base = official_bases[mode]
    adapter = make_lora_adapter(mode, str(base), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_in_process("--mode", mode, "--ori_model_dir", base, "--model_dir", adapter, "--output_dir", out) == 0
    assert_dropin(base, out, MERGE_EXTRAS)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == CUSTOM_AUTO_MAP and config["architectures"] == ["ChatGLMModel"]
    assert config["torch_dtype"] == "float32"
    assert json.loads((out / "merge_lora.json").read_text())["config_fields_changed"] == []
    saved, original = read_weights(out), read_weights(base)
    if mode != "glm":  # the buffer our model computes is carried from the base unchanged
        key = "transformer.rotary_pos_emb.inv_freq"
        assert torch.equal(saved[key], original[key])
    assert any(not torch.equal(saved[k], original[k]) for k in original)  # the merged weights, not the base's
    # the weights reload to the merged model's logits
    from test_merge_lora import unmerged

    reloaded = MODE[mode].model.from_pretrained(str(out)).eval()
    tokenizer = MODE[mode].tokenizer.from_pretrained(str(out))
    expected = logits_of(unmerged(mode, str(base), adapter), tokenizer, mode)
    # fp32 rounding of W + BA, relative to the logits' size (merge_lora.py's own bound)
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    assert (logits_of(reloaded, tokenizer, mode) - expected).abs().max().item() < tolerance


def test_merge_in_another_dtype_changes_only_torch_dtype(official_bases, tmp_path):
    base = official_bases["glm3"]
    adapter = make_lora_adapter("glm3", str(base), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert merge_in_process("--mode", "glm3", "--ori_model_dir", base, "--model_dir", adapter, "--output_dir", out,
                            "--dtype", "bf16") == 0
    assert CHANGED_CONFIG_FIELDS == ("torch_dtype",)
    assert_dropin(base, out, MERGE_EXTRAS, changed_config_fields={"torch_dtype": "bfloat16"})
    assert json.loads((out / "merge_lora.json").read_text())["config_fields_changed"] == ["torch_dtype"]
    assert MODE["glm3"].model.from_pretrained(str(out)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_train_all_checkpoint_is_the_base_with_trained_weights(mode, official_bases, tmp_path):
    base, out = official_bases[mode], tmp_path / "out"
    run_train(base, out, "--mode", mode, "--train_type", "all", "--train_path", ROOT / "data/train.jsonl",
              "--max_len", 128, "--max_src_len", 96, "--per_device_train_batch_size", 2, "--max_steps", 1,
              "--learning_rate", 1e-3, "--warmup_ratio", 0.0)
    (checkpoint,) = [p for p in out.iterdir() if p.name.startswith("epoch-")]
    assert_dropin(base, checkpoint, TRAIN_EXTRAS)
    # the exported weights are the ones DeepSpeed holds (its own resume copy), under the official names
    ds_state = torch.load(checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)["module"]
    saved, original = read_weights(checkpoint), read_weights(base)
    for key, tensor in ds_state.items():
        assert torch.equal(saved[key], tensor.to(saved[key].dtype)), key
    assert any(not torch.equal(saved[k], original[k]) for k in ds_state)


# --------------------------------------------------------------------------------------------- the atomic helper
def test_atomic_directory_leaves_nothing_on_failure_and_never_overwrites(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(final)) as staging:
            Path(staging, "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    final.mkdir()
    (final / "keep").write_text("mine")
    staging = Path(staging_path(str(final)))
    staging.mkdir()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        publish(str(staging), str(final))
    assert (final / "keep").read_text() == "mine"
