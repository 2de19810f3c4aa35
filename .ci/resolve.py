"""Resolve the install on every supported Python (python_check.SUPPORTED), each in a throwaway venv, from wheels only.

  python .ci/resolve.py check   every supported Python on this machine resolves `pip install torch==T
                                -r requirements.txt -c constraints.txt` from wheels, to versions constraints.txt pins
                                (bash .ci/wheels runs it)
  python .ci/resolve.py lock    resolves the newest set requirements.txt allows on each supported Python (all must be
                                on this machine) and writes it to constraints.txt: one line per package where all
                                agree, lines with python_version markers where they differ (bash .ci/newest --lock)

Each resolution is pip's own (`pip install --dry-run --report`, pip upgraded in the venv) with --only-binary=:all:, so
a pin that one of them could only build from source (orjson 3.8.3 on 3.12: Rust) fails the check, and the lock never
picks one. PyPI publishes DeepSpeed as source only: it is the one exception (SOURCE_ONLY); its build is pure Python,
it compiles its ops at run time, when a job needs them.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from python_check import SUPPORTED  # noqa: E402  the one list of supported Pythons

SOURCE_ONLY = ("deepspeed",)
# Not pinned: torch is pinned on the command line (its CPU or CUDA build), and what only its build brings (the CUDA
# runtime of PyPI's Linux wheel) follows that build; pip, setuptools and wheel are left out as `pip freeze` does.
UNPINNED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")
LOCK_HEADER_END = "# To upgrade"


def canonical(name):
    """The package name as PEP 503 compares it (Jinja2 = jinja2, typing_extensions = typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def interpreter_version(path):
    """'3.12' for a working interpreter at path, else None (pyenv's shim for a version not enabled fails here)."""
    try:
        out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_interpreters(versions=SUPPORTED):
    """{'3.10': path, ...} for each of versions on this machine: pythonX.Y on PATH, else pyenv's newest X.Y.*."""
    found = {}
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for version in versions:
        candidates = [shutil.which("python" + version)]
        candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", version + ".*", "bin", "python")),
                             key=lambda path: [int(part) for part in re.findall(r"\d+", path.split("versions")[-1])],
                             reverse=True)
        for path in filter(None, candidates):
            if interpreter_version(path) == version:
                found[version] = path
                break
    return found


