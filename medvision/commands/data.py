"""``medvision data``: scan a DICOM tree, build a manifest, make or check a split, write a data card."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from medvision.data import SPLITS, check_split, patient_split, read_split, write_split
from medvision.dicom_io import ReadLimits
from medvision.errors import ConfigError
from medvision.manifest import (
    KEYS,
    from_class_folders,
    from_dicom_folder,
    from_rsna,
    parse_classes,
    read_manifest,
    write_manifest,
)
from medvision.scan import read_index, scan, summarise, write_index


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="scan DICOM trees, build manifests and splits, write data cards",
                       description="Dataset tools. Run 'medvision data <tool> --help'.")
    tools = p.add_subparsers(dest="tool", metavar="<tool>", required=True)

    s = tools.add_parser("scan", help="index a DICOM tree from headers only, in parallel",
                         description="Reads headers only (pixel data is not decoded), applies the reader's "
                         "refusal policy and writes one row per file: ok / refused / unreadable with the reason. "
                         "Bad files are reported, never fatal. The index holds Patient IDs: protect it like the images.")
    s.add_argument("root", help="folder (or one file) to index")
    s.add_argument("--out", required=True, help="index CSV to write")
    s.add_argument("--workers", type=int, default=0, help="processes (0 = every core this process may use)")
    s.add_argument("--max-pixels", type=int, default=ReadLimits().max_pixels, help="refuse larger declared images")
    s.add_argument("--strict", action="store_true", help="exit 1 if any file is unreadable")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_scan)

    m = tools.add_parser("manifest", help="build a manifest CSV (path, label, patient_id, ...) from an export",
                         description="Exactly one source: --rsna + --images, --csv, --dicom + --labels, or --folders.")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--rsna", metavar="LABELS_CSV", help="RSNA Screening Mammography train.csv (with --images)")
    src.add_argument("--csv", metavar="CSV", help="generic CSV: path, label (or cancer), patient_id [, image_id, study_id, laterality, view]")
    src.add_argument("--dicom", metavar="DIR", help="DICOM folder, labelled by --labels")
    src.add_argument("--folders", metavar="DIR", help="one sub-folder per class (e.g. negative/, cancer/)")
    m.add_argument("--images", help="image folder of --rsna (<patient_id>/<image_id>.dcm)")
    m.add_argument("--labels", help="labels CSV of --dicom, keyed by one of: " + ", ".join(KEYS))
    m.add_argument("--key", choices=KEYS, help="key column of --labels (default: the first present)")
    m.add_argument("--classes", help="folder-name labels for --folders, e.g. 'normal=0,malignant=1'")
    m.add_argument("--index", help="reuse a scan index of --dicom / --folders instead of scanning again")
    m.add_argument("--out", required=True, help="manifest CSV to write")
    m.add_argument("--workers", type=int, default=0)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=run_manifest)

    sp = tools.add_parser("split", help="make a patient-level, label-stratified split, or check one",
                          description="Writes patient_id, image_id, split, cancer. With --check, verifies that "
                          "an existing split covers the manifest and that no patient, image or study leaks.")
    sp.add_argument("manifest", help="manifest CSV")
    sp.add_argument("--out", help="split CSV to write")
    sp.add_argument("--check", metavar="SPLIT_CSV", help="check this split against the manifest instead")
    sp.add_argument("--val", type=float, default=0.2, help="fraction of patients for validation")
    sp.add_argument("--test", type=float, default=0.2, help="fraction of patients for the held-out test")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=run_split)

    c = tools.add_parser("card", help="write data_cards/<name>.md from a manifest and its DICOM headers",
                         description="Counts per label and split, patients, studies, manufacturers, views, "
                         "transfer syntaxes, photometric interpretations, pixel spacing, age and sex, PHI status, "
                         "intended use and known gaps, with plots.")
    c.add_argument("manifest", help="manifest CSV")
    c.add_argument("--name", required=True, help="data card name (file name without .md)")
    c.add_argument("--out-dir", default="data_cards", help="folder for <name>.md and its plots")
    c.add_argument("--split", help="split CSV, for counts per split")
    c.add_argument("--intended-use", default=None, help="one paragraph on what the data may be used for")
    c.add_argument("--compare", metavar="OTHER_MANIFEST", help="another data set (a second site, or the training "
                   "data) to compare with, attribute by attribute")
    c.add_argument("--compare-name", help="its name in the card (default: the manifest's file name)")
    c.add_argument("--workers", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=run_card)


def _print(obj: dict) -> None:
    print(json.dumps(obj, indent=2))


def run_scan(args: argparse.Namespace) -> int:
    limits = ReadLimits(max_pixels=args.max_pixels)
    rows = scan(args.root, args.workers, limits, show_progress=not args.no_progress)
    write_index(args.out, rows)
    summary = summarise(rows)
    _print({"index": args.out, **summary})
    if summary["unreadable"] or summary["refused"]:
        print(f"medvision data scan: {summary['unreadable']} unreadable and {summary['refused']} refused file(s); "
              f"reasons are in {args.out}", file=sys.stderr)
    return 1 if args.strict and summary["unreadable"] else 0


def _index_for(root: str, index: str | None, workers: int, progress: bool):
    if index:
        return read_index(index)
    return scan(root, workers, show_progress=progress)


def run_manifest(args: argparse.Namespace) -> int:
    report: dict = {}
    if args.rsna:
        if not args.images:
            raise ConfigError("--rsna needs --images (the folder holding <patient_id>/<image_id>.dcm)")
        rows = from_rsna(args.rsna, args.images)
    elif args.csv:
        rows = read_manifest(args.csv)
    elif args.dicom:
        if not args.labels:
            raise ConfigError("--dicom needs --labels (a CSV keyed by " + ", ".join(KEYS) + ")")
        index = _index_for(args.dicom, args.index, args.workers, not args.no_progress)
        rows, report = from_dicom_folder(index, args.dicom, args.labels, args.key)
    else:
        index = _index_for(args.folders, args.index, args.workers, not args.no_progress)
        rows, report = from_class_folders(index, args.folders, parse_classes(args.classes))
    write_manifest(args.out, rows)
    labels = Counter(r.label for r in rows)
    _print({"manifest": args.out, "images": len(rows), "patients": len({r.patient_id for r in rows}),
            "cancer": labels.get(1, 0), "non_cancer": labels.get(0, 0), **report})
    return 0


def run_split(args: argparse.Namespace) -> int:
    rows = read_manifest(args.manifest)
    if args.check:
        assignment = read_split(args.check)
        counts = check_split(rows, assignment)
        _print({"split": args.check, "ok": True, "images": counts,
                "patients": {s: sum(1 for v in assignment.values() if v == s) for s in SPLITS}})
        return 0
    if not args.out:
        raise ConfigError("give --out to write a split, or --check to verify one")
    if not (0 < args.val < 1 and 0 <= args.test < 1 and args.val + args.test < 1):
        raise ConfigError("--val and --test are fractions of patients with val + test < 1")
    assignment = patient_split(rows, args.val, args.test, args.seed)
    counts = check_split(rows, assignment)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_split(args.out, rows, assignment)
    positives = {s: sum(r.label for r in rows if assignment[r.patient_id] == s) for s in SPLITS}
    _print({"split": args.out, "images": counts, "cancer_images": positives})
    return 0


def run_card(args: argparse.Namespace) -> int:
    from medvision.datacard import write_data_card
    from medvision.scan import scan_files

    rows = read_manifest(args.manifest)
    headers = scan_files([r.path for r in rows], workers=args.workers, show_progress=not args.no_progress)
    split = read_split(args.split) if args.split else None
    if split is not None:
        check_split(rows, split)
    compare = None
    if args.compare:
        other = read_manifest(args.compare)
        compare = (args.compare_name or Path(args.compare).stem, other,
                   scan_files([r.path for r in other], workers=args.workers, show_progress=not args.no_progress))
    path = write_data_card(args.name, rows, headers, Path(args.out_dir), split=split, intended_use=args.intended_use,
                           source=args.manifest, compare=compare)
    _print({"data_card": str(path)})
    return 0
