"""Write the per-flag reference docs/cli/<script>.md from each entry point's argparse parser (its build_parser()):
every flag with its type, default, choices and help, grouped as the parser groups them, and for train.py the flags
--resume compares (train.RESUME_FIXED).

    python docs/cli/generate.py           # rewrite the pages
    python docs/cli/generate.py --check   # exit 1, naming the stale pages, when they differ from the parsers

tests/test_docs.py runs the check, so a flag changed without regenerating fails a test.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = ("train", "predict", "merge_lora", "web_demo")
REGENERATE = "python docs/cli/generate.py"


def cell(text) -> str:
    """Text for one markdown table cell: pipes escaped, one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def type_name(action: argparse.Action) -> str:
    if action.metavar == "True|False":  # utils.add_bool_flag
        return "bool"
    if action.type is None:
        return "str"
    return getattr(action.type, "__name__", str(action.type))


def default_text(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None:
        return "none"
    if action.default == "":
        return '`""`'
    return f"`{action.default}`"


def flag_row(action: argparse.Action) -> str:
    name = ", ".join(f"`{option}`" for option in action.option_strings)
    choices = ", ".join(f"`{choice}`" for choice in action.choices) if action.choices else ""
    helptext = (action.help or "") % {"default": action.default, "prog": "", "dest": action.dest}
    return f"| {name} | {type_name(action)} | {cell(default_text(action))} | {cell(choices)} | {cell(helptext)} |"


def page(script: str) -> str:
    module = importlib.import_module(script)
    parser = module.build_parser()
    lines = [f"# {script}.py flags", "",
             f"Generated from `{script}.build_parser()` by `{REGENERATE}`; do not edit by hand "
             f"(`tests/test_docs.py` fails when this page and the parser differ). `python {script}.py --help` "
             f"prints the same. Boolean flags take both forms: `--flag` alone (True) or `--flag True` / `False`.", ""]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | type | default | choices | help |", "|---|---|---|---|---|"]
        lines += [flag_row(action) for action in actions]
        lines.append("")
    if script == "train":
        lines += resume_section(module)
    return "\n".join(lines).rstrip("\n") + "\n"


def resume_section(train) -> list[str]:
    """The flags --resume compares with the checkpoint's training_args.json (train.RESUME_FIXED)."""
    lines = ["## Flags that --resume compares", "",
             "A resumed run must be the same run: these values are compared with the checkpoint's "
             "`training_args.json`, and a difference stops with one line naming the flag (`train.RESUME_FIXED`). "
             "Everything else (epochs, `--max_steps`, the learning rate, `--warmup_ratio`, `--lora_dropout`, "
             "logging and saving) may change.", ""]
    for train_type, flags in train.RESUME_FIXED.items():
        names = ", ".join("the number of ranks" if flag == "world_size" else f"`--{flag}`" for flag in flags)
        lines.append(f"- {'every train type' if train_type == 'any' else f'`--train_type {train_type}`'}: {names}")
    lines.append("")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    stale = []
    for script in SCRIPTS:
        path = os.path.join(HERE, f"{script}.md")
        text = page(script)
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(os.path.relpath(path, ROOT))
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        print(f"stale: {', '.join(stale)}; regenerate with: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