def resolve(python, workdir, torch_version, constraints=None):
    """pip's resolution of the README install on `python`, in a fresh venv: ({canonical name: (name, version)}, None),
    or (None, pip's error) when it finds none."""
    venv = os.path.join(workdir, "venv")
    venv_python = os.path.join(venv, "bin", "python")
    for command in ([python, "-m", "venv", venv], [venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip"]):
        out = subprocess.run(command, capture_output=True, text=True)  # the current pip: --report, PEP 658 metadata
        if out.returncode != 0:
            return None, "%s failed:\n%s" % (" ".join(command), out.stderr.strip())
    report = os.path.join(workdir, "report.json")
    command = [venv_python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", report,
               "--only-binary=:all:", "--no-binary=" + ",".join(SOURCE_ONLY), "torch==" + torch_version,
               "-r", os.path.join(ROOT, "requirements.txt")]
    if constraints:
        command += ["-c", constraints]
    out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:  # pip's errors and their reason (not --quiet: it drops the reason), from the first ERROR on
        lines = out.stdout.splitlines()
        first_error = next((i for i, line in enumerate(lines) if line.startswith("ERROR")), 0)
        return None, "\n".join(lines[first_error:first_error + 20])
    with open(report) as handle:
        install = json.load(handle)["install"]
    return {canonical(item["metadata"]["name"]): (item["metadata"]["name"], item["metadata"]["version"])
            for item in install}, None


def resolve_each(interpreters, torch_version, constraints=None):
    """{version: (resolution, error, seconds)} for each of interpreters ({version: path}), resolved side by side (the
    time goes to the network and to building DeepSpeed's metadata, not to one core)."""
    def timed(path):
        started = time.time()
        with tempfile.TemporaryDirectory() as workdir:
            resolution, error = resolve(path, workdir, torch_version, constraints)
        return resolution, error, time.time() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(interpreters) or 1) as pool:
        futures = {version: pool.submit(timed, path) for version, path in interpreters.items()}
        return {version: future.result() for version, future in futures.items()}


def pinned_versions(constraints):
    """{canonical name: set of versions} over constraints.txt's lines, whatever their markers."""
    pins = {}
    with open(constraints) as handle:
        for line in handle:
            requirement = line.split("#")[0].split(";")[0].strip()
            if "==" in requirement:
                name, version = requirement.split("==")
                pins.setdefault(canonical(name.strip()), set()).add(version.strip())
    return pins


def marker(versions, start, end):
    """The python_version marker for SUPPORTED[start:end] (the first range open below, the last open above)."""
    parts = []
    if start > 0:
        parts.append('python_version >= "%s"' % versions[start])
    if end < len(versions):
        parts.append('python_version < "%s"' % versions[end])
    return " and ".join(parts)


def merge(resolutions):
    """constraints.txt lines from {python version: resolution}: one line where all Pythons that install a package
    agree on its version, else one line per run of consecutive Pythons with the same version, with its marker (a
    Python that does not install the package at all takes its neighbour's line: a constraint on a package that is not
    installed does nothing)."""
    names = {name: spelled for resolution in resolutions.values() for name, (spelled, _) in resolution.items()
             if not UNPINNED.match(name)}
    lines = []
    for name in sorted(names):
        by_python = [resolutions[version].get(name, (None, None))[1] for version in SUPPORTED]
        if len(set(filter(None, by_python))) == 1:
            lines.append("%s==%s" % (names[name], next(filter(None, by_python))))
            continue
        for i, version in enumerate(by_python):  # absent: the previous Python's version, or the next one's
            by_python[i] = version or (by_python[i - 1] if i else next(filter(None, by_python)))
        start = 0
        for end in range(1, len(SUPPORTED) + 1):
            if end == len(SUPPORTED) or by_python[end] != by_python[start]:
                lines.append("%s==%s; %s" % (names[name], by_python[start], marker(SUPPORTED, start, end)))
                start = end
    return lines


def check(args):
    """Resolve with constraints.txt on each supported Python present; 1 if any fails or installs an unpinned package."""
    interpreters = find_interpreters(args.python or SUPPORTED)
    pins = pinned_versions(args.constraints)
    failed = False
    results = resolve_each(interpreters, args.torch, args.constraints)
    for version in args.python or SUPPORTED:
        if version not in interpreters:
            print("%s: not on this machine, not checked" % version)
            continue
        resolution, error, seconds = results[version]
        took = "%.0f s" % seconds
        if resolution is None:
            print("%s (%s): FAILED, no install from wheels only (%s):\n%s" % (version, interpreters[version], took,
                                                                              error))
            failed = True
            continue
        unpinned = sorted(spelled for name, (spelled, _) in resolution.items()
                          if name not in pins and not UNPINNED.match(name))
        if unpinned:
            print("%s (%s): FAILED, installs packages %s does not pin: %s" % (version, interpreters[version],
                                                                            args.constraints, ", ".join(unpinned)))
            failed = True
            continue
        print("%s (%s): ok, %d packages from wheels (%s from source) (%s)" % (
            version, interpreters[version], len(resolution), ", ".join(SOURCE_ONLY), took))
    return 1 if failed else 0


def lock(args):
    """Resolve the newest allowed set on every supported Python and write the merged lock to args.constraints."""
    interpreters = find_interpreters()
    missing = [version for version in SUPPORTED if version not in interpreters]
    if missing:
        print("resolve.py lock: Python %s not found (pythonX.Y on PATH or pyenv's versions); the lock must hold on each "
              "of %s: install it (e.g. pyenv install %s)" % (", ".join(missing), ", ".join(SUPPORTED), missing[0]),
              file=sys.stderr)
        return 2
    resolutions = {}
    for version, (resolution, error, seconds) in resolve_each(interpreters, args.torch).items():
        if error:
            print("resolve.py lock: Python %s (%s) finds no install from wheels only:\n%s"
                  % (version, interpreters[version], error), file=sys.stderr)
            return 1
        resolutions[version] = resolution
        print("%s (%s): resolved %d packages (%.0f s)" % (version, interpreters[version], len(resolution), seconds))
    with open(args.constraints) as handle:
        header = []
        for line in handle:
            header.append(line)
            if line.startswith(LOCK_HEADER_END):
                break
    lines = merge(resolutions)
    with open(args.constraints, "w") as handle:
        handle.write("".join(header) + "\n".join(lines) + "\n")
    split = sorted({line.split("==")[0] for line in lines if ";" in line})
    print("%s: %d lines; per Python: %s" % (args.constraints, len(lines), ", ".join(split) or "none"))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("check", "lock"),
                        help="check: constraints.txt installs from wheels on each supported Python here; "
                             "lock: write the newest allowed set, resolved on each supported Python, to constraints.txt")
    parser.add_argument("--torch", default=os.environ.get("TORCH", "2.13.0"),
                        help="the torch version the install pins on its command line (default: $TORCH or 2.13.0)")
    parser.add_argument("--constraints", default=os.path.join(ROOT, "constraints.txt"),
                        help="the lock to check, or to rewrite (its comment header is kept; default: constraints.txt)")
    parser.add_argument("--python", action="append", choices=SUPPORTED,
                        help="check: only this supported Python (repeatable; default: each of them on this machine)")
    args = parser.parse_args()
    if args.python and args.action == "lock":
        parser.error("--python: a lock is resolved on every supported Python")
    return check(args) if args.action == "check" else lock(args)


if __name__ == "__main__":
    sys.exit(main())
