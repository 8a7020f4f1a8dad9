"""The test harness itself: network block (tests/netguard.py) and offline settings."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from netguard import is_loopback


def test_offline_env_is_set():
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[var] == "1"


@pytest.mark.parametrize(
    "address",
    [("127.0.0.1", 80), ("127.8.9.10", 1), ("::1", 80, 0, 0), ("[::1]", 80), ("localhost", 80),
     ("::ffff:127.0.0.1", 80), "/tmp/some.sock", b"\0abstract"],
)
def test_loopback_and_unix_addresses_are_allowed(address):
    assert is_loopback(address)


@pytest.mark.parametrize(
    "address",
    [("10.0.0.1", 80), ("192.168.1.1", 80), ("8.8.8.8", 53), ("2001:db8::1", 80), ("example.invalid", 80),
     ("0.0.0.0", 80), ("", 80)],
)
def test_other_addresses_are_refused(address):
    assert not is_loopback(address)


def test_create_connection_is_refused_before_name_resolution():
    with pytest.raises(RuntimeError, match="network blocked in tests"):
        socket.create_connection(("example.invalid", 80), timeout=1)


def test_socket_connect_to_a_host_name_is_refused():
    # a host name (not an IP) so nothing could leave even if the guard were broken:
    # the .invalid domain never resolves
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(RuntimeError, match="network blocked in tests"):
            s.connect(("example.invalid", 80))
        with pytest.raises(RuntimeError, match="network blocked in tests"):
            s.connect_ex(("example.invalid", 80))


def test_loopback_connections_work():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()


def test_child_processes_are_blocked_too():
    """ComfyUI, the CLI and the benchmarks run as child processes: they inherit the block
    (tests/child_site/sitecustomize.py), and loopback still works for them."""
    script = textwrap.dedent("""
        import socket
        server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
        socket.create_connection(server.getsockname(), timeout=5).close()
        print("loopback ok", flush=True)
        socket.create_connection(("example.invalid", 80), timeout=1)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "loopback ok"
    assert run.returncode != 0 and "RuntimeError: network blocked in tests: ('example.invalid', 80)" in run.stderr
