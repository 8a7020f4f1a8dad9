"""Refuse network connections in tests, except to loopback and AF_UNIX sockets.

tests/conftest.py installs this for the whole session, in the test process and (through
tests/child_site/sitecustomize.py on their PYTHONPATH) in every Python process it starts. Every Python-level connect
goes through socket.socket.connect / connect_ex (urllib, requests, httpx, asyncio,
aiohttp, ssl all do) or socket.create_connection, so patching those three is enough
to make a stray hub download fail at once with a clear message instead of hanging.
"""

from __future__ import annotations

import ipaddress
import os
import socket

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def is_loopback(address) -> bool:
    """True for AF_UNIX paths and loopback (host, port[, ...]) addresses."""
    if isinstance(address, (str, bytes, os.PathLike)):
        return True  # an AF_UNIX path (or abstract socket name)
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0]  # "[::1]", "fe80::1%eth0"
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other host name: refused without resolving it
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _check(family, address) -> None:
    if family in _INET_FAMILIES and not is_loopback(address):
        raise RuntimeError(f"network blocked in tests: {address!r}")


def install(monkeypatch) -> None:
    """Patch socket with `monkeypatch` (a pytest.MonkeyPatch); undone with it."""
    _patch(monkeypatch.setattr)


def install_for_the_process() -> None:
    """Patch socket until the process ends: the Python processes the tests start (ComfyUI,
    the CLI, the benchmarks) load it from tests/child_site/sitecustomize.py."""
    _patch(setattr)


def _patch(setattr) -> None:  # noqa: A002 - pytest's monkeypatch.setattr or the builtin
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def connect(self, address):
        _check(self.family, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        _check(self.family, address)
        return real_connect_ex(self, address)

    def create_connection(address, *args, **kwargs):
        # checked before name resolution, so not even a DNS query leaves
        _check(socket.AF_INET, address)
        return real_create_connection(address, *args, **kwargs)

    setattr(socket.socket, "connect", connect)
    setattr(socket.socket, "connect_ex", connect_ex)
    setattr(socket, "create_connection", create_connection)
