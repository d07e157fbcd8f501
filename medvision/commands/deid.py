"""``medvision deid``: turn a clinical DICOM export into a de-identified training set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medvision.data import ImageRow
from medvision.deid import DeidOptions, deidentify_tree, load_or_create_key, write_report
from medvision.errors import ConfigError
from medvision.manifest import read_manifest, write_manifest
from medvision.scan import iter_files

# Manifest columns that describe the finding or the device class, never the person (RSNA layout names).
_SAFE_COLUMNS = {"density", "birads", "biopsy", "invasive", "implant", "difficult_negative_case", "site_id",
                 "machine_id"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deid", help="de-identify DICOM files (PS3.15 Basic Application Level Confidentiality Profile)",
        description="Writes <out>/<pseudonym>/<study UID>/<SOP UID>.dcm with identifying attributes removed, "
        "emptied or replaced, UIDs and Patient IDs replaced by keyed hashes (consistent across a study and "
        "across runs with the same --key-file), pixel data untouched. Files declaring burned-in annotation "
        "are refused unless --allow-burned-in. Refused files are listed in the --report CSV, which is kept "
        "outside <out> because source paths may identify patients.",
    )
    p.add_argument("src", help="input folder or file (or the base of --manifest's paths)")
    p.add_argument("out", help="output folder (must not be inside the input)")
    p.add_argument("--manifest", help="de-identify only this manifest's files and write <out>/manifest.csv "
                   "with pseudonymised patient IDs and the new paths")
    p.add_argument("--key-file", help="secret key for pseudonyms and UIDs; created if absent. Keep it away "
                   "from the data: with it and the originals, pseudonyms can be linked back. Without it the "
                   "output is not reproducible across runs.")
    p.add_argument("--keep-patient-characteristics", action="store_true",
                   help="PS3.15 Retain Patient Characteristics Option: keep age, sex, size, weight")
    p.add_argument("--allow-burned-in", action="store_true", help="also write images with Burned In Annotation = YES")
    p.add_argument("--report", help="CSV of refused files with reasons (default: <out>_deid_report.csv next to <out>)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = every core this process may use)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if not src.exists():
        raise ConfigError(f"input not found: {src}")
    if out == src or src in out.parents:
        raise ConfigError("the output folder must not be the input folder or inside it")
    report = Path(args.report).resolve() if args.report else out.parent / f"{out.name}_deid_report.csv"
    if out in report.parents:
        raise ConfigError("--report must not be inside the output folder: source paths may identify patients")
    key, reproducible = load_or_create_key(args.key_file)
    if not reproducible:
        print("medvision deid: no --key-file: pseudonyms are random for this run only", file=sys.stderr)
    options = DeidOptions(key=key, keep_patient_characteristics=args.keep_patient_characteristics,
                          allow_burned_in=args.allow_burned_in)
    rows: list[ImageRow] | None = None
    if args.manifest:
        rows = read_manifest(args.manifest)
        files, pids = [r.path for r in rows], [r.patient_id for r in rows]
    else:
        files, pids = [str(f) for f in iter_files(src)], None
    if not files:
        raise ConfigError(f"no files under {src}")
    out.mkdir(parents=True, exist_ok=True)
    results = deidentify_tree(files, out, options, args.workers, not args.no_progress, pids)
    summary = write_report(report, results, str(src) if src.is_dir() else "")
    if rows is not None:
        kept = []
        for row, res in zip(rows, results, strict=True):
            if res["status"] == "ok":
                # only known non-identifying columns travel along (a CSV may carry anything); age only under
                # the patient-characteristics option
                keep = _SAFE_COLUMNS | ({"age"} if args.keep_patient_characteristics else set())
                attrs = {k: v for k, v in row.attributes.items() if k.lower() in keep}
                kept.append(ImageRow(patient_id=res["patient"], image_id=res["sop"], path=str(out / res["out"]),
                                     label=row.label, laterality=row.laterality, view=row.view, study_id=res["study"],
                                     attributes=attrs))
        if kept:
            write_manifest(out / "manifest.csv", kept)
            summary["manifest"] = str(out / "manifest.csv")
    summary["report"] = str(report)
    print(json.dumps(summary, indent=2))
    if summary["refused"]:
        print(f"medvision deid: {summary['refused']} file(s) not written; reasons in {summary['report']}", file=sys.stderr)
    return 0
