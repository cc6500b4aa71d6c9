# Donjon developer tasks. `just --list` shows them; run `bash .ci/setup` once first.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv/bin"
# The state folder: DONJON_HOME (a relative one is taken from where just was called), else an absolute
# folder outside the checkout (/var/lib/donjon-demo as root, ~/.local/state/donjon-demo otherwise).
home := if env("DONJON_HOME", "") == "" { `if [ "$(id -u)" = 0 ]; then echo /var/lib/donjon-demo; else echo "${XDG_STATE_HOME:-$HOME/.local/state}/donjon-demo"; fi` } else { clean(join(invocation_directory(), env("DONJON_HOME"))) }

# List the recipes
default:
    @just --list

# Install system packages and the pinned Python environment (idempotent)
setup:
    bash .ci/setup

# Create a demo CA hierarchy in the state folder (once; outside the checkout) and run the appliance in the foreground
demo:
    #!/usr/bin/env bash
    set -euo pipefail
    export PYTHONDONTWRITEBYTECODE=1  # nothing written into the checkout
    home="{{home}}"
    if [ ! -e "$home/cmdb/cmdb.key" ]; then
      mkdir -p "$(dirname "$home")"
      echo "Choose a password (12 characters or more) for the demo officer 'demo' (administrator and operator):"
      {{venv}}/donjon init --home "$home" --ceremony "{{justfile_directory()}}/image/demo-ceremony.toml" --officer demo:administrator+operator
    fi
    url=$({{venv}}/donjon config show --home "$home" --json | {{venv}}/python -c 'import json, sys; from appliance.adminops import endpoint_url; print(endpoint_url(json.load(sys.stdin)["ocsp.listen"]))')
    cat <<MSG
    Donjon is starting on $home (developer mode when not root; stop it with Ctrl-C).
    In another terminal, in a scratch folder (cd "\$(mktemp -d)"):
      export DONJON_HOME=$home PATH={{venv}}:\$PATH
      donjon status
      donjon login --officer demo
      donjon ca list
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout www.key -subj / -addext subjectAltName=DNS:www.example.org -out www.csr
      donjon issue --ca issuing --profile tls-server --csr www.csr --out www.pem      # prints the new serial
      donjon ca export issuing --chain --out chain.pem && openssl verify -x509_strict -CAfile <(donjon ca export root) -untrusted chain.pem www.pem
      openssl ocsp -issuer <(donjon ca export issuing) -cert www.pem -url $url/ocsp -CAfile chain.pem
      donjon revoke --ca issuing SERIAL --reason keyCompromise && donjon ocsp status   # SERIAL: the one issue printed
      curl -s $url/crl/issuing.crl | openssl crl -inform DER -noout -text
    MSG
    exec {{venv}}/donjon run --home "$home"

# Run the appliance on an existing state folder
run *ARGS:
    {{venv}}/donjon run --home "{{home}}" {{ARGS}}

# Run the whole test suite (pass pytest arguments through: just test -k crl); kill -9 at 10 cycles.
# In parallel (pytest-xdist): DONJON_TEST_WORKERS processes (3: appliance tests wait on fsync and on
# their roles as much as they compute), one test module per worker at a time (--dist loadscope), so
# that a module's fixtures (module_appliance, slapd) live in one worker. DONJON_TEST_WORKERS=0: serial.
test *ARGS:
    {{venv}}/python -m pytest -n {{env_var_or_default("DONJON_TEST_WORKERS", "3")}} --dist loadscope {{ARGS}}

# Lint: ruff over the tree, mypy over policy/, appliance/ipc/, the CMDB module and the store (config in pyproject.toml)
lint:
    {{venv}}/ruff check .
    {{venv}}/mypy policy appliance/ipc appliance/factory/cmdb.py appliance/factory/store appliance/factory/errors.py

# The kill -9 test at 1,000 cycles (nothing lost, no serial twice, audit chain intact; DONJON_KILL_CYCLES=N for another count)
torture *ARGS:
    DONJON_KILL_CYCLES={{env_var_or_default("DONJON_KILL_CYCLES", "1000")}} {{venv}}/python -m pytest tests/integration/test_crash.py -m slow {{ARGS}}

# CMP's long runs: the openssl cmp flows against the protocol layer alone and a 5,000-mutation PKIMessage fuzz (-m slow)
cmp-slow *ARGS:
    {{venv}}/python -m pytest tests/unit/test_cmp_openssl.py -m slow {{ARGS}}

# The ACME server judged by real clients: certbot, lego (http-01, tls-alpn-01, dns-01, EAB), uacme (key rollover), dehydrated; about 2 minutes
acme-clients *ARGS:
    {{venv}}/python -m pytest tests/integration/test_gateway.py -m slow {{ARGS}}

# The KGS's batch of 20 smart cards (SoftHSM2 tokens) judged by pkcs11-tool, pdftotext and openssl (just test runs 5)
kgs-cards *ARGS:
    {{venv}}/python -m pytest tests/integration/test_kgs.py -m slow {{ARGS}}

# The drills CI runs after `just test`: the real ACME clients, CMP's long runs, the 20-card KGS batch (every
# `slow` test but the kill -9 torture: issue 15's key backup ceremony, forged share and restore killed -9, and the
# smoke test of the frozen PyInstaller bundle, the 2,000-certificate lint differential); in parallel like `just test`
drills *ARGS:
    {{venv}}/python -m pytest -n {{env_var_or_default("DONJON_TEST_WORKERS", "3")}} --dist loadscope -m slow tests/integration/test_gateway.py tests/unit/test_cmp_openssl.py tests/integration/test_kgs.py tests/integration/test_keybackup.py tests/integration/test_restore.py tests/integration/test_frozen.py tests/unit/test_lint_walk.py {{ARGS}}

# Run the unit tests only (no appliance processes)
test-unit *ARGS:
    {{venv}}/python -m pytest tests/unit {{ARGS}}

# Benchmarks side by side with the peers (openssl ca, raw SoftHSM signing); --quick for a short run
bench *ARGS:
    {{venv}}/python -m bench.run {{ARGS}}

# What the admin CLI offers
help:
    {{venv}}/donjon --help

# Build the PyInstaller onedir bundle into dist/donjon (runtime-only environment; image/README)
binary:
    bash image/build-binary

# Build the appliance disk images (raw + qcow2 + SBOM) into dist/image: just image [offline-root|online-ca]
image *PROFILES="online-ca offline-root":
    for p in {{PROFILES}}; do bash image/mkimage "$p" dist/image; done

# Build both images, boot both in QEMU at once and carry a virtual vfat USB stick between them (two-tier PKI, SSH, clock; image/README)
image-test *ARGS:
    {{venv}}/python -m pytest image/tests -p no:cacheprovider --basetemp=/var/tmp/donjon-image-test -s {{ARGS}}

# Rebuild an image offline, bit for bit, from the package set an earlier `just image` kept (image/README)
image-rebuild PROFILE DEBS OUT="dist/image-rebuild":
    DONJON_IMAGE_DEBS={{DEBS}} bash image/mkimage {{PROFILE}} {{OUT}}

# Build an image twice from the same package set (mirror of the day, then offline) and compare the hashes
image-repro PROFILE="offline-root":
    bash image/repro {{PROFILE}}
