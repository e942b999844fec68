"""The ``monitor`` command's token page in headless Chromium: every answer renders, nothing is
logged as an error, and hovering a token shows the score ``monitor.json`` saved for it."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from tlextract.cli.main import main

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["Is 1 < 2 & <b>bold</b>?", "Why?"]
# token_html's title: the raw projection, then the colour-scale value.
TITLE = re.compile(r"^(-?\d+\.\d{3}) \(([+-]\d+\.\d{2})\)$")


def _monitor_page(experiments: Path) -> Path:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments)]
    assert main(["run", *base, "--n-examples", "4"]) == 0
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    assert main(["monitor", *base, *prompts, "--max-new-tokens", "5", "--color-trait", "beta"]) == 0
    return experiments / "tiny" / "monitor" / "beta.html"


def _scaled(text: dict, poles: dict | None) -> list[float]:
    """The colour-scale values report/monitor_view.py documents, computed here from the JSON:
    +/-1 at the poles, else the z-score over the answer's tokens."""
    scores = text["scores"]["beta"]
    if poles is not None:
        mid, half = (poles["pos"] + poles["neg"]) / 2, (poles["pos"] - poles["neg"]) / 2
        return [(s - mid) / half for s in scores]
    answer = [s for s, prompt in zip(scores, text["is_prompt"], strict=True) if not prompt]
    mu, sd = statistics.fmean(answer), statistics.pstdev(answer)
    return [(s - mu) / sd for s in scores]


def test_monitor_page_renders_and_hover_shows_the_saved_scores(
    experiments: Path, page, screenshots: Path
) -> None:
    html = _monitor_page(experiments)
    saved = json.loads((html.parent / "monitor.json").read_text())
    page.open(html)
    page.assert_rendered("h1", "h2", ".text")
    blocks = page.tab.locator(".text").all()
    assert len(blocks) == len(saved["texts"]) == len(PROMPTS)
    # The prompts are shown as typed (escaped, not parsed as markup).
    assert page.tab.locator("h2").all_inner_texts() == PROMPTS
    for block, text in zip(blocks, saved["texts"], strict=True):
        spans = block.locator("span").all()
        assert len(spans) == len(text["tokens"])
        answer = [i for i, prompt in enumerate(text["is_prompt"]) if not prompt]
        scaled = _scaled(text, saved["poles"]["beta"])
        hovered = 0
        for i in [0, *answer]:  # the first template token, then every answer token
            box = spans[i].bounding_box()
            if not box or box["width"] == 0:  # an empty or newline-only token has no area
                continue
            shown = TITLE.match(page.hover(spans[i]))
            assert shown, f"token {i}: unexpected title"
            score = text["scores"]["beta"][i]
            assert float(shown[1]) == pytest.approx(score, abs=5e-4), f"token {i}"
            assert float(shown[2]) == pytest.approx(scaled[i], abs=5e-3), f"token {i}"
            hovered += 1
        assert hovered > len(answer) // 2, "too few tokens could be hovered"
    shot = page.screenshot(screenshots / "monitor-page-tiny.png")
    assert shot.read_bytes().startswith(b"\x89PNG")
