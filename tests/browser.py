"""Headless Chromium for the browser tests (marker ``browser``): open tlextract's HTML pages, fail
on any console error or uncaught exception, hover elements, take screenshots.

The browser is Debian's ``chromium`` (``make browser`` installs it; ``make test`` depends on it),
driven by Playwright's Python package with ``executable_path``: Playwright downloads no browser of
its own, and its protocol client drives the distribution's current Chromium (checked on 156).
Without the browser the tests fail with a line naming ``make browser``; a local run may set
``TLEXTRACT_BROWSER_OPTIONAL=1`` to skip them instead (never set by ``make test``).

The fixtures ``chromium`` (one browser a session), ``page`` (a fresh :class:`Page` a test,
checked for errors at teardown) and ``screenshots`` (the folder a test saves its pictures in:
``TLEXTRACT_SCREENSHOTS=docs/figures pytest -m browser`` regenerates the docs' ones) live in
``tests/conftest.py``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from matplotlib.image import imread

from tlextract.store import atomic_path

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Locator

CHROMIUM = Path(os.environ.get("TLEXTRACT_CHROMIUM", "/usr/bin/chromium"))
OPTIONAL = "TLEXTRACT_BROWSER_OPTIONAL"
SCREENSHOTS = "TLEXTRACT_SCREENSHOTS"  # the screenshots fixture's folder (tests/conftest.py)
LOCAL_URLS = ("file://", "http://127.0.0.1", "http://localhost", "http://[::1]")
# The last element the mouse entered, from the real mouseover events (headless Chromium does not
# draw native title tooltips, and document.querySelectorAll(':hover') comes back empty in it).
RECORD_HOVER = "document.addEventListener('mouseover', e => { window.__hovered = e.target }, true)"
# The title the browser would show for the hovered element: its own, else its nearest ancestor's.
HOVERED_TITLE = """target => {
    let e = window.__hovered;
    if (!e || !target.contains(e)) return null;
    while (e && !e.title) e = e.parentElement;
    return e ? e.title : '';
}"""


def _unavailable(reason: str) -> None:
    message = f"{reason}: run `make browser` (or set {OPTIONAL}=1 to skip the browser tests)"
    if os.environ.get(OPTIONAL) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@contextmanager
def launch() -> Iterator[Browser]:
    """Headless Debian Chromium, or a failed (skipped with ``TLEXTRACT_BROWSER_OPTIONAL=1``) test
    saying how to install it."""
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (the dev extras have it)")
    with sync_playwright() as driver:
        # Shared memory in /tmp: a container's /dev/shm (64 MB under Docker) crashes tabs, and
        # Debian's launcher script, which would add this flag, misreads df on some of them.
        browser = driver.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A browser tab that records console errors and uncaught exceptions (:attr:`errors`);
    :meth:`check_errors` fails on any. ``.tab`` is Playwright's page for anything else."""

    def __init__(self, browser: Browser, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(5000)  # local pages: waiting longer only delays failing
        self.context.add_init_script(RECORD_HOVER)
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.tab.on("console", self._console)
        self.tab.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _console(self, message: ConsoleMessage) -> None:
        # Chromium asks a served page for /favicon.ico by itself; its 404 is not the page's error.
        if message.type == "error" and not message.location["url"].endswith("/favicon.ico"):
            self.errors.append(f"console.error: {message.text}")

    def open(self, target: Path | str) -> None:
        """Load a local file or a loopback URL, wait for ``load`` and fail on any error so far."""
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        if not url.startswith(LOCAL_URLS):
            raise ValueError(f"not a local page: {url}")
        self.tab.goto(url, wait_until="load")
        self.check_errors()

    def check_errors(self) -> None:
        assert not self.errors, f"the page logged {len(self.errors)} error(s):\n" + "\n".join(
            self.errors
        )

    def assert_rendered(self, *selectors: str) -> None:
        """Every element each selector matches (at least one) is visible, has an area and text."""
        assert self.tab.locator("body").inner_text().strip(), "blank page: the body has no text"
        for selector in selectors:
            found = self.tab.locator(selector).all()
            assert found, f"nothing matches {selector!r}"
            for i, element in enumerate(found):
                box = element.bounding_box()
                shown = element.is_visible() and box and box["width"] * box["height"] > 0
                assert shown, f"{selector!r} #{i} is not visible"
                assert element.inner_text().strip(), f"{selector!r} #{i} shows no text"

    def hover(self, target: str | Locator, shows: str | None = None) -> str:
        """Move the mouse over ``target`` and return what the page shows for it: the text of the
        element ``shows`` selects (a tooltip the page draws) once visible, else the hovered
        element's title. Fails if the mouse landed on anything outside ``target``."""
        element = self.tab.locator(target) if isinstance(target, str) else target
        # force: no waiting for the element to be uncovered; the check below says what got it.
        element.hover(force=True)
        if shows is not None:
            tip = self.tab.locator(shows)
            tip.wait_for(state="visible")
            return tip.inner_text()
        title = element.evaluate(HOVERED_TITLE)
        assert title is not None, f"the mouse is not over {element}"
        return str(title)

    def screenshot(self, path: Path, selector: str | None = None) -> Path:
        """A PNG of the whole page (or of the element ``selector`` picks) at ``path``, written
        atomically; fails if it is one flat colour (a blank view)."""
        png = (
            self.tab.locator(selector).screenshot()
            if selector
            else self.tab.screenshot(full_page=True)
        )
        pixels = imread(io.BytesIO(png), format="png")
        assert (pixels != pixels[0, 0]).any(), f"blank screenshot of {selector or 'the page'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        return path

    def close(self) -> None:
        self.context.close()
