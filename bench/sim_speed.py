"""Simulator speed: captures per second on this machine, by pose, and the share of each stage.

Run: .venv/bin/python bench/sim_speed.py [--n 40]. Prints a table; the figures in
docs/simulator.md come from this script.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()

    from positioning.bodymodel import load_body_model
    from positioning.capture import write_capture
    from sim import render, simulate as simmod
    from sim.scene import load_config, sample_scene

    model = load_body_model()
    cfg = load_config(None)
    # Time the two heavy stages by wrapping them (the code under test is unchanged).
    stage = {"raycast": [], "noise": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            stage[name].append(time.perf_counter() - t)
            return out
        return wrapper

    simmod.render.raycast = timed("raycast", render.raycast)
    simmod.render.add_depth_noise = timed("noise", render.add_depth_noise)
    total, write, by_pose = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            p = sample_scene(args.seed + i, cfg, model.data.train["betas"])
            t = time.perf_counter()
            cap, truth = simmod.simulate(p, model)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            write_capture(Path(tmp) / f"c{i}", cap, truth)
            write.append(time.perf_counter() - t)
            total.append(dt)
            by_pose.setdefault(p.pose + (" +blanket" if p.blanket else ""), []).append(dt)
    med = statistics.median(total)
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"captures: {args.n} (848x480 depth + colour + truth)")
    print(f"simulate: median {med * 1000:.0f} ms, mean {np.mean(total) * 1000:.0f} ms -> {1 / np.mean(total):.2f} captures/s")
    print(f"write folder: median {statistics.median(write) * 1000:.0f} ms")
    print(f"with writing: {args.n / (sum(total) + sum(write)):.2f} captures/s")
    for k, v in stage.items():
        print(f"  stage {k:8s}: median {statistics.median(v) * 1000:.0f} ms")
    for k, v in sorted(by_pose.items()):
        print(f"  {k:26s} n={len(v):3d} median {statistics.median(v) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
