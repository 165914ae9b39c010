"""The dashboard in headless Chromium, over a replay of simulated traffic with labelled incidents.

Needs Debian's ``chromium`` and ``chromium-driver`` (``deploy/browser/install.sh``); the paths
can be overridden with ``$CHROMIUM`` and ``$CHROMEDRIVER``. Set ``$STORMWATCH_SCREENSHOT`` to
keep the page's screenshot somewhere of your choosing as well.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from detector.cli import read_labels
from detector.events import Alert, IncidentLabel
from detector.simulate import SimulationSpec, write_simulation
from detector.web.control import LocalBreakerControl, LocalFeedback
from detector.web.feed import Feed, build_view_from_replay
from detector.web.server import BackgroundServer, create_web_app
from tests.conftest import make_event
from tests.unit.test_web_view import make_alert

pytestmark = pytest.mark.integration

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
TOKEN = "browser-test-token"
WIDTH, HEIGHT = 1440, 1900
WAIT = 20.0


@dataclass
class Dashboard:
    feed: Feed
    alerts: list[Alert]
    labels: list[IncidentLabel]
    control: LocalBreakerControl
    server: BackgroundServer


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """A quarter day after six hours of warm-up (seed 7): a retry storm, a cost spike, an agent loop, a budget burn."""
    paths = write_simulation(SimulationSpec(seed=7, days=0.25, warmup_hours=6.0), tmp_path_factory.mktemp("sim"))
    feed, alerts = build_view_from_replay(paths["events"], paths["config"])
    control = LocalBreakerControl(feed.view)
    app = create_web_app(
        feed.view, feed.metrics, breaker_control=control, feedback_sink=LocalFeedback(), api_token=TOKEN
    )
    with BackgroundServer(app, port=0) as server:
        yield Dashboard(feed, alerts, read_labels(paths["labels"]), control, server)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        f"need {CHROMIUM} and {CHROMEDRIVER}: run deploy/browser/install.sh (Debian chromium, chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: WebDriver, dashboard: Dashboard) -> WebDriverWait[WebDriver]:
    browser.get(dashboard.server.url)
    wait = WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: d.execute_script("return document.body.dataset.version !== undefined"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "conn"), "live"))
    return wait


def incident_ids(browser: WebDriver, tab: str) -> set[str]:
    browser.find_element(By.CSS_SELECTOR, f'#incident-tabs button[data-tab="{tab}"]').click()
    cards = browser.find_elements(By.CSS_SELECTOR, '#incidents [data-testid="incident"]')
    return {c.get_attribute("data-incident-id") or "" for c in cards}


def severe_console_errors(browser: WebDriver, expected: str | None = None) -> list[str]:
    """Errors in the browser's console (a script error, a CSP violation), but for the ``expected`` one."""
    entries = browser.get_log("browser")  # type: ignore[attr-defined]
    return [e["message"] for e in entries if e["level"] == "SEVERE" and not (expected and expected in e["message"])]


def test_the_replays_incidents_are_listed(browser: WebDriver, dashboard: Dashboard) -> None:
    open_page(browser, dashboard)
    shown = incident_ids(browser, "active") | incident_ids(browser, "recent")
    replayed = {a.incident_id for a in dashboard.alerts}
    assert len(replayed) >= 4
    assert replayed <= shown
    assert shown <= {i["incident_id"] for i in dashboard.feed.view.incidents()}
    # Every labelled incident of the simulation is on the page, with its kind and entity.
    cards: set[tuple[str | None, str | None]] = set()
    for tab in ("active", "recent"):
        browser.find_element(By.CSS_SELECTOR, f'#incident-tabs button[data-tab="{tab}"]').click()
        for card in browser.find_elements(By.CSS_SELECTOR, '#incidents [data-testid="incident"]'):
            cards.add((card.get_attribute("data-kind"), card.get_attribute("data-entity")))
    wanted = {(lb.kind, str(lb.entity)) for lb in dashboard.labels if lb.kind != "benign"}
    assert {k for k, _ in wanted} == {"cost_spike", "retry_storm", "agent_loop", "budget_burn"}
    assert wanted <= cards
    # The explanation sentence and the dollar figures are shown.
    first = browser.find_element(By.CSS_SELECTOR, '#incidents [data-testid="incident"]')
    assert first.find_element(By.CSS_SELECTOR, ".inc-summary").text.strip()
    assert "$" in first.find_element(By.CSS_SELECTOR, ".inc-money").text
    assert severe_console_errors(browser) == []


