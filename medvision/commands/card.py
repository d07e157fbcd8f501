"""``medvision card``: the model card of an ONNX artifact, rendered from its embedded metadata."""

from __future__ import annotations

import argparse
from pathlib import Path

from medvision.artifact import read_artifact, sha256_file
from medvision.model_card import render


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card", help="write the model card (markdown) of an ONNX artifact from its metadata",
        description="Intended use, input contract, operating point, held-out evaluation with intervals, "
        "compression and the promotion gate's result, all read from the artifact itself.",
    )
    p.add_argument("artifact", help="ONNX file written by 'medvision export', 'quantize' or 'gate'")
    p.add_argument("--out", help="markdown file to write (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.artifact)
    meta = read_artifact(path)
    text = render(meta, path, path.stat().st_size, sha256_file(path))
    if args.out:
        Path(args.out).write_text(text)
        print(args.out)
    else:
        print(text)
    return 0
