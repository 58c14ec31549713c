"""The bridge protocol (docs/bridge-protocol.md, version 1.0): one envelope, typed messages, error codes.

Every message is one ZeroMQ frame holding a UTF-8 JSON object (the envelope):

    {"protocol": "1.0", "id": "<32 hex>", "type": "<message type>", "sender": "<name>",
     "time": <unix seconds>, "reply_to": "<id>" | null, "deadline": <unix seconds> | null,
     "body": {...}}

``decode`` validates an incoming frame completely (size, JSON, envelope fields,
version, type, body fields and their types) and raises ``ProtocolError`` with the
error code and a one-line reason; the daemon turns that into an ``error`` reply.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

PROTOCOL_VERSION = "1.0"
MAX_MESSAGE_BYTES = 64 * 1024


class ErrorCode(str, Enum):
    MALFORMED = "E_MALFORMED"  # not JSON, or not an envelope
    TOO_LARGE = "E_TOO_LARGE"
    VERSION = "E_VERSION"  # protocol major version not spoken here
    UNKNOWN_TYPE = "E_UNKNOWN_TYPE"
    BAD_BODY = "E_BAD_BODY"  # body fields missing or of the wrong type
    DEADLINE = "E_DEADLINE"  # arrived after its deadline: not executed
    ILLEGAL_STATE = "E_ILLEGAL_STATE"  # not allowed in the daemon's current state
    LIMIT = "E_LIMIT"  # outside table travel, speed or the bore's safe band
    INTERLOCK = "E_INTERLOCK"  # a safety precondition is not met (room clear, position)
    ESTOP = "E_ESTOP"  # e-stop latched
    FAULT = "E_FAULT"  # the scanner reported a fault
    INTERNAL = "E_INTERNAL"


class ProtocolError(Exception):
    """A message that cannot be accepted; code and one-line reason go back to the sender."""

    def __init__(self, code: ErrorCode, reason: str, msg_id: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.msg_id = code, reason, msg_id


_NUM = (int, float)
# Request types and their body fields: name -> (type(s), required).
REQUESTS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"client_version": ((str,), False)},
    "status": {},
    "heartbeat": {},
    "load_plan": {"plan": ((dict,), True)},
    "move_table": {"table_height_mm": (_NUM, True), "table_longitudinal_mm": (_NUM, True)},
    "move_to_plan": {},
    "stop": {},
    "estop": {"reason": ((str,), False)},
    "reset_estop": {"reason": ((str,), True)},
    "reset_fault": {"reason": ((str,), True)},
    "start_scan": {"room_clear": ((bool,), True)},
    "abort_scan": {"reason": ((str,), False)},
}
# What load_plan's "plan" must hold (CONVENTIONS.md plan JSON, the fields the daemon acts on).
PLAN_FIELDS = {"table_height_mm": _NUM, "scan_range_table_mm": dict}
REPLY_SUFFIX = "_reply"
TELEMETRY = "telemetry"
ERROR = "error"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope:
    """One message. time and deadline are unix seconds; body is message-specific."""

    type: str
    sender: str
    body: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    time: float = field(default_factory=time.time)
    reply_to: str | None = None
    deadline: float | None = None
    protocol: str = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps({"protocol": self.protocol, "id": self.id, "type": self.type, "sender": self.sender,
                           "time": self.time, "reply_to": self.reply_to, "deadline": self.deadline,
                           "body": self.body}, separators=(",", ":"), allow_nan=False).encode()

    def reply(self, sender: str, body: dict[str, Any]) -> "Envelope":
        return Envelope(type=self.type + REPLY_SUFFIX, sender=sender, body=body, reply_to=self.id)

    def error(self, sender: str, code: ErrorCode, reason: str) -> "Envelope":
        return Envelope(type=ERROR, sender=sender, body={"code": code.value, "reason": reason}, reply_to=self.id)


def error_for(msg_id: str | None, sender: str, code: ErrorCode, reason: str) -> Envelope:
    """An error reply to a message that may not even have a usable id."""
    return Envelope(type=ERROR, sender=sender, body={"code": code.value, "reason": reason}, reply_to=msg_id)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def decode(frame: bytes, expect_requests: bool = True) -> Envelope:
    """Parse and validate one frame. Raises ProtocolError(code, reason, id-if-known)."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        doc = json.loads(frame.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(ErrorCode.MALFORMED, "not a UTF-8 JSON message") from None
    if not isinstance(doc, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message is not a JSON object")
    msg_id = doc.get("id") if isinstance(doc.get("id"), str) and 0 < len(doc.get("id")) <= 64 else None
    for key, kinds in (("protocol", (str,)), ("id", (str,)), ("type", (str,)), ("sender", (str,)),
                       ("time", _NUM), ("body", (dict,))):
        v = doc.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, kinds):
            raise ProtocolError(ErrorCode.MALFORMED, f"envelope field '{key}' missing or of the wrong type", msg_id)
    if msg_id is None:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope field 'id' must be 1-64 characters")
    if not 0 < len(doc["sender"]) <= 64:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope field 'sender' must be 1-64 characters", msg_id)
    for key in ("reply_to", "deadline"):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str,) if key == "reply_to" else _NUM)):
            raise ProtocolError(ErrorCode.MALFORMED, f"envelope field '{key}' of the wrong type", msg_id)
    major = str(doc["protocol"]).split(".")[0]
    if major != PROTOCOL_VERSION.split(".")[0]:
        raise ProtocolError(ErrorCode.VERSION, f"protocol {doc['protocol']!r} not supported; this daemon speaks "
                                               f"{PROTOCOL_VERSION}", msg_id)
    env = Envelope(type=doc["type"], sender=doc["sender"], body=doc["body"], id=msg_id, time=float(doc["time"]),
                   reply_to=doc.get("reply_to"), deadline=doc.get("deadline"), protocol=doc["protocol"])
    if expect_requests:
        validate_request(env)
    return env


def validate_request(env: Envelope) -> None:
    spec = REQUESTS.get(env.type)
    if spec is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {env.type[:40]!r}", env.id)
    for name, (kinds, required) in spec.items():
        if name not in env.body:
            if required:
                raise ProtocolError(ErrorCode.BAD_BODY, f"'{env.type}' needs '{name}'", env.id)
            continue
        v = env.body[name]
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            raise ProtocolError(ErrorCode.BAD_BODY, f"'{env.type}': '{name}' has the wrong type", env.id)
        if isinstance(v, float) and not math.isfinite(v):
            raise ProtocolError(ErrorCode.BAD_BODY, f"'{env.type}': '{name}' is not finite", env.id)
    if env.type == "load_plan":
        plan = env.body["plan"]
        for name, kinds in PLAN_FIELDS.items():
            if not isinstance(plan.get(name), kinds) or isinstance(plan.get(name), bool):
                raise ProtocolError(ErrorCode.BAD_BODY, f"plan lacks a valid '{name}'", env.id)
        rng = plan["scan_range_table_mm"]
        for end in ("cranial", "caudal"):
            if isinstance(rng.get(end), bool) or not isinstance(rng.get(end), _NUM):
                raise ProtocolError(ErrorCode.BAD_BODY, f"plan's scan_range_table_mm lacks '{end}'", env.id)
    if env.type in ("reset_estop", "reset_fault") and not env.body["reason"].strip():
        raise ProtocolError(ErrorCode.BAD_BODY, f"'{env.type}' needs an operator reason", env.id)
