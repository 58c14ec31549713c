"""The conformance suite every scanner adapter must pass.

Adapters are listed in ADAPTERS (name -> context manager yielding a connected
adapter). A vendor adapter is proven by adding it here, or by naming it in
CTPOS_ADAPTER="package.module:factory" (a context-manager factory taking a temp
folder), and running `pytest tests/test_adapter_conformance.py`.
"""
from __future__ import annotations

import importlib
import os
import time
from contextlib import contextmanager

import pytest

from bridge_helpers import scanner_process
from scanner_bridge.adapter import LimitError, MoveStatus, ScannerAdapter, ScannerStatus
from scanner_bridge.simulator import SimulatorAdapter


@contextmanager
def simulator(tmp):
    with scanner_process(tmp) as ep:
        a = SimulatorAdapter(ep)
        a.connect()
        try:
            yield a
        finally:
            a.close()


ADAPTERS = {"simulator": simulator}
if os.environ.get("CTPOS_ADAPTER"):
    mod, fn = os.environ["CTPOS_ADAPTER"].split(":")
    ADAPTERS["vendor"] = getattr(importlib.import_module(mod), fn)


@pytest.fixture(params=sorted(ADAPTERS), scope="module")
def adapter(request, tmp_path_factory):
    with ADAPTERS[request.param](tmp_path_factory.mktemp(request.param)) as a:
        yield a


def wait_still(a: ScannerAdapter, timeout_s: float = 30.0) -> ScannerStatus:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        s = a.status()
        if not s.moving:
            return s
        time.sleep(0.05)
    raise AssertionError("adapter never came to rest")


def test_is_an_adapter_and_reports_status(adapter):
    assert isinstance(adapter, ScannerAdapter)
    s = adapter.status()
    lim = adapter.limits()
    assert lim.height_min_mm <= s.table_height_mm <= lim.height_max_mm
    assert lim.longitudinal_min_mm <= s.table_longitudinal_mm <= lim.longitudinal_max_mm
    assert isinstance(s.faults, tuple)


def test_move_returns_status_with_a_deadline_and_arrives_before_it(adapter):
    s0 = wait_still(adapter)
    target = (max(s0.table_height_mm - 30, 100.0), s0.table_longitudinal_mm - 100)
    m = adapter.move(*target)
    assert isinstance(m, MoveStatus) and m.deadline > time.time() and not m.done
    while True:  # poll as the daemon does; the status calls also feed the watchdog
        s = adapter.status()
        if m.arrived(s):
            break
        assert time.time() < m.deadline, "move missed its own deadline"
        time.sleep(0.02)
    assert abs(s.table_height_mm - target[0]) < 0.5 and abs(s.table_longitudinal_mm - target[1]) < 0.5


@pytest.mark.parametrize("target", [(2000.0, -1000.0), (300.0, 5000.0), (420.0, 0.0)])
def test_limits_are_checked_before_any_motion(adapter, target):
    s0 = wait_still(adapter)
    with pytest.raises(LimitError):
        adapter.move(*target)
    time.sleep(0.1)
    s1 = adapter.status()
    assert not s1.moving and abs(s1.table_longitudinal_mm - s0.table_longitudinal_mm) < 0.01


def test_stop_halts_motion(adapter):
    s0 = wait_still(adapter)
    adapter.move(s0.table_height_mm, s0.table_longitudinal_mm - 400)
    time.sleep(0.5)
    adapter.stop()
    s = wait_still(adapter, timeout_s=2.0)
    assert abs(s.table_longitudinal_mm - (s0.table_longitudinal_mm - 400)) > 50  # did not finish the move


def test_scan_moves_at_scan_speed_and_completes(adapter):
    wait_still(adapter)
    adapter.move(200.0, -800.0)
    wait_still(adapter)
    adapter.start_scan(-700.0)
    peak = 0.0
    while True:
        s = adapter.status()
        peak = max(peak, abs(s.longitudinal_velocity_mm_s))
        if not s.scanning:
            break
        time.sleep(0.02)
    assert s.scan_progress >= 0.999 and abs(s.table_longitudinal_mm + 700.0) < 0.5
    assert peak <= adapter.limits().scan_speed_mm_s + 1e-6


def test_abort_scan_halts(adapter):
    wait_still(adapter)
    adapter.start_scan(-1000.0)
    time.sleep(0.4)
    adapter.abort_scan()
    s = wait_still(adapter, timeout_s=2.0)
    assert not s.scanning and s.scan_progress < 0.999


def test_reset_faults_clears(adapter):
    adapter.reset_faults()
    assert adapter.status().faults == ()
