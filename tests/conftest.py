"""Shared fixtures: paths to ../shared, tiny checkpoints built once per session."""
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GENUINE_F_LINEAR = torch.nn.functional.linear  # taken before any test can let DeepSpeed replace it


def our_modules() -> list[str]:
    """Import names of the project's own modules (model.*, train, utils, ...; the test modules too)."""
    names = ["__main__"]  # train.py, predict.py ... when run as scripts
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative.parts[0].startswith("."):
            continue
        parts = relative.parts[1:] if relative.parts[0] == "tests" else relative.parts  # tests import as test_x
        names.append(".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts))
    return sorted(set(names))


# Deprecations are errors, so that the next rename in transformers, peft or torch fails a test instead of printing a
# warning nobody reads. In the test process every DeprecationWarning / FutureWarning is an error (transformers
# often warns without a stacklevel, so the warning names its own file, not our caller), except the few below that
# the libraries raise among themselves, each with the reason. In the train.py / predict.py / merge_lora.py processes
# the tests start, the warnings attributed to our own modules are errors (PYTHONWARNINGS cannot take a regex).
DEPRECATIONS = ("DeprecationWarning", "FutureWarning")
LIBRARY_INTERNAL = {
    "`is_gradient_checkpointing` is deprecated": "peft's PeftModel reads the old property of the base model",
    "`torch.jit.script_method` is deprecated": "raised while deepspeed imports its jit-scripted helpers",
    "`torch.distributed.all_gather_into_tensor` is deprecated": "deepspeed's ZeRO-3 gathers parameters with it",
    "`torch.distributed.reduce_scatter_tensor` is deprecated": "deepspeed's ZeRO-3 reduces gradients with it",
}
os.environ["PYTHONWARNINGS"] = ",".join(f"error::{category}:{module}"
                                        for category in DEPRECATIONS for module in our_modules())


def pytest_configure(config):
    for category in DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"error::{category}")
    for message in LIBRARY_INTERNAL:  # later lines take precedence
        config.addinivalue_line("filterwarnings", f"default:{re.escape(message)}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU a second OpenMP thread makes training ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port that is free on this machine now (the OS picks it: bind to port 0), for every MASTER_PORT,
    --master_port and --port the tests give: a fixed port may be taken by another program or a parallel test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_rank_env(monkeypatch) -> None:
    """The environment the deepspeed launcher gives a world of one process, on the CPU (gloo)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(autouse=True)
def real_f_linear():
    """After every test: ZeRO-3's zero.Init swaps in DeepSpeed's own F.linear for the rest of the process ("persists
    unless manually reset"); the genuine one, taken when this file was imported, is put back, so that no later test
    in the process (under pytest-xdist, whichever runs next on the worker) traces DeepSpeed's under torch.compile."""
    yield
    torch.nn.functional.linear = GENUINE_F_LINEAR


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside the developers' checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """mode -> directory of a tiny random checkpoint written by `python -m model.tiny` (built once)."""
    from model.tiny import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("tiny")
    return {mode: write_tiny_checkpoint(mode, str(base / mode)) for mode in ("glm", "glm2", "glm3", "glm4")}


def overfit(mode: str, base: str, output_dir, conversations: list[list[dict]], max_steps: int, stop_below: float,
            must_reach: float) -> None:
    """A full checkpoint of the tiny base trained with plain AdamW on `conversations` (message lists, as train.py's
    data path gives them) until the loss is below `stop_below`; it must end below `must_reach`. Right-padded like
    train.py's collator. Tests use it for a tiny model whose greedy answers are known."""
    import torch

    from model import MODE, template

    torch.manual_seed(0)
    tokenizer = MODE[mode].tokenizer.from_pretrained(base)
    model = MODE[mode].model.from_pretrained(base)
    encoded = [template.encode_messages(tokenizer, mode, messages)[:2] for messages in conversations]
    longest = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), longest), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), longest), template.IGNORE_INDEX)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, :len(ids)], labels[row, :len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(max_steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < stop_below:
            break
    assert loss.item() < must_reach, f"{mode}: the tiny model did not over-fit (loss {loss.item():.3f})"
    model.eval()
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))


# The training command of the README's "Your own fine-tune, step by step" (step 2), shrunk to one optimizer step
# on the tiny ChatGLM3 checkpoint; per train type its own flags (README "Training"; qlora4: step 2's
# `--quantization_bit 4` for QLoRA).
STEP_BY_STEP_TRAIN_TYPES = {
    "lora": ["--train_type", "lora", "--lora_dim", "4", "--lora_alpha", "16"],
    "qlora4": ["--train_type", "lora", "--lora_dim", "4", "--lora_alpha", "16", "--quantization_bit", "4"],
    "freeze": ["--train_type", "freeze"],
    "ptuning": ["--train_type", "ptuning", "--pre_seq_len", "4", "--prefix_projection", "True"],
    "all": ["--train_type", "all"],
}


@pytest.fixture(scope="session")
def trained_glm3(tiny_dirs, tmp_path_factory):
    """A function: train type (STEP_BY_STEP_TRAIN_TYPES) -> the checkpoint directory train.py wrote after one step
    on the tiny ChatGLM3 checkpoint, with the README's step-by-step flags. train.main runs in this process (a world
    of one, gloo on the CPU, one thread), once per train type and session; the process group stays up for the next
    run, as DeepSpeed keeps references to it."""
    import torch

    import train

    checkpoints = {}

    def checkpoint(train_type: str) -> str:
        if train_type not in checkpoints:
            out = tmp_path_factory.mktemp(f"trained-glm3-{train_type}")
            argv = ["--mode", "glm3", "--model_name_or_path", tiny_dirs["glm3"], "--train_path",
                    ROOT / "data/train.jsonl", "--max_len", "48", "--max_src_len", "24", "--learning_rate", "1e-3",
                    "--max_steps", "1", "--gradient_checkpointing", "--output_dir", out,
                    *STEP_BY_STEP_TRAIN_TYPES[train_type]]
            threads = torch.get_num_threads()
            with pytest.MonkeyPatch.context() as patch:
                one_rank_env(patch)
                torch.set_num_threads(1)
                try:
                    train.main([str(arg) for arg in argv])
                finally:
                    torch.set_num_threads(threads)
            checkpoints[train_type] = str(out / "epoch-1-step-1")
        return checkpoints[train_type]
    return checkpoint


def pytest_collection_modifyitems(config, items):
    """For pytest-xdist (`-n 2 --dist loadgroup`, as .ci/run runs the suite): the tests of a file that use one of
    its module-scoped fixtures (a trained checkpoint, a server) go to one worker together, so that each fixture is
    built once; every other test goes wherever a worker is free. conftest's own module-scoped fixtures are cheap and
    do not group. Without xdist the mark does nothing."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in info.names_closure:
            if any(d.scope == "module" and d.func.__module__ != __name__ for d in info.name2fixturedefs.get(name, ())):
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break
