"""The console command as a user runs it: real subprocesses, exit codes, one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from positioning.capture import read_capture


def ctpos(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ctpos", *args], capture_output=True, text=True, timeout=600, **kw)


def test_sim_capture_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = ctpos("sim", "capture", "--out", str(out), "--n", "2", "--seed", "11")
        assert r.returncode == 0, r.stderr
        assert "wrote 2 captures" in r.stdout
    for i in range(2):
        ca, cb = read_capture(a / f"case-{i:04d}"), read_capture(b / f"case-{i:04d}")
        assert np.array_equal(ca.depth, cb.depth) and np.array_equal(ca.color, cb.color)
        assert (a / f"case-{i:04d}" / "truth.json").read_text() == (b / f"case-{i:04d}" / "truth.json").read_text()


def test_bad_config_gives_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("nonsense = 1\n")
    r = ctpos("sim", "capture", "--out", str(tmp_path / "o"), "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown scene parameter" in r.stderr and "Traceback" not in r.stderr


def test_no_subcommand_prints_help():
    r = ctpos()
    assert r.returncode == 2 and "sim" in r.stdout
