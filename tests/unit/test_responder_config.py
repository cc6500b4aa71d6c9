"""[ocsp] responder-days / responder-renew-days: validated at load, with the file and both keys named."""

from __future__ import annotations

import pytest

from appliance import config as C


def _load(tmp_path, text: str) -> C.Config:
    (tmp_path / "donjon.toml").write_text(text)
    return C.load(str(tmp_path))


def test_defaults_and_valid_values(tmp_path):
    assert (C.Config().ocsp.responder_days, C.Config().ocsp.responder_renew_days) == (30, 10)
    cfg = _load(tmp_path, "[ocsp]\nresponder-days = 7\nresponder-renew-days = 0\n")
    assert (cfg.ocsp.responder_days, cfg.ocsp.responder_renew_days) == (7, 0)


@pytest.mark.parametrize("text, needle", [
    ("[ocsp]\nresponder-days = 10\nresponder-renew-days = 10\n", "responder-renew-days (10) must be less than responder-days (10)"),
    ("[ocsp]\nresponder-days = 31\n", "responder-days"),  # the ocsp-responder profile's maximum is 30 days
    ("[ocsp]\nresponder-renew-days = -1\n", "responder-renew-days"),
])
def test_a_renewal_that_would_loop_or_exceed_the_profile_is_refused(tmp_path, text, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        _load(tmp_path, text)
    assert "donjon.toml" in str(e.value) and "\n" not in str(e.value)
