"""tests/browser.py on hand-made pages: it catches console errors, uncaught exceptions and blank
views, reads a tooltip the page draws, notices a hover that lands elsewhere, and opens local pages
only."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser import Page

pytestmark = pytest.mark.browser

# A tooltip drawn by the page from a data attribute, as the explorer's token spans do.
TOOLTIP = """<p><span class="tok" data-score="0.125">cat</span> <span class="tok">sat</span></p>
<div id="tip" hidden></div>
<script>
for (const t of document.querySelectorAll('.tok[data-score]'))
  t.addEventListener('mouseover', () => {
    const tip = document.getElementById('tip');
    tip.textContent = 'score ' + t.dataset.score; tip.hidden = false; });
</script>"""


@pytest.fixture
def tab(chromium) -> Iterator[Page]:
    """A tab whose errors the test inspects itself (the ``page`` fixture would fail on them)."""
    tab = Page(chromium)
    yield tab
    tab.close()


def _html(tmp_path: Path, body: str, name: str = "page.html") -> Path:
    path = tmp_path / name
    path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"></head><body>{body}</body></html>'
    )
    return path


@pytest.mark.parametrize(
    "script, logged",
    [
        ("console.error('bad thing')", "console.error: bad thing"),
        ("null.x", "uncaught: "),
        (
            "window.addEventListener('load', () => { throw new Error('late') })",
            "uncaught: late",
        ),
    ],
)
def test_errors_while_loading_fail_open(
    tab: Page, tmp_path: Path, script: str, logged: str
) -> None:
    with pytest.raises(AssertionError, match="the page logged 1 error"):
        tab.open(_html(tmp_path, f"<p>text</p><script>{script}</script>"))
    assert len(tab.errors) == 1 and tab.errors[0].startswith(logged)


def test_a_missing_resource_is_an_error(tab: Page, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="Failed to load resource"):
        tab.open(_html(tmp_path, '<p>text</p><img src="missing.png">'))


def test_blank_views_fail(tab: Page, tmp_path: Path) -> None:
    tab.open(_html(tmp_path, '<div id="overview"></div>'))
    with pytest.raises(AssertionError, match="blank page"):
        tab.assert_rendered("#overview")
    with pytest.raises(AssertionError, match="blank screenshot"):
        tab.screenshot(tmp_path / "blank.png")
    assert not (tmp_path / "blank.png").exists()
    tab.open(_html(tmp_path, '<p>text</p><div id="overview" style="display:none">x</div>'))
    with pytest.raises(AssertionError, match="'#overview' #0 is not visible"):
        tab.assert_rendered("#overview")
    with pytest.raises(AssertionError, match="nothing matches '#trait-alpha'"):
        tab.assert_rendered("#trait-alpha")


def test_hover_reads_a_drawn_tooltip_or_the_title(page: Page, tmp_path: Path) -> None:
    page.open(_html(tmp_path, TOOLTIP + '<p><b title="outer"><i>inner</i></b></p>'))
    page.assert_rendered(".tok")
    assert page.hover(".tok[data-score]", shows="#tip") == "score 0.125"
    assert page.hover("i") == "outer"  # the nearest title, as the browser's own tooltip
    assert page.screenshot(tmp_path / "shots" / "tip.png").stat().st_size > 0


def test_a_hover_that_lands_elsewhere_fails(page: Page, tmp_path: Path) -> None:
    cover = '<div title="cover" style="position:fixed;inset:0;background:#fff0"></div>'
    page.open(_html(tmp_path, f'<span id="under" title="under">x</span>{cover}'))
    with pytest.raises(AssertionError, match="the mouse is not over"):
        page.hover(page.tab.locator("#under"))


def test_loopback_urls_open_and_others_do_not(page: Page, tmp_path: Path) -> None:
    _html(tmp_path, "<p>served</p>", "index.html")
    _html(tmp_path, '<p>served</p><img src="missing.png">', "broken.html")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.open(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        assert page.tab.locator("p").inner_text() == "served"
        with pytest.raises(AssertionError, match="404"):
            page.open(f"http://127.0.0.1:{server.server_address[1]}/broken.html")
        page.errors.clear()
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="not a local page"):
        page.open("https://example.com/")
