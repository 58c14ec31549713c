"""Console commands of the bridge: ``ctpos keys``, ``ctpos daemon``, ``ctpos scanner-sim``, ``ctpos bridge``."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("ctpos.bridge")


def telemetry_endpoint(bind: str) -> str:
    """Default telemetry endpoint: the request port + 1 (tcp), or '<path>.telemetry' (ipc)."""
    if bind.startswith("tcp://") and bind.rsplit(":", 1)[-1].isdigit():
        host, port = bind.rsplit(":", 1)
        return f"{host}:{int(port) + 1}"
    return bind + ".telemetry"


def scanner_alive(endpoint: str, timeout_s: float = 0.3) -> bool:
    from scanner_bridge.adapter import AdapterError
    from scanner_bridge.simulator import SimulatorAdapter

    a = SimulatorAdapter(endpoint, timeout_s=timeout_s)
    try:
        a.status()
        return True
    except AdapterError:
        return False
    finally:
        a.close()


def spawn_scanner_sim(endpoint: str, log_path: Path) -> subprocess.Popen:
    """Start the scanner simulator as its own process group: it outlives a killed daemon, as hardware would."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ctpos", "scanner-sim", "--bind", endpoint],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    for _ in range(100):
        if scanner_alive(endpoint):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"scanner simulator did not come up on {endpoint}")


def _daemon(args: argparse.Namespace) -> int:
    from scanner_bridge.daemon import Daemon
    from scanner_bridge.simulator import SimulatorAdapter

    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    scanner = args.scanner or f"ipc://{state.resolve()}/scanner.ipc"
    if args.sim and not scanner_alive(scanner):
        spawn_scanner_sim(scanner, state / "scanner-sim.log")
    daemon = Daemon(SimulatorAdapter(scanner), args.bind, args.telemetry or telemetry_endpoint(args.bind),
                    state / "audit.sqlite", None if args.insecure else args.keys)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    daemon.start()
    print(f"daemon ready on {args.bind} (telemetry {daemon.telemetry_bind}), scanner {scanner}", flush=True)
    try:
        daemon.run(lambda: bool(stopping))
    finally:
        daemon.close()
    return 0


def _scanner_sim(args: argparse.Namespace) -> int:
    from scanner_bridge.simulator import serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.bind)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from scanner_bridge.keys import generate

    folder = generate(args.dir, args.client or ["console"], server=not (Path(args.dir) / "server.key_secret").exists())
    print(f"keys in {folder}: server.key(_secret), " + ", ".join(f"{c}.key_secret" for c in args.client or ["console"])
          + f"; allow-list {folder / 'authorized'}")
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from scanner_bridge.client import BridgeClient

    c = BridgeClient(args.connect, args.keys, args.name).connect()
    try:
        if args.action == "status":
            rep = c.request("status", timeout_s=args.timeout)
        elif args.action == "hello":
            rep = c.request("hello", timeout_s=args.timeout)
        elif args.action == "move":
            if args.height is None or args.longitudinal is None:
                raise ValueError("move needs --height and --longitudinal")
            c.start_heartbeat()
            rep = c.request("move_table", {"table_height_mm": args.height, "table_longitudinal_mm": args.longitudinal},
                            timeout_s=args.timeout)
            # Stay and beat until the table has arrived, as a console would.
            while c.request("status", timeout_s=args.timeout).body["state"] == "moving":
                time.sleep(0.1)
            rep = c.request("status", timeout_s=args.timeout)
        elif args.action in ("stop", "estop"):
            rep = c.request(args.action, {"reason": args.reason} if args.reason else {}, timeout_s=args.timeout)
        elif args.action == "reset-estop":
            rep = c.request("reset_estop", {"reason": args.reason or ""}, timeout_s=args.timeout)
        else:
            raise ValueError(f"unknown action {args.action}")
    finally:
        c.close()
    print(json.dumps(rep.body, indent=1))
    return 0


def register_daemon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the scanner-side daemon")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--telemetry", help="PUB endpoint (default: request port + 1)")
    p.add_argument("--keys", help="keys folder (ctpos keys generate)")
    p.add_argument("--insecure", action="store_true", help="no CURVE encryption (never in a hospital)")
    p.add_argument("--sim", action="store_true", help="drive the scanner simulator (started if not running)")
    p.add_argument("--scanner", help="scanner simulator endpoint (default: ipc in the state folder)")
    p.add_argument("--state-dir", default="bridge-state", help="audit log and simulator socket live here")
    p.set_defaults(func=_daemon)


def register_scanner_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scanner-sim", help="run the scanner simulator (the daemon's --sim starts one)")
    p.add_argument("--bind", required=True)
    p.set_defaults(func=_scanner_sim)


def register_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CURVE keys for the bridge")
    s = p.add_subparsers(dest="keys_command", required=True)
    g = s.add_parser("generate", help="make the daemon's and clients' key pairs and the allow-list")
    g.add_argument("dir")
    g.add_argument("--client", action="append", help="client name (repeatable; default: console)")
    g.set_defaults(func=_keys)


def register_bridge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bridge", help="talk to the daemon")
    p.add_argument("action", choices=["hello", "status", "move", "stop", "estop", "reset-estop"])
    p.add_argument("--connect", default="tcp://127.0.0.1:5555")
    p.add_argument("--keys", required=True)
    p.add_argument("--name", default="console", help="this client's key name")
    p.add_argument("--height", type=float, help="target table height, mm (move)")
    p.add_argument("--longitudinal", type=float, help="target longitudinal position, mm (move)")
    p.add_argument("--reason", help="operator reason (estop, reset-estop)")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_bridge)
