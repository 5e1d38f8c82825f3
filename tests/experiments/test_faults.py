"""Faults of the process tree and the output folder: a killed driver leaves no experiment
running, and the rerun gives one consistent set of outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO


def processes():
    """``{pid: (pgid, command line)}`` of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[2]), cmd)
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # ~40 s: two demo runs (the default test run is kept under 15 minutes)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_driver_leaves_no_experiment_running_and_the_rerun_is_consistent(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce_all.py"), "--quick", "--only", "demo_digits", "--out",
           str(out), "--data-dir", str(tmp_path / "no-data"), "--heartbeat", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    script = str(REPO / "scripts" / "demo_digits.py")
    deadline, groups = time.time() + 120, set()
    while time.time() < deadline and not groups:  # the experiment is running (in a group of its own)
        groups = {pgid for pid, (pgid, c) in processes().items() if script in c and str(out) in c
                  and "process_group.py" not in c}
        time.sleep(0.2)
    assert groups, "the experiment never started"
    time.sleep(3)  # mid-run: its workers and writers are busy
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.2)
    assert not any(group_alive(g) for g in groups), "the experiment outlived its driver"
    left = [c for pid, (pgid, c) in processes().items() if str(out) in c]
    assert not left, left
    # the rerun completes, and the folder holds one run: every listed output there, no temporaries
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    folder = out / "demo_digits"
    listed = json.loads((folder / "outputs.json").read_text())["files"]
    assert {"metrics.json", "arrays.npz"} <= set(listed)
    assert all((folder / name).is_file() for name in listed)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert json.loads((folder / "metrics.json").read_text())["quick"] is True


def test_a_new_run_removes_the_previous_runs_outputs_and_temporaries(tmp_path):
    import argparse

    from influence.experiment import Experiment

    out = tmp_path / "exp"
    out.mkdir()
    for name in ("metrics.json", "arrays.npz", "x.png", "refits.jsonl"):
        (out / name).write_text("old")
    (out / "outputs.json").write_text(json.dumps({"files": ["metrics.json", "arrays.npz", "x.png"]}))
    (out / ".arrays.npz.999999.abcd.tmp.npz").write_text("killed write")
    (out / ".metrics.json.q1w2e3.tmp").write_text("killed write, older naming")
    args = argparse.Namespace(out=str(out), quick=True, seed=1)
    exp = Experiment("x", args)
    assert sorted(p.name for p in out.iterdir()) == ["refits.jsonl"]  # journals stay for the resume
    exp.save_arrays(a=[1, 2])
    assert json.loads((out / "outputs.json").read_text())["files"] == ["arrays.npz"]
