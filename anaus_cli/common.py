"""What every ``anaus`` command shares: the typer ``app``, the ``user_errors`` decorator that turns
bad input into one ``error: ...`` line, warnings on stderr, and option parsing helpers.

Each command parses options, calls one library function and turns ``UserInputError`` /
``ConfigError`` (and OS errors such as a read-only or full disk) into a one-line message on
stderr with a non-zero exit code. Every writing command holds its output folder through
``anaus_core.outputs.claim_output`` (one writer per folder, stale temp files removed). Options
whose default comes from a config dataclass show that default in their help text
(tests/test_harden_cli.py checks they agree).
"""

from __future__ import annotations

import enum
import functools
from typing import Optional

import typer

from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError, one_line

app = typer.Typer(
    name="anaus",
    help="Anatomy-anchored self-supervised pre-training for ultrasound (AnaUS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click output: a bad option is one "Error: ..." line, not a framed panel
)


def user_errors(func):
    """Decorator for command functions: ``UserInputError``/``ConfigError`` become one line on
    stderr (``error: <file>: <reason>``) and exit code 2, also under typer's CliRunner."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserInputError, ConfigError) as exc:
            raise fail(one_line(str(exc)), getattr(exc, "exit_code", 2)) from None
        except OSError as exc:  # read-only or full disk, unreachable scheduler, ...: the file and the reason
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise fail(one_line(f"{where}{exc.strerror or exc}"), 1) from None

    return wrapper


def echo_warning(message: str) -> None:
    """A warning line on stderr (the commands' stdout stays for results)."""
    typer.echo(message, err=True)


def choice_value(choice):
    """The string of an enum-typed option (configs hold plain strings); anything else as given."""
    return choice.value if isinstance(choice, enum.Enum) else choice


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` on one line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_set_options(values: Optional[list[str]]) -> dict:
    """``--set section.key=value`` pairs -> override dict (values parsed as YAML scalars)."""
    import yaml

    overrides = {}
    for item in values or []:
        if "=" not in item:
            raise UserInputError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
