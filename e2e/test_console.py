"""The web console in a real browser, on stacks made by the real CLI.

Debian's Chromium (/usr/bin/chromium) driven by Playwright for Python
(``setup.sh`` installs both; Playwright's own browser download is never used).
One scenario: sign in with a token, find a stack by tag, open its resources and
a resource, open an update and see the diff of a changed property, watch a
running update finish (the page reloads itself), sign out. The browser's
console must stay free of errors (a CSP violation is one). Every page is
saved as a screenshot under the test's tmp dir and checked not blank; with
PULUMI_BACKEND_CONSOLE_SCREENSHOTS=DIR the README's three (README_SHOTS) are
also copied there: ``PULUMI_BACKEND_CONSOLE_SCREENSHOTS=docs`` refreshes them.
"""

import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from conftest import TOKEN, unavailable, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
README_SHOTS = ("stacks", "resources", "update")
# Read at import: the e2e fixture clears PULUMI_* variables before each test.
SCREENSHOTS_TO = os.environ.get("PULUMI_BACKEND_CONSOLE_SCREENSHOTS")
SECRETS = ("hunter2-e2e-output", "s3cr3t-e2e-content", "topsecret-e2e-config")


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium; see e2e/setup.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (see e2e/setup.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def png_ink(path):
    """Fraction of non-zero bytes in a PNG's filtered scanlines (~0 for one colour)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return sum(1 for b in raw[::7] if b) / len(raw[::7])


class Shots:
    def __init__(self, folder):
        self.folder, self.taken = folder, []

    def take(self, page, name, full_page=True):
        html = page.content()
        leaked = [s for s in SECRETS if s in html]
        assert not leaked, f"the {name} page shows {leaked}"
        path = self.folder / f"console-{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        assert path.stat().st_size > 8000, f"{path} looks blank"
        assert png_ink(path) > 0.001, f"{path} looks blank"  # white: ~0
        self.taken.append(path)


@pytest.mark.timeout_seconds(420)
def test_console_in_a_browser(e2e, browser, tmp_path):
    files = e2e.files
    spec = {"dir": str(files), "components": 2,
            "files": {"alpha": {"content": "1"},
                      "beta": {"content": SECRETS[1], "secret": True, "protect": True}},
            "outputs": {"site": "https://example.com/<b>"},
            "secret_outputs": {"password": SECRETS[0]}}
    stack = e2e.stack("web")
    e2e.run("stack", "tag", "set", "owner", "console-e2e", "--stack", "web")
    e2e.run("config", "set", "--secret", "dbpass", SECRETS[2], "--stack", "web")
    e2e.up(stack, spec)
    spec["files"]["alpha"]["content"] = "2"
    e2e.up(stack, spec)
    e2e.stack("other")  # a stack the tag filter must hide

    errors = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    shots = Shots(tmp_path)
    base = e2e.server.url

    # Sign in: any page sends us to the form first.
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    shots.take(page, "sign-in")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    cookie = next(c for c in context.cookies() if c["name"] == "pb_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Find the stack by its tag.
    page.fill("input[name=tag]", "owner=console-e2e")
    page.click("form.search button")
    page.wait_for_url(re.compile(r".*tag=owner.*"))
    links = page.locator("table a").all_inner_texts()
    assert links == ["web"], links
    shots.take(page, "stacks")
    page.click("text=web")
    page.wait_for_url(re.compile(r".*/stacks/.+/web$"))
    overview = page.content()
    assert "[secret]" in overview and "owner: console-e2e" in page.inner_text("main")
    assert "dbpass" in overview and "https://example.com/&lt;b&gt;" in overview
    shots.take(page, "overview")

    # Resources and one resource.
    page.click(".tabs >> text=Resources")
    page.wait_for_url(re.compile(r".*/resources$"))
    assert page.locator("ul.tree a", has_text="alpha").count() == 1
    assert "e2e:index:Group" in page.content()
    shots.take(page, "resources")
    page.click("ul.tree a >> text=beta")
    page.wait_for_url(re.compile(r".*/resource\?urn=.*"))
    resource = page.content()
    assert "protect" in resource and "[secret]" in resource
    shots.take(page, "resource")

    # Activity and the second update: the diff of alpha's content.
    page.click(".tabs >> text=Activity")
    page.wait_for_url(re.compile(r".*/activity$"))
    shots.take(page, "activity")
    page.click("table tr:nth-child(1) td:first-child a")
    page.wait_for_url(re.compile(r".*/updates/.+"))
    diff = page.locator(".diff", has_text="content")
    assert diff.count() >= 1, page.content()
    assert diff.first.inner_text() == '~ content: "1" → "2"'
    assert page.locator(".step.op-update .sym").first.inner_text() == "~"
    shots.take(page, "update")

    # A running update: its page reloads itself until the update ends.
    spec["files"]["gamma"] = {"content": "slow", "sleep": 8}
    job = e2e.spawn("up", "web", spec)
    wait_for(lambda: (files / "gamma.txt.started").exists(), "the slow resource to start")
    page.click(".tabs >> text=Activity")
    page.wait_for_url(re.compile(r".*/activity$"))
    assert page.locator("table tr:nth-child(1) .badge").inner_text() == "running"
    page.click("table tr:nth-child(1) td:first-child a")
    assert page.locator("meta[http-equiv=refresh]").count() == 1
    assert page.locator("h2 .badge").inner_text() == "running"  # (the CLI sends events in batches)
    shots.take(page, "running")
    page.locator("h2 .badge", has_text="succeeded").wait_for(timeout=90000)
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    assert job.wait(60) == 0, job.stderr.read()
    assert page.locator(".step.op-create", has_text="gamma").count() == 1

    # A phone-sized window: the stacks page still reads.
    phone = browser.new_context(viewport={"width": 390, "height": 844},
                                storage_state=context.storage_state())
    small = phone.new_page()
    small.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    small.goto(base + "/")
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    shots.take(small, "stacks-phone")
    phone.close()

    # Tokens, then sign out.
    page.click("header >> text=Tokens")
    page.wait_for_url(base + "/tokens")
    shots.take(page, "tokens")
    page.click("header button")
    page.wait_for_url(re.compile(r".*/login$"))
    page.goto(base + "/stacks/x/y")
    assert "/login" in page.url
    assert errors == [], errors

    assert len(shots.taken) == 10
    if SCREENSHOTS_TO:
        Path(SCREENSHOTS_TO).mkdir(parents=True, exist_ok=True)
        for name in README_SHOTS:
            shot = f"console-{name}.png"
            shutil.copy(tmp_path / shot, Path(SCREENSHOTS_TO) / shot)
    context.close()
