"""The ``latentlab`` command's entry point: stage commands go to a warm server
(:mod:`latentlab.warm`) when one can take them; everything else, and every
fallback, runs the CLI in this process."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    from latentlab import warm

    if warm.enabled(argv):
        status = warm.run(argv)
        if status is not None:
            sys.exit(status)
    from latentlab.cli import app

    app()
