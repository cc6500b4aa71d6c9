"""EST/SCEP enrolment secrets (appliance/factory/enrolsecrets.py) against a real encrypted CMDB: made,
spent once, expired, revoked, raced, refused with an audit record that never holds the secret."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import trio

from appliance.factory.enrolsecrets import EnrolSecrets
from appliance.factory.errors import FactoryError
from appliance.factory.store import Store

PROFILES = {"tls-client": SimpleNamespace(kind="tls-client"), "sub-ca": SimpleNamespace(kind="sub-ca")}


@pytest.fixture
def es(tmp_path):
    st = Store()
    trio.run(st.open, str(tmp_path / "cmdb.sqlite"), os.urandom(32), "chacha20", True)
    with st.tx():
        st.add_ca("issuing", "ec-p256", None, "root-ca", b"der", "")
    yield EnrolSecrets(st, PROFILES)
    for c in (st.db, st.reader):
        c.close()


def _audit(es) -> list[tuple]:
    return es.store.db.db.execute("SELECT actor, action, object, outcome, detail FROM audit ORDER BY seq").fetchall()


def test_scep_challenge_one_time(es):
    async def main():
        made = await es.create("scep", "issuing", "tls-client", 3600, 1, None, None, "alice")
        assert made["ref"].startswith("scep-") and len(made["secret"]) == 24 and made["secret"].isalnum()
        g = await es.spend("scep", made["secret"], None, "dev1", "scep")
        assert (g.ca, g.profile, g.credential) == ("issuing", "tls-client", f"scep-secret:{made['ref']}")
        for secret, why in ((made["secret"], "already used"), ("WRONG" * 4, "wrong secret"), ("", "wrong secret")):
            with pytest.raises(FactoryError) as e:
                await es.spend("scep", secret, None, "dev1", "scep")
            assert e.value.code == "unauthorized" and why in e.value.reason
        # an EST spend of a SCEP secret is refused as wrong (a secret is bound to its protocol)
        other = await es.create("scep", "issuing", "tls-client", 3600, 1, "dev-2", None, "alice")
        with pytest.raises(FactoryError):
            await es.spend("est", other["secret"], "dev-2", None, "est")
        rows = _audit(es)
        assert ("alice", "enrol-secret-create", made["ref"], "ok") == rows[0][:4]
        assert ("scep", "enrol-secret-use", made["ref"], "ok") == rows[1][:4]
        assert ("scep", "scep-enrol", made["ref"], "refused", "secret already used") == rows[2]
        assert not any(made["secret"] in (r[4] or "") for r in rows)  # the secret is never in the audit
        assert {s["ref"]: s["state"] for s in await es.list()} == {made["ref"]: "used", "dev-2": "usable"}
    trio.run(main)


def test_est_secret_uses_subject_expiry_revocation(es):
    async def main():
        made = await es.create("est", "issuing", "tls-client", 3600, 2, "router-7", "router-*", "alice")
        with pytest.raises(FactoryError) as e:
            await es.spend("est", made["secret"], "router-8", "router-7", "est")  # the name must match too
        assert "wrong secret" in e.value.reason
        with pytest.raises(FactoryError) as e:
            await es.spend("est", made["secret"], "router-7", "printer-1", "est")
        assert "not admitted" in e.value.reason
        await es.spend("est", made["secret"], "router-7", "router-7", "est")
        await es.revoke("router-7", "bob")
        with pytest.raises(FactoryError) as e:
            await es.spend("est", made["secret"], "router-7", "router-7", "est")
        assert "revoked" in e.value.reason
        with pytest.raises(FactoryError):
            await es.revoke("router-7", "bob")
        old = await es.create("est", "issuing", "tls-client", 60, 1, "old", None, "alice")
        es.store.db.db.execute("UPDATE enrol_secrets SET expires = 1 WHERE ref='old'")
        with pytest.raises(FactoryError) as e:
            await es.spend("est", old["secret"], "old", None, "est")
        assert "expired" in e.value.reason
    trio.run(main)


def test_create_refusals(es):
    async def main():
        for args, text in ((("cmp", "issuing", "tls-client", 3600, 1, None), "protocol"),
                           (("scep", "issuing", "tls-client", 3600, 2, None), "one-time"),
                           (("est", "issuing", "sub-ca", 3600, 1, None), "CA certificates"),
                           (("est", "nope", "tls-client", 3600, 1, None), "no CA"),
                           (("est", "issuing", "tls-client", 10, 1, None), "lifetime"),
                           (("est", "issuing", "tls-client", 3600, 1, "bad ref!"), "reference")):
            with pytest.raises(FactoryError) as e:
                await es.create(*args, None, "alice")
            assert text in e.value.reason
        await es.create("est", "issuing", "tls-client", 3600, 1, "dup", None, "alice")
        with pytest.raises(FactoryError) as e:
            await es.create("est", "issuing", "tls-client", 3600, 1, "dup", None, "alice")
        assert e.value.code == "exists"
    trio.run(main)


def test_one_time_secret_raced(es):
    """Twenty concurrent spends of one secret: exactly one wins."""
    async def main():
        made = await es.create("scep", "issuing", "tls-client", 3600, 1, None, None, "alice")
        wins, losses = [], []

        async def one():
            try:
                wins.append(await es.spend("scep", made["secret"], None, None, "scep"))
            except FactoryError:
                losses.append(1)
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        assert (len(wins), len(losses)) == (1, 19)
    trio.run(main)


def test_approval_flag_and_ref_of(es):
    async def main():
        made = await es.create("scep", "issuing", "tls-client", 3600, 1, None, None, "officer:alice uid=0", approval=True)
        assert made["approval"] is True
        assert await es.ref_of("scep", made["secret"], None) == made["ref"]
        assert await es.ref_of("est", made["secret"], None) is None  # bound to its protocol
        assert await es.ref_of("scep", "nope", None) is None
        g = await es.spend("scep", made["secret"], None, None, "scep")
        assert g.approval and g.created_by == "officer:alice uid=0"
        assert await es.ref_of("scep", made["secret"], None) == made["ref"]  # still known once spent
    trio.run(main)


def test_a_refused_issuance_gives_the_use_back(es):
    async def main():
        made = await es.create("scep", "issuing", "tls-client", 3600, 1, None, None, "alice")
        g = await es.spend("scep", made["secret"], None, None, "scep")
        await es.give_back(g.ref, "scep")
        await es.spend("scep", made["secret"], None, None, "scep")  # usable once more, then spent
        with pytest.raises(FactoryError):
            await es.spend("scep", made["secret"], None, None, "scep")
        assert ("scep", "enrol-secret-use", g.ref, "returned") in [r[:4] for r in _audit(es)]
    trio.run(main)
