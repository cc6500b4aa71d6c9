"""The image's package set (image/debset.py): kept from a build, checked against signed indexes, and
refused whole when anything in it was changed."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBSET = REPO / "image" / "debset.py"
LISTS = "var/lib/apt/lists"
PREFIX = "test.example_debian_dists_bookworm_"  # how apt names the list files of one suite
PKGS = [("donjon-test-a", "1.0-1", "amd64"), ("donjon-test-b", "2:3.1+deb12u1", "all")]


def _file(name: str, version: str, arch: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _deb(tmp: Path, name: str, version: str, arch: str) -> Path:
    """A real (tiny) .deb built by dpkg-deb."""
    d = tmp / f"src-{name}"
    (d / "DEBIAN").mkdir(parents=True)
    (d / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Donjon <d@example.org>\n"
        f"Description: test package\n")
    (d / "usr/share" / name).mkdir(parents=True)
    (d / "usr/share" / name / "data").write_text(name)
    out = tmp / _file(name, version, arch)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(d), str(out)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A build root as mmdebstrap leaves it: apt's lists, signed (by a throwaway test archive key, the
    fake: only Debian holds Debian's key) and the downloaded .debs in apt's cache."""
    tmp = tmp_path_factory.mktemp("debset")
    root = tmp / "root"
    (root / LISTS).mkdir(parents=True)
    (root / "var/cache/apt/archives").mkdir(parents=True)
    stanzas = []
    for name, version, arch in PKGS:
        deb = _deb(tmp, name, version, arch)
        shutil.copy(deb, root / "var/cache/apt/archives" / deb.name)
        data = deb.read_bytes()
        stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nPriority: required\n"
                       f"Filename: pool/main/d/{name}/{deb.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    packages = "\n".join(stanzas).encode()
    (root / LISTS / f"{PREFIX}main_binary-amd64_Packages").write_bytes(packages)
    release = tmp / "Release"
    release.write_text(f"Origin: Test\nSuite: stable\nCodename: bookworm\nSHA256:\n"
                       f" {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n")
    home = tmp / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]
    try:
        subprocess.run([*gpg, "--quick-gen-key", "Donjon test archive key", "ed25519", "sign", "never"], check=True,
                       capture_output=True)
        subprocess.run([*gpg, "--clearsign", "-o", str(root / LISTS / f"{PREFIX}InRelease"), str(release)],
                       check=True, capture_output=True)
        keyring = tmp / "test-archive-keyring.gpg"
        keyring.write_bytes(subprocess.run([*gpg, "--export"], check=True, capture_output=True).stdout)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    installed = tmp / "installed.txt"
    installed.write_text("".join(f"{n} {v} {a}\n" for n, v, a in sorted(PKGS)))
    return {"root": root, "installed": installed, "keyring": keyring, "tmp": tmp}


