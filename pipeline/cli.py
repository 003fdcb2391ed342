"""The `mergemix-pipeline` command line.

Each command parses its flags, calls into pipeline/ or stages/, and turns user mistakes
(`UserError`) into one readable line and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations

import sys
from functools import wraps

import typer

from stages.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Generate MergeMix preference shards for vision-language models, and inspect, check and train on them.",
)


def user_errors(fn):
    """Report UserError as `error: ...` on stderr with exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# --- commands are registered below, one section per command --------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
