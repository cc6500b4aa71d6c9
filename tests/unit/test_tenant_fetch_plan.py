"""The Factory's fetch plan for tenant CRLs (what the Distribution agent fetches, and when)."""

from __future__ import annotations

from appliance.factory.store import Store
from appliance.factory.tenants import RETRY_SECONDS, Info, TenantManager


def info(name: str, urls=("http://x/ca.crl",), refresh=3600, crl_at=None, nu=None) -> Info:
    return Info(name, b"", list(urls), refresh, "unknown", None, None, None, None, None, 1 if nu else None, None, nu,
                None, crl_at, False, None)


def test_fetch_plan():
    m = TenantManager(Store(), None, None)  # type: ignore[arg-type]  # the plan needs no feed
    now = 1_000_000.0
    m.info = {"new": info("new"), "manual": info("manual", urls=()),
              "fresh": info("fresh", crl_at=now - 100, nu=now + 86400),
              "soon": info("soon", crl_at=now - 100, nu=now + 600),
              "lapsed": info("lapsed", crl_at=now - 7200, nu=now - 60)}
    plan = {n: (urls, t) for n, urls, t in m.fetch_plan(now)}
    assert "manual" not in plan  # no URL: uploads and pushes only
    assert plan["new"] == (["http://x/ca.crl"], now)  # nothing held: at once
    assert plan["fresh"][1] == now - 100 + 3600  # the refresh interval
    assert plan["soon"][1] == now + 600  # at nextUpdate when that comes first
    m.attempts["lapsed"] = now - 10  # an attempt after nextUpdate found nothing newer: retry shortly
    assert dict((n, t) for n, _, t in m.fetch_plan(now))["lapsed"] == now - 10 + RETRY_SECONDS
    m.attempts["new"] = now - 5
    assert dict((n, t) for n, _, t in m.fetch_plan(now))["new"] == now - 5 + RETRY_SECONDS  # a refused first CRL
