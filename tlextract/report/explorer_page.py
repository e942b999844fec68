"""The explorer page: one self-contained HTML file (styles, script and data inline, no network),
drawn in the browser from the data of :func:`tlextract.report.explorer.explorer_data`.

The data sit in ``<script type="application/json" id="explorer-data">``; the page's script
(``explorer_template.html``, shipped as package data) builds the views with stable ids:
``#overview``, ``#cosines``, ``#trait-<name>``, and per run ``#curve-``, ``#tokens-``,
``#steer-``, ``#alarm-``, ``#meaning-<name>[-<variant>-<engine>]`` (the suffix for runs other
than the instruction variant on TransformerLens). Each coloured token is a span with
``data-score`` (its per-token score, as in the data) and ``data-token-id``.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

from tlextract.store import write_text

PLACEHOLDER = "/*DATA*/"
# Where a template takes page_common.js and page_common.css (shared with the live page).
COMMON, COMMON_CSS = "/*COMMON*/", "/*COMMON_CSS*/"


def _finite(x: Any) -> Any:
    """NaN and infinities as null: JSON.parse rejects them (an unavailable baseline is NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def render(template_name: str, data: dict[str, Any]) -> str:
    """The package's template ``template_name`` with page_common.js, page_common.css and ``data``
    inline; every ``<`` (only ever inside a JSON string) written as ``\\u003c`` so no text in the
    data can close the script."""
    payload = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c")
    package = files("tlextract.report")
    template = package.joinpath(template_name).read_text("utf-8")
    for placeholder, name in ((COMMON, "page_common.js"), (COMMON_CSS, "page_common.css")):
        template = template.replace(placeholder, package.joinpath(name).read_text("utf-8"), 1)
    return template.replace(PLACEHOLDER, payload, 1)


def page_html(data: dict[str, Any]) -> str:
    """The explorer page with ``data`` inline."""
    return render("explorer_template.html", data)


def write_page(data: dict[str, Any], path: Path) -> Path:
    write_text(path, page_html(data))
    return path
