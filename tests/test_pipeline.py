"""End to end on the tiny model: outputs, resume after an interruption, skipping, CLI errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import load_from_disk

import tlextract.stages.run
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import settings_for
from tlextract.stages.activations import load_activations
from tlextract.stages.run import run_trait
from tlextract.stages.stage import Job, Stage

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(experiments: Path, trait: str = "alpha", get_model=None, **overrides) -> TraitVectors:
    run = settings_for(load_experiment("tiny", experiments), trait, **overrides)
    vectors = run_trait(run, get_model=get_model)
    assert vectors is not None
    return vectors


def test_cli_run_writes_every_stage_for_every_layer(experiments: Path, tiny_model, capsys) -> None:
    code = main(
        [
            "run",
            "--experiment",
            "tiny",
            "--experiments-dir",
            str(experiments),
            "--traits",
            "alpha",
            "--batch_size",
            "3",
            "--n_examples",
            "4",
        ]
    )
    assert code == 0
    out = experiments / "tiny" / "alpha" / "extraction"
    assert f"results in {out}" in capsys.readouterr().out
    responses = load_from_disk(str(out / "responses" / "dataset"))
    assert sorted(responses["polarity"]) == ["neg"] * 4 + ["pos"] * 4
    vectors = TraitVectors.load(out / "vectors" / "mean_diff.pt")
    assert vectors.layers == tuple(range(tiny_model.cfg.n_layers))
    assert vectors.vectors.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    assert vectors.vectors.dtype == torch.float32
    meta = json.loads((out / "vectors" / "meta.json").read_text())
    assert meta["hook_names"][1] == "blocks.1.hook_resid_post"
    assert meta["model"] == "tiny-random" and meta["judge"] == "none"
    assert meta["kept"] == {"pos": 4, "neg": 4}
    assert not list(out.rglob("shards-*")) and not list(out.rglob(".*tmp"))


def test_saved_vector_equals_recomputation_from_saved_activations(experiments: Path) -> None:
    vectors = _run(experiments)
    run = settings_for(load_experiment("tiny", experiments), "alpha")
    acts = load_activations(run)
    ref = acts.pos.double().mean(0) - acts.neg.double().mean(0)
    torch.testing.assert_close(vectors.vectors.double(), ref, rtol=1e-6, atol=1e-6)
    assert vectors.metadata["n_pos"] == acts.pos.shape[0] == len(acts.pos_index)


def test_pos_and_neg_examples_are_matched_by_question(experiments: Path) -> None:
    _run(experiments)
    out = experiments / "tiny" / "alpha" / "extraction" / "responses" / "dataset"
    rows = load_from_disk(str(out))
    pos = {r["index"]: r for r in rows if r["polarity"] == "pos"}
    neg = {r["index"]: r for r in rows if r["polarity"] == "neg"}
    assert pos.keys() == neg.keys()
    for i in pos:
        assert pos[i]["question"] == neg[i]["question"]
        assert pos[i]["instruction"] != neg[i]["instruction"]
        assert pos[i]["instruction"] in pos[i]["prompt"] and pos[i]["question"] in pos[i]["prompt"]


class Interrupt(Exception):
    pass


def _spy_batches(monkeypatch, stage: str, before_each: Callable[[list[int]], None]) -> None:
    """Call ``before_each(chunk)`` before every batch (or half batch, after an out-of-memory)
    ``stage`` computes: its entry in the pipeline table is replaced by one whose computation
    runs its batches through the spy."""

    def spied(entry: Stage) -> Stage:
        def compute(job: Job) -> Any:
            def sharded(lengths, size, work, *rest):
                def each(chunk):
                    before_each(chunk)
                    return work(chunk)

                return job.sharded(lengths, size, each, *rest)

            return entry.compute(replace(job, sharded=sharded))

        return replace(entry, compute=compute)

    table = tuple(spied(s) if s.name == stage else s for s in tlextract.stages.run.PIPELINE)
    monkeypatch.setattr(tlextract.stages.run, "PIPELINE", table)


def _interrupt_after(monkeypatch, stage: str, calls: int) -> None:
    count = {"n": 0}

    def flaky(chunk: list[int]) -> None:
        if count["n"] == calls:
            raise Interrupt
        count["n"] += 1

    _spy_batches(monkeypatch, stage, flaky)


@pytest.mark.parametrize("stage", ["responses", "activations"])
def test_interrupted_run_resumes_without_redoing_work_and_matches(
    experiments: Path, tmp_path: Path, monkeypatch, stage: str
) -> None:
    clean_root = tmp_path / "clean"
    shutil.copytree(experiments, clean_root)
    reference = _run(clean_root, batch_size=2)

    _interrupt_after(monkeypatch, stage, calls=2)
    with pytest.raises(Interrupt):
        _run(experiments, batch_size=2)
    out = experiments / "tiny" / "alpha" / "extraction"
    assert not (out / "vectors").exists()

    done_batches = len(list(out.rglob("shards-*/batch_*.pt")))
    assert done_batches == 2
    monkeypatch.undo()
    calls = {"n": 0}

    def counting(chunk: list[int]) -> None:
        calls["n"] += 1

    _spy_batches(monkeypatch, stage, counting)
    resumed = _run(experiments, batch_size=2)
    assert calls["n"] == 6 - 2  # 12 examples in batches of 2; two were finished before
    assert torch.equal(resumed.vectors, reference.vectors)


def test_finished_run_is_skipped_without_loading_the_model(experiments: Path) -> None:
    first = _run(experiments)

    def no_model():
        raise AssertionError("the model was loaded although nothing was left to do")

    again = _run(experiments, get_model=no_model)
    assert torch.equal(first.vectors, again.vectors)


def test_changed_layers_recompute_activations_but_not_responses(experiments: Path) -> None:
    _run(experiments)
    stage = experiments / "tiny" / "alpha" / "extraction" / "responses" / "meta.json"
    before = stage.stat().st_mtime_ns
    vectors = _run(experiments, layers=[1])
    assert vectors.layers == (1,)
    assert stage.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--traits", "gamma"], "unknown trait 'gamma'"),
        (["--batch-size", "0"], "--batch-size must be an integer of at least 1 or 'auto'"),
        (["--batch-size", "auto", "--memory-budget", "0"], "--memory-budget must be a positive"),
        (["--n-examples", "0"], "--n-examples must be an integer of at least 1"),
        (["--layers", "7"], "layers [7] do not exist"),
        (["--experiment", "nope"], "unknown experiment 'nope'"),
        (["--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    experiments: Path, capsys, argv: list[str], message: str
) -> None:
    before = sorted(p for p in experiments.rglob("*"))
    code = main(["run", "--experiment", "tiny", "--experiments-dir", str(experiments), *argv])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    created = [p for p in experiments.rglob("*") if p not in before and p.is_file()]
    assert created == []


def test_activations_stage_alone_asks_for_responses_first(experiments: Path, capsys) -> None:
    code = main(
        [
            "activations",
            "--experiment",
            "tiny",
            "--experiments-dir",
            str(experiments),
            "--traits",
            "alpha",
        ]
    )
    assert code == 2
    assert "Run the 'responses' stage first" in capsys.readouterr().err


def test_combined_mode_equals_two_stage(experiments: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(experiments, other)
    two_stage = _run(experiments, mode="two-stage")
    combined = _run(other, mode="combined")
    run = settings_for(load_experiment("tiny", experiments), "alpha")
    responses = lambda root: load_from_disk(  # noqa: E731
        str(root / "tiny" / "alpha" / "extraction" / "responses" / "dataset")
    )["response_ids"]
    assert responses(experiments) == responses(other)
    assert combined.layers == two_stage.layers
    torch.testing.assert_close(combined.vectors, two_stage.vectors, rtol=1e-4, atol=1e-4)
    assert load_activations(run).pos.shape[0] == 6


def test_variants_write_to_separate_places_and_record_the_variant(experiments: Path) -> None:
    instruction = _run(experiments, variant="instruction")
    natural = _run(experiments, variant="natural")
    base = experiments / "tiny" / "alpha"
    for variant, out in (
        ("instruction", base / "extraction"),
        ("natural", base / "extraction-natural"),
    ):
        metas = [json.loads(m.read_text()) for m in out.glob("*/meta.json")]
        assert len(metas) == 4 and {m["variant"] for m in metas} == {variant}
    assert instruction.metadata["variant"] == "instruction"
    assert natural.metadata["variant"] == "natural"
    rows = load_from_disk(str(base / "extraction-natural" / "responses" / "dataset"))
    assert all(r["instruction"] == "" for r in rows)
    assert rows[0]["question"] in rows[0]["prompt"]
    assert not torch.equal(instruction.vectors, natural.vectors)


def test_natural_variant_without_prompt_files_is_a_clear_error(experiments: Path) -> None:
    for side in ("pos", "neg"):
        (experiments / "tiny" / "beta" / f"natural_{side}.txt").unlink()
    with pytest.raises(TLExtractError, match="has no natural prompts"):
        _run(experiments, trait="beta", variant="natural")


def test_gemma_2b_experiment_fails_at_model_loading_when_weights_are_not_cached(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The original study's setting loads its config and traits, then stops with the
    'not cached' message when the model is needed, having written nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    root = Path(__file__).parent.parent / "experiments"
    experiments = tmp_path / "experiments"
    shutil.copytree(root, experiments, ignore=shutil.ignore_patterns("extraction*"))
    code = main(
        [
            "run",
            "--experiment",
            "gemma_2b_cognitive",
            "--experiments-dir",
            str(experiments),
            "--traits",
            "local_global",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "google/gemma-2-2b-it" in err and "download" in err
    assert not (experiments / "gemma_2b_cognitive" / "local_global").exists()


def test_cli_report_writes_summary_after_a_run(experiments: Path, capsys) -> None:
    base = ["--experiment", "tiny", "--experiments-dir", str(experiments), "--traits", "alpha"]
    assert main(["run", *base, "--n-examples", "8"]) == 0
    assert main(["report", *base, "--n-examples", "8", "--methods", "mean_diff,probe"]) == 0
    summary = experiments / "tiny" / "report" / "summary.md"
    assert f"report: {summary}" in capsys.readouterr().out
    assert "alpha" in summary.read_text()
    assert (
        experiments / "tiny" / "alpha" / "extraction" / "report" / "metrics_by_layer.png"
    ).exists()
