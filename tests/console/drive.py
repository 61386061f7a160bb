"""Drives zenith console in headless Chromium (Playwright), the way a user clicks through
it, and checks each step through the zenith CLI and psql as well. Run by the Rust test
`console::the_console_drives_pgs_and_snapshots_in_a_real_browser`, which sets up the repo.

usage: drive.py LOGIN_URL SHOTS_DIR
environment: ZENITH_CMD (JSON list: the zenith command with --repo-dir), CHROMIUM, PSQL
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

LOGIN, SHOTS = sys.argv[1], sys.argv[2]
BASE = LOGIN.split("/console")[0]
HOST = BASE.removeprefix("http://")
ZENITH = json.loads(os.environ["ZENITH_CMD"])
PSQL = os.environ["PSQL"]
TIMEOUT = 90_000


def zenith(*args):
    out = subprocess.run(ZENITH + list(args), capture_output=True, text=True)
    assert out.returncode == 0, f"zenith {args} failed: {out.stdout}{out.stderr}"
    return out.stdout


def psql(connstr, sql):
    out = subprocess.run([PSQL, "-X", "-At", connstr, "-c", sql], capture_output=True, text=True)
    assert out.returncode == 0, f"psql {sql}: {out.stderr}"
    return out.stdout.strip()


def connstr(pg):
    return json.loads(zenith("pg", "show", pg, "--json"))["connstr"]


def http(url, headers=None, method="GET", data=None):
    """The status and headers of one request."""
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def http_status(url, headers=None, method="GET", data=None):
    return http(url, headers, method, data)[0]


def step(name):
    print(f"STEP {name}", flush=True)


def wait_done(page, op):
    """Waits for operation `op` to finish; a failure shows the console's error banner."""
    item = page.locator(f'#ops-list li[data-op="{op}"]').first
    page.wait_for_function(
        """(op) => { const li = document.querySelector(`#ops-list li[data-op="${op}"]`);
                     return li && (li.className === "done" || li.className === "failed"); }""",
        arg=op,
        timeout=TIMEOUT,
    )
    if item.get_attribute("class") != "done":
        raise AssertionError(f"{op} failed: {page.locator('#error-text').inner_text()}")


def answer(page, text=None):
    """Fills the console's dialog (if `text`) and confirms it."""
    dialog = page.locator("dialog#ask")
    expect(dialog).to_be_visible()
    if text is not None:
        dialog.locator("#ask-input").fill(text)
    dialog.locator("#ask-ok").click()


