"""`donjon console`: the numbered appliance menu; every input is a menu number or a validated value."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from appliance import adminops as ops
from appliance.adminops import OpError
from appliance.console import media as M
from appliance.console.session import Session, ask_login, refusal
from appliance.console.term import Term

CSR_SUFFIXES = (".csr", ".req", ".pem", ".der", ".p10")
MAX_LOGIN_TRIES = 3


class Exit(Exception):
    """Leave the console (logout, shutdown)."""


class Console:
    def __init__(self, home: str, term: Term, ssh: bool = False):
        self.home = home
        self.t = term
        self.ssh = ssh
        self.s = Session(home)
        # Short labels in two columns: the menu and an action's output fit together on 24 lines.
        self.items: list[tuple[str, Callable[[], None]]] = [
            ("Status", self.status),
            ("Activate the CA", self.activate),
            ("Ceremonies", self.ceremony),
            ("Issue from a CSR on media", self.issue),
            ("Certificates: list, export", self.certificates),
            ("Revoke a certificate", self.revoke),
            ("CRL: sign, export", self.crl),
            ("Officers", self.officers),
            ("Audit: verify, export", self.audit),
            ("Network and endpoint", self.settings),
            ("Distribution: status, retry", self.distribution),
            ("Backup to media", self.backup),
            ("Shutdown", self.shutdown),
            ("Cards: personalise, PIN letters", self.cards),
            ("Clock: show, set", self.clock),
            ("Removable media (USB)", self.media),
            ("CRL calendar: load, status", self.calendar),
            ("Officers' SSH keys", self.ssh_keys),
            ("Key backup to media", self.key_backup),
            ("CA: request, install (media)", self.ca_tier),
        ]

    # ------------------------------------------------------------ loop

    def run(self) -> int:
        where = "ssh" if self.ssh else os.ttyname(0).removeprefix("/dev/") if self.t.tty else "console"
        self.t.say(f"Donjon appliance console on {socket.gethostname()} ({where})")
        try:
            if not self._activated():
                self.t.say("The CA is not activated. Officers log in once it is (their accounts are in the",
                           "locked database): activate it now with the token PIN.")
                if not self._pre_activation():
                    return 0
            if not self._authenticate():
                return 1
            self.menu()
        except (EOFError, Exit):
            pass
        finally:
            self.s.close()
        self.t.say("bye")
        return 0

    def _activated(self) -> bool:
        try:
            return bool(ops.status(self.s.client)["activated"])
        except OpError as e:
            self.t.say(f"error: {e}")
            raise Exit from None

    def _pre_activation(self) -> bool:
        while True:
            self.t.say("", " 1  Status", " 2  Activate the CA", " 0  Exit")
            a = self._ask_choice()
            if a == "1":
                self._guard(self.status)
            elif a == "2":
                self._guard(self.activate)
                if self._activated():
                    return True
            elif a in ("0", "q"):
                return False
            elif a:
                self.t.say("unknown command")

    def _authenticate(self) -> bool:
        for _ in range(MAX_LOGIN_TRIES):
            try:
                officer = self.t.ask("officer: ").strip()
                if not officer:
                    continue
                client, token = ask_login(self.t, self.home, officer)
            except OpError as e:
                self.t.say(refusal(e))
                continue
            except KeyboardInterrupt:
                self.t.say("")
                continue
            self.s.reset()
            self.s = Session(self.home, officer, client, token)
            if token is None:
                self.t.say("(this appliance has no officer login yet: admitted by the admin socket's credentials)")
            self.t.say(f"logged in as {officer}")
            return True
        self.t.say("too many failed logins")
        return False

    def _ask_choice(self) -> str:
        try:
            return self.t.ask("choice> ").strip().lower()
        except KeyboardInterrupt:  # Ctrl-C at the menu: a fresh menu, never a way out
            self.t.say("")
            return ""

    def menu(self) -> None:
        while True:
            self.t.say("", f"== Donjon menu ({self.s.officer or 'officer'}) ==")
            half = (len(self.items) + 1) // 2
            for r in range(half):
                left = f"{r + 1:>3}  {self.items[r][0]}"
                right = f"{r + 1 + half:>3}  {self.items[r + half][0]}" if r + half < len(self.items) else ""
                self.t.say(f"{left:<40}{right}".rstrip())
            self.t.say("  0  Log out")
            a = self._ask_choice()
            if a in ("0", "q", "quit", "exit", "logout"):
                return
            if a.isdigit() and 1 <= int(a) <= len(self.items):
                self._guard(self.items[int(a) - 1][1])
            elif a:
                self.t.say("unknown command")

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run one menu action: domain errors are one line, Ctrl-C returns here (EOF and Exit leave)."""
        try:
            fn()
        except OpError as e:
            self.t.say(f"error: {e}")
        except ops.PendingApproval as e:
            self.t.say(str(e))
        except KeyboardInterrupt:
            self.s.reset()
            self.t.say("", "interrupted")

    # ------------------------------------------------------------ prompts

    def _pick_ca(self) -> str | None:
        cas = ops.ca_list(self.s.client)
        if not cas:
            raise OpError("no CA")
        i = self.t.choose("CA", [f"{c['name']}  ({c['subject']})" for c in cas])
        return None if i is None else cas[i]["name"]

    def _ask_name(self, prompt: str, default: str | None = None, what: str = "name") -> str | None:
        a = self.t.ask(f"{prompt}{f' [{default}]' if default else ''}: ").strip()
        if not a:
            return default
        return ops.check_name(a, what)

    def _ask_int(self, prompt: str, lo: int, hi: int) -> int | None:
        a = self.t.ask(f"{prompt} (Enter: default): ").strip()
        if not a:
            return None
        if not a.isdigit() or not lo <= int(a) <= hi:
            raise OpError(f"{a[:20]!r} is not a number from {lo} to {hi}")
        return int(a)

    def _pick_file(self, media: str, suffixes: tuple[str, ...], what: str) -> str | None:
        files = M.list_files(media, suffixes, subfolders=True)  # a ceremony's output folder too
        if files:
            self.t.say(f"{what} on the media ({media}):")
            for i, f in enumerate(files, 1):
                self.t.say(f"{i:>3}  {f}")
        else:
            self.t.say(f"no {what} on the media ({media})")
        a = self.t.ask(f"{what}: number or file name (Enter: back)> ").strip()
        if not a:
            return None
        if a.isdigit() and 1 <= int(a) <= len(files):
            return files[int(a) - 1]
        return M.check_file_name(a)

    # ------------------------------------------------------------ actions

    def status(self) -> None:
        doc = ops.status(self.s.client)
        lines = ops.status_lines(doc)
        if doc["activated"]:
            lines += ["", "CAs:"] + ops.ca_list_lines(ops.ca_list(self.s.client))
            lines += ["", "OCSP:"] + ops.ocsp_status_lines(ops.ocsp_status(self.s.client))
        self.t.page(lines)

    def activate(self) -> None:
        i = self.t.choose("activate with", ["the token PIN", "a quorum of officers' PIN shares"])
        if i == 0:
            pin = self.t.secret("token PIN: ")
            if not pin:
                return
            doc = ops.activate(self.s.client, pin)
        elif i == 1:
            n = self._ask_int("how many shares (the quorum)", 1, 16)
            if n is None:
                return
            shares = [self.t.secret(f"share {k + 1} of {n} (its officer types it): ").strip() for k in range(n)]
            doc = ops.activate_shares(self.s.client, shares)
        else:
            return
        self.t.say(f"activated: {doc['token']}")

    def ceremony(self) -> None:
        from appliance.console import ceremony as CER
        media = M.media_dir(self.home)
        name = self._pick_file(media, (".toml",), "ceremony file")
        if name is None:
            return
        path = M.path_in(media, name)
        rc = CER.run_file(self.home, path, self.t, out_base=media)
        self.t.say("ceremony complete" if rc == 0 else "ceremony did not complete")

    def issue(self) -> None:
        media = M.media_dir(self.home)
        name = self._pick_file(media, CSR_SUFFIXES, "CSR")
        if name is None:
            return
        der = ops.der_of(M.read(media, name), "CSR")
        ca = self._pick_ca()
        if ca is None:
            return
        profile = self._ask_name("profile", "tls-server", "profile")
        days = self._ask_int("validity in days", 1, 40 * 366)
        pem, docs, failed = ops.issue(self.s.client, ca, profile, [der], days, [name])
        d = docs[0]
        if failed:
            raise OpError(f"{name}: refused: {d['error']}")
        stem = name.rsplit(".", 1)[0]
        out = M.write_to_media(media, f"{stem}-{d['serial'][:16]}.pem", pem)
        self.t.say(f"issued {ca}/{d['serial']}", f"  -> media: {os.path.basename(out)}")

    def cards(self) -> None:
        """The KGS: a batch file from the media, the card records, the PIN letters to the media (once)."""
        i = self.t.choose("cards", ["Personalise a batch file on the media", "Card records", "PIN letters of a batch to the media"])
        media = M.media_dir(self.home)
        if i == 0:
            name = self._pick_file(media, (".csv", ".json"), "batch file")
            if name is None:
                return
            profile = self._ask_name("card profile", "employee", "card profile")
            batch = ops.check_name(name.rsplit(".", 1)[0], "batch")
            doc = ops.kgs_personalise(self.s.client, profile or "employee", batch, M.read(media, name))
            total = doc["subjects"]
            self.t.say(f"batch {batch}: {total} subject(s) sent to the KGS")
            deadline = time.monotonic() + 24 * 3600
            while time.monotonic() < deadline:
                st = ops.kgs_cards(self.s.client, batch)
                states = [c["state"] for c in st["cards"]]
                self.t.say(f"  {states.count('done')} done, {states.count('failed')} failed of {total}")
                if batch not in st.get("running", []):
                    break
                time.sleep(2)
        elif i == 1:
            self.t.page(ops.kgs_cards_lines(ops.kgs_cards(self.s.client)["cards"]) or ["no cards"])
        elif i == 2:
            batch = self._ask_name("batch", None, "batch")
            if not batch:
                return
            letters = ops.kgs_letters(self.s.client, batch)
            for card, pdf in letters:
                M.write_to_media(media, f"{batch}-card-{card}.pdf", pdf)
            self.t.say(f"{len(letters)} PIN letter(s) -> media" if letters else "no letters waiting for this batch")

    def certificates(self) -> None:
        i = self.t.choose("certificates", ["List the latest certificates", "Export a certificate to the media",
                                           "Export a CA certificate chain to the media"])
        if i == 0:
            self.t.page(ops.cert_list_lines(ops.cert_list(self.s.client, None, 200)) or ["no certificates"])
        elif i == 1:
            ca = self._pick_ca()
            if ca is None:
                return
            serial = ops.parse_serial(self.t.ask("serial (hex): ").strip())
            doc = ops.cert_show(self.s.client, ca, serial)
            out = M.write_to_media(M.media_dir(self.home), f"{ca}-{serial.hex()[:16]}.pem", doc["pem"].encode())
            self.t.say(f"exported -> media: {os.path.basename(out)}")
        elif i == 2:
            ca = self._pick_ca()
            if ca is None:
                return
            out = M.write_to_media(M.media_dir(self.home), f"{ca}-chain.pem", ops.ca_chain_pem(self.s.client, ca, True))
            self.t.say(f"exported -> media: {os.path.basename(out)}")

    def revoke(self) -> None:
        ca = self._pick_ca()
        if ca is None:
            return
        serial = ops.parse_serial(self.t.ask("serial (hex): ").strip())
        release = "release from certificateHold"
        reasons = list(ops.REASONS) + [release]
        i = self.t.choose("reason", reasons)
        if i is None:
            return
        if reasons[i] == release:
            if not self.t.confirm(f"release {ca}/{serial.hex()} from certificateHold?"):
                self.t.say("not released")
                return
            doc = ops.unrevoke(self.s.client, ca, serial)
            self.t.say(f"released {doc['ca']}/{doc['serial']} from certificateHold")
            return
        if not self.t.confirm(f"revoke {ca}/{serial.hex()} ({reasons[i]})?"):
            self.t.say("not revoked")
            return
        doc = ops.revoke(self.s.client, ca, serial, reasons[i])
        self.t.say(f"revoked {doc['ca']}/{doc['serial']} ({reasons[i]})")

    def crl(self) -> None:
        ca = self._pick_ca()
        if ca is None:
            return
        i = self.t.choose("CRL", ["Sign a new CRL now and write it to the media", "Write the latest CRL to the media"])
        if i is None:
            return
        der = ops.crl_generate(self.s.client, ca) if i == 0 else ops.crl_export(self.s.client, ca)
        n = ops.crl_number(der)
        out = M.write_to_media(M.media_dir(self.home), f"{ca}-crl-{n}.crl", der)
        self.t.say(f"CRL {ca} #{n}: {len(der)} bytes -> media: {os.path.basename(out)}")

    def officers(self) -> None:
        i = self.t.choose("officers", ["List the officers", "Add an officer", "Remove an officer", "Unlock an officer",
                                       "Change a password", "Pending dual-control requests", "Approve a pending request"])
        c = self.s.client
        if i == 0:
            self.t.page(ops.officer_list_lines(ops.officer_list(c)))
        elif i == 1:
            name = self._ask_name("new officer name", what="officer name")
            if not name:
                return
            r = self.t.choose("role", list(ops.ROLE_NAMES))
            if r is None:
                return
            pw = self._new_password(name)
            doc = ops.officer_add(c, name, (ops.ROLE_NAMES[r],), pw)
            self.t.say(f"officer {doc['name']} added ({', '.join(doc['roles'])})")
        elif i in (2, 3, 4):
            name = self._ask_name("officer name", what="officer name")
            if not name:
                return
            if i == 2 and self.t.confirm(f"remove officer {name}?"):
                ops.officer_remove(c, name)
                self.t.say(f"officer {name} removed")
            elif i == 3:
                ops.officer_unlock(c, name)
                self.t.say(f"officer {name} unlocked")
            elif i == 4:
                ops.officer_passwd(c, name, self._new_password(name))
                self.t.say(f"password of {name} changed")
        elif i == 5:
            self.t.page(ops.pending_lines(ops.pending_list(c)) or ["no pending request"])
        elif i == 6:
            rid = self._ask_int("request number", 1, 2**62 - 1)
            if rid is None:
                return
            doc = ops.approve(c, rid)
            self.t.say(f"request #{rid} approved ({doc['approvals']} of {doc['required']})"
                       + (": executed" if doc.get("executed") else ""))
            if isinstance(doc.get("result"), dict) and "manifest_sha256" in doc["result"]:
                self.t.say(f"key backup #{doc['result']['backup']} made: its requester takes it (Key backup to media)")

    def _new_password(self, name: str) -> str:
        pw = self.t.secret(f"new password for {name}: ")
        if pw != self.t.secret("again: "):
            raise OpError("the two passwords differ")
        return pw

    def audit(self) -> None:
        i = self.t.choose("audit", ["Verify the audit chain", "Export the audit log to the media"])
        if i is None:
            return
        data = ops.audit_export(self.s.client)
        if i == 0:
            self.t.say(f"audit chain intact: {ops.audit_verify(data)} records")
        else:
            name = time.strftime("audit-%Y%m%dT%H%M%SZ.jsonl", time.gmtime())
            out = M.write_to_media(M.media_dir(self.home), name, data)
            self.t.say(f"exported {len(data.splitlines())} records -> media: {os.path.basename(out)}")

    def settings(self) -> None:
        rows = ops.settings_show(self.home)
        if "administrator" not in (self.s.client.roles or []):
            self.t.page(["settings (HOME/donjon.toml; an administrator changes them):"] + [f"{k:<20} {v}" for k, v in rows])
            return
        self.t.say("settings (HOME/donjon.toml; changes take effect at the next start):")
        i = self.t.choose("change", [f"{k:<20} {v}" for k, v in rows])
        if i is None:
            return
        key = rows[i][0]
        self.t.say(f"{key}: {ops.SETTINGS[key]}")
        value = self.t.ask("new value (Enter: keep): ").strip()
        if value:
            self.t.say(ops.settings_set(self.s.client, key, value))

    def distribution(self) -> None:
        """The publication queue per destination and tenant CRL fetches; parked jobs back in the queue."""
        doc = ops.dist_status(self.s.client)
        self.t.page(ops.dist_status_lines(doc) + ["", "Parked:"] + (ops.dist_list_lines(ops.dist_list(self.s.client)) or ["none"]))
        i = self.t.choose("Distribution", ["Retry every parked publication now", "Back to the menu"])
        if i == 0:
            self.t.say(f"{ops.dist_retry(self.s.client)} job(s) back in the queue")

    def backup(self) -> None:
        media = M.media_dir(self.home)
        name = time.strftime("donjon-backup-%Y%m%dT%H%M%SZ.tar", time.gmtime())
        n, digest = ops.backup_to(self.s.client, M.path_in(media, name))
        self.t.say(f"backup: {n} bytes -> media: {name}", f"  sha256 {digest}",
                   "  (encrypted CMDB + HSM-wrapped key: restorable only with the same HSM token)")

    def key_backup(self) -> None:
        """CA keys wrapped under a KEK split among custodians (dual control keys-backup), to a new media folder."""
        i = self.t.choose("Key backup", ["Back up the CA keys under custodian shares",
                                         "Take a key backup a second officer approved (its number)"])
        if i is None:
            return
        folder = M.path_in(M.media_dir(self.home), time.strftime("keys-%Y%m%dT%H%M%SZ", time.gmtime()))
        if os.path.lexists(folder):
            raise OpError(f"{os.path.basename(folder)} exists on the media: try again in a second")
        if i == 0:
            n = self._ask_int("custodian shares", 2, 16)
            k = self._ask_int("shares needed to recover", 2, n) if n else None
            if n is None or k is None:
                return
            doc = ops.keys_backup(self.s.client, self.t.secret("token SO PIN: "), k, n)
        else:
            number = self._ask_int("key backup number", 1, 2**62 - 1)
            if number is None:
                return
            doc = ops.keys_backup_fetch(self.s.client, number)
        blob, shares = ops.write_key_backup(doc, folder)
        self.t.say(f"key backup sha256 {doc['manifest_sha256'][:32]}...", f"  keys: {', '.join(doc['keys'])}"[:79],
                   f"  -> media: {os.path.basename(folder)}/{os.path.basename(blob)}",
                   f"  {len(shares)} shares in custodian-N/ (any {doc['threshold']} recover): one to each custodian")


    def clock(self) -> None:
        """UTC time and the hardware clock; an administrator sets the time (dual control, audited)."""
        from appliance import clock
        self.t.say(*clock.show())
        if "administrator" not in (self.s.client.roles or []) or not self.t.confirm("set the time?"):
            return
        a = self.t.ask("new time, UTC (YYYY-MM-DD HH:MM:SS): ").strip()
        self.t.say(ops.clock_set(self.s.client, ops.parse_utc(a)))

    def media(self) -> None:
        """Mount a USB stick at the media folder for the actions chosen here, and unmount it after."""
        from appliance.console import stick
        devs = stick.devices()
        if not devs:
            raise OpError("no USB mass-storage device with a vfat or ext4 filesystem: insert one")
        i = self.t.choose("media", [f"{d.path}  {d.fstype}  {d.size}  {d.label}" for d in devs])
        if i is None:
            return
        with stick.mounted(devs[i], M.media_path(self.home)) as where:
            self.t.say(f"mounted {devs[i].path} at {where}", f"  options: {stick.mount_options(where)}"[:400])
            actions = [("Ceremonies", self.ceremony), ("Issue from a CSR", self.issue), ("CRL: sign, export", self.crl),
                       ("CRL calendar: load, status", self.calendar), ("Audit: verify, export", self.audit),
                       ("Backup", self.backup), ("CA: request, install", self.ca_tier),
                       ("Officers' SSH keys", self.ssh_keys)]
            while True:
                self.t.page([f"files: {', '.join(M.list_files(where, ('',))[:20]) or 'none'}"])
                j = self.t.choose("with the media", [a[0] for a in actions])
                if j is None:
                    break
                self._guard(actions[j][1])
        self.t.say(f"{devs[i].path} unmounted: it may be removed")

    def calendar(self) -> None:
        """An offline root's CRL calendar: load a bundle from the media; what is left and when it lapses."""
        i = self.t.choose("CRL calendar", ["Load a calendar bundle from the media", "Status"])
        if i == 0:
            media = M.media_dir(self.home)
            fn = self._pick_file(media, (".json",), "calendar bundle")
            if fn is None:
                return
            doc = ops.crl_calendar_load(self.s.client, M.read(media, fn))
            self.t.say(f"calendar of {doc['ca']}: CRLs #{doc['first']}-#{doc['last']} ({doc['new']} new) loaded")
            self.t.page(ops.calendar_lines([doc]))
        elif i == 1:
            self.t.page(ops.calendar_lines(ops.crl_calendar_status(self.s.client)) or ["no CRL calendar"])

    def ssh_keys(self) -> None:
        """An administrator enrols an officer's SSH public key (a .pub file on the media) or removes it; audited."""
        i = self.t.choose("SSH keys", ["Enrol a key from the media", "Remove an officer's key"])
        if i is None:
            return
        name = self._ask_name("officer", what="officer name")
        if not name:
            return
        if i == 0:
            media = M.media_dir(self.home)
            fn = self._pick_file(media, (".pub",), "SSH public key")
            if fn is None:
                return
            key = M.read(media, fn).decode("ascii", "replace")
            self.t.say(ops.officer_ssh_key(self.s.client, name, key)["message"])
        elif self.t.confirm(f"remove the SSH key of {name}?"):
            self.t.say(ops.officer_ssh_key(self.s.client, name, None)["message"])

    def ca_tier(self) -> None:
        """Two tiers across appliances: a CA's request to the media for a parent elsewhere, and the
        certificate that parent signed installed from the media (dual control and audit as ca-create)."""
        i = self.t.choose("CA", ["Request: a new CA key in the HSM, its CSR to the media",
                                 "Install a CA certificate from the media"])
        if i is None:
            return
        media = M.media_dir(self.home)
        name = self._ask_name("CA name", what="CA name")
        if not name:
            return
        if i == 0:
            subject = ops.parse_subject(self.t.ask("subject (e.g. CN=Example Issuing CA,O=Example,C=FR): ").strip())
            key_type = self.t.ask("key type (rsa3072|rsa4096|p256|p384|ed25519) [p256]: ").strip() or "p256"
            path_length = self._ask_int("path length", 0, 16)
            out = M.path_in(media, f"{name}.csr")
            if os.path.lexists(out):
                raise OpError(f"{name}.csr already exists on the media: refusing to overwrite it")
            doc = ops.ca_request(self.s.client, name, subject, key_type, "sub-ca", path_length, (), "new")
            M.write_new(out, doc["csr"].encode())
            self.t.say(f"CA {doc['name']}: {doc['state']}", f"  request sha256 {doc['sha256'][:32]}... -> media: {name}.csr")
            return
        cert = self._pick_file(media, (".pem", ".crt", ".cer"), "CA certificate")
        if cert is None:
            return
        anchor = self._pick_file(media, (".pem", ".crt", ".cer"), "trust anchor (the root; Enter: the one kept)")
        der = ops.certs_of(M.read(media, cert), cert, 1)[0]
        root = ops.certs_of(M.read(media, anchor), anchor, 1)[0] if anchor else None
        doc = ops.ca_install(self.s.client, name, der, [], root)
        self.t.say(f"installed CA {doc['name']}: {doc['subject']}"[:79], f"  serial {doc['serial']} until {doc['not_after'][:10]}")

    def shutdown(self) -> None:
        if not self.t.confirm("stop the appliance (every role, cleanly)?"):
            return
        ops.shutdown(self.s.client)
        self.t.say("the appliance is stopping")
        raise Exit


def run(home: str, ssh: bool = False) -> int:
    return Console(home, Term(), ssh=ssh).run()
