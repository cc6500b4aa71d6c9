"""Card profiles and batch files (policy/cards.py): what is accepted, and every refusal naming its key, row and field."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import cards
from policy.errors import PolicyError
from policy.profiles import builtin_profiles

PROFILE = (Path(__file__).parents[1] / "data" / "kgs" / "employee.toml").read_text()


def test_three_slot_profile_loads():
    p = cards.load_card_profile_text("employee", PROFILE, builtin_profiles())
    assert [s.name for s in p.slots] == ["auth", "sign", "enc"]
    assert [s.archived for s in p.slots] == [False, False, True]
    assert p.slot("enc").key_type == "rsa2048" and p.pin.length == 6 and p.puk.tries == 10
    s = cards.Subject("e-001", "Alice")
    assert p.card_label(s, 1) == "EMP-e-001"
    pin = cards.new_secret(p.pin, secrets.randbelow)
    assert len(pin) == 6 and pin.isdigit()


@pytest.mark.parametrize("edit, key, rule", [
    (lambda t: t.replace('ca = "issuing"\n', ""), "ca", "required"),
    (lambda t: "bogus = 1\n" + t, "bogus", "unknown-key"),
    (lambda t: t + "\nbogus = 1\n", "slot[2].bogus", "unknown-key"),
    (lambda t: t.replace('label = "EMP-{id}"', 'label = "EMP"'), "label", "unique"),
    (lambda t: t.replace('label = "EMP-{id}"', 'label = "EMP-{uid}"'), "label", "field"),
    (lambda t: t.replace('label = "EMP-{id}"', 'label = "EMP-{id"'), "label", "syntax"),
    (lambda t: t.replace("length = 6", "length = 2"), "pin.length", "value"),
    (lambda t: t.replace('alphabet = "digits"\ntries = 3', 'alphabet = "emoji"\ntries = 3'), "pin.alphabet", "value"),
    (lambda t: t.replace('name = "sign"', 'name = "auth"'), "slot[1].name", "duplicate"),
    (lambda t: t.replace('name = "sign"', 'name = "wallet"'), "slot[1].name", "value"),
    (lambda t: t.replace('key_type = "rsa2048"', 'key_type = "ed25519"'), "slot[2].key_type", "value"),
    (lambda t: t.replace('key_type = "rsa2048"', 'key_type = "p256"'), "slot[2].key_type", "archival"),
    (lambda t: t.replace('generated = "card"\nprofile = "user-auth"', 'generated = "hsm"\nprofile = "user-auth"'),
     "slot[0].generated", "archival"),
    (lambda t: t.replace('profile = "user-enc"', 'profile = "no-such"'), "slot[2].profile", "unknown"),
    (lambda t: t.replace('profile = "user-enc"', 'profile = "sub-ca"'), "slot[2].profile", "kind"),
    (lambda t: "ca = ", "toml", "syntax"),
])
def test_bad_profiles_name_the_key(edit, key, rule):
    with pytest.raises(PolicyError) as e:
        cards.load_card_profile_text("employee", edit(PROFILE), builtin_profiles())
    assert e.value.field == f"card profile employee: {key}" and e.value.rule == rule, str(e.value)


def test_batches_csv_and_json():
    csv = b"id,CN,email,O,C,address\ne-1,Alice Martin,alice@example.org,Example,FR,1 rue de la Paix|75002 Paris\ne-2,Bob,,,,\n"
    a = cards.parse_batch(csv)
    assert [s.id for s in a] == ["e-1", "e-2"] and a[0].address == ("1 rue de la Paix", "75002 Paris")
    assert a[0].attrs() == [("C", "FR"), ("O", "Example"), ("CN", "Alice Martin")] and a[1].email is None
    js = b'[{"id": "e-1", "CN": "Alice Martin", "email": "alice@example.org", "O": "Example", "C": "FR", "address": "1 rue de la Paix\\n75002 Paris"}, {"id": "e-2", "CN": "Bob"}]'
    b = cards.parse_batch(js)
    assert b == a
    assert cards.subject_from_dict(a[0].as_dict()) == a[0]


@pytest.mark.parametrize("data, where, rule", [
    (b"", "file", "empty"),
    (b"id,CN\n", "file", "empty"),
    (b"id,CN,phone\n1,A,2\n", "header: phone", "unknown-field"),
    (b"id,CN\ne-1,Alice\ne-1,Bob\n", "line 3: id", "duplicate"),
    (b"id,CN\ne-1\n", "line 2", "columns"),
    (b"id,CN\n,Alice\n", "line 2: id", "required"),
    (b"id,CN\ne 1,Alice\n", "line 2: id", "value"),
    (b"id,CN,C\ne-1,Alice,France\n", "line 2: C", "value"),
    (b"id,CN,email\ne-1,Alice,not-mail\n", "line 2: email", "value"),
    (b"id,CN\ne-1,\"Ali\x01ce\"\n", "line 2: CN", "value"),
    (b"\xff\xfe", "file", "encoding"),
    (b"[1, 2]", "subject 1", "type"),
    (b'[{"id": "e-1", "CN": 5}]', "subject 1: CN", "type"),
    (b'{"id": "e-1"', "file", "syntax"),
    (b'{"x": 1}', "file", "type"),
    (b"[" * 100000, "file", "syntax"),
    (b"x" * (cards.MAX_BATCH_BYTES + 1), "file", "size"),
])
def test_bad_batches_name_row_and_field(data, where, rule):
    with pytest.raises(PolicyError) as e:
        cards.parse_batch(data)
    assert e.value.field == f"batch {where}" and e.value.rule == rule, str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=300).map(lambda t: ("id,CN,email\n" + t).encode()),
                 st.text(max_size=300).map(lambda t: ('[{"id": "a", "CN": ' + t).encode())))
def test_fuzz_batch_parser_only_policy_errors(data):
    """Whatever the file holds: subjects, or one PolicyError (never another exception)."""
    try:
        out = cards.parse_batch(data)
    except PolicyError:
        return
    assert all(cards.subject_from_dict(s.as_dict()) == s for s in out)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_profile_loader_only_policy_errors(text):
    try:
        cards.load_card_profile_text("x", PROFILE.replace('label = "EMP-{id}"', "label = " + repr(text)[:60]))
    except PolicyError:
        pass


def test_a_card_profile_bounds_what_the_kgs_may_have_certified():
    """The Factory's check on every KgsIssue: a compromised KGS gets only what its card profiles name."""
    p = cards.load_card_profile_text("employee", PROFILE, builtin_profiles())
    assert p.refuses("enc", "issuing", "user-enc") is None
    assert "no slot" in p.refuses("wallet", "issuing", "user-enc")
    assert "not root" in p.refuses("enc", "root", "user-enc")
    assert "not tls-server" in p.refuses("auth", "issuing", "tls-server")
    two = PROFILE[:PROFILE.index("[[slot]]\nname = \"enc\"")]
    assert "no slot enc" in cards.load_card_profile_text("two", two, builtin_profiles()).refuses("enc", "issuing", "user-enc")
