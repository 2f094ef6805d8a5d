"""The ``anaus`` command line (console script ``anaus`` = ``cli:main``; ``python -m cli``): a thin
typer app over library functions that tests call directly.

The commands live in ``anaus_cli/`` (``common`` holds the app, the one-line error handling and the
option parsers); importing a command module registers its commands, so the imports below fix the
order of ``anaus --help``. The names tests and benchmarks import from ``cli`` are re-exported here.
"""

from __future__ import annotations

import sys

import typer

from anaus_cli.common import app
from anaus_core.config import ConfigError
from anaus_core.errors import UserInputError, one_line

# command modules, in --help order (each registers on ``app`` when imported)
from anaus_cli import phantoms  # noqa: F401  make-phantoms, inspect-shard
from anaus_cli import precompute  # noqa: F401  precompute-masks
from anaus_cli import lpsam  # noqa: F401  lpsam adapt / train-prompter / predict
from anaus_cli import pretrain  # noqa: F401  pretrain, export-encoder
from anaus_cli.demo import demo_pretrain_config, run_demo  # demo
from anaus_cli import evaluate  # noqa: F401  evaluate
from anaus_cli.shard_data import shard_data_source, store_anatomy_categories  # (no commands)

__all__ = ["app", "main", "shard_data_source", "store_anatomy_categories", "run_demo", "demo_pretrain_config"]


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (UserInputError, ConfigError) as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
