"""The clinician review UI at ``/ui``: sign in, AI-prioritised worklist, study viewer, calls, export, admin.

Server-rendered pages (Jinja2) with two small scripts; everything the page loads comes from this service.
Every page, image and API route needs a signed-in session (pages redirect to the sign-in form, images and
API calls get 401); state-changing requests must carry the session's CSRF token. Views, calls, exports,
sign-ins and refusals are written to the audit log with the reader's user id; study UIDs and accession
numbers appear in URLs and the audit log, patient names nowhere.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlencode

import anyio
from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi import Path as Path_
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from medvision.errors import ConfigError, DicomError, PreprocessError
from medvision.serving import reviews, site_calibrations
from medvision.serving.audit import audit, audit_failure
from medvision.serving.dependencies import Database, LoadedEngine, ServiceSettings, State
from medvision.serving.drift_watch import drift_of
from medvision.serving.errors import (
    CsrfFailed,
    Forbidden,
    ImageNotStored,
    InvalidParameter,
    StudyNotFound,
    Unauthenticated,
)
from medvision.serving.identifiers import request_site, request_uid
from medvision.serving.problems import CATALOGUE
from medvision.serving.rendering import SIZES, image_info, render, render_heatmap
from medvision.serving.site_calibrations import meaning
from medvision.serving.tables import AuditEvent, User
from medvision.serving.users import (
    THROTTLE_MINUTES,
    Reader,
    authenticate,
    end_session,
    resume_session,
    start_session,
)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
COOKIE = "mv_session"
router = APIRouter(prefix="/ui", include_in_schema=False)
log = logging.getLogger("medvision.serving.ui")
templates = Jinja2Templates(directory=str(UI_DIR / "templates"))


# -- sessions and audit ---------------------------------------------------------------------------


def _minutes(request: Request) -> float:
    return request.app.state.settings.ui_session_minutes


async def _reader(request: Request) -> Reader | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None

    def lookup():
        with request.app.state.db() as db:
            return resume_session(db, token, _minutes(request))

    return await run_in_threadpool(lookup)


async def _api_reader(request: Request, admin: bool = False) -> Reader:
    reader = await _reader(request)
    if reader is None:
        await audit_failure(request, "ui_refused", 401)
        raise Unauthenticated("sign in to the review UI first (/ui/login)")
    if admin and not reader.is_admin:
        await audit_failure(request, "ui_forbidden", 403, user_id=reader.user_id)
        raise Forbidden("this needs the admin role")
    request.state.reader = reader  # a refusal further on is audited with the reader (``errors``)
    return reader


async def _admin_reader(request: Request) -> Reader:
    return await _api_reader(request, admin=True)


class SignInRequired(Exception):
    """A page asked for without a session: answered by a redirect to the sign-in page (``sign_in_first``)."""


async def _page_reader(request: Request) -> Reader:
    reader = await _reader(request)
    if reader is None:
        raise SignInRequired()
    return reader


# The signed-in reader, as route parameters: JSON routes refuse without a session (401, or 403 for a non-admin
# where admin is needed), pages send the browser to the sign-in page.
SignedIn = Annotated[Reader, Depends(_api_reader)]
SignedInAdmin = Annotated[Reader, Depends(_admin_reader)]
PageReader = Annotated[Reader, Depends(_page_reader)]
MaybeSignedIn = Annotated[Reader | None, Depends(_reader)]


async def sign_in_first(request: Request, _exc: SignInRequired) -> RedirectResponse:
    return _to_login(request)


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)


async def _audit(request: Request, action: str, status: int, resource: str = "", reader: Reader | None = None,
                 **detail) -> None:
    await run_in_threadpool(audit, request.app.state.db, request, action, status, resource,
                            user_id=reader.user_id if reader else None, **detail)


def _check_csrf(request: Request, reader: Reader, given: str | None) -> None:
    if not given or not hmac.compare_digest(given, reader.csrf_token):
        raise CsrfFailed("the request did not carry this session's CSRF token: reload the page")


# Everything comes from this service (the browser enforces it), no framing, and no Referer: URLs hold study UIDs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _page(request: Request, name: str, reader: Reader | None, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, {"reader": reader, **context})
    response.headers.update({"Cache-Control": "no-store", **SECURITY_HEADERS})
    return response


# -- sign in / out --------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/ui/") and not target.startswith("//") else "/ui/worklist"


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home(request: Request):
    return RedirectResponse("/ui/worklist", status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None):
    return _page(request, "login.html", None, next=_safe_next(next), error="")


LOGIN_THREADS = 2  # password checks at once: each takes ~0.5 s of a core and 128 MiB
LOGIN_QUEUE = 16  # sign-ins waiting for one; beyond it 503, so a flood of sign-ins never waits in the API's threads


def _login_limiter(app) -> anyio.CapacityLimiter:
    """Sign-ins run in threads of their own (at most ``LOGIN_THREADS``), not the shared pool the API's database
    work runs in: a flood of sign-ins slows sign-ins, not the PACS's requests."""
    if getattr(app.state, "login_limiter", None) is None:
        app.state.login_limiter = anyio.CapacityLimiter(LOGIN_THREADS)
    return app.state.login_limiter


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, sessions: Database, settings: ServiceSettings, username: str = Form(""),
                password: str = Form(""), next: str = Form("")):
    username = username.strip()[:128]
    address = request.client.host if request.client else "unknown"

    def check():
        with sessions() as db:
            user, reason = authenticate(db, username, password, address)
            if user is None:
                return None, reason
            return (start_session(db, user, _minutes(request)), user.id, user.role), ""

    limiter = _login_limiter(request.app)
    if limiter.statistics().tasks_waiting >= LOGIN_QUEUE:
        await _audit(request, "ui_login_failed", 503, "", reason="busy")
        page = _page(request, "login.html", None, next=_safe_next(next), error="Sign-in is busy: try again shortly.")
        page.status_code, page.headers["Retry-After"] = 503, "5"
        return page
    found, reason = await anyio.to_thread.run_sync(check, limiter=limiter)
    if found is None:
        # the typed name goes to the audit log only when it is a user's: people type passwords into it
        known = reason in ("wrong_password", "disabled")
        await _audit(request, "ui_login_failed", 429 if reason == "throttled" else 401, username if known else "",
                     reason=reason)
        if reason == "throttled":
            page = _page(request, "login.html", None, next=_safe_next(next),
                         error=f"Too many failed sign-ins from this address: try again in {THROTTLE_MINUTES} minutes.")
            page.status_code = 429
            page.headers["Retry-After"] = str(THROTTLE_MINUTES * 60)
            return page
        return _page(request, "login.html", None, next=_safe_next(next), error="Unknown user name or wrong password.")
    token, user_id, role = found
    await _audit(request, "ui_login", 200, username, Reader(user_id, username, role, ""))
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui",
                        secure=settings.secure_cookies, max_age=int(_minutes(request) * 60))
    return response