def test_the_chart_is_drawn_and_follows_the_range(browser: WebDriver, dashboard: Dashboard) -> None:
    wait = open_page(browser, dashboard)
    teams = {s["team"] for s in dashboard.feed.view.spend_series()["series"]}
    paths = browser.find_elements(By.CSS_SELECTOR, "#chart svg path.series:not(.partial)")
    assert {p.get_attribute("data-team") for p in paths} == teams
    for path in paths:
        assert (path.get_attribute("d") or "").count("L") >= 10
        assert browser.execute_script("return arguments[0].getTotalLength()", path) > 100
    legend = browser.find_element(By.ID, "legend").text
    assert all(team in legend for team in teams)
    # One-hour range: sixty one-minute steps, the last still filling (dashed).
    browser.find_element(By.CSS_SELECTOR, '#range button[data-range="3600"]').click()
    wait.until(
        lambda d: (
            (d.find_element(By.CSS_SELECTOR, "#chart svg path.series:not(.partial)").get_attribute("d") or "").count(
                "L"
            )
            == 58
        )
    )
    # Hovering shows each team's rate at that minute.
    chart = browser.find_element(By.CSS_SELECTOR, "#chart svg")
    ActionChains(browser).move_to_element(chart).perform()
    tip = browser.find_element(By.CSS_SELECTOR, "#chart .chart-tip")
    wait.until(lambda d: tip.is_displayed())
    assert "/h" in tip.text and "UTC" in tip.text
    browser.find_element(By.CSS_SELECTOR, '#range button[data-range="21600"]').click()


def wait_for_breaker(wait: WebDriverWait[WebDriver], entity: str, state: str) -> WebElement:
    selector = f'#breakers tr[data-testid="breaker"][data-entity="{entity}"][data-state="{state}"]'
    element: WebElement = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, selector)))
    return element


def test_a_live_alert_arrives_and_its_breaker_button_works(browser: WebDriver, dashboard: Dashboard) -> None:
    wait = open_page(browser, dashboard)
    browser.execute_script("sessionStorage.clear()")
    browser.find_element(By.CSS_SELECTOR, '#incident-tabs button[data-tab="active"]').click()
    view = dashboard.feed.view
    storm = next(lb for lb in dashboard.labels if lb.kind == "retry_storm")
    entity = str(storm.entity)
    assert storm.entity.type == "api_key"
    alert = make_alert("live-storm", severity="critical", entity=entity, at=view.watermark, rate=42.0, owner=storm.team)

    # Live: the alert is fed after the page loaded, and the page shows it without a reload.
    dashboard.feed.observe_alert(alert)
    card_selector = '#incidents [data-testid="incident"][data-incident-id="live-storm"]'
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, card_selector)))
    assert "$42.00/h" in card.text and "critical" in card.text.lower()

    # A wrong token is refused and forgotten; nothing reaches the control.
    requests_before = len(dashboard.control.requests)
    card.find_element(By.CSS_SELECTOR, 'button[data-action="open-breaker"]').click()
    dialog_input = wait.until(ec.visibility_of_element_located((By.ID, "token-input")))
    dialog_input.send_keys("not-the-token")
    browser.find_element(By.ID, "token-ok").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "toast"), "wrong token"))
    assert len(dashboard.control.requests) == requests_before
    assert browser.execute_script("return sessionStorage.getItem('stormwatch.token')") is None

    # The right token opens the breaker: the click reaches the control and the page shows it open.
    browser.find_element(By.CSS_SELECTOR, f'{card_selector} button[data-action="open-breaker"]').click()
    wait.until(ec.visibility_of_element_located((By.ID, "token-input"))).send_keys(TOKEN)
    browser.find_element(By.ID, "token-ok").click()
    row = wait_for_breaker(wait, entity, "open")
    assert "open" in row.find_element(By.CSS_SELECTOR, '[data-testid="breaker-state"]').text.lower()
    request = dashboard.control.requests[-1]
    assert (str(request.entity), request.action, request.incident_id, request.actor, request.owner) == (
        entity,
        "open",
        "live-storm",
        "dashboard",
        storm.team,  # the incident's team: whose breaker it is
    )
    assert request.reason.startswith("Retry storm:")
    assert view.breaker(request.entity, storm.team).state.value == "open"  # type: ignore[union-attr]
    wait.until(ec.text_to_be_present_in_element((By.ID, "kpi-breakers"), "1"))
    wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'{card_selector} button[data-action="close-breaker"]'))
    )

    # Closing it from the breakers table (the token is remembered for the tab).
    row.find_element(By.CSS_SELECTOR, 'button[data-action="close-breaker"]').click()
    wait_for_breaker(wait, entity, "closed")
    assert dashboard.control.requests[-1].action == "close"
    assert view.breaker(request.entity, storm.team).state.value == "closed"  # type: ignore[union-attr]
    wait.until(ec.text_to_be_present_in_element((By.ID, "kpi-breakers"), "0"))
    assert (
        severe_console_errors(
            browser, expected="/api/breakers - Failed to load resource: the server responded with a status of 403"
        )
        == []
    )


