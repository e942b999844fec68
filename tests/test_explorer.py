"""``explore``: one self-contained HTML page of what the runs saved, on the tiny experiment."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import write_experiment

from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.evaluation.crossval import HEADLINE, cross_validate
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.ops.vector_tokens import vector_tokens
from tlextract.settings import report_dir, settings_for
from tlextract.stages.responses import load_responses
from tlextract.stages.run import run_trait
from tlextract.store import read_json, write_json

DATA = re.compile(r'<script type="application/json" id="explorer-data">(.*?)</script>', re.S)


def _explore(root: Path) -> Path:
    assert main(["explore", "--experiment", "tiny", "--experiments-dir", str(root)]) == 0
    return root / "tiny" / "report" / "explorer.html"


def _data(page: Path) -> dict:
    match = DATA.search(page.read_text())
    assert match is not None
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def explored(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> tuple[Path, Path, dict]:
    """alpha and beta run and cross-validated (what `make report` writes per run), explored."""
    root = tmp_path_factory.mktemp("explore")
    write_experiment(root)
    exp = load_experiment("tiny", root)
    for trait in ("alpha", "beta"):
        run = settings_for(exp, trait)
        run_trait(run, get_model=lambda: tiny_model)
        cross_validate(run, [HEADLINE])  # the result card's; the report adds the other methods
    before = {p: p.stat().st_mtime_ns for p in root.rglob("crossval.json")}
    page = _explore(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("crossval.json")} == before  # read only
    return root, page, _data(page)


def _run(data: dict, trait: str) -> dict:
    return next(r for r in data["runs"] if r["id"] == f"{trait}/instruction/tl")


def test_the_page_holds_the_saved_crossval_auroc(explored) -> None:
    root, page, data = explored
    assert page.stat().st_size < 5_000_000
    for trait in ("alpha", "beta"):
        view = _run(data, trait)
        saved = read_json(root / "tiny" / trait / "extraction" / "report" / "crossval.json")
        assert view["crossval"]["per_layer_auroc"] == saved["per_layer_auroc"]
        assert [s["auroc"] for s in view["crossval"]["scored"]] == [
            s["auroc"] for s in saved["scored"]
        ]
        assert view["layer"] == saved["layer"]["mean_diff"]
        assert "baseline" in view["crossval"]["verdict"]


def test_per_token_scores_equal_run_with_cache(explored, tiny_model) -> None:
    """Token i's score: the residual at the chosen layer's resid_post at token i of
    prompt+response (run_with_cache), dotted with the unit vector v / ||v||."""
    root, _, data = explored
    view = _run(data, "alpha")
    run = settings_for(load_experiment("tiny", root), "alpha")
    shown = [r for r in view["ranking"]["responses"] if r.get("scores")]
    assert shown and len(view["ranking"]["responses"]) == 12  # 6 per side, none dropped
    row = next(
        r
        for r in load_responses(run)[0]
        if (r["polarity"], r["index"]) == (shown[0]["polarity"], shown[0]["index"])
    )
    v = TraitVectors.load(run.stage_dir("vectors") / "mean_diff.pt")[view["layer"]].float()
    ids = torch.tensor([list(row["prompt_ids"]) + list(row["response_ids"])])
    _, cache = tiny_model.run_with_cache(ids)
    resid = cache[f"blocks.{view['layer']}.hook_resid_post"][0, len(row["prompt_ids"]) :]
    expected = (resid.float() @ (v / v.norm())).tolist()
    assert shown[0]["token_ids"] == list(row["response_ids"])
    assert shown[0]["scores"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    projections = [r["projection"] for r in view["ranking"]["responses"]]
    assert projections == sorted(projections, reverse=True)


def test_the_page_loads_nothing_from_the_network(explored) -> None:
    _, page, _ = explored
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "fetch(" not in html and "XMLHttpRequest" not in html
    assert "/*COMMON" not in html and "#tip {" in html  # the shared script and styles inline


def test_missing_parts_name_their_command(explored) -> None:
    _, _, data = explored
    missing = _run(data, "alpha")["missing"]
    assert missing["steering"] == "no steering run: make steer experiment=tiny trait=alpha"
    assert "make report experiment=tiny" in data["missing"]["cosines"]
    assert "alarm" in missing and "vector_tokens" not in missing


def test_unsaved_vector_tokens_are_computed_at_the_chosen_layer(explored, tiny_model) -> None:
    """Without the report's vector_tokens.json the page still shows what the vector means:
    tx.vector_tokens of the saved vector at the chosen layer."""
    root, _, data = explored
    view = _run(data, "alpha")
    run = settings_for(load_experiment("tiny", root), "alpha")
    vectors = TraitVectors.load(run.stage_dir("vectors") / "mean_diff.pt")
    lens = vector_tokens(tiny_model, vectors, view["layer"], 10)
    shown = view["vector_tokens"]
    assert shown["layer"] == view["layer"]
    assert [t[0] for t in shown["promoted"]] == [t[0] for t in lens.promoted]
    assert [t[0] for t in shown["suppressed"]] == [t[0] for t in lens.suppressed]


def test_saved_extras_are_shown_and_no_longer_missing(explored) -> None:
    root, _, data = explored
    run = settings_for(load_experiment("tiny", root), "beta")
    tokens = {"trait": "beta", "layer": 1, "promoted": [[5, "yes", 2.5]], "suppressed": []}
    write_json(report_dir(run) / "vector_tokens.json", tokens)
    try:
        view = _run(_data(_explore(root)), "beta")
    finally:
        (report_dir(run) / "vector_tokens.json").unlink()
    assert view["vector_tokens"] == tokens


def test_runs_of_every_variant_and_engine_on_disk_are_shown(explored) -> None:
    """An ``extraction-natural-vllm`` directory (the natural variant, generated by vLLM) is a run
    of its own, its missing vectors named with the make line that makes them."""
    root, _, _ = explored
    extra = root / "tiny" / "alpha" / "extraction-natural-vllm"
    extra.mkdir()
    try:
        data = _data(_explore(root))
    finally:
        extra.rmdir()
    ids = [r["id"] for r in data["runs"]]
    assert ids == ["alpha/instruction/tl", "alpha/natural/vllm", "beta/instruction/tl"]
    missing = data["runs"][1]["missing"]["run"]
    assert missing == "no vectors yet: make experiment=tiny trait=alpha variant=natural engine=vllm"


def test_an_unknown_experiment_exits_2_with_one_line(tmp_path, capsys) -> None:
    write_experiment(tmp_path)
    code = main(["explore", "--experiment", "nope", "--experiments-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
    assert not (tmp_path / "nope").exists()


def _save_extras(root: Path, model) -> None:
    """A real alarm, steer --auto run (tiny: one layer, two strengths, two questions) and
    cosine matrix for alpha, saved where the monitor, steer and report commands save them."""
    from tlextract.monitoring.alarm_data import monitor_alarm
    from tlextract.report.autosteer_view import write_autosteer
    from tlextract.report.summary import cosine_matrix
    from tlextract.settings import monitor_dir, steer_dir
    from tlextract.steering.autosteer import auto_steer

    exp = load_experiment("tiny", root)
    run = settings_for(exp, "alpha")
    write_json(monitor_dir(run) / "calibration.json", {"alpha": asdict(monitor_alarm(model, run))})
    vectors = TraitVectors.load(run.stage_dir("vectors") / "mean_diff.pt")
    steered = auto_steer(model, run, vectors, layers=[1], alphas=(0.1, 0.4), n_questions=2)
    write_autosteer(steered, steer_dir(run))
    cosine_matrix(exp, 1)


def _views(data: dict) -> list[str]:
    """The id of every view the page draws for ``data``'s runs (the tiny experiment's are
    instruction runs on TransformerLens: no id suffix)."""
    views = ["#overview", "#cosines"]
    for run in data["runs"]:
        views += [f"#{view}-{run['trait']}" for view in ("trait", "curve", "tokens", "meaning")]
    return views


@pytest.mark.browser
def test_every_view_renders_and_a_hovered_token_shows_its_saved_score(
    explored, page, screenshots
) -> None:
    _, path, data = explored
    page.open(path)
    page.assert_rendered(*_views(data), "#trait-alpha", "#trait-beta")
    shown = [r for r in _run(data, "alpha")["ranking"]["responses"] if r.get("scores")]
    n_tokens = sum(
        len(r.get("scores", [])) for v in data["runs"] for r in v["ranking"]["responses"]
    )
    assert page.tab.locator("#tokens-alpha .tok, #tokens-beta .tok").count() == n_tokens
    first = page.tab.locator("#tokens-alpha .tok").first
    shows = page.hover(first)
    score, token_id = shown[0]["scores"][0], shown[0]["token_ids"][0]
    assert first.get_attribute("data-token-id") == str(token_id)
    assert float(first.get_attribute("data-score")) == pytest.approx(score, rel=1e-5, abs=1e-6)
    assert shows.startswith(f"score {score:.4f} · token {token_id}"), shows
    assert page.tab.locator('[data-missing="steering"]').count() >= 1
    page.screenshot(screenshots / "explorer-overview.png", "#overview")
    page.screenshot(screenshots / "explorer-trait.png", "#trait-alpha")


@pytest.mark.browser
@pytest.mark.slow
def test_saved_steering_alarm_and_cosines_render(explored, tmp_path, tiny_model, page) -> None:
    root = tmp_path / "copy"
    shutil.copytree(explored[0], root)
    _save_extras(root, tiny_model)
    path = _explore(root)
    view = _run(_data(path), "alpha")
    assert not {"steering", "alarm"} & set(view["missing"])
    page.open(path)
    page.assert_rendered("#steer-alpha", "#alarm-alpha", "#cosines")
    steer = page.tab.locator("#steer-alpha").inner_text()
    assert all(name in steer for name in ("unsteered", "steered", "random direction"))
    assert "wrong-way share" in steer
    assert page.tab.locator('[data-missing="cosines"]').count() == 0
    shows = page.hover(page.tab.locator("#tokens-alpha .tok").first)
    assert "alarm threshold" in shows and f"(L{view['alarm']['layer']})" in shows


@pytest.mark.browser
def test_a_screened_dataset_and_a_compared_fine_tune_render(
    explored, tmp_path, tiny_adapter, page, capsys
) -> None:
    """What ``screen`` and ``compare`` saved is on the page: the figures as saved, the shift
    curve's points hovered, the ranked samples; and no longer named as missing."""
    root = tmp_path / "copy"
    shutil.copytree(explored[0], root)
    data_file = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer number {i}.", "label": i % 2 == 0}
            for i in range(6)]  # fmt: skip
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    where = ["--experiment", "tiny", "--experiments-dir", str(root), "--traits", "alpha"]
    assert main(["screen", *where, "--data", str(data_file)]) == 0
    assert main(["compare", *where, "--other", str(tiny_adapter)]) == 0
    capsys.readouterr()
    path = _explore(root)
    data, view = _data(path), _run(_data(path), "alpha")
    assert "compare" not in view["missing"] and "screens" not in data["missing"]
    saved = json.loads(next(root.rglob("compare.json")).read_text())
    assert view["comparisons"][0]["layers"] == saved["layers"]
    screened = json.loads(next(root.rglob("screen.json")).read_text())["traits"]["alpha"]
    shown = data["screens"][0]["traits"]["alpha"]
    assert shown["mean_diff"] == screened["mean_diff"] and shown["n"] == len(rows)
    page.open(path)
    page.assert_rendered("#screens", "#compare-alpha")
    point = page.tab.locator("#compare-alpha circle").nth(1)
    layer = saved["layers"][1]
    assert float(point.get_attribute("data-score")) == layer["value"]
    assert f"layer {layer['layer']}: shift {layer['value']:.3f}" in page.hover(point, shows="#tip")
    table = page.tab.locator('#screens table[data-trait="alpha"] tr[data-diff]')
    assert table.count() == len(rows)
    assert [float(table.nth(i).get_attribute("data-diff")) for i in range(len(rows))] == [
        r["diff"] for r in screened["ranked"]
    ]
