"""The closing note of `just bench`: the rows of issue 19's table, each with its figure, its peer's and the ratio."""

from __future__ import annotations

from typing import Any

MB = 2 ** 20


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}/s"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(workload, Donjon, peer, ratio, goal) for every part of the run that was measured."""
    out: list[tuple[str, str, str, str, str]] = []
    iss = res.get("issuance")
    if iss:
        for kt, label in (("p256", "P-256"), ("rsa2048", "RSA-2048")):
            r = iss["key_types"].get(kt)
            if not r:
                continue
            o = r["openssl"]["rate"]
            lint, nolint = r["donjon"]["tls-server"]["rate"], r["donjon"]["tls-server-nolint"]["rate"]
            out.append((f"issuance {label}, every leaf linted", _rate(lint), f"openssl ca {_rate(o)}", _ratio(lint, o), ">= 1.0x"))
            out.append((f"issuance {label}, lint off", _rate(nolint), f"openssl ca {_rate(o)}", _ratio(nolint, o), ">= 2x"))
            lc = r.get("lint_cpu_ms_per_cert")
            if lc is not None:
                out.append((f"lint CPU per certificate, {label}", f"{lc:.2f} ms", "issue 19 measured ~9 ms", "", ">= 5x less"))
    oc = res.get("ocsp")
    if oc:
        d, c, o = oc["donjon"], oc["cfssl"], oc["openssl"]["p256"]["conns"]
        dp, cp, op = d["post"]["64"]["rps"], c["post"]["64"]["rps"], o["64"]["rps"]
        out.append(("OCSP POST, 64 connections", _rate(dp), f"cfssl ocspserve {_rate(cp)}", _ratio(dp, cp), ">= 1.0x"))
        al = d.get("alternated")
        if al:  # the endpoint-alone goal: the median of alternated rounds, with their spread and the machine's load
            out.append((f"OCSP POST, 64 connections, endpoint alone ({len(al['rounds'])} alternated rounds, "
                        f"load {al['load1_min']:.0f}-{al['load1_max']:.0f})", _rate(al["median_donjon"]),
                        f"openssl ocsp P-256 {_rate(al['median_openssl'])}",
                        f"{al['median_ratio']:.2f}x ({al['min_ratio']:.2f}-{al['max_ratio']:.2f}x)", ">= 2x"))
        else:
            out.append(("OCSP POST, 64 connections", _rate(dp), f"openssl ocsp P-256 {_rate(op)}", _ratio(dp, op), ">= 2x"))
        ng = d.get("nginx")
        if ng:
            np_, ng_ = ng["post"]["64"]["rps"], ng["get"]["64"]["rps"]
            out.append(("OCSP POST, 64 connections, behind nginx", _rate(np_), f"cfssl ocspserve {_rate(cp)}", _ratio(np_, cp), ">= 1.0x"))
            out.append(("OCSP GET, 64 connections, behind nginx", _rate(ng_), f"cfssl ocspserve {_rate(cp)}", _ratio(ng_, cp), ">= 1.0x"))
            rv = ng["revocation"]
            out.append(("OCSP behind nginx: revocation shown", f"{rv['seconds']:.1f} s", f"ocsp.max-age {rv['bound_seconds']} s + 1 s re-sign",
                        "within" if rv["within_bound"] else "LATE", "<= bound"))
    di = res.get("dist")
    if di:
        lr = di["ldapadd"].get("rate") if isinstance(di.get("ldapadd"), dict) else None
        out.append(("publication backlog drain to slapd", _rate(di["drain_rate"]), f"ldapadd {_rate(lr)}",
                    f"{di['ratio_drain_vs_ldapadd']:.2f}x", ">= 1.0x"))
    crl = res.get("crl")
    if crl:
        for n, r in crl["sizes"].items():
            if int(n) < 1_000_000:
                continue
            dd, oo = r["donjon"], r["openssl"]
            out.append((f"CRL {int(n):,} entries", f"{dd['seconds']:.1f} s, {dd['peak'] / MB:.0f} MB",
                        f"openssl ca -gencrl {oo['seconds']:.1f} s, {oo['peak'] / MB:.0f} MB",
                        f"{r['time_ratio']:.2f}x, {r['mem_ratio']:.2f}x", "<= 3 s, <= 100 MB"))
        sh = crl.get("shards")
        if sh:
            dd, oo = sh["donjon"], sh["openssl"]
            secs = dd["shards_seconds"] if dd.get("shards_seconds") is not None else dd["seconds"]
            out.append((f"CRL {sh['shards']} shards of {sh['entries']:,} entries", f"{secs:.1f} s, {dd['peak'] / MB:.0f} MB",
                        f"openssl ca -gencrl x{sh['shards']} {oo['seconds']:.1f} s, {oo['peak'] / MB:.0f} MB",
                        f"{sh['time_ratio']:.2f}x, {sh['mem_ratio']:.2f}x", "<= 3 s in total"))
    return out


def table(res: dict[str, Any]) -> str:
    rs = rows(res)
    if not rs:
        return ""
    w = [max(len(r[i]) for r in rs + [("workload", "Donjon", "peer", "ratio", "goal")]) for i in range(5)]
    head = ("workload", "Donjon", "peer", "ratio", "goal")
    lines = ["Issue 19's table from this run (ratios = Donjon/peer):",
             "  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "-" * (sum(w) + 8)]
    lines[1] = lines[1].rstrip()
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rs]
    return "\n".join(lines)
