"""Pictures of a :class:`tlextract.ops.monitor.Monitoring`: a token x trait heatmap (PNG) per answer
and an HTML page that colours the text by one trait's score.

Colour scale. With ``poles`` (the mean projection of the extraction's pos and neg examples at the
same layer, :func:`tlextract.steering.sweep.pole_means`) a score is shown as
``(score - midpoint) / (half the pos - neg gap)``: 0 is halfway between the two, +1 reads like an
average positive example, -1 like an average negative one. Without them, as a z-score over the
answer's tokens. Colours are clipped at +/-2; prompt tokens (chat template included) are drawn but
do not set the scale, since a few of them carry very large residuals.

Thresholds. With ``thresholds`` (per trait a :class:`tlextract.monitoring.alarm.Alarm`, the
alarm at a chosen false-alarm rate, or an older :class:`tlextract.monitoring.calibrate.Calibration`)
an answer token whose (windowed) score is above its trait's threshold gets a black dot in the
heatmap and is bold and underlined in the page (:func:`above_threshold`), and each trait's
threshold, hit and false-alarm rates are stated beside it. The colours stay on the scale above.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure

from tlextract.monitoring.alarm import Alarm
from tlextract.monitoring.calibrate import Calibration
from tlextract.ops.monitor import Monitoring, TokenScores
from tlextract.report.figures import save_figure
from tlextract.store import write_json, write_text

Poles = Mapping[str, Mapping[str, float] | None]
Thresholds = Mapping[str, Calibration | Alarm]
CLIP = 2.0
CMAP = "RdBu_r"
TOKENS_PER_ROW = 40


def normalise(
    text: TokenScores, trait: str, poles: Mapping[str, float] | None
) -> tuple[list[float], str]:
    """The trait's scores on the colour scale of the module docstring, and its description."""
    scores = text.scores[trait]
    if poles is not None and abs(poles["pos"] - poles["neg"]) > 1e-6:
        mid, half = (poles["pos"] + poles["neg"]) / 2, (poles["pos"] - poles["neg"]) / 2
        return [(s - mid) / half for s in scores], "+1 = extraction pos mean, -1 = neg mean"
    answer = [s for s, p in zip(scores, text.is_prompt, strict=True) if not p] or scores
    mu = sum(answer) / len(answer)
    sd = math.sqrt(sum((s - mu) ** 2 for s in answer) / len(answer)) or 1.0
    return [(s - mu) / sd for s in scores], "z-score over the answer's tokens"


def _label(token: str) -> str:
    """Newlines and other control characters spelled out (fonts have no glyph for them)."""
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in token)
    return shown or "∅"


def above_threshold(text: TokenScores, trait: str, thresholds: Thresholds | None) -> list[bool]:
    """Per token: an answer token whose raw score is above ``trait``'s threshold. Prompt tokens
    never are: the false-alarm rate was measured on answer tokens, and template tokens carry
    outsized residuals."""
    cal = (thresholds or {}).get(trait)
    if cal is None:
        return [False] * len(text.tokens)
    flags = cal.above(text.scores[trait], text.is_prompt)
    return [a and not p for a, p in zip(flags, text.is_prompt, strict=True)]


def _mark_above(ax: Axes, above: list[list[bool]], chunk: range) -> None:
    """A black dot (white rim, seen on any colour) on each cell above its trait's threshold."""
    cells = [(x, y) for y, row in enumerate(above) for x, i in enumerate(chunk) if row[i]]
    if cells:
        xs, ys = zip(*cells, strict=True)
        ax.scatter(xs, ys, s=14, c="black", edgecolors="white", linewidths=0.6, zorder=3)


def _legend(mon: Monitoring, thresholds: Thresholds | None) -> list[str]:
    if thresholds is None:
        return []
    return ["black dot: answer token above the trait's threshold"] + [
        thresholds[t].describe() if t in thresholds else f"{t}: no calibration" for t in mon.traits
    ]


