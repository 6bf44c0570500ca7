"""The ``stillroom`` command. Each package adds its own subcommands; this module only assembles them and
turns expected errors into one line on stderr (exit 1 for failures, 2 for usage errors)."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.errors import StillroomError

# modules with a ``register(subparsers)``; one that is not there yet is skipped
COMMAND_MODULES = (
    "pipelines.commands",
    "pipelines.teacher_commands",
    "student.commands",
    "services.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillroom",
        description="Run the teacher once per augmentation seed, store its labels, train students from the store.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StillroomError as e:
        print(f"stillroom: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stillroom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
