"""The scanner simulator: a CT table and gantry in real time, as a process of its own, and its adapter.

It lives in ``scanner_bridge`` (not ``sim``) because it stands where a vendor's
scanner would: the daemon reaches it only through ``SimulatorAdapter``, the same
boundary a vendor adapter implements, and it must not pull in the RGB-D
simulator's torch/Open3D stack.

Behaviour (documented in docs/scanner-simulator.md): trapezoidal motion per axis at
the limits in ``TableLimits``; emergency deceleration on stop; a scan moves the
table at the scan speed and reports progress; a **hardware watchdog** stops all
motion (and any exposure) when the daemon has sent nothing for ``WATCHDOG_S``;
injectable faults: ``motor`` (stops, refuses motion until cleared),
``encoder_jump`` (the reported longitudinal position jumps 40 mm), ``lost_link``
(stops answering for a while).

Its own link is a small JSON request/reply over ZeroMQ (ROUTER here, REQ in the
adapter), on a local endpoint; it is not the bridge protocol.
"""
from __future__ import annotations

import json
import logging
import math
import time

import zmq

from scanner_bridge.adapter import (AdapterError, LimitError, LinkError, MoveStatus, ScannerAdapter, ScannerStatus,
                                    TableLimits)

log = logging.getLogger("ctpos.scanner_sim")
WATCHDOG_S = 0.3
STOP_DECEL = {"height": 400.0, "longitudinal": 1000.0}  # mm/s^2, emergency stop
ENCODER_JUMP_MM = 40.0


class Axis:
    """One table axis: trapezoidal moves to a target, or a hard stop."""

    def __init__(self, name: str, pos: float, vmax: float, accel: float) -> None:
        self.name, self.pos, self.vel, self.vmax, self.accel = name, pos, 0.0, vmax, accel
        self.target: float | None = None
        self.speed_limit = vmax

    def move_to(self, target: float, speed: float | None = None) -> None:
        self.target, self.speed_limit = target, min(speed or self.vmax, self.vmax)

    def stop(self) -> None:
        self.target = None

    @property
    def moving(self) -> bool:
        return self.target is not None or abs(self.vel) > 1e-6

    def step(self, dt: float) -> None:
        if self.target is None:  # braking
            dv = STOP_DECEL[self.name] * dt
            self.vel = 0.0 if abs(self.vel) <= dv else self.vel - math.copysign(dv, self.vel)
        else:
            d = self.target - self.pos
            v_des = math.copysign(min(self.speed_limit, math.sqrt(2 * self.accel * abs(d))), d)
            dv = self.accel * dt
            self.vel = v_des if abs(v_des - self.vel) <= dv else self.vel + math.copysign(dv, v_des - self.vel)
            if abs(d) < 0.02 and abs(self.vel) < self.accel * dt * 2:
                self.pos, self.vel, self.target = self.target, 0.0, None
                return
        self.pos += self.vel * dt


class SimulatedScanner:
    """Table, scan and faults; advanced by ``step(now)``. No I/O."""

    def __init__(self, limits: TableLimits = TableLimits(), height: float = 300.0,
                 longitudinal: float = -1100.0) -> None:
        self.limits = limits
        self.h = Axis("height", height, limits.height_speed_mm_s, limits.height_accel_mm_s2)
        self.l = Axis("longitudinal", longitudinal, limits.longitudinal_speed_mm_s, limits.longitudinal_accel_mm_s2)
        self.faults: set[str] = set()
        self.encoder_offset = 0.0
        self.scan: dict | None = None  # {"start", "end"}
        self.scan_progress = 0.0
        self.mute_until = 0.0
        self.last_contact = time.monotonic()
        self._t = time.monotonic()

    def step(self, now: float) -> None:
        dt = min(now - self._t, 0.05)
        self._t = now
        if dt <= 0:
            return
        if now - self.last_contact > WATCHDOG_S and (self.h.moving or self.l.moving or self.scan):
            log.warning("watchdog: no word from the daemon for %.0f ms: stopping", 1000 * (now - self.last_contact))
            self.faults.add("watchdog_stop")
            self._halt()
        self.h.step(dt)
        self.l.step(dt)
        if self.scan is not None:
            total = abs(self.scan["end"] - self.scan["start"]) or 1.0
            self.scan_progress = min(1.0, abs(self.l.pos - self.scan["start"]) / total)
            if not self.l.moving:
                self.scan = None
                self.scan_progress = 1.0 if self.scan_progress > 0.999 else self.scan_progress

    def _halt(self) -> None:
        self.h.stop()
        self.l.stop()
        self.scan = None

    def status(self) -> dict:
        return {"table_height_mm": self.h.pos, "table_longitudinal_mm": self.l.pos + self.encoder_offset,
                "height_velocity_mm_s": self.h.vel, "longitudinal_velocity_mm_s": self.l.vel,
                "moving": self.h.moving or self.l.moving, "scanning": self.scan is not None,
                "scan_progress": self.scan_progress, "faults": sorted(self.faults), "sample_time": self._t}

    def handle(self, req: dict, now: float) -> dict | None:
        """Apply one request; None means: do not answer (a lost link)."""
        if now < self.mute_until:
            return None
        self.last_contact = now
        op = req.get("op")
        if op == "status":
            pass  # contact alone feeds the watchdog; the reply carries the status
        elif op == "move":
            if "motor_fault" in self.faults:
                return {"ok": False, "error": "motor fault: motion refused"}
            try:
                self.limits.check_target(float(req["height"]), float(req["longitudinal"]))
            except (LimitError, KeyError, TypeError, ValueError) as exc:
                return {"ok": False, "error": str(exc) or "bad move request"}
            self.h.move_to(float(req["height"]))
            self.l.move_to(float(req["longitudinal"]))
        elif op == "stop":
            self._halt()
        elif op == "start_scan":
            if "motor_fault" in self.faults:
                return {"ok": False, "error": "motor fault: scan refused"}
            end = float(req["end_longitudinal"])
            self.scan = {"start": self.l.pos, "end": end}
            self.scan_progress = 0.0
            self.l.move_to(end, self.limits.scan_speed_mm_s)
        elif op == "abort_scan":
            self._halt()
        elif op == "inject":
            fault = req.get("fault")
            if fault == "motor":
                self.faults.add("motor_fault")
                self._halt()
            elif fault == "encoder_jump":
                self.encoder_offset += ENCODER_JUMP_MM
            elif fault == "lost_link":
                self.mute_until = now + float(req.get("seconds", 2.0))
                return None
            else:
                return {"ok": False, "error": f"unknown fault {fault!r}"}
        elif op == "clear_faults":
            self.faults.clear()
            self.encoder_offset = 0.0
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, **self.status()}


