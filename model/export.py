"""Writing what the project outputs: the atomic-publish helpers (directories and single files), and the drop-in
full-model writer.

`write_full_checkpoint` is what train.py (--train_type freeze / all) and merge_lora.py write: the base checkpoint
directory with new weights, so that whatever loaded the base (THUDM's remote code through `trust_remote_code`, vLLM,
chatglm.cpp's converter, our own loader) loads the output the same way:

- every top-level file of the base that is not a weight file (the official *.py files, tokenizer files,
  tokenizer_config.json, generation_config.json, README, licences ...) is copied byte for byte, except this
  project's own run records (`RUN_RECORDS`), which the writing tool replaces with its own;
- config.json is the base's, byte for byte, unless a field in `CHANGED_CONFIG_FIELDS` really changed (only
  `torch_dtype`, when merge_lora.py is asked for another dtype than the base's); then it is the base's JSON with just
  those fields replaced;
- the weights carry exactly the base's weight names, in safetensors, each tensor in the base's dtype (or the one asked
  for); where the base is sharded (model.safetensors.index.json or pytorch_model.bin.index.json) the output is
  sharded the same way, tensor for tensor, with a model.safetensors.index.json. Tensors the base stores but our model
  computes (the rotary `inv_freq` buffer of the official ChatGLM2/3 checkpoints) are copied from the base unchanged.

Every directory this project writes appears only once complete: it is written under a temporary name beside its
final place (`staging_path`) and renamed into place by `publish`, which also gives files and directories the
ordinary permissions of the user's umask (tempfile and some writers create them 0600 / 0700).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter

import torch

from .config import read_json

# Files of ours that a base directory may hold when it is itself an output of this project (training_args.json of a
# train.py checkpoint, merge_lora.json of a merge). They describe the run that wrote the base, not the new one, so
# they are not carried over; the tool that writes the new directory writes its own.
RUN_RECORDS = ("training_args.json", "merge_lora.json")

# config.json fields a full checkpoint may change relative to its base. Nothing else is ever rewritten.
CHANGED_CONFIG_FIELDS = ("torch_dtype",)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class ExportError(ValueError):
    """A base directory the writer cannot reproduce (one line, naming the file)."""


# --------------------------------------------------------------------------------------------- atomic directories
def staging_path(final: str) -> str:
    """The temporary name a directory is written under: `.tmp-<name>` beside `final` (the same on every rank, so
    that ranks of one job can write into it together)."""
    final = os.path.abspath(final)
    return os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}")


def begin_staging(final: str) -> str:
    """Create an empty staging directory for `final` (a stale one from an interrupted run is removed first)."""
    staging = staging_path(final)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def _normalise_permissions(root: str) -> None:
    """Files 0666 and directories 0777, both minus the umask: what `open()` and `mkdir` give by default."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def publish(staging: str, final: str, replace: bool = False) -> str:
    """Rename the complete `staging` directory to `final`. An existing `final` is replaced when `replace`, taken
    over when it is an empty directory, and otherwise an error (nothing is overwritten by accident)."""
    _normalise_permissions(staging)
    if os.path.lexists(final):
        if replace:
            shutil.rmtree(final) if os.path.isdir(final) and not os.path.islink(final) else os.remove(final)
        elif os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)
        else:
            raise FileExistsError(f"{final} exists and is not empty")
    os.replace(staging, final)
    return final


@contextlib.contextmanager
def atomic_directory(final: str, replace: bool = False):
    """`with atomic_directory(path) as staging:` write into `staging`; on success it becomes `path`, on an error
    nothing is left behind. For one process; train.py's ranks use `begin_staging` / `publish` themselves."""
    final = os.path.abspath(final)  # "." too: an empty current directory can be taken over by its full path
    staging = begin_staging(final)
    try:
        yield staging
        publish(staging, final, replace)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def atomic_write_text(path: str, text: str) -> None:
    """One file, the same way: written under a temporary name in its directory, then renamed, so `path` is never
    half-written; with the umask's ordinary permissions (mkstemp makes it private)."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


# ------------------------------------------------------------------------------------------------ the base's weights
def is_weight_file(name: str) -> bool:
    """Weight files and their indexes, which a full checkpoint writes anew (everything else is carried over)."""
    return name.endswith(".safetensors") or name in (SAFE_INDEX, BIN_INDEX) or (
        name.startswith("pytorch_model") and name.endswith(".bin"))


def base_weight_layout(base_dir: str) -> tuple[dict[str, str], list[str]]:
    """(weight name -> the base file holding it, the base's weight files in shard order)."""
    names = set(os.listdir(base_dir))
    for index in (SAFE_INDEX, BIN_INDEX):
        if index in names:
            weight_map = read_json(os.path.join(base_dir, index), ExportError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ExportError(f"{os.path.join(base_dir, index)}: no weight_map")
            return dict(weight_map), sorted(set(weight_map.values()))
    for single in (SAFE_SINGLE, "pytorch_model.bin"):
        if single in names:
            return {key: single for key in _tensor_names(os.path.join(base_dir, single))}, [single]
    raise ExportError(f"{base_dir}: no model.safetensors, pytorch_model.bin or weight index to take the layout from")


def _tensor_names(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def _base_dtypes(base_dir: str, files: list[str], default: torch.dtype) -> dict[str, torch.dtype]:
    """Stored dtype of each base weight: from the safetensors headers; .bin shards are not opened for this, their
    floating tensors count as the config's torch_dtype (`default`)."""
    from safetensors import safe_open

    dtypes = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(base_dir, name), framework="pt") as f:
                for key in f.keys():
                    dtypes[key] = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), default)
    return dtypes