def test_an_agent_two_teams_name_opens_as_the_incidents_teams(browser: WebDriver, dashboard: Dashboard) -> None:
    wait = open_page(browser, dashboard)
    browser.find_element(By.CSS_SELECTOR, '#incident-tabs button[data-tab="active"]').click()
    at = dashboard.feed.view.watermark
    for i, (team, cost) in enumerate([("ads", 9.0), ("support", 2.0)] * 3):  # ads spends most on its "twin"
        dashboard.feed.observe_event(make_event(at + i, team=team, agent_id="twin", api_key_id=f"k-{team}"), cost)
    alert = make_alert("twin-loop", kind="agent_loop", entity="agent:twin", at=at + 5, owner="support")
    dashboard.feed.observe_alert(alert)
    card_selector = '#incidents [data-testid="incident"][data-incident-id="twin-loop"]'
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, card_selector)))
    card.find_element(By.CSS_SELECTOR, ".inc-entity").click()  # support's loop: support's twin, not ads'
    wait.until(ec.text_to_be_present_in_element((By.ID, "entity-title"), "agent twin · team support"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "entity-body"), "Owned by team support"))
    assert "$6.00" in browser.find_element(By.ID, "entity-body").text  # three calls at $2, none of ads' $27
    others = browser.find_element(By.CSS_SELECTOR, '#entity-body [data-testid="other-teams"]')
    others.find_element(By.TAG_NAME, "button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "entity-title"), "agent twin · team ads"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "entity-body"), "$27.00"))
    browser.find_element(By.ID, "entity-close").click()
    assert severe_console_errors(browser) == []


def test_the_screenshot_is_not_blank(browser: WebDriver, dashboard: Dashboard, tmp_path: Path) -> None:
    open_page(browser, dashboard)
    browser.find_element(By.CSS_SELECTOR, '#incident-tabs button[data-tab="active"]').click()
    png = browser.get_screenshot_as_png()
    (tmp_path / "dashboard.png").write_bytes(png)
    if os.environ.get("STORMWATCH_SCREENSHOT"):
        Path(os.environ["STORMWATCH_SCREENSHOT"]).write_bytes(png)
    pixels = png_pixels(png)
    assert pixels.shape[1] == WIDTH and pixels.shape[0] > HEIGHT // 2  # the viewport, less the window's frame
    colours, counts = np.unique(pixels.reshape(-1, pixels.shape[2])[:, :3], axis=0, return_counts=True)
    assert len(colours) > 500, "the page looks blank"
    assert counts.max() / counts.sum() < 0.9, "one colour covers nearly the whole page"
    # The chart's area holds the lines' colours, not just white.
    box = browser.find_element(By.ID, "chart").rect
    scale = pixels.shape[1] / browser.execute_script("return window.innerWidth")
    top, left = int(box["y"] * scale), int(box["x"] * scale)
    crop = pixels[top : top + int(box["height"] * scale), left : left + int(box["width"] * scale), :3]
    assert crop.size and len(np.unique(crop.reshape(-1, 3), axis=0)) > 50


# -- a PNG reader, so the check needs no imaging library ---------------------------------------


def png_pixels(png: bytes) -> np.ndarray:
    """8-bit RGB or RGBA, non-interlaced (what Chromium writes), as an array of shape (height, width, channels)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        chunk = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    assert header is not None, "no IHDR"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6), f"unsupported PNG {header}"
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average, Paeth: each byte needs the one decoded before it
            cur = _unfilter(kind, line.tolist(), prev.tolist(), bpp)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def _unfilter(kind: int, line: list[int], prev: list[int], bpp: int) -> np.ndarray:
    cur = [0] * len(line)
    for i, x in enumerate(line):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (x + ((a + b) >> 1)) & 255
        else:
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            cur[i] = (x + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return np.array(cur, np.int64)
