"""The officer session every console face works through: authentication and the admin client it opens."""

from __future__ import annotations

from appliance.adminops import OpError, check_name
from appliance.client import AdminClient, ClientError

TIMEOUT = 600


def _connect(home: str, token: str | None) -> AdminClient:
    try:
        if token is None:
            return AdminClient(home, timeout=TIMEOUT)
        return AdminClient(home, timeout=TIMEOUT, session=token)  # type: ignore[call-arg]
    except ClientError as e:
        raise OpError(str(e)) from None


def ask_login(t, home: str, officer: str) -> tuple[AdminClient, str | None]:
    """Prompt for the password and the optional second-factor code on terminal `t`, then log in."""
    check_name(officer, "officer name")
    password = t.secret("password: ")
    otp = t.ask("second-factor code (Enter: none): ").strip() or None
    if otp is not None and not (otp.isdigit() and 6 <= len(otp) <= 8):
        raise OpError("a second-factor code is 6 to 8 digits")
    return login(home, officer, password, otp)


def refusal(e: Exception) -> str:
    m = str(e)
    return m if m.startswith("login refused") else f"login refused: {m}"


def login(home: str, officer: str, password: str, otp: str | None = None) -> tuple[AdminClient, str | None]:
    """THE authentication hook of the console, the SSH shell and ceremonies: log the officer in and
    return the open client and its session token. Where the appliance has no officer login (before
    issue #6's officers land) the admin socket's peer credentials are the only gate: token None."""
    check_name(officer, "officer name")
    c = _connect(home, None)
    do_login = getattr(c, "login", None)
    if do_login is None:
        return c, None
    try:
        token = do_login(officer, password, otp)
    except ClientError as e:
        c.close()
        raise OpError(str(e)) from None
    return c, token


class Session:
    """One authenticated officer; reconnects with the same token after an interrupted request."""

    def __init__(self, home: str, officer: str | None = None, client: AdminClient | None = None, token: str | None = None):
        self.home = home
        self.officer = officer
        self.token = token
        self._client = client

    @property
    def client(self) -> AdminClient:
        if self._client is not None and self.token is None and self._client.dropped():
            self.reset()  # idle too long without a session (e.g. at the PIN prompt): a new connection
        if self._client is None:
            self._client = _connect(self.home, self.token)
        return self._client

    def reset(self) -> None:
        """Drop the connection (after Ctrl-C mid-request its replies would arrive out of order)."""
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None

    def close(self) -> None:
        if self._client is not None and self.token is not None:
            try:
                self._client.logout()
            except (ClientError, OSError):
                pass
        self.reset()