def shot(page, name):
    # The operations panel polls each second: settled, it shows nothing still running.
    page.wait_for_function(
        "() => !document.querySelector('#ops-server li:not(.done):not(.failed)')",
        timeout=TIMEOUT,
    )
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def main():
    step("without a session or the token, the API refuses")
    assert http_status(f"{BASE}/status") == 401
    assert http_status(f"{BASE}/status", {"X-Zenith-Console": "1"}) == 401
    forged = json.dumps({"code": "ab" * 32}).encode()
    assert http_status(f"{BASE}/console/session", method="POST", data=forged) == 401
    # A DNS-rebound name reaches nothing.
    assert http_status(f"{BASE}/console", {"Host": "evil.example"}) == 421

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ["CHROMIUM"], args=["--no-sandbox"], headless=True
        )
        context = browser.new_context(viewport={"width": 1400, "height": 820})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)

        step("the page without logging in says how to log in")
        page.goto(f"{BASE}/console")
        expect(page.locator("#error-text")).to_contain_text("zenith console")

        step("the login link logs in once and shows main running")
        page.goto(LOGIN)
        main_row = page.locator('tr[data-pg="main"]')
        expect(main_row.locator('[data-field="status"]')).to_have_text("running")
        assert page.url.endswith("/console#/pgs"), f"the code stays in the address: {page.url}"
        other = browser.new_context().new_page()
        other.goto(LOGIN)
        expect(other.locator("#error-text")).to_contain_text("used or expired")
        other.context.close()

        step("the session works from the console's own origin only, and no cookie holds it")
        session = page.evaluate("localStorage.getItem('zenith-console-session')")
        assert session and len(session) == 64, session
        assert context.cookies() == [], context.cookies()
        own = {"X-Zenith-Console": session}
        assert http_status(f"{BASE}/status", own) == 200
        assert http_status(f"{BASE}/status", {**own, "Origin": "http://127.0.0.1:1"}) == 401
        assert http_status(f"{BASE}/status", {**own, "Origin": f"http://{HOST}"}) == 200
        assert http_status(f"{BASE}/status", {**own, "Host": "evil.example"}) == 401
        assert http_status(f"{BASE}/status", own, method="OPTIONS") != 200
        assert http_status(f"{BASE}/console/codes", own, method="POST") == 401
        status, headers = http(f"{BASE}/console")
        assert status == 200 and headers["X-Frame-Options"] == "DENY", headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], headers
        main = main_row.locator('[data-field="connstr"]').get_attribute("data-connstr")
        assert psql(main, "select count(*) from t") == "1000"
        shown = main_row.locator('[data-field="connstr"]').inner_text()
        assert main.split("@")[0].split(":")[-1] not in shown, "the password is on screen"

        step("snapshot now, with a tag")
        main_row.locator('button[data-act="snapshot"]').click()
        answer(page, "console")
        wait_done(page, "snapshot of main")
        assert "main@console" in zenith("snapshot", "list")
        zenith("push", "main@console", "team")
        psql(main, "insert into t select generate_series(1001, 1500)")

        step("the timeline shows the snapshot, where it is held, and branches it")
        page.goto(f"{BASE}/console#/pg/main")
        row = page.locator('tr[data-name="main@console"]')
        expect(row).to_contain_text("team")
        shot(page, "timeline.png")
        row.locator('button[data-act="branch"]').click()
        answer(page, "feature")
        wait_done(page, "branch feature")
        assert "feature" in zenith("pg", "list")
        assert psql(connstr("feature"), "select count(*) from t") == "1000"
        # zenith-local's own account of it, with the bytes it restored, in the panel too.
        fetch = """async (path) => (await fetch(path, {headers: {'X-Zenith-Console':
            localStorage.getItem('zenith-console-session')}})).json()"""
        ops = page.evaluate(fetch, "/operations")
        made = [o for o in ops if o["what"] == "create pg feature"]
        assert made and not made[0]["running"] and not made[0].get("error"), ops
        snap = [s for s in page.evaluate(fetch, "/snapshots") if s["name"] == "main@console"][0]
        total, done = made[0]["total_bytes"], made[0]["done_bytes"]
        assert done == total and 0.9 <= total / snap["total_size"] <= 1.1, (made, snap)
        expect(page.locator('#ops-server li[data-what="create pg feature"]')).to_contain_text("finished")

        step("check out main to the snapshot")
        page.locator('tr[data-name="main@console"] button[data-act="checkout"]').click()
        answer(page)
        wait_done(page, "checkout of main")
        assert psql(connstr("main"), "select count(*) from t") == "1000"
        assert "main@HEAD{0}" in zenith("snapshot", "list")

        step("an error reads as a sentence, not JSON")
        page.locator('tr[data-name="main@console"] button[data-act="branch"]').click()
        answer(page, "main")
        page.wait_for_selector('#ops-list li[data-op="branch main"].failed', timeout=TIMEOUT)
        banner = page.locator("#error-text").inner_text()
        assert "main" in banner and "{" not in banner, banner
        page.locator("#error-close").click()

        step("destroy asks for the name typed")
        page.goto(f"{BASE}/console#/pgs")
        feature = page.locator('tr[data-pg="feature"]')
        expect(feature).to_be_visible()
        shot(page, "pgs.png")
        feature.locator('button[data-act="destroy"]').click()
        ok = page.locator("#ask-ok")
        expect(ok).to_be_disabled()
        page.locator("#ask-input").fill("featur")
        expect(ok).to_be_disabled()
        page.locator("#ask-input").fill("feature")
        expect(ok).to_be_enabled()
        ok.click()
        wait_done(page, "destroy feature")
        assert "feature" not in zenith("pg", "list")
        expect(page.locator('tr[data-pg="feature"]')).to_have_count(0)

        step("snapshots and storages pages")
        page.goto(f"{BASE}/console#/snapshots")
        expect(page.locator('tr[data-name="main@console"]')).to_contain_text("team")
        shot(page, "snapshots.png")
        page.goto(f"{BASE}/console#/storages")
        expect(page.locator('tr[data-storage="team"]')).to_be_visible()
        shot(page, "storages.png")
        browser.close()
    step("done")


if __name__ == "__main__":
    main()
