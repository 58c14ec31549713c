"""Perception and planning core of ctpos: pure functions over arrays and dataclasses.

Never imports zmq or Qt (see docs/architecture.md).
"""
