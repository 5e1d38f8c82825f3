"""Every script's ``--help`` answers without TensorFlow: usage, description, ``--out`` default, help for every option."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
OUT_DEFAULTS = {"reproduce_all": "output"}  # others: output/<name>

# Run in a fresh interpreter: TensorFlow and Keras cannot be imported (a meta-path finder
# refuses them), every ArgumentParser that parses is recorded, and the script runs as
# __main__ with --help. The parsers' actions come back as JSON after a marker line.
SHIM = r"""
import argparse, json, runpy, sys

class RefuseTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"--help imported {name}")
        return None

sys.meta_path.insert(0, RefuseTensorFlow())
parsers = []
_parse = argparse.ArgumentParser.parse_known_args

def recording(self, *args, **kwargs):
    parsers.append(self)
    return _parse(self, *args, **kwargs)

argparse.ArgumentParser.parse_known_args = recording
script = sys.argv[1]
sys.argv = [script, "--help"]
code = "no exit"
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
actions = [{"options": a.option_strings, "dest": a.dest, "help": a.help, "default": a.default}
           for p in parsers[:1] for a in p._actions]
print("\n@@SHIM@@" + json.dumps({"code": code, "actions": actions,
                                "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))},
                               default=str))
"""


def first_docstring_line(path: Path) -> str:
    doc = re.search(r'"""(.*?)"""', path.read_text(), re.S).group(1)
    return next(ln.strip() for ln in doc.splitlines() if ln.strip())


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_without_tensorflow(name):
    script = REPO / "scripts" / f"{name}.py"
    proc = subprocess.run([sys.executable, "-c", SHIM, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert "@@SHIM@@" in proc.stdout, proc.stderr[-3000:]
    help_text, report = proc.stdout.rsplit("\n@@SHIM@@", 1)
    report = json.loads(report)
    assert report["code"] == 0, proc.stderr[-3000:]
    assert report["loaded"] == []
    assert "TensorFlow" not in proc.stderr and "tensorflow" not in proc.stderr
    flat = " ".join(help_text.split())
    assert help_text.startswith(f"usage: scripts/{name}.py")
    assert first_docstring_line(script) in flat  # what the script reproduces, in one line
    out_default = OUT_DEFAULTS.get(name, f"output/{name}")
    out = [a for a in report["actions"] if "--out" in a["options"]]
    assert out and out[0]["default"] == out_default
    assert f"(default: {out_default})" in flat
    for action in report["actions"]:
        assert action["help"] and action["help"] != "==SUPPRESS==", f"{action['options'] or action['dest']} has no help"
