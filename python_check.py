"""Refuse an unsupported Python in one line, before some import further on fails on it with a traceback.

demo.sh runs it first; the entry points (train.py, predict.py, merge_lora.py, web_demo.py) and the model package
import it before anything else; .ci/resolve.py resolves constraints.txt for each of SUPPORTED. Written in syntax that
old Pythons still parse (no f-strings, no annotations), so that they reach the message.
"""
import sys

# The Pythons constraints.txt is resolved for and installs on from wheels (bash .ci/wheels checks it), oldest first.
# 3.10 is the oldest that current distributions and CUDA images ship (Ubuntu 22.04) and the oldest torch 2.13 supports.
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
MINIMUM = tuple(int(part) for part in SUPPORTED[0].split("."))

if tuple(sys.version_info[:2]) < MINIMUM:
    sys.stderr.write("Python %d.%d is too old: this project needs Python %s or newer (tested on %s); %s is %s\n"
                     % (sys.version_info[0], sys.version_info[1], SUPPORTED[0], ", ".join(SUPPORTED),
                        sys.executable, sys.version.split()[0]))
    sys.exit(2)
