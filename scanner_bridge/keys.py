"""CURVE keys for the bridge (pyzmq's zmq.auth), and where they live.

Layout of a keys folder (``ctpos keys generate DIR``)::

    DIR/server.key           the daemon's public key (every client needs it)
    DIR/server.key_secret    the daemon's key pair (stays on the scanner side)
    DIR/<client>.key_secret  a client's key pair (stays on that console)
    DIR/authorized/<client>.key   the allow-list: public keys the daemon accepts
"""
from __future__ import annotations

import shutil
from pathlib import Path

import zmq.auth


class KeyFileError(Exception):
    """Keys are missing or unreadable; one-line reason."""


def generate(folder: str | Path, clients: list[str] = ("console",), server: bool = True) -> Path:
    """Create the server key pair (unless present and server=False) and client key pairs, authorising the clients."""
    folder = Path(folder)
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    if server or not (folder / "server.key_secret").exists():
        zmq.auth.create_certificates(folder, "server")
    for name in clients:
        pub, _ = zmq.auth.create_certificates(folder, name)
        shutil.move(pub, folder / "authorized" / f"{name}.key")
    return folder


def load_pair(path: Path) -> tuple[bytes, bytes]:
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: cannot read key ({exc.__class__.__name__})") from None
    if sec is None:
        raise KeyFileError(f"{path}: holds no secret key")
    return pub, sec


def server_keys(folder: str | Path) -> tuple[bytes, bytes, Path]:
    """(public, secret, allow-list folder) for the daemon."""
    folder = Path(folder)
    pub, sec = load_pair(folder / "server.key_secret")
    allow = folder / "authorized"
    if not allow.is_dir():
        raise KeyFileError(f"{allow}: no allow-list of client keys")
    return pub, sec, allow


def client_keys(folder: str | Path, name: str = "console") -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) for a client."""
    folder = Path(folder)
    pub, sec = load_pair(folder / f"{name}.key_secret")
    try:
        server_pub, _ = zmq.auth.load_certificate(str(folder / "server.key"))
    except (OSError, ValueError):
        raise KeyFileError(f"{folder / 'server.key'}: the daemon's public key is missing") from None
    return pub, sec, server_pub
