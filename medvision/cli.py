"""The one command-line entry point, ``medvision <command>``.

Sub-commands are discovered through the ``medvision.commands`` entry-point group: the core never
imports ``medvision.training`` or ``medvision.serving``, yet ``medvision train`` and ``medvision
serve`` appear once the package is installed. A command whose extra is missing still shows its
``--help`` and fails with an install hint when run.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from medvision import __version__
from medvision.errors import MedvisionError

ENTRY_POINT_GROUP = "medvision.commands"
# Fixed order in --help; unknown plugins follow alphabetically.
COMMAND_ORDER = ["synth", "data", "deid", "train", "distill", "evaluate", "export", "quantize", "gate", "card", "bench", "serve", "predict", "score", "recalibrate", "keys", "users"]


OVERRIDE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvision",
        description="Radiology AI from DICOM to a served model. Run 'medvision <command> --help'.",
    )
    parser.add_argument("--version", action="version", version=f"medvision {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
    for name in sorted(eps, key=lambda n: (rank.get(n, len(rank)), n)):
        register = eps[name].load()
        register(sub)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with 'section.key=value' overrides allowed anywhere, also after an option (argparse alone
    takes only their first run as the positional list)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all(OVERRIDE.fullmatch(e) for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 2 usage / input error, 1 failure)."""
    args = parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Codecs and the HTTP client log every tile / request at INFO; keep the console for progress and results.
    for noisy in ("openjpeg", "pydicom", "httpx", "httpcore", "matplotlib", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        result = args.func(args)
    except MedvisionError as exc:
        print(f"medvision {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medvision {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
