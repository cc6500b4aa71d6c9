"""The officer roles and the no-session mark of the admin-request table, in a leaf module: admin.py
builds its table with them and officers.py checks against them without importing admin.py (whose
handlers reach the whole Factory: no import circle through restore.py, which checks passwords)."""

from __future__ import annotations

ROLES = ("administrator", "operator", "auditor")
PUBLIC = None  # no session needed: activation is authorised by the PIN or the shares, not by an officer
