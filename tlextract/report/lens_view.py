"""The report's logit lens: per trait run, ``vector_tokens.json`` next to ``metrics.json`` (the
tokens its mean_diff vector promotes and suppresses at its cross-validated layer), and the
experiment summary's table of them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tlextract.evaluation.cosines import saved_vectors
from tlextract.evaluation.crossval import HEADLINE
from tlextract.model.decoding import Model
from tlextract.ops.vector_tokens import VectorTokens, vector_tokens
from tlextract.settings import RunSettings, report_dir
from tlextract.stages.common import model_loader
from tlextract.store import write_json

LENS_FILE = "vector_tokens.json"
K = 10  # tokens per side saved
SHOWN = 5  # tokens per side in the summary's table
LAYER_RULE = f"highest cross-validated {HEADLINE} AUROC (crossval.json)"


def save_vector_tokens(
    chosen: Sequence[tuple[RunSettings, int]],
) -> list[tuple[RunSettings, VectorTokens]]:
    """For each run and its chosen layer, the logit lens of its saved mean_diff vector, written
    to ``report_dir(run) / vector_tokens.json``; runs without current vectors at that layer are
    left out. The model is loaded once, and only if some run has vectors."""
    model: Model | None = None
    done = []
    for run, layer in chosen:
        vectors = saved_vectors(run, HEADLINE)
        if vectors is None or layer not in vectors.layers:
            continue
        model = model or model_loader(run)()
        lens = vector_tokens(model, vectors, layer, K)
        write_json(
            report_dir(run) / LENS_FILE,
            {**lens.to_json(), "variant": run.variant, "model": vectors.model,
             "hook_name": vectors.hook_name(layer), "layer_rule": LAYER_RULE},
        )  # fmt: skip
        done.append((run, lens))
    return done


def _tokens(listed: Sequence[tuple[int, str, float]]) -> str:
    # JSON quoting shows whitespace and control bytes; a double-backtick span holds a backtick.
    quoted = [json.dumps(text, ensure_ascii=False).replace("|", "\\|") for _, text, _ in listed]
    return " ".join(f"`` {q} ``" for q in quoted[:SHOWN])


def lens_section(
    done: Sequence[tuple[RunSettings, VectorTokens]], link: Callable[[str, Path], str]
) -> list[str]:
    """The summary's markdown: one row per trait run, its top tokens on each side (``link``:
    the summary's markdown link from a label and a target path)."""
    if not done:
        return []
    lines = [
        "",
        f"## What the {HEADLINE} vectors write to the vocabulary (logit lens)",
        "",
        f"Each vector at its layer of highest cross-validated {HEADLINE} AUROC, through the "
        f"model's final norm and unembedding, biases left out: the {SHOWN} tokens it raises most "
        "and lowers most (decoded; a lone byte of a longer character shows as �), as "
        "if it reached the final norm unchanged (a description of the direction, not of "
        f"steering with it). All {K} per side, with logits, in each run's `{LENS_FILE}`.",
        "",
        "| trait | variant | layer | promoted | suppressed | file |",
        "|---|---|---:|---|---|---|",
    ]
    for run, lens in done:
        lines.append(
            f"| {run.trait.name} | {run.variant} | {lens.layer} | {_tokens(lens.promoted)} | "
            f"{_tokens(lens.suppressed)} | {link(LENS_FILE, report_dir(run) / LENS_FILE)} |"
        )
    return [*lines, ""]
