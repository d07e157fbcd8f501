"""The review UI in a real browser (Debian's chromium, headless, driven by Playwright): sign in -> worklist in
suspicion order -> open a study -> toggle the heatmap -> record a disagreement with a comment -> see it in
the audit log and the export. Screenshots of the worklist and the study view are saved (to
MEDVISION_SCREENSHOT_DIR when set: the README's come from there)."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import ADMIN, READER, require_tool

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=ARGS)
        yield b
        b.close()


def _sign_in(page, base: str, user) -> None:
    page.goto(f"{base}/ui/worklist")
    assert "/ui/login" in page.url  # not signed in: the page itself is refused
    page.get_by_label("User name").fill(user[0])
    page.get_by_label("Password").fill(user[1])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/ui/worklist")


def _wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` from outside the page: the UI's Content-Security-Policy forbids the eval that
    Playwright's own ``wait_for_function`` runs inside it."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def _save(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    target = os.environ.get("MEDVISION_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def test_read_a_study_in_the_browser(ui_server, browser, tmp_path):
    base = ui_server.url
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    outside, failed, console_errors = [], [], []
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)  # CSP violations too
    # a request cut short by navigating on (or turned into a download) is "aborted": not a failure of the page
    page.on("requestfailed", lambda r: None if "ERR_ABORTED" in (r.failure or "") else failed.append(r.url))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    _sign_in(page, base, READER)

    # the worklist, most suspicious first
    page.wait_for_selector("#rows tr")
    rows = page.locator("#rows tr")
    assert rows.count() == len(ui_server.studies)
    shown = [float(t.split()[0]) for t in page.locator("#rows tr td:nth-child(2)").all_inner_texts()]
    assert shown == sorted(shown, reverse=True) and shown[0] > shown[-1]
    _save(page, tmp_path, "ui-worklist.png")

    # open the top study with the keyboard
    top = rows.first.get_attribute("data-study")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/ui/studies/pacs/{top}*")
    _wait_until(page, "document.querySelectorAll('.pane img.base').length === 4 && "
                      "[...document.querySelectorAll('.pane img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".pane .label").all_inner_texts()[0].startswith("R CC")
    assert "%" in page.locator("#prob").inner_text()
    assert "threshold" in page.locator("#op").inner_text()
    heat = page.locator(".pane img.heat").first
    assert heat.is_visible()
    page.keyboard.press("h")
    assert not heat.is_visible()
    page.locator("#heat-on").check()
    assert heat.is_visible()
    page.get_by_label("Heatmap opacity").fill("35")
    assert abs(float(heat.evaluate("e => e.style.opacity")) - 0.35) < 1e-6
    _save(page, tmp_path, "ui-study.png")

    # window presets (W), window / level by Shift+drag, zoom by wheel, reset (R)
    base_img = page.locator(".pane img.base").first
    page.keyboard.press("w")
    assert page.locator("#preset").input_value() == "full range"
    _wait_until(page, "document.querySelector('.pane img.base').src.includes('wc=')")
    _wait_until(page, "[...document.querySelectorAll('.pane img.base')].every(i => i.complete && i.naturalWidth > 0)")
    before = base_img.get_attribute("src")
    box = page.locator(".pane").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.keyboard.down("Shift")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 80, cy + 40, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    _wait_until(page, f"document.querySelector('.pane img.base').src !== {before!r}")
    assert "W " in page.locator("#wl").inner_text()
    _wait_until(page, "document.querySelector('.pane img.base').complete && "
                      "document.querySelector('.pane img.base').naturalWidth > 0")
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -300)
    stage = page.locator(".pane .stage").first
    _wait_until(page, "document.querySelector('.pane .stage').style.transform.includes('scale(') && "
                      "!document.querySelector('.pane .stage').style.transform.includes('scale(1)')")
    page.keyboard.press("r")
    assert "scale(1)" in stage.evaluate("e => e.style.transform")

    # record a disagreement with a comment
    page.get_by_label("Comment (optional)").fill("benign: vascular calcification")
    page.get_by_label("BI-RADS (optional)").select_option("2")
    page.get_by_role("button", name="Disagree").click()
    page.wait_for_selector("text=Saved: disagree.")
    assert "reader1: disagree, BI-RADS 2 — benign: vascular calcification" in page.locator("#reviews").inner_text()
    page.keyboard.press("Escape")
    page.wait_for_url(f"{base}/ui/worklist*")
    page.wait_for_selector(f"#rows tr[data-study='{top}'] .badge.disagreed")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{base}/ui/login")

    # the admin sees the call in the audit log and downloads it in the export
    _sign_in(page, base, ADMIN)
    page.goto(f"{base}/ui/admin")
    audit = page.locator("#audit").inner_text()
    assert "ui_call" in audit and top in audit and "reader1" in audit
    assert "ui_view_study" in audit
    with page.expect_download() as download:
        page.get_by_role("link", name="Export all calls (CSV)").click()
    text = Path(download.value.path()).read_text()
    assert top in text and "benign: vascular calcification" in text and "disagree" in text
    assert not outside, f"the page loaded something from outside the service: {outside}"
    assert not console_errors, console_errors
    assert not failed, failed
    context.close()


def test_the_api_docs_work_offline_in_a_browser(ui_server, browser):
    """/docs renders every route from the service's own files (nothing requested from another host, nothing
    blocked by its content policy), and declares how to send a key."""
    import httpx

    r = httpx.get(f"{ui_server.url}/docs")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text
    spec = httpx.get(f"{ui_server.url}/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    page = browser.new_page()
    elsewhere, blocked = [], []
    page.on("request", lambda req: None if req.url.startswith(ui_server.url) else elsewhere.append(req.url))
    page.on("console", lambda msg: blocked.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: blocked.append(str(exc)))
    page.goto(f"{ui_server.url}/docs")
    try:
        page.wait_for_selector(".opblock", timeout=30_000)
    except Exception:
        pytest.fail(f"the docs did not render: {blocked[:5]} {page.inner_text('body')[:600]}")
    assert page.locator(".opblock").count() >= 10 and page.locator("button.authorize").count() == 1
    assert not elsewhere and not blocked, (elsewhere, blocked)
    page.close()
