"""The image's units: CAP_SYS_TIME belongs to the per-request clock helper alone, behind a root-only socket."""

from __future__ import annotations

from pathlib import Path

UNITS = Path(__file__).resolve().parents[2] / "image" / "rootfs" / "etc" / "systemd" / "system"


def _unit(name: str) -> dict[str, list[str]]:
    """Each key's values in order (systemd units repeat keys; the [Service] section here)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(f"{section}{k}", []).append(v)
    return out


def test_only_the_clock_helper_has_cap_sys_time():
    main = _unit("donjon.service")
    assert main["[Service]ProtectClock"] == ["yes"]
    assert "CAP_SYS_TIME" not in " ".join(main["[Service]CapabilityBoundingSet"])
    assert any("@clock" in v and v.startswith("~") for v in main["[Service]SystemCallFilter"])
    assert "DONJON_CLOCK_SOCKET=/run/donjon-clock.sock" in main["[Service]Environment"]
    helper = _unit("donjon-clock@.service")
    assert helper["[Service]CapabilityBoundingSet"] == ["CAP_SYS_TIME"]
    assert helper["[Service]NoNewPrivileges"] == ["yes"] and helper["[Service]PrivateNetwork"] == ["yes"]
    assert helper["[Service]DevicePolicy"] == ["closed"] and helper["[Service]DeviceAllow"] == ["/dev/rtc0 rw"]
    assert helper["[Service]ExecStart"] == ["/opt/donjon/donjon clock apply"]
    assert helper["[Service]StandardInput"] == ["socket"]
    sock = _unit("donjon-clock.socket")
    assert sock["[Socket]ListenStream"] == ["/run/donjon-clock.sock"]
    assert sock["[Socket]SocketMode"] == ["0600"] and sock["[Socket]SocketUser"] == ["root"]
    assert sock["[Socket]Accept"] == ["yes"] and sock["[Socket]MaxConnections"] == ["1"]
    # No other unit of the image grants the capability.
    for f in UNITS.glob("*.service"):
        if f.name != "donjon-clock@.service":
            text = f.read_text()
            assert "CAP_SYS_TIME" not in text.replace("no CAP_SYS_TIME", ""), f.name
