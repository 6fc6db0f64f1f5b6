"""The ``nucsynth`` command line: one sub-command per module in :mod:`nucsynth.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, and gives every command (and
every sub-command) the same ``--threads`` option, applied by
:func:`nucsynth.threads.set_threads` before the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Order shown in --help. A module listed here must exist.
COMMANDS = ("prepare", "stats", "train", "synthesize", "edit", "evaluate", "segmenter", "check", "demo")


def _load(name: str):
    return importlib.import_module(f"nucsynth.commands.{name}")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line: ``parser`` itself or, if it has sub-commands,
    theirs (recursively)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    leaves: dict[int, argparse.ArgumentParser] = {}
    for action in subs:
        for child in action.choices.values():
            for leaf in _leaf_parsers(child):
                leaves[id(leaf)] = leaf
    return list(leaves.values())


def _add_threads(parser: argparse.ArgumentParser) -> None:
    from nucsynth.threads import available_cpus

    parser.add_argument(
        "--threads", type=int, default=None,
        help=f"CPU threads (default: OMP_NUM_THREADS if set, else the cores this process may use, "
             f"{available_cpus()} here, less any --workers)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all sub-commands that are installed)."""
    parser = argparse.ArgumentParser(
        prog="nucsynth",
        description="Synthesize H&E tissue with pixel-exact nuclei labels.",
    )
    from nucsynth import __version__

    parser.add_argument("--version", action="version", version=f"nucsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as e:
            if e.name == f"nucsynth.commands.{name}":
                continue  # command not part of this build
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        for leaf in _leaf_parsers(p):
            _add_threads(leaf)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nucsynth`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from nucsynth.threads import set_threads

        threads = getattr(args, "threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        set_threads(threads, workers=getattr(args, "workers", None) or 0)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Bad input, or a path that cannot be read or written (read-only, disk full, being
        # written by another process): say what was wrong, no traceback.
        print(f"nucsynth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
