"""Bridge benchmarks over loopback with CURVE, daemon and scanner simulator as real processes.

Prints: request/reply round trip (status; median, p99), an audited command's round
trip (stop: two synchronous SQLite writes), telemetry rate, stop latency after the
console's heartbeat stops mid-move (last message -> table at rest, read from the
simulator), and a soak of N audited commands checked for loss and duplication.
Run: .venv/bin/python bench/bridge.py [--soak 100000]
"""
from __future__ import annotations

import argparse
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bridge_helpers import client, daemon_process, make_keys, scanner_process  # noqa: E402
from scanner_bridge.simulator import SimulatorAdapter  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--soak", type=int, default=100_000)
    ap.add_argument("--rtt", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = make_keys(tmp)
        with scanner_process(tmp) as sep, daemon_process(tmp, keys, scanner_ep=sep) as (proc, bind, tele):
            c = client(bind, keys)
            for _ in range(200):
                c.request("status")
            rtt = []
            for _ in range(args.rtt):
                t = time.perf_counter()
                c.request("status")
                rtt.append((time.perf_counter() - t) * 1000)
            audited = []
            for _ in range(1000):
                t = time.perf_counter()
                c.request("stop")
                audited.append((time.perf_counter() - t) * 1000)
            print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, python {platform.python_version()}")
            print(f"round trip, status (CURVE, loopback), n={args.rtt}: median {statistics.median(rtt):.3f} ms, "
                  f"p99 {pct(rtt, 99):.3f} ms, max {max(rtt):.3f} ms")
            print(f"round trip, stop (audited: 2 synchronous SQLite writes), n=1000: median "
                  f"{statistics.median(audited):.3f} ms, p99 {pct(audited, 99):.3f} ms")

            tele_c = client(bind, keys, "tech2")
            tele_c.telemetry_endpoint = tele
            tele_c.subscribe()
            tele_c.telemetry(2.0)
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 5.0:
                tele_c.telemetry(1.0)
                n += 1
            print(f"telemetry: {n / (time.perf_counter() - t0):.1f} Hz over 5 s")
            tele_c.close()

            sim = SimulatorAdapter(sep)
            lat = []
            for i in range(5):
                st = c.request("status").body
                if st["state"] == "fault":
                    c.request("reset_fault", {"reason": "bench"})
                st = c.request("status").body
                target = -1700.0 if st["table_longitudinal_mm"] > -1100 else -500.0
                c.start_heartbeat()
                c.request("move_table", {"table_height_mm": 300.0, "table_longitudinal_mm": target})
                time.sleep(1.0)
                c.stop_heartbeat()
                c.request("status")
                t_last = time.perf_counter()
                while sim.status().moving:
                    time.sleep(0.002)
                lat.append((time.perf_counter() - t_last) * 1000)
            sim.close()
            c.request("reset_fault", {"reason": "bench"})
            print(f"stop latency after heartbeat loss (last console message -> table at rest), n=5: "
                  f"median {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms "
                  f"(timeout 300 ms + braking from 150 mm/s)")

            t0 = time.perf_counter()
            ids = []
            for i in range(args.soak):
                rep = c.request("stop", timeout_s=5.0)
                ids.append(rep.reply_to)
            dt = time.perf_counter() - t0
            c.close()
        with sqlite3.connect(tmp / "state" / "audit.sqlite") as db:
            req = [r[0] for r in db.execute("SELECT msg_id FROM audit WHERE kind='request' AND what='stop'")]
            rep = [r[0] for r in db.execute("SELECT reply_to FROM audit WHERE kind='reply' AND what='stop_reply'")]
        soak = set(ids)
        print(f"soak: {args.soak} audited commands in {dt:.0f} s ({args.soak / dt:.0f}/s); replies received "
              f"{len(ids)}, distinct {len(soak)}; logged requests {len(soak & set(req))}, "
              f"logged replies {len(soak & set(rep))}; duplicates in log "
              f"{len(req) - len(set(req))}; lost {args.soak - len(soak & set(rep))}")


if __name__ == "__main__":
    main()
