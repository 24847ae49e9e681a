"""Command-line interface (see :mod:`qtune.cli.main`)."""