@router.post("/logout")
async def logout(request: Request, sessions: Database, reader: MaybeSignedIn, csrf: str = Form("")):
    if reader is not None:
        _check_csrf(request, reader, csrf)
        token = request.cookies[COOKIE]

        def end():
            with sessions() as db:
                end_session(db, token)

        await run_in_threadpool(end)
        await _audit(request, "ui_logout", 200, "", reader)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- worklist --------------------------------------------------------------------------------------


def _date(text: str | None, name: str) -> _dt.date | None:
    if not text:
        return None
    try:
        day = _dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{name} must be a date as YYYY-MM-DD") from None
    if not _dt.date(1900, 1, 1) <= day <= _dt.date(2999, 12, 31):
        raise ConfigError(f"{name} must be a date between 1900-01-01 and 2999-12-31")
    return day


def _filters(status, model, site, day_from, day_to, q, sort) -> dict:
    return {"status": status or None, "model": model or None, "site": site or None, "day_from": _date(day_from, "from"),
            "day_to": _date(day_to, "to"), "q": q or None, "sort": sort if sort in ("suspicion", "newest") else "suspicion"}


@router.get("/worklist", response_class=HTMLResponse)
async def worklist_page(request: Request, sessions: Database, reader: PageReader):

    def choices():
        with sessions() as db:
            return reviews.filters(db)

    await _audit(request, "ui_view_worklist", 200, "/ui/worklist", reader)
    return _page(request, "worklist.html", reader, choices=await run_in_threadpool(choices),
                 statuses=reviews.STATUSES, args=dict(request.query_params))


