"""`donjon config set crl.delta` / `crl.shards` (issue 19): a table of CA names and numbers, checked, written
back in one normal form, the whole file validated again before it replaces the old one."""

from __future__ import annotations

import pytest

from appliance import config as C


@pytest.mark.parametrize("key,value,want", [
    ("crl.delta", "{ issuing = 60 }", '{ "issuing" = 60 }'),
    ("crl.delta", '{issuing=60,"a.b"=5}', '{ "issuing" = 60, "a.b" = 5 }'),
    ("crl.delta", "{}", "{}"),
    ("crl.shards", "{ issuing = 16 }", '{ "issuing" = 16 }'),
])
def test_tables_are_written_in_one_form(key, value, want):
    assert C.setting_literal(key, value) == want


@pytest.mark.parametrize("key,value", [
    ("crl.delta", "{ issuing = 0 }"), ("crl.delta", "{ issuing = 1441 }"), ("crl.shards", "{ issuing = 257 }"),
    ("crl.delta", "{ issuing = 60, issuing = 5 }"), ("crl.delta", "issuing = 60"), ("crl.delta", '{ "x\\" = 1 }'),
    ("crl.delta", "{ a = 1 }\n[ocsp]\nlisten = 1"), ("crl.delta", "{ a = 1 } # c"), ("crl.delta", "{ a b = 1 }"),
    ("crl.delta", "{ " + ", ".join(f"c{i} = 1" for i in range(600)) + " }"),  # over 4,000 characters
])
def test_anything_else_is_refused_in_one_line(key, value):
    with pytest.raises(C.ConfigError) as e:
        C.setting_literal(key, value)
    assert "\n" not in str(e.value)


def test_written_into_the_file_and_validated_with_it(tmp_path):
    (tmp_path / "donjon.toml").write_text("# kept\n[crl]\nvalidity-hours = 24  # a day\n")
    assert "next start" in C.write_setting(str(tmp_path), "crl.delta", "{ issuing = 60 }")
    text = (tmp_path / "donjon.toml").read_text()
    assert '[crl]\ndelta = { "issuing" = 60 }\nvalidity-hours = 24  # a day' in text and text.startswith("# kept")
    cfg = C.load_toml(str(tmp_path / "donjon.toml"), C.Config)
    assert cfg.crl.delta == {"issuing": 60}
    C.write_setting(str(tmp_path), "crl.delta", "{ issuing = 30 }")  # replaced in place, not added twice
    assert (tmp_path / "donjon.toml").read_text().count("delta =") == 1
