"""The `donjon` program: `donjon role NAME` is dispatched before the CLI (typer, admin client) is imported."""

from __future__ import annotations

import sys


def dispatch_role(argv: list[str]) -> None:
    """Run `role NAME ...` and exit with its status; return for any other command."""
    if argv[1:2] == ["role"]:
        from appliance.roles import main as role_main

        sys.exit(role_main(argv[2:]))


def main() -> None:
    dispatch_role(sys.argv)
    from appliance.cli import main as cli_main  # the operator's commands: never loads a role's code

    cli_main()


if __name__ == "__main__":
    main()
