"""``medvision serve`` and ``medvision predict``. onnxruntime / FastAPI are imported only when run."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from medvision.errors import ConfigError
from medvision.extras import require_extra
from medvision.memory import keep_freed_memory

SERVE_MODULES = ("onnxruntime", "fastapi", "uvicorn", "pydantic_settings", "httpx", "sqlalchemy", "alembic",
                 "prometheus_client", "highdicom", "dicomweb_client", "pynetdicom")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve an ONNX artifact over HTTP (FastAPI + ONNX Runtime)",
        description="POST /v1/predict (DICOM in, JSON out), GET /healthz, /readyz, OpenAPI docs at /docs. "
        "Every option can also be set as MEDVISION_<NAME> in the environment.",
    )
    p.add_argument("--model", help="ONNX artifact (MEDVISION_ARTIFACT)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=run_serve)


def register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="score DICOM files locally or through a running service",
        description="Scores files / folders with --model (local ONNX Runtime) or --url (a medvision service). "
        "With --manifest (or --labels, an RSNA-style CSV) prints AUROC and the operating point's sensitivity / "
        "specificity.",
    )
    p.add_argument("inputs", nargs="*", help="DICOM files or folders (or give --manifest)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="ONNX artifact to run locally")
    target.add_argument("--url", help="base URL of a running 'medvision serve'")
    p.add_argument("--api-key", default=os.environ.get("MEDVISION_API_KEY"),
                   help="API key with the 'score' scope for --url (default: MEDVISION_API_KEY)")
    p.add_argument("--manifest", help="manifest CSV ('medvision data manifest'): its files and labels")
    p.add_argument("--labels", help="labels CSV with image_id and cancer columns")
    p.add_argument("--split", help="split.csv of a training run: score only the images of --subset")
    p.add_argument("--subset", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="write one CSV row per file here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_predict)


def _database_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database", help="SQLAlchemy URL (default: MEDVISION_DATABASE_URL or sqlite:///medvision_data/medvision.db)")


def _open_database(args: argparse.Namespace):
    """The sessions of ``--database``, else of the service's own settings (what ``medvision serve`` would open)."""
    from medvision.serving.db import open_database
    from medvision.serving.settings import load_settings

    return open_database(args.database or load_settings().database_url)