def _run(archive, *args: str, keyring: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DONJON_DEBIAN_KEYRING": str(keyring or archive["keyring"])}
    return subprocess.run([sys.executable, str(DEBSET), *map(str, args)], capture_output=True, text=True, env=env)


def _collect(archive, out: Path) -> Path:
    r = _run(archive, "collect", archive["root"], archive["installed"], out)
    assert r.returncode == 0, r.stderr
    return out


def _refused(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 1
    assert r.stderr.startswith("debset: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_kept_set_rebuilds_a_repository_of_exactly_its_packages(archive, tmp_path):
    s = _collect(archive, tmp_path / "set")
    manifest = (s / "packages.txt").read_text().splitlines()
    debs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (s / "debs").iterdir()}
    assert manifest == sorted(f"{n} {v} {a} {debs[_file(n, v, a)]}" for n, v, a in PKGS)
    assert sorted(p.name for p in (s / "indexes").iterdir()) == [f"{PREFIX}InRelease",
                                                                 f"{PREFIX}main_binary-amd64_Packages.gz"]
    r = _run(archive, "verify", s, tmp_path / "repo")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted([*debs, "Packages", "Release"])
    index = (tmp_path / "repo" / "Packages").read_text()
    # Debian's stanza (Priority decides minbase), its Filename pointing at the copy beside it.
    assert "Filename: ./donjon-test-b_2%3a3.1+deb12u1_all.deb\n" in index and "Priority: required" in index
    assert "pool/" not in index
    release = (tmp_path / "repo" / "Release").read_text()
    assert "Codename: bookworm\n" in release  # how mmdebstrap finds the essential and required packages
    assert f" {hashlib.sha256(index.encode()).hexdigest()} {len(index.encode())} Packages\n" in release


def test_tampered_or_incomplete_sets_are_refused(archive, tmp_path):
    good = _collect(archive, tmp_path / "good")

    def variant(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    deb_a = "donjon-test-a_1.0-1_amd64.deb"
    s = variant("tampered-deb")
    with open(s / "debs" / deb_a, "ab") as f:
        f.write(b"\0")
    _refused(_run(archive, "verify", s, tmp_path / "r1"), f"{deb_a}: differs from the manifest or the signed index")

    s = variant("missing-deb")
    (s / "debs" / deb_a).unlink()
    _refused(_run(archive, "verify", s, tmp_path / "r2"), f"{deb_a}: missing from")

    s = variant("extra-deb")
    shutil.copy(s / "debs" / deb_a, s / "debs" / "evil_1_amd64.deb")
    _refused(_run(archive, "verify", s, tmp_path / "r3"), "evil_1_amd64.deb: in ")

    # A replaced .deb with the manifest rewritten to match: the signed index still catches it.
    s = variant("manifest-rewritten")
    evil = _deb(tmp_path, "donjon-test-a", "1.0-1", "amd64")  # a different build of the "same" package
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", "-Zxz", str(tmp_path / "src-donjon-test-a"),
                    str(evil)], check=True, capture_output=True)
    shutil.copy(evil, s / "debs" / deb_a)
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    lines = [ln if not ln.startswith("donjon-test-a ") else " ".join([*ln.split()[:3], digest])
             for ln in (s / "packages.txt").read_text().splitlines()]
    (s / "packages.txt").write_text("\n".join(lines) + "\n")
    _refused(_run(archive, "verify", s, tmp_path / "r4"), f"{deb_a}: differs from the manifest or the signed index")

    # The index edited to match the replaced .deb: it no longer matches the signed InRelease.
    idx = s / "indexes" / f"{PREFIX}main_binary-amd64_Packages.gz"
    text = gzip.decompress(idx.read_bytes()).decode()
    old = next(ln for ln in text.splitlines() if ln.startswith("SHA256: "))
    idx.write_bytes(gzip.compress(text.replace(old, f"SHA256: {digest}", 1).encode()))
    _refused(_run(archive, "verify", s, tmp_path / "r5"), "does not match the signed")

    s = variant("bad-manifest")
    (s / "packages.txt").write_text("donjon-test-a 1.0-1 amd64 nothex\n")
    _refused(_run(archive, "verify", s, tmp_path / "r6"), "packages.txt line 1: not 'name version arch sha256'")


def test_indexes_not_signed_by_debian_are_refused(archive, tmp_path):
    """The default keyring is Debian's archive keyring: our test archive key is not in it."""
    s = _collect(archive, tmp_path / "set")
    _refused(_run(archive, "verify", s, tmp_path / "repo", keyring=Path("/usr/share/keyrings/debian-archive-keyring.gpg")),
             "not signed by a Debian archive key")
    assert not (tmp_path / "repo" / "Packages").exists()


def test_collect_refuses_a_package_outside_the_signed_indexes(archive, tmp_path):
    installed = tmp_path / "installed.txt"
    installed.write_text(archive["installed"].read_text() + "donjon-test-c 1 amd64\n")
    r = _run(archive, "collect", archive["root"], installed, tmp_path / "set")
    _refused(r, "donjon-test-c 1 amd64: installed but in none of the signed indexes")


def test_sbom_records_each_deb_hash(archive, tmp_path):
    s = _collect(archive, tmp_path / "set")
    python = tmp_path / "python.txt"
    python.write_text("trio==0.25.0\n")
    (tmp_path / "bundle").mkdir()
    r = subprocess.run([sys.executable, str(REPO / "image" / "sbom.py"), "online-ca", str(s / "packages.txt"), str(python),
                        str(tmp_path / "bundle")], capture_output=True, text=True, check=True,
                       env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    comps = {c["name"]: c for c in json.loads(r.stdout)["components"]}
    manifest = {ln.split()[0]: ln.split() for ln in (s / "packages.txt").read_text().splitlines()}
    for name, (_, version, arch, digest) in manifest.items():
        assert comps[name]["version"] == version
        assert comps[name]["purl"] == f"pkg:deb/debian/{name}@{version}?arch={arch}&distro=bookworm"
        assert comps[name]["hashes"] == [{"alg": "SHA-256", "content": digest}]
    assert "hashes" not in comps["trio"]
