"""The daemon's states and transitions, as data: (state, event) -> next state.

Anything not in TRANSITIONS is illegal: ``Machine.fire`` raises ``IllegalTransition``
and logs it, and the daemon answers the command with E_ILLEGAL_STATE.
"""
from __future__ import annotations

import logging
from enum import Enum

log = logging.getLogger("ctpos.bridge.fsm")


class State(str, Enum):
    IDLE = "idle"  # no plan loaded, table still
    PLAN_LOADED = "plan_loaded"  # a plan, table not at its start
    MOVING = "moving"
    POSITIONED = "positioned"  # at the plan's ISO height and scan start
    SCANNING = "scanning"
    SCAN_DONE = "scan_done"
    FAULT = "fault"  # motion stopped by a fault; needs reset_fault
    ESTOP = "estop"  # latched until reset_estop


class Event(str, Enum):
    LOAD_PLAN = "load_plan"
    MOVE = "move"  # move_table, or move_to_plan
    ARRIVED_AT_PLAN = "arrived_at_plan"
    ARRIVED_WITH_PLAN = "arrived_with_plan"  # somewhere else, a plan still loaded
    ARRIVED_NO_PLAN = "arrived_no_plan"
    STOPPED_WITH_PLAN = "stopped_with_plan"
    STOPPED_NO_PLAN = "stopped_no_plan"
    START_SCAN = "start_scan"
    SCAN_COMPLETE = "scan_complete"
    ABORT_SCAN = "abort_scan"
    FAULT = "fault"  # scanner fault, lost link, encoder jump, heartbeat loss
    RESET_FAULT = "reset_fault"
    ESTOP = "estop"
    RESET_ESTOP = "reset_estop"


S, E = State, Event
_STILL = (S.IDLE, S.PLAN_LOADED, S.POSITIONED, S.SCAN_DONE)
TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, E.LOAD_PLAN): S.PLAN_LOADED for s in _STILL},
    **{(s, E.MOVE): S.MOVING for s in _STILL},
    (S.MOVING, E.ARRIVED_AT_PLAN): S.POSITIONED,
    (S.MOVING, E.ARRIVED_WITH_PLAN): S.PLAN_LOADED,
    (S.MOVING, E.ARRIVED_NO_PLAN): S.IDLE,
    (S.MOVING, E.STOPPED_WITH_PLAN): S.PLAN_LOADED,
    (S.MOVING, E.STOPPED_NO_PLAN): S.IDLE,
    (S.POSITIONED, E.START_SCAN): S.SCANNING,
    (S.SCANNING, E.SCAN_COMPLETE): S.SCAN_DONE,
    (S.SCANNING, E.ABORT_SCAN): S.POSITIONED,
    **{(s, E.FAULT): S.FAULT for s in (*_STILL, S.MOVING, S.SCANNING, S.FAULT)},
    (S.FAULT, E.RESET_FAULT): S.IDLE,
    **{(s, E.ESTOP): S.ESTOP for s in State},
    (S.ESTOP, E.RESET_ESTOP): S.IDLE,
}


class IllegalTransition(Exception):
    """An event that the current state does not allow."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"'{event.value}' is not allowed in state '{state.value}'")
        self.state, self.event = state, event


class Machine:
    """Holds the current state; ``fire`` moves it by the table or raises."""

    def __init__(self, state: State = State.IDLE) -> None:
        self.state = state

    def allowed(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def fire(self, event: Event) -> tuple[State, State]:
        """Apply event; returns (old, new). Raises IllegalTransition (and logs it)."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            log.warning("illegal event %s in state %s", event.value, self.state.value)
            raise IllegalTransition(self.state, event)
        old, self.state = self.state, nxt
        return old, nxt
