"""The bridge over real sockets: CURVE, bad messages, duplicates, heartbeat, e-stop, kill -9, audit log.

The scanner simulator always runs as its own process; the daemon runs in-process
(a thread with its own zmq context) or as a `ctpos daemon` subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_helpers import client, daemon_process, daemon_thread, make_keys, scanner_process, wait_state
from scanner_bridge.client import BridgeError, BridgeTimeout
from scanner_bridge.keys import generate
from scanner_bridge.simulator import SimulatorAdapter

PLAN = {"table_height_mm": 180.0, "scan_range_table_mm": {"cranial": 420.0, "caudal": 120.0}}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One scanner process and one secure in-process daemon for the module's tests."""
    tmp = tmp_path_factory.mktemp("bridge")
    keys = make_keys(tmp)
    with scanner_process(tmp) as sep, daemon_thread(tmp, sep, keys) as d:
        yield d, keys, sep


def _still_and_clean(c) -> None:
    c.request("stop")
    st_ = c.request("status").body["state"]
    if st_ == "estop":
        c.request("reset_estop", {"reason": "test cleanup"})
    elif st_ == "fault":
        c.request("reset_fault", {"reason": "test cleanup"})


@pytest.fixture
def console(rig):
    """A console on a still, clean daemon (the module-scoped fuzz client may have left it moving or faulted)."""
    d, keys, _ = rig
    c = client(d, keys)
    _still_and_clean(c)
    yield c
    try:
        _still_and_clean(c)
    finally:
        c.close()


def test_hello_and_status(console):
    h = console.request("hello").body
    assert h["protocol"] == "1.0" and "move_to_plan" in h["capabilities"] and h["limits"]["bore_height_max_mm"] > 0
    s = console.request("status").body
    assert s["state"] in ("idle", "plan_loaded") and "table_height_mm" in s


def test_unknown_key_gets_nothing(rig, tmp_path):
    d, _, _ = rig
    stranger = generate(tmp_path / "other", ["console"])  # a valid key pair, but not on the allow-list
    # It also needs the real server's public key to even try.
    (stranger / "server.key").write_bytes((rig[1] / "server.key").read_bytes())
    c = client(d, stranger)
    with pytest.raises(BridgeTimeout, match="allow-list"):
        c.request("status", timeout_s=0.5)
    c.close()


def test_plaintext_client_gets_nothing(rig):
    d, _, _ = rig
    c = client(d, None)
    with pytest.raises(BridgeTimeout):
        c.request("status", timeout_s=0.5)
    c.close()


@pytest.mark.parametrize("payload, code", [
    (b"not json", "E_MALFORMED"),
    (b"x" * 70000, "E_TOO_LARGE"),
    (json.dumps({"protocol": "9.0", "id": "abc", "type": "status", "sender": "c", "time": 1, "body": {}}).encode(),
     "E_VERSION"),
    (json.dumps({"protocol": "1.0", "id": "abd", "type": "fly", "sender": "c", "time": 1, "body": {}}).encode(),
     "E_UNKNOWN_TYPE"),
    ([b"two", b"frames"], "E_MALFORMED"),
])
def test_bad_messages_get_error_replies_and_the_daemon_keeps_serving(console, payload, code):
    console.send_raw(payload)
    rep = json.loads(console.recv_raw(2.0))
    assert rep["type"] == "error" and rep["body"]["code"] == code
    assert console.request("status").body["state"]


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["protocol", "id", "type", "sender", "time", "body", "reply_to", "deadline"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=20), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)),
                    max_size=8).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({
        "protocol": st.sampled_from(["1.0", "1.1", "0.9", "2"]), "id": st.text(min_size=1, max_size=70),
        "type": st.sampled_from(["status", "move_table", "load_plan", "estop_x", "start_scan", "hello", "stop"]),
        "sender": st.text(min_size=1, max_size=10), "time": st.floats(allow_nan=False, allow_infinity=False),
        "body": st.dictionaries(st.sampled_from(["table_height_mm", "table_longitudinal_mm", "room_clear", "plan",
                                                 "reason"]),
                                st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text(max_size=5),
                                          st.floats(allow_nan=False, allow_infinity=False)), max_size=3),
    }).map(lambda d: json.dumps(d).encode()),
))
def test_fuzz_every_message_gets_one_reply(rig, fuzz_client, frame):
    """10,000 generated messages: each gets exactly one well-formed reply; the daemon never stops serving."""
    fuzz_client.send_raw(frame)
    rep = json.loads(fuzz_client.recv_raw(2.0))
    assert rep["type"] == "error" or rep["type"].endswith("_reply")
    if rep["type"] == "error":
        assert rep["body"]["code"].startswith("E_") and rep["body"]["reason"]


