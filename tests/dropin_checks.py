"""Checks that a full checkpoint directory is its base directory with new weights (model/export.py's promise)."""
import json
import os
import stat
from pathlib import Path

import torch
from safetensors import safe_open

# What train.py and merge_lora.py add beside the base's files: their run records (and train.py's resume state).
TRAIN_EXTRAS = {"training_args.json", "deepspeed"}
MERGE_EXTRAS = {"merge_lora.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
INDEXES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in INDEXES


def weight_names(directory) -> dict[str, str]:
    """name -> dtype of every tensor in the directory's safetensors files."""
    names = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert key not in names, f"{key} stored twice"
                names[key] = f.get_slice(key).get_dtype()
    return names


def read_weights(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def assert_dropin(base, out, extras: set, changed_config_fields: dict | None = None) -> None:
    """`out` holds exactly the base's non-weight files (byte for byte; config.json except `changed_config_fields`,
    name -> new value), safetensors weights with exactly the base's names and dtypes (or the changed torch_dtype), an
    index when the base is sharded, `extras`, and ordinary permissions."""
    base, out = Path(base), Path(out)
    base_files = {p.name for p in base.iterdir() if p.is_file() and not is_weight(p.name)}
    out_entries = {p.name for p in out.iterdir()}
    out_weights = {name for name in out_entries if is_weight(name)}
    assert out_entries - out_weights == base_files | extras, (sorted(out_entries), sorted(base_files))
    for name in base_files - {"config.json"}:
        assert (out / name).read_bytes() == (base / name).read_bytes(), f"{name} differs from the base's"
    if changed_config_fields:
        got, want = json.loads((out / "config.json").read_text()), json.loads((base / "config.json").read_text())
        assert got == {**want, **changed_config_fields}
    else:
        assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()

    base_names, out_names = weight_names(base), weight_names(out)
    if not base_names:  # a .bin base: its index names the tensors
        base_names = dict.fromkeys(json.loads((base / "pytorch_model.bin.index.json").read_text())["weight_map"])
    assert set(out_names) == set(base_names), "the output's weight names are not the base's"
    if changed_config_fields is None and any(isinstance(v, str) for v in base_names.values()):
        assert out_names == base_names, "a tensor changed dtype"
    sharded = any(name in INDEXES for name in os.listdir(base))
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        base_index = next(json.loads((base / name).read_text()) for name in INDEXES if (base / name).exists())
        assert set(index["weight_map"]) == set(base_names)
        # sharded like the base: as many shards, each tensor in the shard of the same number
        assert len(set(index["weight_map"].values())) == len(set(base_index["weight_map"].values()))
        shard_number = {file: i for i, file in enumerate(sorted(set(base_index["weight_map"].values())))}
        out_number = {file: i for i, file in enumerate(sorted(set(index["weight_map"].values())))}
        assert all(out_number[index["weight_map"][k]] == shard_number[f] for k, f in base_index["weight_map"].items())
        assert set(index["weight_map"].values()) == {n for n in out_weights if n.endswith(".safetensors")}
        for key, file in index["weight_map"].items():
            with safe_open(str(out / file), framework="pt") as f:
                assert key in f.keys()
    else:
        assert out_weights == {"model.safetensors"}

    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path} has mode {oct(mode)}, expected {oct(expected)}"
