"""Shared fixtures: paths to ../shared, tiny checkpoints built once per session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU a second OpenMP thread makes training ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return {mode: write_tiny_checkpoint(mode, str(base / mode)) for mode in ("glm", "glm2", "glm3")}