@router.get("/api/worklist")
async def worklist_api(request: Request, sessions: Database, reader: SignedIn, status: str = "", model: str = "",
                       site: str = "",
                       day_from: str = Query("", alias="from"), day_to: str = Query("", alias="to"), q: str = "",
                       sort: str = "suspicion"):
    f = _filters(status, model, request_site(site), day_from, day_to, q, sort)

    def load():
        with sessions() as db:
            return reviews.worklist(db, **f)

    rows = await run_in_threadpool(load)
    # a search names what the reader looked for (an accession number, a Study UID): it is an access
    used = {k: str(v) for k, v in f.items() if v is not None and k != "sort"}
    if used:
        await _audit(request, "ui_search_worklist", 200, "/ui/api/worklist", reader, rows=len(rows), filters=used)
    return JSONResponse({"studies": rows, "count": len(rows)}, headers={"Cache-Control": "no-store"})


# -- study view -------------------------------------------------------------------------------------


_HANGING = {("R", "CC"): 0, ("L", "CC"): 1, ("R", "MLO"): 2, ("L", "MLO"): 3}


def _study_key(site: str, study_uid: str) -> tuple[str, str]:
    return request_site(site) or "", request_uid(study_uid, "the Study Instance UID")


@router.get("/studies/{site}/{study_uid}", response_class=HTMLResponse)
async def study_page(request: Request, engine: LoadedEngine, reader: PageReader, site: str, study_uid: str):
    site, study_uid = _study_key(site, study_uid)
    return _page(request, "study.html", reader, site=site, study_uid=study_uid, query=request.url.query,
                 operating_point=engine.meta.operating_point, model_name=engine.meta.model_name,
                 has_heatmap=engine.has_heatmap, calls=reviews.CALLS, birads=reviews.BIRADS)


@router.get("/api/studies/{site}/{study_uid}")
async def study_api(request: Request, app: State, reader: SignedIn, site: str, study_uid: str, status: str = "",
                    model: str = "",
                    filter_site: str = Query("", alias="site"), day_from: str = Query("", alias="from"),
                    day_to: str = Query("", alias="to"), q: str = "", sort: str = "suspicion"):
    site, study_uid = _study_key(site, study_uid)
    f = _filters(status, model, request_site(filter_site), day_from, day_to, q, sort)

    def load():
        with app.db() as db:
            found = reviews.study(db, site, study_uid)
            if found is None:
                return None
            paths = {i["image_id"]: reviews.image_path(db, i["image_id"]) for i in found["images_detail"]
                     if i["image_id"] is not None}
            previous, following = reviews.neighbours(db, (site, study_uid), **f)
        # the views' window presets side by side (each a decode at 1024 px, kept for their renderings next)
        stored = [_stored(app, paths.get(image["image_id"])) for image in found["images_detail"]]
        with ThreadPoolExecutor(min(len(stored), app.settings.cores) or 1, thread_name_prefix="medvision-ui") as pool:
            infos = list(pool.map(lambda path: _info_or_why_not(app, path) if path is not None else None, stored))
        for image, path, info in zip(found["images_detail"], stored, infos, strict=True):
            if info is not None:
                image.update(info)
            image["stored"] = path is not None
            if path is None:
                image["image_id"] = None
        found["images_detail"].sort(key=lambda i: (_HANGING.get((i.get("laterality"), i.get("view")), 9),
                                                   i["sop_instance_uid"]))
        found["calibration"] = meaning(app.db, app.engine.meta,
                                       {i.pop("calibration_id") for i in found["images_detail"]}).sentence()
        found["previous"], found["next"] = previous, following
        return found

    found = await run_in_threadpool(load)
    if found is None:
        await _audit(request, "ui_view_study", 404, f"{site}/{study_uid}", reader)
        raise StudyNotFound("no such scored study")
    mine = next((r for r in found["reviews"] if r["reader"] == reader.username), None)
    found["my_call"] = mine
    found["operating_point"] = app.engine.meta.operating_point
    await _audit(request, "ui_view_study", 200, f"{site}/{study_uid}", reader)
    return JSONResponse(found, headers={"Cache-Control": "no-store"})


class CallBody(BaseModel):
    call: str = Field(description="agree, disagree or uncertain")
    birads: str = ""
    comment: str = ""


