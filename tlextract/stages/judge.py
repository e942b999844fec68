"""Stage 2, judge: score every response with the experiment's judge and keep the clear cases
(positives that show the trait, negatives that lack it, both coherent)."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from tlextract.judge.keep import Selection, select
from tlextract.settings import RunSettings
from tlextract.stages.responses import RESPONSES, responses_key
from tlextract.stages.stage import GetModel, Job, Stage, need, run_stage
from tlextract.store import META, fingerprint, read_json, write_json

log = logging.getLogger(__name__)


def judge_key(run: RunSettings, responses_fp: str) -> str:
    return fingerprint(
        {"responses": responses_fp, "judge": run.judge, "eval_prompt": run.trait.eval_prompt}
    )


def current_judge_key(run: RunSettings) -> str:
    """The key judgments of these settings have (whether or not they exist yet)."""
    return judge_key(run, responses_key(run))


def compute_judgments(job: Job) -> Selection:
    run = job.run
    return select(
        list(job.inputs["responses"]),
        run.trait.eval_prompt,
        run.judge,
        job.dir / "judge_cache.jsonl",
        job.get_model,
        where=f"{run.experiment.config_path} ({run.trait.name})",
        given=run.judge_given,
    )


def save_judgments(job: Job, sel: Selection) -> dict[str, Any]:
    write_json(job.dir / "judgments.json", sel.judgments)
    s = sel.summary
    log.info("[%s] judge (%s): kept %s of %s, missing %s, mean trait score %s -> %s",
             job.run.trait.name, s["judge"], s["kept"], s["generated"], s["missing"],
             s["mean_score"], job.dir)  # fmt: skip
    return {"kept_index": sel.kept, **sel.summary}


def read_judgments(run: RunSettings, key: str) -> Selection:
    """The stage's selection, its judgments checked against the count in meta.json."""
    stage = run.stage_dir("judge")
    meta = read_json(stage / META)
    keys = ("judge", "rules", "generated", "judged", "missing", "kept", "mean_score")
    judgments = read_json(stage / "judgments.json")
    if len(judgments) != sum(meta["generated"].values()):
        raise ValueError(f"{len(judgments)} judgments, meta.json says {meta['generated']}")
    return Selection(
        kept=meta["kept_index"], judgments=judgments, summary={k: meta[k] for k in keys}
    )


JUDGE: Stage[Selection] = Stage(
    "judge", (RESPONSES,), "judgments.json, the kept examples",
    key=current_judge_key, compute=compute_judgments, save=save_judgments, load=read_judgments,
)  # fmt: skip


def select_responses(
    run: RunSettings, get_model: GetModel, responses: Dataset | None = None
) -> Selection:
    """Run the judge stage alone; ``responses``: the responses stage's output when the caller
    has it."""
    return run_stage(JUDGE, run, get_model, {} if responses is None else {"responses": responses})


def load_selection(run: RunSettings) -> Selection:
    return need(JUDGE, run)
