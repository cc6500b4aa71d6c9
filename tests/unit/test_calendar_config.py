"""[crl] calendar-warn-remaining / calendar-warn-hours: read, bounded, refused in one line (issue 14)."""

from __future__ import annotations

import pytest

from appliance import config as C
from appliance.factory.tier import Tier


def _load(tmp_path, body: str) -> C.Config:
    (tmp_path / "donjon.toml").write_text(body)
    return C.load(str(tmp_path))


def test_defaults_and_values_read(tmp_path):
    assert (C.Config().crl.calendar_warn_remaining, C.Config().crl.calendar_warn_hours) == (3, 72)
    cfg = _load(tmp_path, "[crl]\ncalendar-warn-remaining = 12\ncalendar-warn-hours = 240\n")
    assert (cfg.crl.calendar_warn_remaining, cfg.crl.calendar_warn_hours) == (12, 240)


@pytest.mark.parametrize("line", ["calendar-warn-remaining = 0", "calendar-warn-remaining = 121", "calendar-warn-hours = 0",
                                  "calendar-warn-hours = 2161", "calendar-warn-hours = \"72h\"", "calendar-warn-remaining = -1",
                                  "calendar-warn-days = 3"])
def test_bad_values_refused_in_one_line(tmp_path, line):
    with pytest.raises(C.ConfigError) as e:
        _load(tmp_path, f"[crl]\n{line}\n")
    msg = str(e.value)
    assert "\n" not in msg and "crl" in msg and line.split(" =")[0] in msg, msg


def _doc(remaining: int, next_update: int | None) -> dict:
    return {"ca": "root", "remaining": remaining, "current": 7, "current_next_update": next_update}


def test_warning_thresholds_and_order():
    """The pure decision (the Factory's clock is an argument): lapsed, then lapsing within the hours with none to
    follow, then fewer than K left; the integration test drives the same through status and SNMP."""
    t = Tier.__new__(Tier)  # only the thresholds: _warning reads nothing else
    t.warn_remaining, t.warn_hours = 5, 100
    now = 1_800_000_000
    assert t._warning(_doc(5, now + 86400), now) is None
    assert "4 pre-signed CRL(s) left (fewer than 5)" in t._warning(_doc(4, now + 86400), now)
    assert "0 pre-signed CRL(s) left" in t._warning(_doc(0, now + 101 * 3600), now)
    assert "lapses at" in t._warning(_doc(0, now + 99 * 3600), now)
    assert "lapses at" not in (t._warning(_doc(6, now + 99 * 3600), now) or "")  # a next CRL follows: no lapse ahead
    assert t._warning(_doc(6, now), now).endswith("#7 has lapsed")
    t.warn_remaining, t.warn_hours = 3, 72
    assert t._warning(_doc(4, now + 86400), now) is None and "lapses at" not in t._warning(_doc(0, now + 99 * 3600), now)
