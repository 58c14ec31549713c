"""The protocol's envelope and validation, and the daemon's state table (pure parts)."""
from __future__ import annotations

import json

import pytest

from scanner_bridge.fsm import TRANSITIONS, Event, IllegalTransition, Machine, State
from scanner_bridge.protocol import MAX_MESSAGE_BYTES, Envelope, ErrorCode, ProtocolError, decode


def enc(**kw) -> bytes:
    doc = {"protocol": "1.0", "id": "a" * 32, "type": "status", "sender": "console", "time": 1.0,
           "reply_to": None, "deadline": None, "body": {}}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_round_trip():
    e = Envelope(type="move_table", sender="c", body={"table_height_mm": 200, "table_longitudinal_mm": -900.5})
    d = decode(e.encode())
    assert d == e


@pytest.mark.parametrize("frame, code", [
    (b"\xff\xfe", ErrorCode.MALFORMED),
    (b"[1,2]", ErrorCode.MALFORMED),
    (b"x" * (MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE),
    (enc(protocol="2.0"), ErrorCode.VERSION),
    (enc(type="launch_missiles"), ErrorCode.UNKNOWN_TYPE),
    (enc(id=""), ErrorCode.MALFORMED),
    (enc(time="noon"), ErrorCode.MALFORMED),
    (enc(body=[]), ErrorCode.MALFORMED),
    (enc(type="move_table", body={"table_height_mm": 200}), ErrorCode.BAD_BODY),
    (enc(type="move_table", body={"table_height_mm": True, "table_longitudinal_mm": 1}), ErrorCode.BAD_BODY),
    (enc(type="reset_estop", body={"reason": "  "}), ErrorCode.BAD_BODY),
    (enc(type="start_scan", body={"room_clear": "yes"}), ErrorCode.BAD_BODY),
    (enc(type="load_plan", body={"plan": {"table_height_mm": 180}}), ErrorCode.BAD_BODY),
    (b'{"protocol":"1.0","id":"x","type":"status","sender":"c","time":NaN,"body":{}}', ErrorCode.MALFORMED),
])
def test_bad_messages_get_their_code(frame, code):
    with pytest.raises(ProtocolError) as ei:
        decode(frame)
    assert ei.value.code is code and "\n" not in ei.value.reason


def test_minor_versions_are_accepted():
    assert decode(enc(protocol="1.3")).type == "status"


def test_state_table_is_complete_and_strict():
    m = Machine()
    with pytest.raises(IllegalTransition, match="not allowed in state 'idle'"):
        m.fire(Event.START_SCAN)
    for ev in (Event.LOAD_PLAN, Event.MOVE, Event.ARRIVED_AT_PLAN, Event.START_SCAN, Event.SCAN_COMPLETE):
        m.fire(ev)
    assert m.state is State.SCAN_DONE
    # e-stop is reachable from everywhere and only reset_estop leaves it.
    for s in State:
        assert TRANSITIONS[(s, Event.ESTOP)] is State.ESTOP
    leaving = {e for (s, e), n in TRANSITIONS.items() if s is State.ESTOP and n is not State.ESTOP}
    assert leaving == {Event.RESET_ESTOP}
    # Nothing moves the table out of FAULT or ESTOP.
    assert (State.FAULT, Event.MOVE) not in TRANSITIONS and (State.ESTOP, Event.MOVE) not in TRANSITIONS