@router.post("/api/studies/{site}/{study_uid}/call")
async def record_call(request: Request, sessions: Database, reader: SignedIn, site: str, study_uid: str, body: CallBody):
    _check_csrf(request, reader, request.headers.get("x-csrf-token"))
    site, study_uid = _study_key(site, study_uid)

    def save():
        with sessions() as db:
            try:
                row = reviews.record_call(db, site, study_uid, reader.user_id, body.call, body.birads, body.comment)
            except LookupError:
                return None
            db.add(AuditEvent(user_id=reader.user_id, action="ui_call", resource=f"{site}/{study_uid}", status=200,
                              request_id=request.state.request_id,
                              detail={"call": row.call, "birads": row.birads, "comment_chars": len(row.comment)}))
            db.commit()  # the call and its audit record commit together
            return {"call": row.call, "birads": row.birads, "comment": row.comment, "reader": reader.username}

    saved = await run_in_threadpool(save)
    if saved is None:
        raise StudyNotFound("no such scored study")
    return saved


# -- images ------------------------------------------------------------------------------------------


def _size(size: int) -> int:
    return min(SIZES, key=lambda s: abs(s - size))


def _info(app, path: Path) -> dict:
    """An image's window presets and labels (``image_info``), kept with its renderings."""
    made = app.renders.get(lambda: json.dumps(image_info(path, app.engine.limits, app.decoded)).encode(), "info",
                           str(path))
    return json.loads(made)


def _info_or_why_not(app, path: Path) -> dict:
    """``_info``, or why the image cannot be shown (``unreadable``: the refusal's title and explanation from the problem
    catalogue, never the decoder's own words, which may name the service's files): one view that cannot be read (a
    file damaged since it was scored, a decoder that crashes on it) leaves the study's other views. Only the file's
    own refusals: a busy or stopping service answers the whole request with its problem (retry later), not a view
    marked as if its file were bad."""
    try:
        return _info(app, path)
    except (DicomError, PreprocessError) as exc:
        log.warning("a stored image could not be read for the viewer (%s)", exc.code)
        title, explanation = CATALOGUE.get(exc.code, ("Unreadable image", "The image could not be decoded."))
        return {"unreadable": f"{title}. {explanation}"}


def _stored(app, path: str | None) -> Path | None:
    """A stored image's file, checked to lie in the data folder; ``None`` if there is none."""
    if not path:
        return None
    found = app.data.inside(path)
    return found if found.is_file() else None


async def _image_path(request: Request, image_id: int, reader: Reader, what: str) -> Path:
    app = request.app.state

    def lookup():
        with app.db() as db:
            return _stored(app, reviews.image_path(db, image_id))

    path = await run_in_threadpool(lookup)
    await _audit(request, what, 200 if path else 404, str(image_id), reader)
    if path is None:
        raise ImageNotStored("no such image is stored on this service (only studies received by STOW-RS are)")
    return path


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


IMAGE_ID = Path_(ge=1, le=2**31 - 1, description="the image's number (its row in the service's database)")


@router.get("/images/{image_id}.png")
async def image(request: Request, app: State, reader: SignedIn, image_id: int = IMAGE_ID, size: int = 1024,
                wc: float | None = None, ww: float | None = None):
    path = await _image_path(request, image_id, reader, "ui_view_image")
    side = _size(size)
    window = (round(wc, 1), round(max(ww, 1.0), 1)) if wc is not None and ww is not None else (None, None)
    cfg = app.engine.preprocess.cfg
    data = await run_in_threadpool(app.renders.get, lambda: render(path, app.engine.limits, cfg, side, *window, app.decoded),
                                   "image", str(path), side, window, cfg.model_dump_json())
    return _png(data)


@router.get("/images/{image_id}/heatmap.png")
async def heatmap(request: Request, app: State, reader: SignedIn, image_id: int = IMAGE_ID, size: int = 1024):
    if not app.engine.has_heatmap:
        raise ImageNotStored("this model has no heatmap output")
    path = await _image_path(request, image_id, reader, "ui_view_heatmap")
    side = _size(size)
    sha = app.engine.artifact_sha256
    data = await run_in_threadpool(app.renders.get, lambda: render_heatmap(app.engine, path, side, app.decoded), "heatmap",
                                   str(path), side, sha)
    return _png(data)


# -- export and admin ------------------------------------------------------------------------------------


