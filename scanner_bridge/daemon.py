"""The scanner-side daemon: the only thing that moves the table, and the last word on safety.

Sockets: a ROUTER for requests (CURVE server, clients on the allow-list only), a
PUB for telemetry (CURVE too). One thread, one poll loop: requests are handled in
arrival order; between them the scanner is read at the telemetry rate, telemetry
published, motion supervised (arrival, deadline, encoder plausibility, the
commanding console's heartbeat) and faults turned into a stop.

Fail-safe rules (docs/bridge-protocol.md, "Safety"):
* limits (travel, the bore's safe height band) are checked before any motion;
  a move that would enter or leave the bore outside the band is split so the
  height changes outside it;
* the commanding console's heartbeat older than HEARTBEAT_TIMEOUT_S during motion
  or a scan: stop, fault;
* scanner link lost, a scanner fault, an encoder jump, a missed move deadline: stop, fault;
* e-stop latches until reset_estop with an operator reason; reset clears the plan;
* on start the daemon reads the true table position and never moves on its own.
"""
from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from scanner_bridge import keys as bridge_keys
from scanner_bridge.adapter import AdapterError, LimitError, LinkError, MoveStatus, ScannerAdapter, ScannerStatus
from scanner_bridge.audit import AuditLog
from scanner_bridge.fsm import Event, IllegalTransition, Machine, State
from scanner_bridge.protocol import (PROTOCOL_VERSION, REQUESTS, TELEMETRY, Envelope, ErrorCode, ProtocolError,
                                     decode, error_for)

log = logging.getLogger("ctpos.bridge.daemon")
NAME = "ctpos-bridge-daemon"
HEARTBEAT_PERIOD_S = 0.1
HEARTBEAT_TIMEOUT_S = 0.3
TELEMETRY_HZ = 50.0
POSITION_TOL_MM = 1.0
REPLY_CACHE = 10_000
QUERIES = {"hello", "status", "heartbeat"}  # change nothing: not audited


class DaemonError(Exception):
    """The daemon cannot start (an endpoint taken, keys unreadable); one-line reason."""


