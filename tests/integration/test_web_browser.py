"""The status pages in a real browser: the real `retracer --config ... web` process on an instance with jobs in
every state (both databases), read by headless Chromium through Playwright, as an admin would read them.

Besides what is shown, the browser is the judge of safety: any console error (a CSP violation is one), any
dialog (alert) or a changed document title means something ran or broke. Screenshots are kept under the
test's tmp dir; with RETRACER_DOCS_SCREENSHOT=<path> the overview of a realistic instance (no hostile
values) is also written there, which is how docs/web-overview.png is made:

    RETRACER_DOCS_SCREENSHOT=docs/web-overview.png python -m pytest -q -p no:randomly \
        tests/integration/test_web_browser.py -k "docs and sqlite"
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Route, sync_playwright
from sqlalchemy import func, select

from retracer import config as cfg
from retracer import store
from retracer.mail.rows import command
from retracer.store.models import Job
from retracer.testing import webworld
from retracer.testing.instance import RETRACER
from retracer.workflow import load_spec

from ..conftest import IN_CI

CHROMIUM = "/usr/bin/chromium"
SPEC = load_spec()
ROLES = SPEC.roles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Web:
    """A running `retracer web` on a populated instance."""

    url: str
    world: webworld.World
    config: cfg.Config
    config_file: Path
    shots: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def retracer(self) -> str:
        return command(self.config)


def _start(tmp_path: Path, db_url: str, page_size: int, hostile: bool, queued: int) -> Iterator[Web]:
    data = tmp_path / "data"
    config_file = tmp_path / "retracer.toml"
    config_file.write_text(f"""\
[service]
data_dir = "{data}"
start_requires_offer = false

[database]
url = "{db_url}"

[mail]
admins = ["celso@example.com"]

[web]
page_size = {page_size}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRACER")}
    config = cfg.load(config_file, environ=env)
    engine = store.make_engine(config.database_url)
    factory = store.session_factory(engine)
    world = webworld.populate(config, factory, queued=queued, hostile=hostile)
    with factory() as session:
        counts = {s: int(n) for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
    engine.dispose()

    port = free_port()
    log = tmp_path / "web.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*RETRACER, "--config", str(config_file), "web", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        shots = tmp_path / "screenshots"
        shots.mkdir()
        yield Web(url, world, config, config_file, shots, counts)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"retracer web exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/static/retracer.css", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"retracer web did not answer within 60 s:\n{log.read_text()}")


