"""What the explorer shows of the vectors' uses: each run's ``compare`` outputs
(``compare-*/compare.json``) and the experiment's ``screen`` outputs
(``screen*/<data>/screen.json``), trimmed to what the page draws so it stays small."""

from __future__ import annotations

from typing import Any

from tlextract.config import Experiment
from tlextract.settings import RunSettings
from tlextract.store import read_json

SHOWN = 5  # responses (compare: the largest mean shifts) and samples at each end (screen)


def comparisons(run: RunSettings) -> list[dict[str, Any]]:
    """Every saved comparison of ``run`` with another model: the shift per layer with its
    interval (and cosine), and the responses whose mean token shift is largest, token by token."""
    out = []
    for path in sorted(run.out_dir.glob("compare-*/compare.json")):
        saved = read_json(path)
        mean = {id(r): sum(r["shift"]) / max(len(r["shift"]), 1) for r in saved["responses"]}
        top = sorted(saved["responses"], key=lambda r: -abs(mean[id(r)]))[:SHOWN]
        out.append({
            "file": str(path), "other": saved["other"], "base": saved["base"],
            "hook": saved["hook"], "token_layer": saved["token_layer"], "layers": saved["layers"],
            "responses": [{**r, "mean": mean[id(r)]} for r in top],
        })  # fmt: skip
    return out


def screens(experiment: Experiment) -> list[dict[str, Any]]:
    """Every saved screening of the experiment: per trait its layer, the mean difference, the
    ranking's AUROC and each label's mean where the data had labels, the top and bottom
    samples."""
    out = []
    for path in sorted(experiment.path.glob("screen*/*/screen.json")):
        saved = read_json(path)
        traits = {}
        for trait, t in saved["traits"].items():
            ranked = t["ranked"]
            ends = ranked if len(ranked) <= 2 * SHOWN else [*ranked[:SHOWN], *ranked[-SHOWN:]]
            traits[trait] = {
                **{k: t.get(k) for k in ("layer", "hook_name", "mean_diff", "auroc",
                                         "mean_diff_by_label")},
                "n": len(ranked),
                "shown": [{**r, "rank": ranked.index(r) + 1} for r in ends],
            }  # fmt: skip
        out.append({"file": str(path), "data": saved["data"], "traits": traits})
    return out