def stored_dtype(base_dir: str) -> torch.dtype:
    """The floating dtype most of a checkpoint's weights are stored in (safetensors headers), else the one its
    config.json declares, else float32."""
    declared = config_dtype(read_json(os.path.join(base_dir, "config.json"), ExportError)) or torch.float32
    counts = Counter(dtype for dtype in _base_dtypes(base_dir, base_weight_layout(base_dir)[1], declared).values()
                     if dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else declared


def _load_base_tensors(base_dir: str, layout: dict[str, str], keys: list[str]) -> dict[str, torch.Tensor]:
    """The base's own tensors named in `keys` (those our model does not hold, such as inv_freq)."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted({layout[key] for key in keys}):
        path = os.path.join(base_dir, file)
        wanted = [key for key in keys if layout[key] == file]
        if file.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in wanted})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({key: state[key].clone() for key in wanted})
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype a config.json declares (`torch_dtype`, or transformers 5's `dtype`), or None."""
    value = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or ""), None)
    return value if isinstance(value, torch.dtype) else None


def _output_shard_name(base_file: str, shard_files: list[str]) -> str:
    if len(shard_files) == 1:
        return SAFE_SINGLE
    return f"model-{shard_files.index(base_file) + 1:05d}-of-{len(shard_files):05d}.safetensors"


def _shares_storage(tensor: torch.Tensor, shards: dict[str, dict[str, torch.Tensor]]) -> bool:
    pointer = tensor.untyped_storage().data_ptr()
    return any(other.untyped_storage().data_ptr() == pointer for shard in shards.values() for other in shard.values())


# ---------------------------------------------------------------------------------------------- the full writer
def with_tied_keys(state_dict: dict[str, torch.Tensor], tied: dict[str, str] | None,
                   stored: set[str]) -> dict[str, torch.Tensor]:
    """`state_dict` with each tied pair ({target: source}, a model's `all_tied_weights_keys`: ChatGLM-6B's lm_head and
    word_embeddings) written under the names the base stores: a key the state dict lacks (named_parameters() names a
    shared parameter once) is filled from its twin, a key the base does not store is left out. Both written keys
    then hold the one matrix the model trained."""
    tensors = dict(state_dict)
    for target, source in (tied or {}).items():
        value = tensors.get(source, tensors.get(target))
        if value is None:
            continue
        for key in (target, source):
            if key in stored:
                tensors[key] = value
            else:
                tensors.pop(key, None)
    return tensors


def write_full_checkpoint(state_dict: dict[str, torch.Tensor], base_dir: str, out_dir: str,
                          dtype: torch.dtype | None = None, tied: dict[str, str] | None = None) -> list[str]:
    """Write `state_dict` (official names) into the empty directory `out_dir` as the base directory with new weights
    (see the module docstring). `dtype` None keeps each tensor in the base's stored dtype; a dtype casts every
    floating tensor to it and, where that differs from the base's, updates config.json's `torch_dtype`. `tied`
    ({target: source}, the model's `all_tied_weights_keys`) names weights that are one parameter in the model: each
    is written under every name of the pair that the base stores (`with_tied_keys`).
    Returns the config.json fields that were changed."""
    from safetensors.torch import save_file

    base_dir = os.path.abspath(base_dir)
    config_file = os.path.join(base_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ExportError(f"{config_file} not found: the base directory must be a checkpoint directory")
    base_config = read_json(config_file, ExportError)
    layout, base_files = base_weight_layout(base_dir)
    state_dict = with_tied_keys(state_dict, tied, set(layout))

    base_names, ours = set(layout), set(state_dict)
    extra = sorted(ours - base_names)
    if extra:
        raise ExportError(f"{base_dir}: the model has weights the base does not store, e.g. {extra[:3]}; "
                          f"a full checkpoint keeps the base's weight names")
    base_only = sorted(base_names - ours)
    tensors = dict(state_dict)
    tensors.update(_load_base_tensors(base_dir, layout, base_only))

    declared = config_dtype(base_config) or torch.float32
    stored = _base_dtypes(base_dir, base_files, declared)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(base_names):
        tensor = tensors[key].detach().to("cpu")
        if tensor.is_floating_point() and key not in base_only:
            tensor = tensor.to(dtype or stored.get(key, declared))
        shard = _output_shard_name(layout[key], base_files)
        # a copy where the tensor is shared with another key (tied weights): safetensors refuses aliases in one file
        shards.setdefault(shard, {})[key] = tensor.clone() if _shares_storage(tensor, shards) else tensor.contiguous()

    for name in sorted(os.listdir(base_dir)):
        path = os.path.join(base_dir, name)
        if os.path.isfile(path) and not is_weight_file(name) and name not in RUN_RECORDS and name != "config.json":
            shutil.copyfile(path, os.path.join(out_dir, name))

    changed = []
    if dtype is not None and dtype != declared:
        changed.append("torch_dtype")
    if changed:
        config = dict(base_config)
        config["torch_dtype"] = _dtype_name(dtype)
        if "dtype" in config:  # a base saved by transformers 5 names the field this way
            config["dtype"] = _dtype_name(dtype)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    else:
        shutil.copyfile(config_file, os.path.join(out_dir, "config.json"))

    metadata = {"format": "pt"}
    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, os.path.join(out_dir, shard), metadata=metadata)
    if len(shards) > 1 or len(base_files) > 1:
        total = sum(t.numel() * t.element_size() for shard in shards.values() for t in shard.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: shard for shard, part in sorted(shards.items()) for key in sorted(part)}}
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return changed