@pytest.fixture
def web(tmp_path: Path, db_url: str) -> Iterator[Web]:
    yield from _start(tmp_path, db_url, page_size=3, hostile=True, queued=6)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing (CI must have it: apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_playwright() as p:
        # As root (containers, CI) Chromium refuses to start without --no-sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@dataclass
class Watched:
    """A browser tab and everything it reported: console errors (CSP violations among them), uncaught
    errors, dialogs a script opened."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def clean(self) -> None:
        assert self.errors == [], f"the browser reported errors: {self.errors}"
        assert self.dialogs == [], f"a script ran and opened dialogs: {self.dialogs}"


@pytest.fixture
def tab(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, java_script_enabled=True)
    page = context.new_page()
    watched = Watched(page)

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            watched.errors.append(f"{message.type}: {message.text}")

    def dialog(d: Dialog) -> None:
        watched.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    page.on("console", console)
    page.on("pageerror", lambda exc: watched.errors.append(f"pageerror: {exc}"))
    page.on("dialog", dialog)
    yield watched
    context.close()


def _go(tab: Watched, url: str, status: int = 200) -> Any:
    response = tab.page.goto(url)
    assert response is not None and response.status == status, url
    return response


def _texts(page: Page, selector: str) -> list[str]:
    return [" ".join(t.split()) for t in page.locator(selector).all_inner_texts()]


def test_overview_as_an_admin_sees_it(web: Web, tab: Watched) -> None:
    page = tab.page
    _go(tab, web.url + "/")
    assert page.title() == "Status · retracer"
    assert page.get_by_role("heading", name="Status", exact=True).is_visible()
    for name, spec in SPEC.states.items():
        card = page.locator(f"li.count.state-{name.lower()}")
        assert card.locator(".number").inner_text() == str(web.counts.get(name, 0))
        assert card.locator(".state-title").inner_text() == spec.title
    # The stylesheet came from the app and applies under the CSP (no inline style is allowed).
    assert page.locator("header.top").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 35, 43)"

    ready = len(web.world.jobs["pending"])
    queue = page.locator("#queue")
    assert f"and {ready - 3} more in the queue" in queue.inner_text()
    assert _texts(page, "#queue tbody tr td:nth-child(2)")[0] == f"#{web.world.jobs['pending'][-1]}"
    page.get_by_role("link", name="next 3 →").click()
    page.wait_for_url("**/?queue_page=2")
    assert _texts(page, "#queue tbody tr td:first-child") == ["4", "5", "6"]

    _go(tab, web.url + "/")
    held = web.world.one("held_permanent")
    commands = _texts(page, "#on-hold code.command")
    assert f"{web.retracer} release {held}" in commands
    assert web.retracer.startswith(f"retracer --config {web.config_file.resolve()}")
    assert "Connection (timed out|refused|reset)" in page.locator("#groups").inner_text()
    missing = _texts(page, "#missing-symbols tbody tr")
    gedit = "5e1f0c9a0b6d4e2f8a7c3b1d9e0f2a4c6b8d0e1f /usr/lib/gedit/libgedit-46.so 1 #"
    assert any(row.startswith(gedit) for row in missing)
    assert any(webworld.HOSTILE_MODULE in row for row in missing), "a module path with markup shows as text"
    hover = page.locator("#retracing time").first.get_attribute("title")
    assert hover is not None and hover.endswith(" UTC")
    page.screenshot(path=str(web.shots / "overview.png"), full_page=True)
    tab.clean()


def test_job_page_shows_hostile_values_as_text_and_runs_nothing(web: Web, tab: Watched) -> None:
    page = tab.page
    job_id = web.world.one("hostile")
    _go(tab, f"{web.url}/jobs/{job_id}")
    assert page.title() == f"Job #{job_id} · retracer", "a script in a value changed the title"
    crash = page.locator("table.fields tr", has_text="crash_id").locator("td")
    assert crash.inner_text() == webworld.HOSTILE_CRASH
    assert webworld.HOSTILE_ERROR in page.locator("table.fields tr", has_text="last_error").locator("td").inner_text()
    assert page.locator("script").count() == 0 and page.locator("img").count() == 0
    assert page.locator("main b").count() == 0
    act = _texts(page, "#act pre.command")
    assert f"{web.retracer} release {job_id}" in act and f"{web.retracer} retry {job_id}" in act
    page.screenshot(path=str(web.shots / "job-hostile.png"), full_page=True)

    _go(tab, f"{web.url}/")
    assert page.title() == "Status · retracer"
    _go(tab, f"{web.url}/rejected")
    page.locator("#events details summary").first.click()  # the event's body is folded away until asked for
    assert webworld.HOSTILE_SOURCE.replace('"', '\\"') in page.locator("#events details pre").first.inner_text()
    assert page.title() == "Rejected events · retracer"
    tab.clean()


def test_job_page_of_a_failed_upload(web: Web, tab: Watched) -> None:
    page = tab.page
    job_id = web.world.one("failedtoupload")
    _go(tab, f"{web.url}/jobs/{job_id}")
    heading = page.locator("h1").inner_text()
    assert f"Job #{job_id}" in heading and ROLES.rescuable in heading
    assert "Rejected: backtrace.txt has no frames" in page.locator("#upload-log").inner_text()
    assert f"{web.retracer} retry {job_id} --reason \"...\"" in _texts(page, "#act pre.command")
    mails = page.locator("#mails tbody tr")
    assert mails.count() == 2  # the admin and the crash's creator
    assert "celso@example.com" in mails.first.inner_text()
    history = _texts(page, "#history tbody tr td:nth-child(4)")
    assert history == ["submit", "start", "upload_failed"]
    page.screenshot(path=str(web.shots / "job-failedtoupload.png"), full_page=True)
    original = web.world.one("fullybuilt")
    _go(tab, f"{web.url}/jobs/{web.world.jobs['duplicate'][0]}")
    page.locator("#signatures dd a").first.click()
    page.wait_for_url(f"**/jobs/{original}")
    assert "write_track (fd=3) at cdrecord.c:412" in page.locator("#backtrace").inner_text()
    tab.clean()


def test_errors_and_the_workflow(web: Web, tab: Watched) -> None:
    page = tab.page
    _go(tab, f"{web.url}/jobs/424242", status=404)
    assert "There is no job 424242" in page.locator("main").inner_text()
    _go(tab, f"{web.url}/jobs/not-a-number", status=422)
    assert "job_id" in page.locator("main").inner_text()
    _go(tab, f"{web.url}/workflow")
    assert page.locator("svg.diagram g.state").count() == len(SPEC.states)
    labels = " ".join(page.locator("svg.diagram .edge-label").all_text_contents())
    for t in SPEC.transitions:
        assert t.trigger in labels
    assert page.locator("svg.diagram").bounding_box() is not None
    page.screenshot(path=str(web.shots / "workflow.png"), full_page=True)
    # An error page is a page too, and as clean: 404 and 422 are answers, not console errors of ours.
    tab.errors = [e for e in tab.errors if "status of 404" not in e and "status of 422" not in e]
    tab.clean()


def test_a_script_slipped_into_a_page_is_blocked_and_reported(web: Web, tab: Watched) -> None:
    """The watchers above can fail: the same page with a script injected on its way to the browser is
    stopped by the app's CSP, and the browser says so."""
    page = tab.page

    def inject(route: Route) -> None:
        response = route.fetch()
        body = response.text().replace("</main>", "<script>alert('ran')</script><p style='color:red'>x</p></main>")
        route.fulfill(response=response, body=body)

    page.route(web.url + "/", inject)
    _go(tab, web.url + "/")
    assert tab.dialogs == [], "the CSP let an inline script run"
    assert any("Content Security Policy" in e for e in tab.errors), tab.errors
    with pytest.raises(AssertionError):
        tab.clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_docs_screenshot(tmp_path: Path, db_url: str, browser: Browser) -> None:
    """The overview of a realistic instance; written to $RETRACER_DOCS_SCREENSHOT when set (the README's)."""
    for web in _start(tmp_path, db_url, page_size=8, hostile=False, queued=14):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(web.url + "/")
        shot = web.shots / "web-overview.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        target = os.environ.get("RETRACER_DOCS_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)
        page.close()
