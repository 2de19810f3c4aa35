"""The scripts that write a directory never delete what the user put there: `python -m model.tiny` and demo.sh
refuse a target that is not theirs with one line, and leave it as it was."""
import os
import subprocess
import sys

from conftest import ROOT


def run(command, **env):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_tiny_refuses_a_directory_or_file_that_holds_something(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (tmp_path, notes):
        result = run([sys.executable, "-m", "model.tiny", "--output_dir", str(target)])
        assert result.returncode == 2
        assert f"--output_dir {target} exists and is not an empty directory" in result.stderr.splitlines()[-1]
        assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and notes.read_text() == "mine"


def test_tiny_writes_into_an_empty_directory(tmp_path):
    result = run([sys.executable, "-m", "model.tiny", "--mode", "glm2", "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in tmp_path.iterdir()}


def test_demo_keeps_a_work_directory_it_did_not_write(tmp_path):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "base").mkdir()  # what an earlier demo writes may be there too
    (work / "notes.txt").write_text("mine")
    result = run(["bash", "demo.sh"], WORK=str(work))
    assert result.returncode == 2 and "holds notes.txt" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["base", "notes.txt"]

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    result = run(["bash", "demo.sh"], WORK=str(a_file))
    assert result.returncode == 2 and "is a file" in result.stderr and a_file.read_text() == "mine"