@pytest.fixture(scope="module")
def fuzz_client(rig):
    d, keys, _ = rig
    c = client(d, keys, "tech2")
    yield c
    c.request("stop")
    s = c.request("status").body["state"]
    if s == "estop":
        c.request("reset_estop", {"reason": "after fuzz"})
    if c.request("status").body["state"] == "fault":
        c.request("reset_fault", {"reason": "after fuzz"})
    c.close()


def test_duplicate_ids_are_answered_once_and_not_reexecuted(console, rig):
    d, _, _ = rig
    before = d.counters["executed"]
    first = console.request("load_plan", {"plan": PLAN}, msg_id="dup-0001")
    again = console.request("load_plan", {"plan": PLAN}, msg_id="dup-0001")
    assert first.body == again.body and first.id == again.id
    assert d.counters["executed"] == before + 1
    with sqlite3.connect(d.audit.path) as db:  # a reader of our own, beside the daemon's writer
        n = db.execute("SELECT COUNT(*) FROM audit WHERE kind='request' AND msg_id='dup-0001'").fetchone()[0]
    assert n == 1


def test_expired_deadline_is_not_executed(console):
    rep = pytest.raises(BridgeError, console.request, "move_table",
                        {"table_height_mm": 250, "table_longitudinal_mm": -1000}, deadline_s=-0.01)
    assert rep.value.code == "E_DEADLINE"
    assert console.request("status").body["state"] != "moving"


def test_limits_are_checked_before_motion(console):
    with pytest.raises(BridgeError) as ei:
        console.request("move_table", {"table_height_mm": 900, "table_longitudinal_mm": -1000})
    assert ei.value.code == "E_LIMIT"
    with pytest.raises(BridgeError, match="safe band") as ei:  # into the bore, too low
        console.request("move_table", {"table_height_mm": 400, "table_longitudinal_mm": 0})
    assert not console.request("status").body["moving"]


def test_full_exam_sequence_and_interlocks(console):
    console.start_heartbeat()
    with pytest.raises(BridgeError, match="not allowed|positioned"):
        console.request("start_scan", {"room_clear": True})
    console.request("load_plan", {"plan": PLAN})
    console.request("move_to_plan")
    s = wait_state(console, {"positioned", "fault"})
    assert s["state"] == "positioned", s
    assert abs(s["table_height_mm"] - 180) < 1 and abs(s["table_longitudinal_mm"] + 420) < 1
    with pytest.raises(BridgeError) as ei:
        console.request("start_scan", {"room_clear": False})
    assert ei.value.code == "E_INTERLOCK"
    console.request("start_scan", {"room_clear": True})
    s = wait_state(console, {"scan_done", "fault"}, timeout_s=30)
    assert s["state"] == "scan_done" and abs(s["table_longitudinal_mm"] + 120) < 1
    console.stop_heartbeat()


def test_heartbeat_loss_stops_motion(console, rig):
    """The console goes silent mid-move: the daemon stops the table and faults.

    Asserted on distance, not wall time: after its last message the table may travel
    at most what 500 ms at full speed allows (150 mm/s -> 75 mm).
    """
    st0 = console.request("status").body
    target = -1500.0 if st0["table_longitudinal_mm"] > -1000 else -600.0
    console.start_heartbeat()
    console.request("move_table", {"table_height_mm": st0["table_height_mm"], "table_longitudinal_mm": target})
    time.sleep(0.6)  # up to full speed, the heartbeat running
    console.stop_heartbeat()
    last = console.request("status").body  # the console's last word
    assert last["state"] == "moving"
    time.sleep(1.2)  # silence
    sim = SimulatorAdapter(rig[2])
    true = sim.status()
    sim.close()
    assert not true.moving
    assert abs(true.table_longitudinal_mm - last["table_longitudinal_mm"]) < 75.0
    s = console.request("status").body
    assert s["state"] == "fault" and "heartbeat" in s["fault"]


def test_estop_latches_until_reset_with_reason(console):
    console.request("estop", {"reason": "patient moved"})
    for req, body in (("move_table", {"table_height_mm": 250, "table_longitudinal_mm": -1000}),
                      ("load_plan", {"plan": PLAN}), ("move_to_plan", {})):
        with pytest.raises(BridgeError) as ei:
            console.request(req, body)
        assert ei.value.code == "E_ESTOP"
    with pytest.raises(BridgeError) as ei:
        console.request("reset_estop", {"reason": ""})
    assert ei.value.code == "E_BAD_BODY"
    assert console.request("reset_estop", {"reason": "patient repositioned, checked"}).body["state"] == "idle"


@pytest.mark.parametrize("fault, expect", [("motor", "motor_fault"), ("encoder_jump", "encoder jump"),
                                           ("lost_link", "link lost")])
