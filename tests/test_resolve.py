"""The lock that .ci/resolve.py writes from one resolution per supported Python, and the one-line refusal of an
unsupported Python (python_check.py) through demo.sh and the entry points."""
import importlib.util
import os
import subprocess
import sys

import pytest
from packaging.markers import Marker

import python_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_resolve():
    spec = importlib.util.spec_from_file_location("resolve", os.path.join(ROOT, ".ci", "resolve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins_for(lines, python):
    """What pip applies on `python` from constraints lines: markers evaluated as PEP 508 says (packaging.markers)."""
    pins = {}
    for line in lines:
        requirement, _, marker = line.partition(";")
        if not marker or Marker(marker).evaluate({"python_version": python}):
            name, version = requirement.split("==")
            assert name not in pins, "two lines apply to %s on Python %s" % (name, python)
            pins[name] = version
    return pins


def test_lock_merges_per_python_resolutions_with_markers():
    resolve = load_resolve()
    versions = python_check.SUPPORTED
    assert versions[:4] == ("3.10", "3.11", "3.12", "3.13")
    newest = {"3.10": "2.2.6", "3.11": "2.4.6"}  # numpy: 2.5 needs 3.12, 2.3 and 2.4 need 3.11
    resolutions = {
        version: {"numpy": ("numpy", newest.get(version, "2.5.5")),
                  "jinja2": ("Jinja2", "3.1.6"),  # the same everywhere: one line, spelled as the package spells it
                  "torch": ("torch", "2.13.0"), "nvidia-nccl-cu13": ("nvidia-nccl-cu13", "2.29.7"),  # not pinned
                  **({"tomli": ("tomli", "2.5.0")} if version == "3.10" else {})}  # only where installed
        for version in versions}
    lines = resolve.merge(resolutions)
    assert lines == ["Jinja2==3.1.6",
                     'numpy==2.2.6; python_version < "3.11"',
                     'numpy==2.4.6; python_version >= "3.11" and python_version < "3.12"',
                     'numpy==2.5.5; python_version >= "3.12"',
                     "tomli==2.5.0"]
    for version in versions:
        expected = {spelled: pinned for spelled, pinned in resolutions[version].values()
                    if spelled not in ("torch", "nvidia-nccl-cu13")}
        assert {name: pinned for name, pinned in pins_for(lines, version).items() if name in expected} == expected


def test_constraints_pin_one_version_per_package_on_each_supported_python():
    with open(os.path.join(ROOT, "constraints.txt")) as handle:
        lines = [line.split("#")[0].strip() for line in handle if line.split("#")[0].strip()]
    for version in python_check.SUPPORTED:
        assert pins_for(lines, version)["numpy"]  # and no package twice (pins_for asserts it)


@pytest.mark.parametrize("command", [["bash", "demo.sh"], [sys.executable, "train.py", "--help"]])
def test_older_python_is_refused_in_one_line(tmp_path, command):
    # an interpreter that says it is 3.9: sitecustomize runs before any script (python docs, 'site' module)
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.version_info = (3, 9, 18, 'final', 0)\n")
    work = tmp_path / "not-a-directory"
    work.write_text("")  # without the check, demo.sh stops on this WORK instead, before any training
    env = dict(os.environ, PYTHONPATH=str(tmp_path), WORK=str(work),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert "Python 3.9 is too old: this project needs Python 3.10 or newer" in out.stderr
