"""The image's clock helper protocol (`donjon clock apply` behind donjon-clock.socket): one line in, one line out.

Only refusals are exercised here: a valid time would set this machine's clock. The helper setting the clocks
for real is exercised in the VM (image/tests/test_boot.py)."""

from __future__ import annotations

import io
import os
import socket
import threading

import pytest

from appliance import clock


def _run(line: bytes) -> tuple[int, str]:
    out = io.StringIO()
    rc = clock.helper_main(io.TextIOWrapper(io.BytesIO(line)), out)
    return rc, out.getvalue()


@pytest.mark.parametrize("line", [b"", b"\n", b"abc\n", b"1\n", b"-5\n", b"4102444801\n", b"1700000000.5\n",
                                  b"9" * 4096 + b"\n", b"\xff\xfe\n", b"1800000000; reboot\n"])
def test_helper_refuses_anything_but_a_time_in_range(line):
    rc, out = _run(line)
    assert rc == 1 and out.startswith("error: ") and out.count("\n") == 1 and len(out) <= clock.REPLY_MAX, out


def test_supervisor_side_talks_to_the_helper_over_its_socket(tmp_path):
    """The supervisor's half (set_clock -> _ask_helper) against the real helper function on a Unix socket,
    as systemd's Accept=yes hands it the connection: the refusal comes back as an OSError, in one line."""
    path = str(tmp_path / "clock.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as rb, conn.makefile("w") as w:
            clock.helper_main(io.TextIOWrapper(rb), w)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    old = os.environ.pop(clock.FAKE_ENV, None)
    os.environ[clock.HELPER_SOCKET_ENV] = path
    try:
        with pytest.raises(OSError) as e:
            clock.set_clock(12345)  # out of range: the helper checks again, whatever the caller did
        assert "between 2023-11-14 and 2100" in str(e.value) and "\n" not in str(e.value)
    finally:
        del os.environ[clock.HELPER_SOCKET_ENV]
        if old is not None:
            os.environ[clock.FAKE_ENV] = old
        t.join(10)
        srv.close()


def test_no_helper_listening_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(OSError):
        clock._ask_helper(str(tmp_path / "absent.sock"), 1_800_000_000)