class CommandError(Exception):
    """A well-formed command the daemon will not execute; becomes an error reply."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Motion:
    """The move under way: its current segment and any segment after it."""

    status: MoveStatus
    queue: list[tuple[float, float]]
    to_plan: bool


class Daemon:
    """Serve the bridge protocol over ``bind`` (requests) and ``telemetry_bind`` (telemetry).

    adapter: the scanner, injected. keys_dir: CURVE keys (None = no encryption, tests
    of the protocol logic only). Construction does no I/O; ``start`` binds.
    """

    def __init__(self, adapter: ScannerAdapter, bind: str, telemetry_bind: str, audit_path: str | Path,
                 keys_dir: str | Path | None) -> None:
        self.adapter, self.bind, self.telemetry_bind = adapter, bind, telemetry_bind
        self.audit = AuditLog(audit_path)
        self.keys_dir = keys_dir
        self.fsm = Machine()
        self.plan: dict | None = None
        self.plan_id: str | None = None
        self.motion: _Motion | None = None
        self.controller: str | None = None  # the console that commanded the current motion/scan
        self.last_seen: dict[str, float] = {}
        self.last_status: ScannerStatus | None = None
        self.fault_reason = ""
        self.replies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.counters = collections.Counter()
        self.telemetry_seq = 0
        self._ctx = self._auth = self._router = self._pub = None

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.audit.open()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        if self.keys_dir is not None:
            from zmq.auth.thread import ThreadAuthenticator

            pub, sec, allow = bridge_keys.server_keys(self.keys_dir)
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(allow))
            for s in (self._router, self._pub):
                s.curve_secretkey, s.curve_publickey, s.curve_server = sec, pub, True
        for s in (self._router, self._pub):
            s.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        for sock, ep in ((self._router, self.bind), (self._pub, self.telemetry_bind)):
            try:
                sock.bind(ep)
            except zmq.ZMQError as exc:
                raise DaemonError(f"cannot listen on {ep}: {exc}") from None
        self.adapter.connect()
        # Never resume: read where the table really is and start still.
        try:
            st = self.adapter.status()
            self.last_status = st
            self.adapter.stop()
            if st.faults:
                self.fault_reason = f"scanner reports {', '.join(st.faults)} at start"
                self._fire(Event.FAULT, "daemon", self.fault_reason)
        except AdapterError as exc:
            self.fault_reason = f"scanner unreachable at start: {exc}"
            self._fire(Event.FAULT, "daemon", self.fault_reason)
        self.audit.record("event", "daemon", "start", f"protocol {PROTOCOL_VERSION}; table at "
                          + (f"{self.last_status.table_height_mm:.1f}/{self.last_status.table_longitudinal_mm:.1f} mm"
                             if self.last_status else "unknown"))
        log.info("daemon on %s, telemetry %s", self.bind, self.telemetry_bind)

    def run(self, should_stop=lambda: False) -> None:
        """Serve until should_stop() is true."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        period = 1.0 / TELEMETRY_HZ
        next_tick = time.monotonic()
        while not should_stop():
            timeout = max(0.0, next_tick - time.monotonic())
            if poller.poll(int(timeout * 1000) + 1):
                for _ in range(100):  # bounded burst; supervision must not starve
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            now = time.monotonic()
            if now >= next_tick:
                self._supervise()
                next_tick = max(next_tick + period, now)

    def close(self) -> None:
        if self.fsm.state in (State.MOVING, State.SCANNING):
            self._halt()  # logs if the scanner does not acknowledge
        self.adapter.close()
        if self._auth is not None:
            self._auth.stop()
        for s in (self._router, self._pub):
            if s is not None:
                s.close()
        if self._ctx is not None:
            self._ctx.term()
        self.audit.record("event", "daemon", "stop", "daemon closed")
        self.audit.close()

    # ---- requests --------------------------------------------------------
    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            self._router.send_multipart([identity, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["send_failed"] += 1

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        self.counters["received"] += 1
        if len(frames) != 2:
            self.counters["rejected"] += 1
            self._send(identity, error_for(None, NAME, ErrorCode.MALFORMED,
                                           "a message is exactly one frame").encode())
            return
        try:
            env = decode(frames[1])
        except ProtocolError as exc:
            self.counters["rejected"] += 1
            log.info("rejected message: %s", exc.reason)
            self._send(identity, error_for(exc.msg_id, NAME, exc.code, exc.reason).encode())
            return
        self.last_seen[env.sender] = time.monotonic()
        cached = self.replies.get(env.id)
        if cached is None and env.type not in QUERIES:
            cached = self.audit.reply_for(env.id)
        if cached is not None:
            self.counters["duplicates"] += 1
            self._send(identity, cached)
            return
        if env.type in QUERIES:
            self._send(identity, self._query(env).encode())
            return
        self.audit.record("request", env.sender, env.type, str(env.body.get("reason", "")), env.id,
                          payload=frames[1])
        if env.deadline is not None and time.time() > env.deadline:
            reply = env.error(NAME, ErrorCode.DEADLINE, f"arrived {time.time() - env.deadline:.3f} s after its "
                                                        f"deadline; not executed")
        else:
            try:
                reply = env.reply(NAME, self._command(env))
            except CommandError as exc:
                reply = env.error(NAME, exc.code, exc.reason)
            except IllegalTransition as exc:
                reply = env.error(NAME, ErrorCode.ILLEGAL_STATE, str(exc))
        payload = reply.encode()
        self.audit.record("reply", NAME, reply.type, reply.body.get("reason", ""), reply.id, env.id, payload)
        self.replies[env.id] = payload
        if len(self.replies) > REPLY_CACHE:
            self.replies.popitem(last=False)
        self.counters["executed"] += 1
        self._send(identity, payload)

    def _query(self, env: Envelope) -> Envelope:
        if env.type == "hello":
            lim = self.adapter.limits()
            return env.reply(NAME, {"protocol": PROTOCOL_VERSION, "daemon": NAME, "capabilities": sorted(REQUESTS),
                                    "limits": lim.to_json(), "heartbeat_period_s": HEARTBEAT_PERIOD_S,
                                    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "telemetry_hz": TELEMETRY_HZ,
                                    "telemetry": self.telemetry_bind})
        if env.type == "heartbeat":
            return env.reply(NAME, {"state": self.fsm.state.value})
        return env.reply(NAME, self._status_body())

    def _status_body(self) -> dict:
        st = self.last_status
        body = {"state": self.fsm.state.value, "plan_id": self.plan_id, "fault": self.fault_reason or None,
                "controller": self.controller}
        if st is not None:
            body.update(table_height_mm=st.table_height_mm, table_longitudinal_mm=st.table_longitudinal_mm,
                        height_velocity_mm_s=st.height_velocity_mm_s,
                        longitudinal_velocity_mm_s=st.longitudinal_velocity_mm_s, moving=st.moving,
                        scanning=st.scanning, scan_progress=st.scan_progress, scanner_faults=list(st.faults))
        return body

    def _fire(self, event: Event, who: str, why: str) -> None:
        old, new = self.fsm.fire(event)
        self.audit.record("transition", who, f"{old.value}->{new.value}", why or event.value)
        log.info("%s -> %s (%s)", old.value, new.value, why or event.value)

    def _require_not_estop(self) -> None:
        if self.fsm.state is State.ESTOP:
            raise CommandError(ErrorCode.ESTOP, "e-stop is latched: reset_estop with a reason first")

    def _command(self, env: Envelope) -> dict:
        t, b, who = env.type, env.body, env.sender
        if t == "estop":
            self._halt()
            self._fire(Event.ESTOP, who, b.get("reason") or "e-stop")
            return {"state": self.fsm.state.value}
        if t == "reset_estop":
            if self.fsm.state is not State.ESTOP:
                raise CommandError(ErrorCode.ILLEGAL_STATE, "e-stop is not latched")
            self.plan = self.plan_id = None
            self._fire(Event.RESET_ESTOP, who, b["reason"])
            return {"state": self.fsm.state.value}
        if t == "stop":
            self._halt()
            if self.fsm.state is State.MOVING:
                self._fire(Event.STOPPED_WITH_PLAN if self.plan else Event.STOPPED_NO_PLAN, who, "stop")
            return {"state": self.fsm.state.value}
        self._require_not_estop()
        if t == "reset_fault":
            self._fire(Event.RESET_FAULT, who, b["reason"])
            try:
                self.adapter.reset_faults()
                # A reset may re-reference the encoders: take a fresh reading as the new reference.
                self.last_status = self.adapter.status()
            except AdapterError as exc:
                self._fire(Event.FAULT, "daemon", f"scanner refused the reset: {exc}")
                raise CommandError(ErrorCode.FAULT, f"scanner refused the reset: {exc}") from None
            self.fault_reason = ""
            self.plan = self.plan_id = None
            return {"state": self.fsm.state.value}
        if t == "load_plan":
            plan = b["plan"]
            lim = self.adapter.limits()
            start, end = self._plan_ends(plan)
            try:
                lim.check_target(self._plan_height(plan), start)
                lim.check_target(self._plan_height(plan), end)
            except LimitError as exc:
                raise CommandError(ErrorCode.LIMIT, f"plan cannot be run: {exc}") from None
            self._fire(Event.LOAD_PLAN, who, f"plan {env.id}")
            self.plan, self.plan_id = plan, env.id
            return {"state": self.fsm.state.value, "plan_id": env.id, "scan_start_longitudinal_mm": start,
                    "scan_end_longitudinal_mm": end}
        if t == "move_table":
            return self._start_move(float(b["table_height_mm"]), float(b["table_longitudinal_mm"]), who, False)
        if t == "move_to_plan":
            if self.plan is None:
                raise CommandError(ErrorCode.ILLEGAL_STATE, "no plan loaded")
            start, _ = self._plan_ends(self.plan)
            return self._start_move(self._plan_height(self.plan), start, who, True)
        if t == "start_scan":
            return self._start_scan(b, who)
        if t == "abort_scan":
            if self.fsm.state is not State.SCANNING:
                raise CommandError(ErrorCode.ILLEGAL_STATE, "no scan running")
            self._halt()
            self._fire(Event.ABORT_SCAN, who, b.get("reason") or "abort")
            return {"state": self.fsm.state.value}
        raise CommandError(ErrorCode.UNKNOWN_TYPE, f"no handler for {t!r}")

    @staticmethod
    def _plan_height(plan: dict) -> float:
        """The height to drive to: the ISO height unless the plan moved it to clear the bore."""
        return float(plan.get("move_table_height_mm", plan["table_height_mm"]))

    @staticmethod
    def _plan_ends(plan: dict) -> tuple[float, float]:
        """Longitudinal positions that put the range's cranial and caudal ends at the isocenter plane."""
        rng = plan["scan_range_table_mm"]
        return -float(rng["cranial"]), -float(rng["caudal"])

    def _segments(self, h: float, lo: float) -> list[tuple[float, float]]:
        """The legs of a move that keep the table out of the bore unless its height is in the safe band."""
        lim = self.adapter.limits()
        st = self.last_status
        h0, l0 = st.table_height_mm, st.table_longitudinal_mm
        if lim.in_bore(lo) and not lim.height_safe_in_bore(h0):
            return [(h, l0), (h, lo)]  # height first, outside the bore
        if lim.in_bore(l0) and not lim.height_safe_in_bore(h):
            return [(h0, lo), (h, lo)]  # out of the bore first
        return [(h, lo)]

    def _start_move(self, h: float, lo: float, who: str, to_plan: bool) -> dict:
        if not self.fsm.allowed(Event.MOVE):
            raise CommandError(ErrorCode.ILLEGAL_STATE, f"cannot move in state '{self.fsm.state.value}'")
        try:
            self.adapter.limits().check_target(h, lo)
        except LimitError as exc:
            raise CommandError(ErrorCode.LIMIT, str(exc)) from None
        if self.last_status is None:
            raise CommandError(ErrorCode.FAULT, "table position unknown")
        legs = self._segments(h, lo)
        try:
            first = self.adapter.move(*legs[0])
        except LimitError as exc:
            raise CommandError(ErrorCode.LIMIT, str(exc)) from None
        except AdapterError as exc:
            self._fault(f"scanner refused the move: {exc}")
            raise CommandError(ErrorCode.FAULT, f"scanner refused the move: {exc}") from None
        self.motion = _Motion(first, legs[1:], to_plan)
        self.controller = who
        self.last_seen[who] = time.monotonic()
        self._fire(Event.MOVE, who, f"to {h:.1f}/{lo:.1f} mm in {len(legs)} leg(s)")
        return {"state": self.fsm.state.value, "target": {"table_height_mm": h, "table_longitudinal_mm": lo},
                "legs": [list(x) for x in legs], "deadline": first.deadline}

    def _start_scan(self, b: dict, who: str) -> dict:
        if self.fsm.state is not State.POSITIONED:
            raise CommandError(ErrorCode.ILLEGAL_STATE, f"scan needs the table positioned for the plan; state is "
                                                        f"'{self.fsm.state.value}'")
        if b["room_clear"] is not True:
            raise CommandError(ErrorCode.INTERLOCK, "the operator has not confirmed the room is clear")
        start, end = self._plan_ends(self.plan)
        st = self.last_status
        if (abs(st.table_height_mm - self._plan_height(self.plan)) > POSITION_TOL_MM
                or abs(st.table_longitudinal_mm - start) > POSITION_TOL_MM):
            raise CommandError(ErrorCode.INTERLOCK, "table is not at the planned position")
        try:
            self.adapter.start_scan(end)
        except AdapterError as exc:
            self._fault(f"scanner refused the scan: {exc}")
            raise CommandError(ErrorCode.FAULT, str(exc)) from None
        self.controller = who
        self.last_seen[who] = time.monotonic()
        self._fire(Event.START_SCAN, who, f"room clear confirmed; scan to {end:.1f} mm")
        return {"state": self.fsm.state.value, "scan_end_longitudinal_mm": end}

    # ---- supervision -----------------------------------------------------
    def _halt(self) -> None:
        """Stop all motion (best effort: if the link is gone, the scanner's watchdog stops it)."""
        self.motion = None
        try:
            self.adapter.stop()
        except AdapterError as exc:
            log.error("stop not acknowledged by the scanner: %s", exc)

    def _fault(self, why: str) -> None:
        self._halt()
        self.fault_reason = why
        if self.fsm.allowed(Event.FAULT) and self.fsm.state is not State.FAULT:
            self._fire(Event.FAULT, "daemon", why)
        else:
            self.audit.record("event", "daemon", "fault", why)

    def _supervise(self) -> None:
        now = time.monotonic()
        prev = self.last_status
        try:
            st = self.adapter.status()
        except AdapterError as exc:
            if self.fsm.state not in (State.FAULT, State.ESTOP):
                self._fault(f"scanner link lost: {exc}")
            self._publish(now)
            return
        self.last_status = st
        state = self.fsm.state
        if prev is not None and state is not State.ESTOP:
            dt = max(st.time - prev.time, 1e-3)
            lim = self.adapter.limits()
            jump = abs(st.table_longitudinal_mm - prev.table_longitudinal_mm)
            if jump > lim.longitudinal_speed_mm_s * dt * 1.5 + 5.0:
                self._fault(f"encoder jump: longitudinal position changed {jump:.1f} mm in {dt * 1000:.0f} ms")
        if st.faults and self.fsm.state not in (State.FAULT, State.ESTOP):
            self._fault(f"scanner fault: {', '.join(st.faults)}")
        state = self.fsm.state
        if state in (State.MOVING, State.SCANNING) and self.controller is not None:
            silent = now - self.last_seen.get(self.controller, 0.0)
            if silent > HEARTBEAT_TIMEOUT_S:
                self._fault(f"heartbeat of {self.controller} lost for {silent * 1000:.0f} ms during "
                            f"{state.value}: stopped")
        if self.fsm.state is State.MOVING and self.motion is not None:
            m = self.motion
            if m.status.arrived(st):
                if m.queue:
                    try:
                        m.status = self.adapter.move(*m.queue.pop(0))
                    except AdapterError as exc:
                        self._fault(f"scanner refused the next leg: {exc}")
                else:
                    m.status.finish(True)
                    self.motion = None
                    ev = (Event.ARRIVED_AT_PLAN if m.to_plan else
                          Event.ARRIVED_WITH_PLAN if self.plan else Event.ARRIVED_NO_PLAN)
                    self._fire(ev, "daemon", f"at {st.table_height_mm:.1f}/{st.table_longitudinal_mm:.1f} mm")
            elif time.time() > m.status.deadline:
                self._fault("move missed its deadline")
        if self.fsm.state is State.SCANNING and not st.scanning:
            if st.scan_progress >= 0.999:
                self._fire(Event.SCAN_COMPLETE, "daemon", "scan complete")
            else:
                self._fault(f"scan ended at {st.scan_progress * 100:.0f} %")
        self._publish(now)

    def _publish(self, now: float) -> None:
        st = self.last_status
        ctrl_age = now - self.last_seen[self.controller] if self.controller in self.last_seen else math.inf
        body = self._status_body()
        body["seq"] = self.telemetry_seq
        body["interlocks"] = {"estop": self.fsm.state is State.ESTOP, "fault": self.fsm.state is State.FAULT,
                              "heartbeat_ok": ctrl_age <= HEARTBEAT_TIMEOUT_S,
                              "in_bore": bool(st and self.adapter.limits().in_bore(st.table_longitudinal_mm))}
        self.telemetry_seq += 1
        env = Envelope(type=TELEMETRY, sender=NAME, body=body)
        try:
            self._pub.send_multipart([TELEMETRY.encode(), env.encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["telemetry_dropped"] += 1