def heatmap_figure(
    mon: Monitoring, index: int, poles: Poles | None = None, thresholds: Thresholds | None = None
) -> Figure:
    """Answer ``index``: traits down, tokens across (wrapped every :data:`TOKENS_PER_ROW`),
    cells above a trait's threshold dotted when ``thresholds`` are given."""
    text = mon.texts[index]
    n = len(text.tokens)
    rows = [normalise(text, t, (poles or {}).get(t)) for t in mon.traits]
    above = [above_threshold(text, t, thresholds) for t in mon.traits]
    legend = _legend(mon, thresholds)
    chunks = [range(i, min(i + TOKENS_PER_ROW, n)) for i in range(0, n, TOKENS_PER_ROW)]
    fig = Figure(
        figsize=(13, len(chunks) * (0.35 * len(mon.traits) + 1.3) + 1.0 + 0.2 * len(legend)),
        layout="constrained",
    )
    axes = fig.subplots(len(chunks), 1, squeeze=False)[:, 0]
    norm = Normalize(-CLIP, CLIP)
    image = None
    for ax, chunk in zip(axes, chunks, strict=True):
        values = [[row[0][i] for i in chunk] for row in rows]
        image = ax.imshow(values, cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest")
        _mark_above(ax, above, chunk)
        ax.set_xlim(-0.5, TOKENS_PER_ROW - 0.5)  # a short last row keeps the token width
        ax.set_xticks(
            range(len(chunk)), [_label(text.tokens[i]) for i in chunk], rotation=90, fontsize=7
        )
        for tick, i in zip(ax.get_xticklabels(), chunk, strict=True):
            if text.is_prompt[i]:
                tick.set_color("grey")
        ax.set_yticks(
            range(len(mon.traits)), [f"{t} (L{mon.layers[t]})" for t in mon.traits], fontsize=8
        )
        boundary = sum(text.is_prompt) - chunk.start
        if 0 < boundary < len(chunk):
            ax.axvline(boundary - 0.5, color="black", linewidth=1.5)
    scales = sorted({label for _, label in rows})
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="; ".join(scales), shrink=0.8)
    fig.suptitle(
        "\n".join(
            [
                "per-token projection on each trait vector · prompt tokens in grey, black line: "
                "answer starts",
                *legend,
                repr(text.prompt),
            ]
        ),
        fontsize=10,
    )
    return fig


def plot_heatmap(
    mon: Monitoring,
    index: int,
    path: Path,
    poles: Poles | None = None,
    thresholds: Thresholds | None = None,
) -> Path:
    """:func:`heatmap_figure` of answer ``index`` as a PNG."""
    return save_figure(heatmap_figure(mon, index, poles, thresholds), path, dpi=100)


def _threshold_note(cal: Calibration | Alarm | None) -> str:
    if cal is None:
        return ""
    note = f"Bold and underlined: answer tokens above the trait's threshold. {cal.describe()}."
    return f"\n<p>{html.escape(note)}</p>"


def token_html(
    mon: Monitoring,
    trait: str,
    poles: Mapping[str, float] | None = None,
    thresholds: Thresholds | None = None,
) -> str:
    """A page with every answer, each token's background coloured by ``trait``'s score; tokens
    above the trait's threshold in bold and underlined when ``thresholds`` has it."""
    cmap, norm = colormaps[CMAP], Normalize(-CLIP, CLIP)
    cal = (thresholds or {}).get(trait)
    parts = []
    scale = ""
    for text in mon.texts:
        values, scale = normalise(text, trait, poles)
        spans = [
            f'<span class="{"prompt" if p else "answer"}{" above" if a else ""}" '
            f'style="background:{to_hex(cmap(norm(v)))}" title="{raw:.3f} ({v:+.2f})">'
            f"{html.escape(tok)}</span>"
            for tok, p, v, raw, a in zip(
                text.tokens,
                text.is_prompt,
                values,
                text.scores[trait],
                above_threshold(text, trait, thresholds),
                strict=True,
            )
        ]
        parts.append(
            f'<h2>{html.escape(text.prompt)}</h2>\n<div class="text">{"".join(spans)}</div>'
        )
    title = f"{trait} · layer {mon.layers[trait]} ({mon.hook_names[trait]})"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.text {{ white-space: pre-wrap; font-family: monospace; line-height: 1.8; }}
.prompt {{ opacity: 0.45; }}
.above {{ font-weight: bold; text-decoration: underline; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each token is coloured by its residual's projection on the {html.escape(trait)} vector
(red: more of the trait, blue: less; {html.escape(scale)}; clipped at &plusmn;{CLIP:g}).
Faded: the prompt. Hover for the raw projection.</p>{_threshold_note(cal)}
{chr(10).join(parts)}
</body></html>
"""


def write_monitoring(
    mon: Monitoring,
    out: Path,
    color_trait: str,
    poles: Poles | None = None,
    thresholds: Thresholds | None = None,
) -> list[Path]:
    """``monitor.json`` (with the poles and calibrations), ``heatmap_<i>.png`` per answer and
    ``<color_trait>.html`` in ``out``."""
    calibration = {t: asdict(c) for t, c in (thresholds or {}).items()}
    write_json(
        out / "monitor.json",
        {**asdict(mon), "poles": dict(poles or {}), "calibration": calibration},
    )
    paths = [out / "monitor.json"]
    paths += [
        plot_heatmap(mon, i, out / f"heatmap_{i}.png", poles, thresholds)
        for i in range(len(mon.texts))
    ]
    page = out / f"{color_trait}.html"
    write_text(page, token_html(mon, color_trait, (poles or {}).get(color_trait), thresholds))
    return [*paths, page]