@router.get("/export.csv")
async def export(request: Request, sessions: Database, reader: SignedInAdmin):

    def load():
        with sessions() as db:
            return reviews.export_csv(db)

    text = await run_in_threadpool(load)
    await _audit(request, "ui_export", 200, "/ui/export.csv", reader, rows=max(0, text.count("\n") - 1))
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(text, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="medvision-calls-{stamp}.csv"', "Cache-Control": "no-store"})


@router.get("/admin", response_class=HTMLResponse)
async def admin_page(request: Request, sessions: Database, app: State, reader: PageReader, action: str = ""):
    if not reader.is_admin:
        await _audit(request, "ui_forbidden", 403, "/ui/admin", reader)
        return _page(request, "forbidden.html", reader)
    await _audit(request, "ui_view_admin", 200, "/ui/admin", reader)
    return await _admin(request, sessions, app, reader, action)


async def _admin(request: Request, sessions, app, reader: Reader, action: str = "", error: str = "",
                 status: int = 200) -> HTMLResponse:
    def load():
        from sqlalchemy import select

        with sessions() as db:
            query = (select(AuditEvent, User.username).outerjoin(User, User.id == AuditEvent.user_id)
                     .order_by(AuditEvent.id.desc()).limit(200))
            if action:
                query = query.where(AuditEvent.action == action)
            events = [{"at": reviews.iso(e.at), "user": name or "", "key_id": e.key_id, "action": e.action,
                       "resource": e.resource, "status": e.status, "detail": e.detail} for e, name in db.execute(query)]
            return reviews.agreement(db), events

    agreement, events = await run_in_threadpool(load)
    drift = await run_in_threadpool(drift_of, app)
    calibrations = await run_in_threadpool(site_calibrations.listing, sessions, app.engine.artifact_sha256)
    page = _page(request, "admin.html", reader, agreement=agreement, events=events, action=action, drift=drift,
                 calibrations=calibrations, error=error, query=urlencode({"action": action}) if action else "")
    page.status_code = status
    return page


OVERLAY_MAX_BYTES = 256 * 1024


@router.post("/admin/site-calibrations", response_class=HTMLResponse)
async def apply_site_calibration(request: Request, sessions: Database, app: State, reader: SignedInAdmin,
                                 csrf: str = Form(""), overlay: UploadFile | None = None):
    """Apply a site calibration written by ``medvision recalibrate fit`` (its JSON file), for the served model; one
    its gate refused is not applied here (the command line's ``--force`` is the only way, and it is audited)."""
    _check_csrf(request, reader, csrf)
    from medvision.site_calibration import SiteCalibration

    data = await overlay.read(OVERLAY_MAX_BYTES + 1) if overlay is not None else b""
    problem = ""
    if not data:
        problem = "choose the site calibration's JSON file (written by 'medvision recalibrate fit')"
    elif len(data) > OVERLAY_MAX_BYTES:
        problem = "that file is too large to be a site calibration"
    else:
        try:
            fitted = SiteCalibration.model_validate_json(data)
        except ValueError:
            fitted = None
            problem = "that file is not a site calibration written by 'medvision recalibrate fit'"
        if fitted is not None:
            if fitted.artifact_sha256 != app.engine.artifact_sha256:
                problem = (f"that calibration was fitted for another model (sha256 {fitted.artifact_sha256[:12]}…), "
                           f"not the one this service runs ({app.engine.artifact_sha256[:12]}…)")
            else:  # a site name, a verdict its evidence supports, a gate that accepted it: apply_overlay checks
                try:
                    await run_in_threadpool(site_calibrations.apply_overlay, sessions, fitted,
                                            f"ui:{reader.username}", False, reader.user_id)
                except ConfigError as exc:
                    problem = exc.message
    if problem:
        await _audit(request, "ui_site_calibration_refused", 422, "/ui/admin/site-calibrations", reader)
        return await _admin(request, sessions, app, reader, error=problem, status=422)
    await run_in_threadpool(app.site_overlays.reload)  # scores from now on, not in a few seconds
    return RedirectResponse("/ui/admin#calibrations-h", status_code=303)


@router.post("/admin/site-calibrations/remove")
async def remove_site_calibration(request: Request, sessions: Database, app: State, reader: SignedInAdmin,
                                  csrf: str = Form(""), site: str = Form("")):
    _check_csrf(request, reader, csrf)
    site = request_site(site)
    if site is None:
        raise InvalidParameter("name the site whose calibration to remove", code="invalid_site")
    await run_in_threadpool(site_calibrations.remove_overlay, sessions, site, app.engine.artifact_sha256,
                            f"ui:{reader.username}", reader.user_id)
    await run_in_threadpool(app.site_overlays.reload)
    return RedirectResponse("/ui/admin#calibrations-h", status_code=303)
