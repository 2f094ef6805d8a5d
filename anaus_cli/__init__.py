"""The ``anaus`` command line, one module per command family; ``cli.py`` (the entry point) imports
them in ``--help`` order. Each command module registers its commands on ``anaus_cli.common.app``
when imported and only parses options, builds configs and calls library functions."""
