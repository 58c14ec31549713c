"""The append-only audit log: every command, reply and transition, who, what, when and why.

SQLite in WAL mode with synchronous=FULL: a row is on disk when ``record`` returns,
so a reply is only sent for a command whose row survived (kill -9 included).
Triggers refuse UPDATE and DELETE. The log also answers "was this message id
already handled?", which makes duplicate detection survive a daemon restart.
"""
from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    time     TEXT NOT NULL,          -- ISO-8601 UTC
    kind     TEXT NOT NULL,          -- request | reply | transition | event
    who      TEXT NOT NULL,          -- sender, or 'daemon'
    what     TEXT NOT NULL,          -- message type, or 'old->new' for a transition
    why      TEXT NOT NULL DEFAULT '',
    msg_id   TEXT,
    reply_to TEXT,
    payload  TEXT                    -- the message as sent/received, JSON
);
CREATE INDEX IF NOT EXISTS audit_reply_to ON audit(reply_to) WHERE kind = 'reply';
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class AuditLog:
    """Append-only SQLite audit log at path (opened by ``open``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def open(self) -> "AuditLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened by start(), used by run(): possibly two threads, never at once.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        return self

    def record(self, kind: str, who: str, what: str, why: str = "", msg_id: str | None = None,
               reply_to: str | None = None, payload: bytes | str | dict | None = None) -> int:
        """Append one row, durably. Returns its sequence number."""
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8", "replace")
        elif isinstance(payload, dict):
            payload = json.dumps(payload)
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
        cur = self._db.execute(
            "INSERT INTO audit (time, kind, who, what, why, msg_id, reply_to, payload) VALUES (?,?,?,?,?,?,?,?)",
            (now, kind, who, what, why, msg_id, reply_to, payload))
        return int(cur.lastrowid)

    def reply_for(self, msg_id: str) -> bytes | None:
        """The reply already sent to request msg_id, if any."""
        row = self._db.execute("SELECT payload FROM audit WHERE kind = 'reply' AND reply_to = ? LIMIT 1",
                               (msg_id,)).fetchone()
        return row[0].encode() if row else None

    def rows(self, kind: str | None = None) -> list[dict]:
        q = "SELECT seq, time, kind, who, what, why, msg_id, reply_to, payload FROM audit"
        cur = self._db.execute(q + (" WHERE kind = ?" if kind else "") + " ORDER BY seq", (kind,) if kind else ())
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
