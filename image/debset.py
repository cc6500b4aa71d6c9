"""The image's package set: the .debs a build installed, checked against Debian's signed indexes, kept
as a build artefact (collect) and turned back into a local repository for an offline rebuild (verify)."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KEYRING = os.environ.get("DONJON_DEBIAN_KEYRING", "/usr/share/keyrings/debian-archive-keyring.gpg")
APT_HELPER = "/usr/lib/apt/apt-helper"
NAME_RX = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
VERSION_RX = re.compile(r"^[A-Za-z0-9.+~:-]+$")
ARCH_RX = re.compile(r"^(all|amd64)$")
SHA_RX = re.compile(r"^[0-9a-f]{64}$")
Key = tuple[str, str, str]  # package, version, architecture


class SetError(Exception):
    """A package set that must not be used (one line for the operator)."""


def deb_name(name: str, version: str, arch: str) -> str:
    """The file name apt gives a downloaded package (an epoch's ':' becomes %3a)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _signed_text(inrelease: Path) -> str:
    """What the Debian archive key signed in an InRelease file (gpgv's output, never our own parse of
    the clear-signed text, so that nothing outside the signature can slip in)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "release"
        r = subprocess.run(["gpgv", "--keyring", KEYRING, "--output", str(out), str(inrelease)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetError(f"{inrelease.name}: not signed by a Debian archive key ({KEYRING})")
        return out.read_text(encoding="utf-8")


def _release_hashes(release: str) -> dict[str, tuple[str, int]]:
    hashes: dict[str, tuple[str, int]] = {}
    section = False
    for line in release.splitlines():
        if not line.startswith(" "):
            section = line.strip() == "SHA256:"
            continue
        if section:
            digest, size, path = line.split()
            hashes[path] = (digest, int(size))
    return hashes


def _stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        if "Package" in fields:
            fields["_text"] = block.strip("\n")
            out.append(fields)
    return out


def signed_packages(indexes: Path) -> dict[Key, dict[str, str]]:
    """Every package stanza of apt's list files in indexes (LISTS folder or an artefact's copy) whose
    Packages file hashes to what a verified InRelease names."""
    found: dict[Key, dict[str, str]] = {}
    releases = sorted(indexes.glob("*_InRelease"))
    if not releases:
        raise SetError(f"{indexes}: no InRelease index")
    for inrelease in releases:
        prefix = inrelease.name[: -len("InRelease")]
        hashes = _release_hashes(_signed_text(inrelease))
        for lst in sorted(indexes.glob(prefix + "*_Packages*")):
            rel = lst.name[len(prefix):]
            rel = re.sub(r"\.(lz4|gz|xz|zst|bz2)$", "", rel).replace("_", "/")
            text = subprocess.run([APT_HELPER, "cat-file", str(lst)], capture_output=True, check=True).stdout
            if rel not in hashes or hashes[rel] != (hashlib.sha256(text).hexdigest(), len(text)):
                raise SetError(f"{lst.name}: does not match the signed {inrelease.name}")
            for st in _stanzas(text.decode("utf-8")):
                found.setdefault((st["Package"], st["Version"], st["Architecture"]), st)
    return found


def read_manifest(path: Path) -> dict[Key, str]:
    """name version arch sha256, one package a line."""
    out: dict[Key, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if len(parts) != 4 or not (NAME_RX.match(parts[0]) and VERSION_RX.match(parts[1])
                                   and ARCH_RX.match(parts[2]) and SHA_RX.match(parts[3])):
            raise SetError(f"{path.name} line {n}: not 'name version arch sha256'")
        out[(parts[0], parts[1], parts[2])] = parts[3]
    return out


def collect(root: Path, installed: Path, out: Path) -> None:
    """Copy the .deb of every installed package from the build's apt cache into out/debs, with the
    signed indexes they came from (out/indexes) and the manifest (out/packages.txt)."""
    signed = signed_packages(root / "var/lib/apt/lists")
    archives = root / "var/cache/apt/archives"
    (out / "debs").mkdir(parents=True)
    (out / "indexes").mkdir()
    lines = []
    for line in installed.read_text(encoding="utf-8").splitlines():
        key = tuple(line.split())
        assert len(key) == 3, line
        st = signed.get(key)  # type: ignore[arg-type]
        if st is None:
            raise SetError(f"{' '.join(key)}: installed but in none of the signed indexes")
        src = archives / deb_name(*key)
        if not src.is_file():
            raise SetError(f"{src.name}: installed but not in the apt cache of this build")
        dst = out / "debs" / src.name
        shutil.copyfile(src, dst)
        digest = _sha256(dst)
        if digest != st["SHA256"]:
            raise SetError(f"{src.name}: differs from the signed index")
        lines.append(f"{' '.join(key)} {digest}\n")
    for f in (root / "var/lib/apt/lists").iterdir():
        if f.is_file() and f.name.endswith("_InRelease"):
            shutil.copyfile(f, out / "indexes" / f.name)
        elif f.is_file() and f.name.endswith("_Packages"):  # ≈ 90 MB as apt keeps them: gzip (mtime 0)
            with open(f, "rb") as src, gzip.GzipFile(out / "indexes" / f"{f.name}.gz", "wb", mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        elif f.is_file() and "_Packages." in f.name:
            shutil.copyfile(f, out / "indexes" / f.name)
    (out / "packages.txt").write_text("".join(sorted(lines)), encoding="utf-8")


def verify(setdir: Path, repo: Path) -> None:
    """Check a kept package set (manifest, signed indexes, every .deb) and write a flat repository of
    exactly those packages in repo (copies, hashed as copied: a later change to setdir cannot reach
    the build)."""
    manifest = read_manifest(setdir / "packages.txt")
    signed = signed_packages(setdir / "indexes")
    debs = setdir / "debs"
    wanted = {deb_name(*k): k for k in manifest}
    present = {p.name for p in debs.iterdir()} if debs.is_dir() else set()
    if missing := sorted(set(wanted) - present):
        raise SetError(f"{missing[0]}: missing from {debs} ({len(missing)} missing)")
    if extra := sorted(present - set(wanted)):
        raise SetError(f"{extra[0]}: in {debs} but not in the manifest ({len(extra)} extra)")
    repo.mkdir(parents=True)
    stanzas = []
    for fname, key in sorted(wanted.items()):
        st = signed.get(key)
        if st is None:
            raise SetError(f"{' '.join(key)}: in none of the signed indexes")
        dst = repo / fname
        shutil.copyfile(debs / fname, dst)
        digest = _sha256(dst)
        if not digest == manifest[key] == st["SHA256"]:
            raise SetError(f"{fname}: differs from the manifest or the signed index")
        # Debian's own stanza (its Priority and Essential fields decide minbase), pointing at the copy.
        stanzas.append(re.sub(r"(?m)^Filename: .*$", f"Filename: ./{fname}", st["_text"]))
    index = ("\n\n".join(stanzas) + "\n").encode()
    (repo / "Packages").write_bytes(index)
    # mmdebstrap picks the Essential and Priority: required packages of the suite by its codename.
    (repo / "Release").write_text(
        "Origin: Donjon package set\nSuite: stable\nCodename: bookworm\nArchitectures: amd64 all\n"
        f"SHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} Packages\n", encoding="utf-8")


def main() -> None:
    try:
        match sys.argv[1:]:
            case ["collect", root, installed, out]:
                collect(Path(root), Path(installed), Path(out))
            case ["verify", setdir, repo]:
                verify(Path(setdir), Path(repo))
            case _:
                raise SetError("usage: debset.py collect ROOT INSTALLED OUT | verify SET REPO")
    except SetError as e:
        sys.exit(f"debset: {e}")
    except OSError as e:
        sys.exit(f"debset: {e.filename or ''}: {e.strerror}")


if __name__ == "__main__":
    main()
