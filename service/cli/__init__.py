"""The ``visionserve`` command line: ``serve``, the export and bench commands (loaded lazily),
and the client commands. ``visionserve.service.cli:main`` is the console script; ``python -m
visionserve.service.cli`` runs the same."""

from .main import BENCH_COMMANDS, EXIT_CODES, build_parser, env_defaults, main
from .serve_flags import UsageError, server_config

__all__ = ["BENCH_COMMANDS", "EXIT_CODES", "UsageError", "build_parser", "env_defaults", "main",
           "server_config"]
