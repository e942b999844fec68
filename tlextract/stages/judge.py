"""Stage 2, judge: score every response with the experiment's judge and keep the clear cases
(positives that show the trait, negatives that lack it, both coherent)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset
from transformer_lens import HookedTransformer

from tlextract.errors import TLExtractError
from tlextract.judge.keep import Selection, select
from tlextract.settings import RunSettings
from tlextract.stages.common import reuse, stage_meta
from tlextract.stages.responses import load_responses, responses_key
from tlextract.store import META, fingerprint, read_json, write_json

log = logging.getLogger(__name__)


def judge_key(run: RunSettings, responses_fp: str) -> str:
    return fingerprint(
        {"responses": responses_fp, "judge": run.judge, "eval_prompt": run.trait.eval_prompt}
    )


def select_responses(
    run: RunSettings,
    get_model: Callable[[], HookedTransformer],
    responses: Dataset | None = None,
) -> Selection:
    """The kept examples; ``responses``: the generate stage's output when the caller has it."""
    responses = responses if responses is not None else load_responses(run)[0]
    stage, key = run.stage_dir("judge"), current_judge_key(run)
    done = reuse(stage, key, lambda: _load(stage), f"[{run.trait.name}] judge")
    if done is not None:
        log.info("[%s] judge: up to date, skipped (%s)", run.trait.name, stage)
        return done
    sel = select(
        list(responses),
        run.trait.eval_prompt,
        run.judge,
        stage / "judge_cache.jsonl",
        get_model,
        where=f"{run.experiment.config_path} ({run.trait.name})",
    )
    write_json(stage / "judgments.json", sel.judgments)
    write_json(stage / META, stage_meta("judge", key, run, kept_index=sel.kept, **sel.summary))
    s = sel.summary
    log.info("[%s] judge (%s): kept %s of %s, missing %s, mean trait score %s -> %s",
             run.trait.name, s["judge"], s["kept"], s["generated"], s["missing"],
             s["mean_score"], stage)  # fmt: skip
    return sel


def _load(stage: Path) -> Selection:
    """The stage's selection, its judgments checked against the count in meta.json."""
    meta = read_json(stage / META)
    keys = ("judge", "rules", "generated", "judged", "missing", "kept", "mean_score")
    judgments = read_json(stage / "judgments.json")
    if len(judgments) != sum(meta["generated"].values()):
        raise ValueError(f"{len(judgments)} judgments, meta.json says {meta['generated']}")
    return Selection(
        kept=meta["kept_index"], judgments=judgments, summary={k: meta[k] for k in keys}
    )


def current_judge_key(run: RunSettings) -> str:
    """The key judgments of these settings have (whether or not they exist yet)."""
    return judge_key(run, responses_key(run))


def load_selection(run: RunSettings) -> Selection:
    stage, key = run.stage_dir("judge"), current_judge_key(run)
    selection = reuse(stage, key, lambda: _load(stage), f"[{run.trait.name}] judge")
    if selection is None:
        raise TLExtractError(f"{stage}: responses not judged yet. Run the 'judge' stage first.")
    return selection
