"""Write the image's CycloneDX SBOM: every Debian package of the image (with its .deb's hash), every
Python package of the bundle, and the build host's Debian packages whose libraries PyInstaller copied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid


def deb(name: str, version: str, arch: str, scope: str, sha256: str | None = None) -> dict:
    c = {"type": "library", "name": name, "version": version, "scope": "required",
         "purl": f"pkg:deb/debian/{name}@{version}?arch={arch}&distro=bookworm",
         "properties": [{"name": "donjon:where", "value": scope}]}
    if sha256:  # the .deb the image was built from (its package set, dist/image/NAME.debs)
        c["hashes"] = [{"alg": "SHA-256", "content": sha256}]
    return c


def main() -> None:
    profile, manifest, bundle_python, bundle_dir = sys.argv[1:5]
    comps = []
    with open(manifest, encoding="utf-8") as f:  # name version arch sha256 (image/debset.py)
        for line in f:
            name, version, arch, sha256 = line.split()
            comps.append(deb(name, version, arch, "image", sha256))
    with open(bundle_python, encoding="utf-8") as f:
        for line in f:
            name, _, version = line.strip().partition("==")
            if name:
                comps.append({"type": "library", "name": name, "version": version, "scope": "required",
                              "purl": f"pkg:pypi/{name.lower()}@{version}",
                              "properties": [{"name": "donjon:where", "value": "/opt/donjon"}]})
    # Shared libraries copied from the build host (libpython, libffi, ...): name the Debian package.
    libs = sorted(os.path.realpath(os.path.join(r, n)) for r, _, ns in os.walk(bundle_dir) for n in ns if ".so" in n)
    owners: dict[tuple[str, str, str], None] = {}
    for lib in libs:
        base = os.path.basename(lib)
        r = subprocess.run(["dpkg", "-S", f"*/{base}"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            pkg = line.split(":", 1)[0].split(",")[0].strip()
            if "/lib/" not in line:
                continue
            q = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Architecture}", pkg],
                               capture_output=True, text=True)
            if q.returncode == 0 and q.stdout:
                owners[tuple(q.stdout.split())] = None
            break
    for name, version, arch in owners:
        comps.append(deb(name, version, arch, "/opt/donjon (copied from the build host)"))
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    import datetime
    ts = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "bomFormat": "CycloneDX", "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'donjon-{profile}-{epoch}')}",
        "version": 1,
        "metadata": {"timestamp": ts, "component": {"type": "operating-system", "name": f"donjon-{profile}"}},
        "components": sorted(comps, key=lambda c: (c["purl"])),
    }
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