def test_scanner_faults_stop_and_fault(console, rig, fault, expect):
    _, _, sep = rig
    console.start_heartbeat()
    st0 = console.request("status").body
    target = -1500.0 if st0["table_longitudinal_mm"] > -1000 else -600.0
    console.request("move_table", {"table_height_mm": st0["table_height_mm"], "table_longitudinal_mm": target})
    time.sleep(0.3)
    sim = SimulatorAdapter(sep)
    sim.inject_fault(fault, seconds=1.0)
    s = wait_state(console, {"fault"}, timeout_s=5)
    assert expect in s["fault"]
    time.sleep(1.2)  # let a lost link come back
    assert not sim.status().moving
    sim.reset_faults()
    sim.close()
    console.stop_heartbeat()


def test_kill_9_during_a_move(tmp_path):
    """The daemon dies mid-move: the scanner's watchdog stops the table; a restarted daemon
    reports the true position, does not move, and the audit log holds every acknowledged command."""
    keys = make_keys(tmp_path)
    with scanner_process(tmp_path) as sep:
        with daemon_process(tmp_path, keys, scanner_ep=sep) as (proc, bind, tele):
            c = client(bind, keys)
            acked = [c.request("load_plan", {"plan": PLAN}).reply_to]
            c.start_heartbeat()
            acked.append(c.request("move_table", {"table_height_mm": 250, "table_longitudinal_mm": -1600}).reply_to)
            time.sleep(0.8)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            c.close()
        time.sleep(1.0)
        sim = SimulatorAdapter(sep)
        true = sim.status()
        assert not true.moving and "watchdog_stop" in true.faults
        assert -1600 < true.table_longitudinal_mm < -1100  # stopped part way
        with sqlite3.connect(tmp_path / "state" / "audit.sqlite") as db:
            logged = {r[0] for r in db.execute("SELECT msg_id FROM audit WHERE kind='request'")}
            replied = {r[0] for r in db.execute("SELECT reply_to FROM audit WHERE kind='reply'")}
        assert set(acked) <= logged and set(acked) <= replied
        with daemon_process(tmp_path, keys, scanner_ep=sep) as (proc, bind, tele):
            c = client(bind, keys)
            s = c.request("status").body
            assert abs(s["table_longitudinal_mm"] - true.table_longitudinal_mm) < 0.01
            assert s["state"] == "fault" and "watchdog_stop" in s["fault"]
            time.sleep(0.5)
            assert abs(sim.status().table_longitudinal_mm - true.table_longitudinal_mm) < 0.01  # never resumed
            # A duplicate of a command sent before the crash is answered from the log, not re-executed.
            again = c.request("load_plan", {"plan": PLAN}, msg_id=acked[0])
            assert again.reply_to == acked[0]
            c.close()
        sim.close()


def test_telemetry_flows_at_20_hz_or_more(rig):
    d, keys, _ = rig
    c = client(d, keys)
    c.subscribe()
    c.telemetry(timeout_s=2.0)  # the subscription is live
    msgs = [c.telemetry(timeout_s=1.0) for _ in range(40)]
    c.close()
    seqs = [m.body["seq"] for m in msgs]
    assert seqs == sorted(seqs) and {"state", "table_height_mm", "interlocks", "scan_progress"} <= set(msgs[0].body)
    span = msgs[-1].time - msgs[0].time  # the daemon's own timestamps, not this test's clock
    assert (len(msgs) - 1) / span >= 20.0


def test_audit_log_is_append_only(rig):
    d, _, _ = rig
    with sqlite3.connect(d.audit.path) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET who='x'")


def test_cli_keys_daemon_and_bridge(tmp_path):
    """The commands a service engineer types: keys, a daemon with the simulator, bridge status/move/estop."""
    import subprocess
    import sys

    def run(*a):
        return subprocess.run([sys.executable, "-m", "ctpos", *a], capture_output=True, text=True, timeout=120)

    r = run("keys", "generate", str(tmp_path / "k"))
    assert r.returncode == 0 and (tmp_path / "k" / "authorized" / "console.key").exists()
    with scanner_process(tmp_path) as sep, \
            daemon_process(tmp_path, tmp_path / "k", scanner_ep=sep) as (proc, bind, tele):
        r = run("bridge", "status", "--connect", bind, "--keys", str(tmp_path / "k"))
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "idle", r.stderr
        r = run("bridge", "move", "--height", "250", "--longitudinal", "-1050", "--connect", bind,
                "--keys", str(tmp_path / "k"))
        body = json.loads(r.stdout)
        assert r.returncode == 0 and abs(body["table_longitudinal_mm"] + 1050) < 1, r.stderr
        r = run("bridge", "estop", "--reason", "test", "--connect", bind, "--keys", str(tmp_path / "k"))
        assert json.loads(r.stdout)["state"] == "estop"
        r = run("bridge", "move", "--height", "250", "--longitudinal", "-1000", "--connect", bind,
                "--keys", str(tmp_path / "k"))
        assert r.returncode == 2 and "E_ESTOP" in r.stderr and r.stderr.count("\n") == 1
        r = run("bridge", "status", "--connect", bind, "--keys", str(tmp_path / "nokeys"))
        assert r.returncode == 2 and "key" in r.stderr
