"""``python -m mitoseg.deploy ...``: the ``mitoseg deploy`` commands without the main CLI."""

from __future__ import annotations

from mitoseg.cli.deploy import deploy_app


def main() -> None:
    """Run the deploy sub-application."""
    deploy_app(prog_name="python -m mitoseg.deploy")


if __name__ == "__main__":
    main()
