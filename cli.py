"""The ``anaus`` command line: a thin typer app over library functions that tests call directly.

Each command parses options, calls one library function and turns ``UserInputError`` /
``ConfigError`` into a one-line message on stderr with a non-zero exit code.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError

app = typer.Typer(
    name="anaus",
    help="Anatomy-anchored self-supervised pre-training for ultrasound (AnaUS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(func):
    """Decorator for command functions: ``UserInputError``/``ConfigError`` become one line on
    stderr (``error: <file>: <reason>``) and exit code 2, also under typer's CliRunner."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserInputError, ConfigError) as exc:
            raise fail(str(exc), getattr(exc, "exit_code", 2)) from None

    return wrapper


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` on one line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# make-phantoms
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# inspect-shard
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# precompute-masks
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# lpsam (sub-app: adapt, train-prompter, predict)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# pretrain, export-encoder
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (UserInputError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