def register_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys", help="create, list and revoke the service's API keys",
        description="Keys carry scopes: score (send images, read their site's results), pull (make the service fetch "
        "studies from the PACS), review (read every site's results), admin (keys, usage, audit, metrics; implies "
        "the others). Each key belongs to a site, which owns what the key sends. Only a hash of each key is stored: "
        "the key is printed once, at creation. Every change is audited. The database is MEDVISION_DATABASE_URL (or "
        "--database).",
    )
    _database_option(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")
    c = actions.add_parser("create", help="create a key and print it (once)")
    c.add_argument("name", help="the site or client it is for (unique)")
    c.add_argument("--scopes", default="score", help="comma-separated: score, pull, review, admin (default: score)")
    c.add_argument("--site", help="the site that owns what the key sends (default: the key's name); give an "
                   "existing site to rotate its key without losing its results")
    actions.add_parser("list", help="list keys (names, scopes, prefixes, status; never secrets)")
    r = actions.add_parser("revoke", help="revoke a key by name")
    r.add_argument("name")
    p.set_defaults(func=run_keys)


def _actor() -> str:
    """Who ran the command, for the audit log: the operating-system user."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (a container without a passwd entry)
        return f"cli:uid {os.getuid()}"


def run_keys(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    from sqlalchemy import select

    from medvision.serving.auth import create_key, revoke_key
    from medvision.serving.tables import ApiKey

    sessions = _open_database(args)
    with sessions() as db:
        if args.action == "create":
            token, row = create_key(db, args.name, args.scopes, site=args.site, actor=_actor())
            print(json.dumps({"name": row.name, "site": row.site, "scopes": row.scopes.split(","), "key": token},
                             indent=2))
            print("store this key now: it is not kept and cannot be shown again", file=sys.stderr)
        elif args.action == "revoke":
            row = revoke_key(db, args.name, actor=_actor())
            print(json.dumps({"name": row.name, "revoked_at": row.revoked_at.isoformat()}, indent=2))
        else:
            rows = db.scalars(select(ApiKey).order_by(ApiKey.id))
            print(json.dumps([{"name": k.name, "site": k.site, "prefix": f"mv_{k.prefix}_…",
                               "scopes": k.scopes.split(","),
                               "created_at": k.created_at.isoformat(),
                               "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                               "revoked": k.revoked_at is not None} for k in rows], indent=2))
    return 0


def register_recalibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recalibrate", help="fit, apply and remove a site's own calibration and operating point",
        description="A site whose images differ from the validation data gets other probabilities, and another "
        "sensitivity at the model's threshold. 'fit' takes the site's stored scores under a model and their outcomes "
        "(a CSV with cancer and sop_instance_uid or study_instance_uid columns, or the review UI's export of calls), "
        "refits the probability (Platt scaling) and chooses the site's threshold by the model's rule on half of the "
        "site's studies, and judges it on the other half: accepted only if the rule's metric is within 2 points of "
        "its target there and better than the model's own threshold. 'apply' makes an accepted overlay the site's "
        "(audited; a running service picks it up within seconds), 'remove' returns the site to the model's own.",
    )
    _database_option(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")
    f = actions.add_parser("fit", help="fit a site's overlay and write it (nothing is applied)")
    f.add_argument("--site", required=True)
    f.add_argument("--model", required=True, help="the served artifact (its scores are the ones used)")
    f.add_argument("--outcomes", required=True, help="outcomes CSV, or the review UI's export of calls")
    f.add_argument("--rule", help="operating-point rule (default: the model's own, e.g. 'sensitivity>=0.90')")
    f.add_argument("--held-out", type=float, default=0.5, help="share of the site's studies held out (default 0.5)")
    f.add_argument("--bootstrap", type=int, default=2000)
    f.add_argument("--out", required=True, help="where to write the overlay (JSON)")
    a = actions.add_parser("apply", help="make an accepted overlay the site's calibration (audited)")
    a.add_argument("overlay", help="a JSON file written by 'fit'")
    a.add_argument("--force", action="store_true", help="apply one its gate refused (recorded in the audit log)")
    r = actions.add_parser("remove", help="return a site to the model's own calibration (audited)")
    r.add_argument("--site", required=True)
    r.add_argument("--model", required=True)
    actions.add_parser("list", help="the active site calibrations")
    p.set_defaults(func=run_recalibrate)


def run_recalibrate(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    from sqlalchemy import select

    from medvision.artifact import read_artifact, sha256_file
    from medvision.serving.site_calibrations import apply_overlay, fit_site, remove_overlay
    from medvision.serving.tables import SiteCalibrationRow
    from medvision.site_calibration import SiteCalibration

    sessions = _open_database(args)
    if args.action == "fit":
        if not 0.1 <= args.held_out <= 0.9:
            raise ConfigError("--held-out must be between 0.1 and 0.9")
        overlay = fit_site(sessions, args.site, read_artifact(args.model), sha256_file(args.model), args.outcomes,
                           args.rule, args.held_out, args.bootstrap)
        Path(args.out).write_text(overlay.model_dump_json(indent=2))
        ev = overlay.evidence
        print(json.dumps({"site": overlay.site, "accepted": overlay.accepted, "reasons": overlay.reasons,
                          "threshold": {"model": ev.model_threshold.threshold, "site": overlay.threshold},
                          "held_out": {"studies": ev.held_out_studies, "images": ev.held_out_images,
                                       "model_threshold": ev.model_threshold.model_dump(),
                                       "site_threshold": ev.site_threshold.model_dump(),
                                       "ece": [ev.ece_before, ev.ece_after]},
                          "overlay": args.out}, indent=2))
        return 0 if overlay.accepted else 3
    if args.action == "apply":
        try:
            overlay = SiteCalibration.model_validate_json(Path(args.overlay).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{args.overlay} is not a site calibration written by 'medvision recalibrate fit': "
                              f"{str(exc)[:200]}") from None
        row = apply_overlay(sessions, overlay, _actor(), args.force)
        print(json.dumps({"id": row.id, "site": row.site, "threshold": overlay.threshold,
                          "applied_at": row.applied_at.isoformat()}, indent=2))
    elif args.action == "remove":
        n = remove_overlay(sessions, args.site, sha256_file(args.model), _actor())
        print(json.dumps({"site": args.site, "removed": n}, indent=2))
    else:
        with sessions() as db:
            rows = db.scalars(select(SiteCalibrationRow).where(SiteCalibrationRow.removed_at.is_(None))
                              .order_by(SiteCalibrationRow.id))
            print(json.dumps([{"id": r.id, "site": r.site, "artifact_sha256": r.artifact_sha256,
                               "threshold": r.overlay["threshold"], "rule": r.overlay["rule"],
                               "applied_by": r.applied_by, "applied_at": r.applied_at.isoformat()} for r in rows],
                             indent=2))
    return 0


def register_users(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "users", help="create, list and disable review-UI accounts",
        description="Accounts for the clinician review UI (/ui). Roles: reader (worklist, viewer, calls) and admin "
        "(also agreement rates, the audit log and the CSV export of calls). Passwords are stored as salted scrypt "
        "hashes; give one on standard input (--password-stdin) or let create generate and print one.",
    )
    _database_option(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")
    c = actions.add_parser("create", help="create an account")
    c.add_argument("username")
    c.add_argument("--role", choices=("reader", "admin"), default="reader")
    c.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    pw = actions.add_parser("passwd", help="set a new password (signs the user out everywhere)")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    actions.add_parser("list", help="list accounts (names, roles, status; never passwords)")
    d = actions.add_parser("disable", help="disable an account and end its sessions")
    d.add_argument("username")
    p.set_defaults(func=run_users)


def _new_password(args: argparse.Namespace) -> tuple[str, bool]:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n"), False
    if args.action == "passwd":
        import getpass

        return getpass.getpass("new password: "), False
    import secrets

    return secrets.token_urlsafe(12), True


def run_users(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    from sqlalchemy import select

    from medvision.serving.tables import User
    from medvision.serving.users import create_user, disable_user, set_password

    sessions = _open_database(args)
    with sessions() as db:
        if args.action in ("create", "passwd"):
            password, generated = _new_password(args)
            user = (create_user(db, args.username, password, args.role, actor=_actor()) if args.action == "create"
                    else set_password(db, args.username, password, actor=_actor()))
            out = {"username": user.username, "role": user.role}
            if generated:
                out["password"] = password
                print("store this password now: only its hash is kept", file=sys.stderr)
            print(json.dumps(out, indent=2))
        elif args.action == "disable":
            user = disable_user(db, args.username, actor=_actor())
            print(json.dumps({"username": user.username, "disabled_at": user.disabled_at.isoformat()}, indent=2))
        else:
            print(json.dumps([{"username": u.username, "role": u.role, "created_at": u.created_at.isoformat(),
                               "disabled": u.disabled_at is not None} for u in db.scalars(select(User).order_by(User.id))],
                             indent=2))
    return 0


def register_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score a whole archive (folders, a manifest or a PACS), resumably; locally or on Ray",
        description="One row per file (scored, or refused with the reason) as Parquet parts or a CSV in OUT, plus "
        "exam and breast aggregates and summary.json. Decoding runs in a process pool (or Ray tasks) overlapped "
        "with batched ONNX Runtime inference. Rerunning the same command skips what OUT already holds; an "
        "interruption loses at most the batch in flight.",
    )
    p.add_argument("inputs", nargs="*", help="DICOM files or folders (every file under a folder gets a row)")
    p.add_argument("--model", required=True, help="ONNX artifact from 'medvision export' / 'quantize' / 'gate'")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--manifest", help="score the files of a manifest CSV ('medvision data')")
    p.add_argument("--pacs", metavar="URL", help="DICOMweb root of a PACS to fetch --studies from (WADO-RS)")
    p.add_argument("--studies", help="with --pacs: Study Instance UIDs, comma-separated or a file with one per line")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="with --engine ray: an existing Ray cluster (default: start one on this machine)")
    p.add_argument("--actors", type=int, default=1, help="with --engine ray: ONNX Runtime actors")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per core this process may use)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: one per physical core this process may run on, "
                   "within its CPU quota)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    from medvision.serving.archive import Options, list_inputs, score_archive

    keep_freed_memory()  # the forked decoders inherit it

    if args.batch_size < 1 or args.workers < 0 or args.actors < 1:
        raise ConfigError("--batch-size and --actors must be >= 1, --workers >= 0")
    if args.engine == "ray" and args.format != "parquet":
        raise ConfigError("the Ray engine writes Parquet: drop --format csv")
    if args.engine != "ray" and args.address:
        raise ConfigError("--address is for --engine ray")
    paths = list_inputs(args.inputs, args.manifest)
    if args.pacs:
        from medvision.serving.archive_pacs import fetch_studies

        fetched, not_found = fetch_studies(args.pacs, args.studies, Path(args.out) / "pacs",
                                           show_progress=not args.no_progress)
        paths += fetched
    elif args.studies:
        raise ConfigError("--studies needs --pacs")
    if not paths:
        raise ConfigError("nothing to score: give files or folders, --manifest, or --pacs with --studies")
    options = Options(batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                      show_progress=not args.no_progress)
    if args.engine == "ray":
        from medvision.serving.archive_ray import score_archive_ray

        summary = score_archive_ray(paths, args.model, args.out, options, address=args.address, actors=args.actors)
    else:
        summary = score_archive(paths, args.model, args.out, args.format, options)
    if args.pacs:
        summary["pacs_studies_not_found"] = not_found
    print(json.dumps(summary, indent=2))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    import uvicorn

    from medvision.serving.app import create_app
    from medvision.serving.engine import Engine
    from medvision.serving.http_server import uvicorn_options
    from medvision.serving.settings import load_settings

    overrides = {k: v for k, v in {"artifact": args.model, "host": args.host, "port": args.port,
                                   "threads": args.threads}.items() if v is not None}
    settings = load_settings(**overrides)
    keep_freed_memory()  # image-sized buffers reused, not faulted in again for every request
    os.umask(0o077)  # whatever the service writes (data, database, logs it opens) is its user's alone
    logging.getLogger().setLevel(settings.log_level.upper())  # medvision's own loggers follow MEDVISION_LOG_LEVEL too
    if settings.log_format == "json":
        from medvision.serving.logs import use_json_logs

        use_json_logs()
    # Load before binding the port: a bad artifact is a one-line error, not a failed-startup traceback.
    engine = Engine.from_settings(settings)
    uvicorn.run(create_app(settings, engine=engine), **uvicorn_options(settings))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    require_extra("serve", *SERVE_MODULES)
    from medvision.serving.scoring import collect_files, score_local, score_remote, summarise, write_rows

    truth = None
    if args.manifest:
        from medvision.data import read_split
        from medvision.manifest import read_manifest

        if args.inputs:
            raise ConfigError("give DICOM inputs or --manifest, not both")
        rows = read_manifest(args.manifest)
        if args.split:
            assignment = read_split(args.split)
            rows = [r for r in rows if assignment.get(r.patient_id) == args.subset]
        files = [Path(r.path) for r in rows]
        truth = {str(Path(r.path).resolve()): r.label for r in rows}
    else:
        if not args.inputs:
            raise ConfigError("give DICOM files or folders, or --manifest")
        files = collect_files(args.inputs)
        if args.split:
            with open(args.split, newline="") as fh:
                keep = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == args.subset}
            files = [f for f in files if f.stem in keep]
    show = not args.no_progress
    if args.model:
        rows, threshold = score_local(files, args.model, show_progress=show)
    else:
        rows, threshold = score_remote(files, args.url, args.api_key, show_progress=show)
    if args.out:
        write_rows(rows, args.out)
    print(json.dumps(summarise(rows, threshold, args.labels, truth), indent=2))
    return 0
