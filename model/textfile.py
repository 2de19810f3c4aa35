"""The one reading rule for every text file the project reads: training / dev / test data, sample prompts, --tools,
a tool result given as @FILE, JSON configs (DeepSpeed, config.json, training_args.json, adapter_config.json).

UTF-8, with a leading byte-order mark dropped (Python's "utf-8-sig": Windows Notepad and Excel save UTF-8 with one,
and U+FEFF would otherwise reach the model or make json refuse the file with "Unexpected UTF-8 BOM"). Bytes that are
not UTF-8 are named by line and column; every problem is one line naming the file.
"""
from __future__ import annotations

import codecs


def read_text(path: str, error: type[Exception] = ValueError) -> str:
    """The text of `path`. A file that cannot be read or is not UTF-8 raises `error` (the caller picks the class its
    entry point reports) with one line naming the file (and the line and column of the first bad byte)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[line_start:e.start].decode("utf-8", errors="replace")) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}; save the file as "
                    f"UTF-8)") from None
