"""The operator console in a real browser (headless Debian Chromium through Selenium): a SIGKILLed
worker's bar turns red and its run shows stopped without a reload; force-cancel from the page;
business scope, read-only and CSRF as the browser sees them; Hebrew right to left; a hostile
worker id shown as text; live updates through PgBouncer in transaction mode (polling).

The SIGKILL test also writes docs/console.png, the README's screenshot."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from outbound_heartbeat import service
from outbound_heartbeat.console import Console, ConsoleServer, standalone

from ..console_support import Browser, viewer_from_cookie
from ..helpers import run_row
from ..pgbouncer import PgBouncer
from ..workers import Worker

Conn = psycopg.Connection[Any]
STALE_AFTER = 4.0
POLL = 1.0
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
#: Set to rewrite docs/console.png (the README's screenshot); otherwise it is written only when
#: missing, and every run takes a fresh one into the test's own folder.
UPDATE_SCREENSHOT_ENV = "OUTBOUND_HEARTBEAT_UPDATE_SCREENSHOT"
TOKEN = "browser-token-0123456789"


pytestmark = pytest.mark.needs("chromium")

@pytest.fixture
def browser() -> Iterator[WebDriver]:
    b = Browser()
    try:
        yield b.driver
    finally:
        b.quit()


@pytest.fixture
def console_url(dsn: str) -> Iterator[str]:
    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=6) as pool:
        console = Console(pool, viewer_from_cookie, listen=dsn, poll_interval=POLL)
        with ConsoleServer(console) as server:
            yield server.url


def login(driver: WebDriver, url: str, viewer: str, path: str = "/") -> None:
    driver.get(url + "/static/console.css")  # a page of the origin, to set its cookie
    driver.delete_all_cookies()
    driver.add_cookie({"name": "viewer", "value": viewer, "path": "/"})
    driver.get(url + path)


def wait(driver: WebDriver, seconds: float = 20.0) -> WebDriverWait[WebDriver]:
    # A live update may replace an element between finding it and reading it: try again.
    return WebDriverWait(driver, seconds, poll_frequency=0.05,
                         ignored_exceptions=[StaleElementReferenceException])


def post_status(driver: WebDriver, path: str, body: str) -> int:
    """POSTs a form from the page's own JavaScript (same origin, the browser's cookies)."""
    status: int = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: arguments[1], credentials: 'same-origin',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}})"
        ".then(r => done(r.status)).catch(e => done(-1));",
        path, body,
    )
    return status


def row_state(driver: WebDriver, run_id: int) -> dict[str, Any] | None:
    """A runs-table row read in one go: the live updates replace rows, so element handles
    go stale between two WebDriver calls."""
    state: dict[str, Any] | None = driver.execute_script(
        "const row = document.getElementById('run-' + arguments[0]);"
        "if (!row) return null;"
        "const bar = row.querySelector('.hb'), reason = row.querySelector('.reason');"
        "const cells = Array.from(row.cells);"
        "return {status: row.dataset.status, bar: bar ? bar.className : null,"
        " reason: reason ? reason.textContent : null,"
        " worker: row.querySelector('.worker').textContent,"
        " xs: cells.map(c => c.getBoundingClientRect().left),"
        " bold: row.querySelectorAll('b, script').length};",
        run_id,
    )
    return state


def start_worker(dsn: str, name: str, run_id: int) -> Worker:
    worker = Worker(dsn, "--worker-id", name, "--run-id", str(run_id), "--dial-seconds", "60")
    worker.wait_for("claimed", timeout=30)
    worker.wait_for("dialing", timeout=30)
    return worker


def test_killed_worker_bar_turns_red_then_run_stops_without_reload(
    dsn: str, conn: Conn, console_url: str, browser: WebDriver, tmp_path: Path
) -> None:
    conn.execute("UPDATE outbound_heartbeat.settings SET stale_after = make_interval(secs => %s)",
                 (STALE_AFTER,))
    earlier = service.create_run(conn, 3, [{"phone": str(i)} for i in range(12)])
    service.force_cancel(conn, earlier.id)
    alive = service.create_run(conn, 2, [{"phone": str(i)} for i in range(20)])
    doomed = service.create_run(conn, 1, [{"phone": str(i)} for i in range(27)])
    workers = []
    try:
        workers.append(start_worker(dsn, "dialer-b", alive.id))
        workers.append(start_worker(dsn, "dialer-a", doomed.id))
        login(browser, console_url, "op")
        wait(browser).until(lambda d: (row_state(d, doomed.id) or {}).get("bar") == "hb hb-ok")
        browser.execute_script("window.notReloaded = true;")

        workers[1].signal(signal.SIGKILL)
        killed = time.monotonic()
        wait(browser, 30).until(lambda d: (row_state(d, doomed.id) or {}).get("bar") != "hb hb-ok")
        missed_after = time.monotonic() - killed
        wait(browser, 30).until(lambda d: (row_state(d, doomed.id) or {}).get("bar") == "hb hb-red")
        red_after = time.monotonic() - killed
        shot = tmp_path / "console.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get(UPDATE_SCREENSHOT_ENV) or not SCREENSHOT.exists():
            SCREENSHOT.write_bytes(shot.read_bytes())

        wait(browser, 30).until(lambda d: (row_state(d, doomed.id) or {}).get("status") == "stopped")
        stopped_after = time.monotonic() - killed
        state = row_state(browser, doomed.id)
        print(f"\n[console] SIGKILL -> missed beat {missed_after:.2f} s, -> red bar"
              f" {red_after:.2f} s, -> stopped {stopped_after:.2f} s"
              f" (stale_after {STALE_AFTER:g} s, poll {POLL:g} s)")
        assert state is not None and state["reason"] == "stale_stopped: stale_heartbeat"
        assert browser.execute_script("return window.notReloaded === true;")
        assert red_after < stopped_after
        # Generous slack for two busy cores: the promise is stale_after plus one poll.
        assert stopped_after <= STALE_AFTER + POLL + 4.0, stopped_after
        assert run_row(conn, doomed.id)["status"] == "stopped"
        assert (row_state(browser, alive.id) or {}).get("status") == "running"
    finally:
        for w in workers:
            w.close()


def test_a_missed_beat_is_amber_long_before_half_of_stale_after(
    dsn: str, conn: Conn, console_url: str, browser: WebDriver
) -> None:
    # stale_after 30 s, beats every 2 s: a heartbeat 4 s old has missed one. The script repaints
    # every 200 ms with the same rule as the server, so the bar stays amber, then turns red at
    # three quarters of stale_after, all on the browser's clock without a new heartbeat.
    silent = service.create_run(conn, 1, [{}])
    beating = service.create_run(conn, 2, [{}])
    claims = {run.id: service.claim_run(conn, f"w{run.business_id}", run.id)
              for run in (silent, beating)}
    assert all(claims.values())
    conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now() - interval '4 s'"
                 " WHERE id = %s", (silent.id,))
    # The other run's worker beats for real, however long the page takes to load on a busy
    # machine: its bar must stay green next to the silent one.
    stop = threading.Event()

    def beat() -> None:
        claim = claims[beating.id]
        assert claim is not None
        with psycopg.connect(dsn, autocommit=True) as worker:
            while not stop.wait(0.5):
                service.heartbeat(worker, beating.id, claim.worker_id, claim.lease_epoch)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        login(browser, console_url, "op")
        # Amber within a few seconds of the page, while the age is far below 15 s (half).
        wait(browser, 6).until(lambda d: (row_state(d, silent.id) or {}).get("bar") == "hb hb-warn")
        age = float(browser.execute_script(
            "return document.querySelector(arguments[0]).textContent;", f"#run-{silent.id} .hb-age"))
        assert age < 12, age
        time.sleep(1.0)  # five repaints later: still amber, the beating one still green
        assert (row_state(browser, silent.id) or {}).get("bar") == "hb hb-warn"
        assert (row_state(browser, beating.id) or {}).get("bar") == "hb hb-ok"
        conn.execute("UPDATE outbound_call_runs SET last_heartbeat_at = now() - interval '21 s'"
                     " WHERE id = %s", (silent.id,))
        wait(browser, 15).until(lambda d: (row_state(d, silent.id) or {}).get("bar") == "hb hb-red")
    finally:
        stop.set()
        beater.join(10)


def test_force_cancel_from_the_page(
    dsn: str, conn: Conn, console_url: str, browser: WebDriver
) -> None:
    run = service.create_run(conn, 4, [{"phone": str(i)} for i in range(30)])
    worker = start_worker(dsn, "dialer-f", run.id)
    try:
        login(browser, console_url, "op", f"/runs/{run.id}")
        # The run's fragment is re-rendered live: click through the page's own JavaScript.
        wait(browser).until(lambda d: d.execute_script(
            "const a = document.querySelector('#run-live a.force'); if (a) a.click(); return !!a;"))
        text = wait(browser).until(lambda d: d.find_element(By.ID, "confirm-text")).text
        assert text == (f"Force-cancel run {run.id} of business 4? 29 queued calls will be failed;"
                        " 1 in progress is left to telephony.")
        browser.find_element(By.CSS_SELECTOR, "button.confirm").click()
        result = wait(browser).until(lambda d: d.find_element(By.ID, "result")).text
        assert result == f"Run {run.id} force-cancelled (was running): 29 calls cancelled."
        worker.wait_exit(30)
        browser.find_element(By.LINK_TEXT, "Back").click()
        event = wait(browser).until(lambda d: d.execute_script(
            "const e = document.querySelector('#timeline tr.ev-force_cancelled');"
            "return e && e.textContent;"))
        assert "jobs failed: 29" in event
        assert browser.execute_script(
            "return document.getElementById('run-status').textContent") == "cancelled"
    finally:
        worker.close()


def test_business_scope_read_only_and_csrf_in_the_browser(
    conn: Conn, console_url: str, browser: WebDriver
) -> None:
    mine = service.create_run(conn, 5, [{}, {}, {}])
    other = service.create_run(conn, 6, [{}, {}, {}])

    login(browser, console_url, "biz:5")
    wait(browser).until(lambda d: row_state(d, mine.id))
    assert row_state(browser, other.id) is None
    browser.get(f"{console_url}/runs/{mine.id}/force-cancel")
    token = browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    assert post_status(browser, f"/runs/{other.id}/force-cancel", f"csrf_token={token}") == 403
    assert post_status(browser, f"/runs/{mine.id}/force-cancel", "") == 403  # no CSRF token

    login(browser, console_url, "ro")
    wait(browser).until(lambda d: row_state(d, other.id))
    assert not browser.find_elements(By.CSS_SELECTOR, "form, button, a.button")
    assert post_status(browser, f"/runs/{other.id}/force-cancel", f"csrf_token={token}") == 403
    assert run_row(conn, mine.id)["status"] == "pending"
    assert run_row(conn, other.id)["status"] == "pending"


def test_hebrew_right_to_left_and_worker_id_shown_as_text(
    conn: Conn, console_url: str, browser: WebDriver
) -> None:
    hostile = "<script>window.pwned = true</script><b>x</b>"
    run = service.create_run(conn, 7, [{}, {}])
    service.claim_run(conn, hostile, run.id)
    login(browser, console_url, "op", "/?lang=he")
    wait(browser).until(lambda d: row_state(d, run.id))
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("dir") == "rtl"
    assert browser.execute_script(
        "return getComputedStyle(document.getElementById('runs')).direction") == "rtl"
    assert "מסוף שיחות יוצאות" in browser.find_element(By.TAG_NAME, "header").text
    state = row_state(browser, run.id)
    assert state is not None
    # Right to left: the first column (the run id) is drawn right of the second (the business).
    assert state["xs"][0] > state["xs"][1]
    assert state["worker"] == hostile and state["bold"] == 0
    assert browser.execute_script("return window.pwned === undefined")
    # The page keeps the language on the next page (cookie).
    browser.get(f"{console_url}/runs/{run.id}")
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("dir") == "rtl"
    # Read in one script call: the live section is replaced on every update, so a handle found
    # in one WebDriver call may be stale by the next.
    wait(browser).until(lambda d: d.execute_script(
        "const w = document.querySelector('#run-live .worker'); return w ? w.textContent : null;"
    ) == hostile)


def test_a_carriage_return_in_a_worker_id_does_not_freeze_the_table(
    conn: Conn, console_url: str, browser: WebDriver
) -> None:
    """A worker id holding CR, ``event:`` and ``data:`` once renamed every ``runs`` event of the
    stream (the page ignored them all): the table must keep updating, with no reload."""
    hostile = "adv\revent: x\rdata: y\r\nevent: z\n"
    run = service.create_run(conn, 5, [{}])
    assert service.claim_run(conn, hostile, run.id) is not None
    login(browser, console_url, "op")
    wait(browser).until(lambda d: row_state(d, run.id))
    wait(browser).until(lambda d: d.find_element(By.ID, "live").text == "live (LISTEN)")
    browser.execute_script("window.notReloaded = true;")
    later = service.create_run(conn, 6, [{}, {}])
    wait(browser, 10).until(lambda d: row_state(d, later.id))
    service.force_cancel(conn, later.id)
    wait(browser, 10).until(lambda d: (row_state(d, later.id) or {}).get("status") == "cancelled")
    assert browser.execute_script("return window.notReloaded === true;")
    # (HTML parsing turns every CR and CRLF of a document into LF.)
    assert browser.execute_script(
        "return document.querySelector('#run-' + arguments[0] + ' .worker').textContent",
        run.id) == hostile.replace("\r\n", "\n").replace("\r", "\n")


def test_a_refused_stream_falls_back_to_polling(
    dsn: str, conn: Conn, browser: WebDriver
) -> None:
    """One stream per viewer: the page's own stream is refused (429) while another is open, and
    the page polls instead, still showing new runs."""
    import http.client

    with ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=4) as pool:
        console = Console(pool, viewer_from_cookie, listen=dsn, poll_interval=POLL,
                          max_streams_per_viewer=1)
        with ConsoleServer(console) as server:
            held = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            held.request("GET", "/stream", headers={"Cookie": "viewer=op"})
            response = held.getresponse()  # kept: dropping it would close the stream
            assert response.status == 200
            try:
                login(browser, server.url, "op")
                wait(browser).until(lambda d: d.find_element(By.ID, "live").text == "live (polling)")
                browser.execute_script("window.notReloaded = true;")
                run = service.create_run(conn, 5, [{}])
                wait(browser, 10).until(lambda d: row_state(d, run.id))
                assert browser.execute_script("return window.notReloaded === true;")
                assert console.streams.open() == 1
            finally:
                response.close()
                held.close()


def test_live_updates_through_pgbouncer_by_polling(
    pgbouncer: PgBouncer, dsn: str, conn: Conn, browser: WebDriver
) -> None:
    with standalone(pgbouncer.dsn_for(dsn), TOKEN, poll_interval=0.5).start() as server:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait(browser).until(lambda d: d.find_element(By.ID, "live").text == "live (polling)")
        browser.execute_script("window.notReloaded = true;")
        run = service.create_run(conn, 8, [{}, {}])
        wait(browser).until(lambda d: row_state(d, run.id))
        service.force_cancel(conn, run.id)
        wait(browser).until(lambda d: (row_state(d, run.id) or {}).get("status") == "cancelled")
        assert browser.execute_script("return window.notReloaded === true;")
        assert server.console.monitor.mode == "poll"
