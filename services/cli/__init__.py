"""The ``stillroom`` command. Each package adds its own subcommands; this module only assembles them and
turns expected errors into one line on stderr (exit 1 for failures, 2 for usage errors)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import stillroom
from stillroom.pipelines.core import StillroomError, apply_config_file, error_line

# modules with a ``register(subparsers)``, and the top-level commands each registers; one that is not there
# yet is skipped
COMMAND_MODULES = {
    "stillroom.services.cli.store": ("store", "view"),
    "stillroom.services.cli.teacher": ("teacher", "label"),
    "stillroom.services.cli.train": ("train", "eval"),
    "stillroom.services.cli.serve": ("serve", "jobs"),
    "stillroom.services.cli.demo": ("demo",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or, for a ``command`` one module registers, that module's part only: the others
    import torch to list their options, a second that ``stillroom jobs ls`` need not wait for."""
    parser = argparse.ArgumentParser(
        prog="stillroom",
        description="Run the teacher once per augmentation seed, store its labels, train students from the store.",
    )
    parser.add_argument("--version", action="version", version=f"stillroom {stillroom.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [m for m, commands in COMMAND_MODULES.items() if command in commands] or list(COMMAND_MODULES)
    if command == "--version":  # needs no command: import none of them
        names = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        args = apply_config_file(args, lambda: parser.parse_args(argv))  # --config FILE.yaml, flags override it
        return int(args.func(args) or 0)
    except StillroomError as e:
        print(f"stillroom: error: {error_line(e)}{_log_worker_traceback(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stillroom: interrupted", file=sys.stderr)
        return 130


def _log_worker_traceback(error: StillroomError) -> str:
    """An error raised in a Ray actor or worker: its traceback to a log file, named after the error line."""
    if not error.worker_traceback:
        return ""
    log = Path(tempfile.gettempdir()) / "stillroom" / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(error.worker_traceback)
    except OSError:
        return ""
    return f" (traceback: {log})"
