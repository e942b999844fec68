"""One rule per decision and one computation: every layer tlextract names comes from
``ops.folds.pick_layer``, and the pipeline's generate -> pool exists once
(``stages/compute.py``), run from disk by the stages and in memory by ``tx.extract``.

A second best-layer rule or a second generate -> pool path makes these tests fail: the first by
behaviour (swap the rule, every consumer must follow), the second by the call sites."""

from __future__ import annotations

import argparse
import ast
import shutil
from pathlib import Path

import pytest
from conftest import write_experiment

import tlextract.ops.folds as crossval_ops
from tlextract.backends.ray import _mean_diff_best
from tlextract.cli.interventions import saved_run
from tlextract.cli.result import result_card
from tlextract.config import load_experiment
from tlextract.evaluation.crossval import HEADLINE, cross_validate
from tlextract.evaluation.evaluate import evaluate_trait
from tlextract.settings import report_dir, settings_for
from tlextract.stages.activations import load_activations
from tlextract.stages.extract import Extraction
from tlextract.stages.run import run_trait

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGE = Path(__file__).resolve().parents[1] / "tlextract"


def _layers_named(run) -> dict[str, int]:
    """The layer each consumer names for ``run``'s mean_diff vectors."""
    acts = load_activations(run)
    extraction = Extraction(
        trait=run.trait.name, method=HEADLINE, model=run.model, hook=acts.hook,
        layers=acts.layers, vectors=acts.pos[0] * 0, metadata={}, pos=acts.pos, neg=acts.neg,
    )  # fmt: skip
    args = argparse.Namespace(model=None, model_backend=None, variant=run.variant, device=None,
                              dtype=run.dtype, judge=None, engine=None, layer=None)  # fmt: skip
    card = next(line for line in result_card(run, 1.0) if "use layer" in line)
    return {
        "result card": int(card.split("use layer ")[1].split()[0]),
        "cross_validate": cross_validate(run, [HEADLINE]).layer[HEADLINE],
        "report (one-split best row)": evaluate_trait(run, [HEADLINE]).best[HEADLINE].layer,
        "ray summary": _mean_diff_best(run)[0],
        "tx.extract evaluate": extraction.evaluate().layer,
        "steer/monitor default": saved_run(args, run.experiment, run.trait.name)[2],
    }


def test_every_consumer_names_the_layer_of_the_one_rule(tmp_path, monkeypatch, capsys):
    write_experiment(tmp_path)
    run = settings_for(load_experiment("tiny", tmp_path), "alpha")
    run_trait(run)
    layers = load_activations(run).layers
    assert len(layers) >= 2
    for column in (0, len(layers) - 1):  # two different rules: no consumer can match both
        shutil.rmtree(report_dir(run), ignore_errors=True)
        monkeypatch.setattr(crossval_ops, "pick_layer", lambda z, y, c=column: c)
        named = _layers_named(run)
        assert named == dict.fromkeys(named, layers[column]), named


def _calls(name: str) -> set[str]:
    """Modules of the package that call ``name`` (a plain or attribute call)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called == name:
                    found.add(path.relative_to(PACKAGE).as_posix())
    return found


def test_generate_then_pool_exists_once():
    # Pooling the residual over responses: the pipeline's computation, the batch-size probe
    # that measures its peak memory, and the GPU check that compares the op itself with
    # transformers (it pools no experiment). Nothing else pools.
    assert _calls("pooled_activations") == {
        "stages/compute.py", "stages/autobatch.py", "benchmarks/gpu_check.py"
    }  # fmt: skip
    # The stages, tx.extract and tx.screen generate through it (an engine's generate), never
    # alone, and pool through pool_records.
    assert _calls("generate_records") == {
        "stages/responses.py", "stages/extract.py", "stages/screening.py"
    }  # fmt: skip
    assert _calls("pool_records") == {
        "stages/activations.py",
        "stages/extract.py",
        "stages/screening.py",
    }


def test_one_best_layer_rule():
    assert _calls("pick_layer") == {"ops/folds.py"}
    defined = {
        (path.relative_to(PACKAGE).as_posix(), node.name)
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and "layer" in node.name
        and any(w in node.name for w in ("best", "pick", "choose", "select"))
    }  # fmt: skip
    # The one other layer decision answers another question: where a per-token alarm at a fixed
    # false-alarm rate catches most pos tokens (issue 24 measured it better for monitoring).
    assert defined == {("ops/folds.py", "pick_layer")}, defined
    assert _calls("_alarm_column") == {"monitoring/alarm.py"}