def serve(endpoint: str, limits: TableLimits = TableLimits(), stop_after_s: float | None = None,
          height: float = 300.0, longitudinal: float = -1100.0) -> None:
    """Run the simulated scanner on a ZeroMQ ROUTER at endpoint until interrupted (or stop_after_s)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    scanner = SimulatedScanner(limits, height, longitudinal)
    t_end = None if stop_after_s is None else time.monotonic() + stop_after_s
    log.info("scanner simulator on %s", endpoint)
    try:
        while t_end is None or time.monotonic() < t_end:
            if sock.poll(2):
                frames = sock.recv_multipart()
                try:
                    req = json.loads(frames[-1])
                except ValueError:
                    req = {"op": "?"}
                rep = scanner.handle(req if isinstance(req, dict) else {"op": "?"}, time.monotonic())
                if rep is not None:
                    sock.send_multipart([*frames[:-1], json.dumps(rep).encode()])
            scanner.step(time.monotonic())
    finally:
        sock.close()


class SimulatorAdapter(ScannerAdapter):
    """The daemon's side of the simulator's link: REQ with a timeout, rebuilt after a timeout (lazy pirate)."""

    def __init__(self, endpoint: str, limits: TableLimits = TableLimits(), timeout_s: float = 0.25) -> None:
        self.endpoint, self._limits, self.timeout_s = endpoint, limits, timeout_s
        self._sock = None

    def connect(self) -> None:
        ctx = zmq.Context.instance()
        self._sock = ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def _call(self, req: dict) -> dict:
        if self._sock is None:
            self.connect()
        self._sock.send(json.dumps(req).encode())
        if not self._sock.poll(int(self.timeout_s * 1000)):
            self._sock.close()
            self._sock = None
            raise LinkError(f"scanner did not answer '{req.get('op')}' within {self.timeout_s * 1000:.0f} ms")
        rep = json.loads(self._sock.recv())
        if not rep.get("ok"):
            raise AdapterError(rep.get("error", "scanner refused"))
        return rep

    def limits(self) -> TableLimits:
        return self._limits

    def status(self) -> ScannerStatus:
        r = self._call({"op": "status"})
        return ScannerStatus(r["table_height_mm"], r["table_longitudinal_mm"], r["height_velocity_mm_s"],
                             r["longitudinal_velocity_mm_s"], r["moving"], r["scanning"], r["scan_progress"],
                             tuple(r["faults"]), r["sample_time"])

    def move(self, table_height_mm: float, table_longitudinal_mm: float) -> MoveStatus:
        self._limits.check_target(table_height_mm, table_longitudinal_mm)
        now = self.status()
        self._call({"op": "move", "height": table_height_mm, "longitudinal": table_longitudinal_mm})
        t = self._limits.travel_time_s(table_height_mm - now.table_height_mm,
                                       table_longitudinal_mm - now.table_longitudinal_mm)
        return MoveStatus(table_height_mm, table_longitudinal_mm, deadline=time.time() + 1.5 * t + 1.0)

    def stop(self) -> None:
        self._call({"op": "stop"})

    def start_scan(self, end_longitudinal_mm: float) -> None:
        self._call({"op": "start_scan", "end_longitudinal": end_longitudinal_mm})

    def abort_scan(self) -> None:
        self._call({"op": "abort_scan"})

    def inject_fault(self, fault: str, seconds: float = 2.0) -> None:
        """Simulation only: make the scanner misbehave (motor, encoder_jump, lost_link)."""
        try:
            self._call({"op": "inject", "fault": fault, "seconds": seconds})
        except LinkError:
            if fault != "lost_link":
                raise

    def reset_faults(self) -> None:
        self._call({"op": "clear_faults"})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
