"""The dashboard in a real browser: Playwright drives Debian's Chromium over ``routelens app`` on a small store, visits
every page, waits for its figures and saves a screenshot per page under ``test-artifacts/screenshots/``.

Skipped (with the reason) when the ``playwright`` package or a Chromium binary is missing: install them with
``pip install -c constraints.txt playwright`` and ``apt-get install -y chromium`` (never ``playwright install``).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("ROUTELENS_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

# (url path, page title, what must be on it besides the title, figures expected)
PAGES = [
    ("", "Runs", "Analysis results for this run", 0),
    ("overview", "Overview", "Expert detail", 3),
    ("tokens", "Tokens", "hover a token", 0),
    ("consistency", "Consistency", "SRP vs segment length", 2),
    ("super_experts", "Super experts", "Flagged experts", 4),
    ("crosslingual", "Cross-lingual", "Expert usage differences", 2),
    ("cognitive", "Cognitive experts", "Where they fire", 1),
    ("steering", "Steering", "Run it", 0),
]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -c constraints.txt "
                                                      "playwright (the browser comes from apt: chromium)")
    if _chromium() is None:
        pytest.skip("no chromium binary: apt-get install -y chromium")
    from test_app import build_store

    db = tmp_path_factory.mktemp("browser") / "store.duckdb"
    build_store(db)
    port = _free_port()
    from routelens.app.launch import command

    log = open(db.parent / "streamlit.log", "w")
    proc = subprocess.Popen(command(db, port), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.terminate()
        pytest.fail(f"streamlit did not start: {(db.parent / 'streamlit.log').read_text()[-2000:]}")
    yield url, proc
    proc.terminate()
    proc.wait(10)
    log.close()


def _settle(page, n_figures: int) -> None:
    """Wait for ``n_figures`` plotly figures and the end of the script run, then for plotly's last relayout."""
    if n_figures:
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}",
                               timeout=60_000)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
    time.sleep(0.5)


def _steady_box(locator, timeout: float = 30.0) -> dict:
    """The element's bounding box once two reads 0.3 s apart agree (a box read mid-resize points at the wrong cell)."""
    deadline = time.monotonic() + timeout
    box = locator.bounding_box()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = locator.bounding_box()
        if again == box and box is not None:
            return box
        box = again
    raise AssertionError(f"the figure kept moving for {timeout:.0f} s: last box {box}")


def test_every_page_in_chromium(server):
    from playwright.sync_api import sync_playwright

    url, proc = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for path, title, marker, n_figures in PAGES:
            page.goto(url + path + "?run=1")
            page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
            page.get_by_text(marker).first.wait_for(timeout=60_000)
            _settle(page, n_figures)
            assert page.locator("[data-testid='stException']").count() == 0, f"exception on the {title} page"
            page.screenshot(path=str(SHOTS / f"{path or 'runs'}.png"), full_page=True)
        # hover a token on the Tokens page: its title carries the top-k experts and weights
        page.goto(url + "tokens?run=1")
        tok = page.locator("span.rl-tok[title*='layer']").first
        tok.wait_for(timeout=60_000)
        assert "e" in tok.get_attribute("title")
        # click a heatmap cell on Overview (expert detail follows), put it in the basket, steer the embedded model
        page.goto(url + "overview?run=1")
        _settle(page, 3)
        heat = page.locator(".js-plotly-plot .nsewdrag").first
        add = page.get_by_text("Add layer 3 expert 7 to the steering basket")
        for attempt in range(3):  # a click landing while plotly still lays out is lost: click again
            box = _steady_box(heat)  # plotly resizes to its column after the first draw: aim at the final cell
            page.mouse.click(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.9)  # last expert, layer
            try:
                add.wait_for(timeout=20_000)
                break
            except Exception:
                page.screenshot(path=str(SHOTS / f"overview_click_{attempt}.png"), full_page=True)
                if attempt == 2:
                    raise
        page.get_by_text("Add layer 3 expert 7 to the steering basket").click()
        # navigate only once the rerun that fills the basket has run (its toast), else the click can be lost
        page.get_by_text("added", exact=True).first.wait_for(timeout=60_000)
        page.get_by_role("link", name="Steering").click()
        page.get_by_role("heading", name="Steering").first.wait_for(timeout=60_000)
        page.get_by_text('"experts": [').first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Generate with and without the spec").click()
        page.get_by_text("With the spec").first.wait_for(timeout=180_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=60_000)
        time.sleep(1.0)
        page.screenshot(path=str(SHOTS / "steering_result.png"), full_page=True)
        browser.close()
    assert proc.poll() is None, "the app exited"
    assert not errors, errors
