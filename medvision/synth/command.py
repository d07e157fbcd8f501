"""``medvision synth``: write the built-in synthetic mammography dataset."""

from __future__ import annotations

import argparse
import json

from medvision.synth.dataset import SynthConfig, generate_dataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate synthetic screening mammograms (DICOM + RSNA-style labels)",
        description="Write images/<patient_id>/<image_id>.dcm, labels.csv (RSNA columns), "
        "lesions.csv (finding locations) and summary.json. Deterministic for a seed.",
    )
    p.add_argument("out", help="output folder")
    defaults = SynthConfig()
    p.add_argument("--patients", type=int, default=defaults.n_patients, help="number of 4-view exams")
    p.add_argument("--prevalence", type=float, default=defaults.prevalence, help="fraction of patients with cancer")
    p.add_argument("--rows", type=int, default=defaults.rows)
    p.add_argument("--columns", type=int, default=defaults.columns)
    p.add_argument("--difficulty", type=float, default=defaults.difficulty, help="0 (obvious) .. 1 (subtle)")
    p.add_argument("--benign-rate", type=float, default=defaults.benign_rate)
    p.add_argument("--compressed-fraction", type=float, default=defaults.compressed_fraction)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--site", choices=["reference", "shifted"], default=defaults.site,
                   help="'shifted': another vendor's processing, fainter findings, more noise, older patients, its "
                   "own patient ids and UIDs (a second site to test drift and recalibration on)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = every core this process may use)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(
        n_patients=args.patients, prevalence=args.prevalence, rows=args.rows, columns=args.columns,
        difficulty=args.difficulty, benign_rate=args.benign_rate, compressed_fraction=args.compressed_fraction,
        seed=args.seed, workers=args.workers, site=args.site,
    )
    summary = generate_dataset(cfg, args.out, show_progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0
