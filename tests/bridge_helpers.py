"""Real peers for bridge tests: a scanner simulator process, a daemon in a thread or a process, keys."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from scanner_bridge.cli import scanner_alive, spawn_scanner_sim
from scanner_bridge.client import BridgeClient
from scanner_bridge.daemon import Daemon
from scanner_bridge.keys import generate
from scanner_bridge.simulator import SimulatorAdapter


def endpoints() -> tuple[str, str]:
    """Two distinct free loopback TCP endpoints (both sockets held open while choosing)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{a.getsockname()[1]}", f"tcp://127.0.0.1:{b.getsockname()[1]}"


@contextmanager
def scanner_process(tmp: Path):
    """The scanner simulator as its own process (the 'hardware')."""
    ep = f"ipc://{tmp}/scanner.ipc"
    proc = spawn_scanner_sim(ep, tmp / "scanner.log")
    try:
        yield ep
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def daemon_thread(tmp: Path, scanner_ep: str, keys: Path | None):
    """A daemon in this process (its own thread and zmq context), on fresh loopback ports."""
    bind, tele = endpoints()
    d = Daemon(SimulatorAdapter(scanner_ep), bind, tele, tmp / "audit.sqlite", keys)
    stop = threading.Event()
    d.start()
    t = threading.Thread(target=d.run, args=(stop.is_set,), daemon=True)
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(timeout=5)
        d.close()


@contextmanager
def daemon_process(tmp: Path, keys: Path, bind: str | None = None, scanner_ep: str | None = None):
    """``ctpos daemon --sim`` as a real subprocess; yields (Popen, request endpoint, telemetry endpoint)."""
    ep, tele = endpoints()
    bind = bind or ep
    # An explicit telemetry port: the default (request port + 1) may be some client's ephemeral port.
    args = [sys.executable, "-m", "ctpos", "daemon", "--sim", "--bind", bind, "--telemetry", tele, "--keys",
            str(keys), "--state-dir", str(tmp / "state")]
    if scanner_ep:
        args += ["--scanner", scanner_ep]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "daemon ready" not in line:
        proc.kill()
        raise RuntimeError(f"daemon did not start: {line}{proc.stdout.read()}")
    try:
        yield proc, bind, tele
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def make_keys(tmp: Path) -> Path:
    return generate(tmp / "keys", ["console", "tech2"])


def client(d_or_bind, keys: Path | None, name: str = "console") -> BridgeClient:
    bind = d_or_bind if isinstance(d_or_bind, str) else d_or_bind.bind
    tele = None if isinstance(d_or_bind, str) else d_or_bind.telemetry_bind
    return BridgeClient(bind, keys, name, tele).connect()


def wait_state(c: BridgeClient, states: set[str], timeout_s: float = 30.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        body = c.request("status").body
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"state never reached {states}; last {body}")


__all__ = ["scanner_alive", "scanner_process", "daemon_thread", "daemon_process", "make_keys", "client",
           "wait_state", "endpoints"]
