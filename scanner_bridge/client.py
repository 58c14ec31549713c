"""The console's side of the bridge: requests with correlation and deadlines, heartbeats, telemetry.

Each request carries a fresh id; the reply is the message whose ``reply_to`` is
that id (stale replies to earlier, timed-out requests are dropped). A request
may carry a deadline: the daemon refuses to execute it after that time. The
heartbeat runs on its own socket in a thread, so a busy console still beats.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq

from scanner_bridge import keys as bridge_keys
from scanner_bridge.protocol import ERROR, TELEMETRY, Envelope, ProtocolError, decode

log = logging.getLogger("ctpos.bridge.client")


class BridgeTimeout(Exception):
    """No reply in time: the daemon is down, unreachable, or refused our key."""


class BridgeError(Exception):
    """The daemon answered with an error. code: the protocol's error code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class BridgeClient:
    """One console's link to the daemon. Construction does no I/O; ``connect`` does."""

    def __init__(self, endpoint: str, keys_dir: str | Path | None, name: str = "console",
                 telemetry_endpoint: str | None = None) -> None:
        self.endpoint, self.keys_dir, self.name = endpoint, keys_dir, name
        self.telemetry_endpoint = telemetry_endpoint
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._sub = None
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()

    def _secure(self, sock: zmq.Socket) -> None:
        if self.keys_dir is None:
            return
        pub, sec, server = bridge_keys.client_keys(self.keys_dir, self.name)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server

    def _dealer(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        self._secure(s)
        s.connect(self.endpoint)
        return s

    def connect(self) -> "BridgeClient":
        self._sock = self._dealer()
        return self

    def send_raw(self, payload: bytes | list[bytes]) -> None:
        """Send arbitrary frames (protocol tests and fuzzing)."""
        if isinstance(payload, list):
            self._sock.send_multipart(payload)
        else:
            self._sock.send(payload)

    def recv_raw(self, timeout_s: float) -> bytes:
        if not self._sock.poll(int(timeout_s * 1000)):
            raise BridgeTimeout(f"no answer from {self.endpoint} within {timeout_s:.2f} s")
        return self._sock.recv()

    def request(self, msg_type: str, body: dict | None = None, timeout_s: float = 2.0,
                deadline_s: float | None = None, msg_id: str | None = None) -> Envelope:
        """Send one request and return its reply; raise BridgeError for an error reply, BridgeTimeout if none."""
        env = Envelope(type=msg_type, sender=self.name, body=body or {},
                       deadline=None if deadline_s is None else time.time() + deadline_s)
        if msg_id is not None:
            env = Envelope(type=env.type, sender=env.sender, body=env.body, id=msg_id, deadline=env.deadline)
        end = time.monotonic() + timeout_s
        # The send counts against the timeout too: after a refused key (CURVE handshake failed) the socket has
        # no peer and a blocking send would wait for ever.
        try:
            if not self._sock.poll(int(timeout_s * 1000) + 1, zmq.POLLOUT):
                raise zmq.Again()
            self._sock.send(env.encode(), zmq.NOBLOCK)
        except zmq.Again:
            raise BridgeTimeout(f"could not send '{msg_type}' to {self.endpoint} within {timeout_s:.2f} s "
                                f"(daemon down, or our key not on its allow-list)") from None
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise BridgeTimeout(f"no reply to '{msg_type}' from {self.endpoint} within {timeout_s:.2f} s "
                                    f"(daemon down, or our key not on its allow-list)")
            try:
                rep = decode(self._sock.recv(), expect_requests=False)
            except ProtocolError:
                continue
            if rep.reply_to != env.id:
                continue  # a late reply to an earlier request
            if rep.type == ERROR:
                raise BridgeError(rep.body.get("code", "?"), rep.body.get("reason", ""))
            return rep

    # ---- heartbeat -------------------------------------------------------
    def start_heartbeat(self, period_s: float = 0.1) -> None:
        self._hb_stop.clear()

        def beat() -> None:
            sock = self._dealer()
            try:
                while not self._hb_stop.wait(period_s):
                    try:  # a beat that cannot go now is a missed beat, which the daemon acts on
                        sock.send(Envelope(type="heartbeat", sender=self.name).encode(), zmq.NOBLOCK)
                    except zmq.Again:
                        log.debug("heartbeat to %s not sent: no peer ready", self.endpoint)
                    while sock.poll(0):
                        sock.recv()
            finally:
                sock.close()

        self._hb_thread = threading.Thread(target=beat, name="bridge-heartbeat", daemon=True)
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
            self._hb_thread = None

    # ---- telemetry -------------------------------------------------------
    def subscribe(self) -> None:
        if self.telemetry_endpoint is None:
            raise ValueError("no telemetry endpoint given")
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._secure(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, TELEMETRY.encode())
        self._sub.connect(self.telemetry_endpoint)

    def telemetry(self, timeout_s: float = 1.0) -> Envelope:
        if not self._sub.poll(int(timeout_s * 1000)):
            raise BridgeTimeout(f"no telemetry within {timeout_s:.2f} s")
        _, payload = self._sub.recv_multipart()
        return decode(payload, expect_requests=False)

    def close(self) -> None:
        self.stop_heartbeat()
        for s in (self._sock, self._sub):
            if s is not None:
                s.close()
        self._sock = self._sub = None
