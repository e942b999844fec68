"""``compare``: a model against a fine-tune of it on the same tokens.

The acceptance check: a GPT-2 whose block K attention output bias (``b_O``) got ``alpha * v``
added, saved as a directory, shows no shift before block K, exactly ``alpha * v`` at block K's
``hook_resid_mid``, and after it the shift an independent forward pass of each model measures.
Then the command on the tiny experiment against a LoRA adapter of its model (files, cosines with
the adapter's own vectors, up to date, interrupted and resumed, damaged and redone) and the
one-line refusals (another architecture, another width, a layer the vectors lack)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from tiny_checkpoints import TOKENIZER_FILES, save_checkpoint
from transformers import AutoModelForCausalLM

import tlextract as tx
import tlextract.stages.compare as compare_stage
from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.load import load_model
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.settings import compare_dir, settings_for
from tlextract.stages.responses import load_responses
from tlextract.stages.run import run_trait

K, ALPHA = 1, 0.7  # the edited block and the strength
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62]]
RESPONSES = [[70, 71, 72], [80, 81, 82, 83], [90]]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A 3-block GPT-2 directory, the same with ``alpha * v`` added to block K's ``b_O``, and
    ``v``."""
    root = tmp_path_factory.mktemp("gpt2")
    base = save_checkpoint("gpt2", root / "base", n_layer=3)
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    edited = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        edited.transformer.h[K].attn.c_proj.bias.add_(ALPHA * v)
    edited.save_pretrained(root / "edited")
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, root / "edited" / name)
    return base, root / "edited", v


def _vectors(v: torch.Tensor, model: str, layers=(0, 1, 2)) -> TraitVectors:
    """``v`` at block K, other random directions elsewhere."""
    gen = torch.Generator().manual_seed(2)
    rows = [v if layer == K else torch.randn(64, generator=gen) for layer in layers]
    return TraitVectors("t", "mean_diff", model, "resid_post", tuple(layers), torch.stack(rows))


def _independent_shift(base, other, hook: str, unit: torch.Tensor) -> list[torch.Tensor]:
    """Each response alone (no padding) through each model: the mean over its response tokens
    of (other - base) at ``hook``, and its projection on ``unit``."""
    out = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        tokens = torch.tensor([p + r])
        _, a = base.run_with_cache(tokens, names_filter=[hook])
        _, b = other.run_with_cache(tokens, names_filter=[hook])
        diff = (b[hook] - a[hook])[0, len(p) :].mean(0)
        out.append(diff @ unit)
    return out


def test_a_bias_edit_shifts_nothing_before_its_block_alpha_v_inside_it_and_after_as_measured(
    gpt2,
) -> None:
    base_dir, edited_dir, v = gpt2
    base, other = load_model(str(base_dir)), load_model(str(edited_dir))
    vectors = _vectors(v, str(base_dir))
    post = tx.compare(base, other, vectors, PROMPTS, RESPONSES, batch_size=2)
    mid = tx.compare(base, other, vectors, PROMPTS, RESPONSES, hook="resid_mid", batch_size=2)
    assert post.layers == (0, 1, 2) and post.hook_names[K] == f"blocks.{K}.hook_resid_post"
    # Before block K: nothing moved, in any direction.
    assert torch.equal(post.residual_shift[:, :K], torch.zeros_like(post.residual_shift[:, :K]))
    assert torch.equal(mid.residual_shift[:, :K], torch.zeros_like(mid.residual_shift[:, :K]))
    # At block K's resid_mid: alpha * v, as a vector, on every response and every token.
    expected = (ALPHA * v).expand(len(PROMPTS), -1)
    torch.testing.assert_close(mid.residual_shift[:, K], expected, atol=1e-5, rtol=1e-5)
    shift_mid = mid.shift("t")[:, K]
    torch.testing.assert_close(shift_mid, torch.full((3,), ALPHA * float(v.norm())))
    for tokens in mid.token_shift["t"]:
        torch.testing.assert_close(tokens[:, K], torch.full((len(tokens),), ALPHA * v.norm()))
    # From block K's output on: what each model's own pass says, and not nothing.
    for layer in (K, K + 1):
        hook = f"blocks.{layer}.hook_resid_post"
        unit = vectors[layer] / vectors[layer].norm()
        measured = torch.stack(_independent_shift(base, other, hook, unit))
        torch.testing.assert_close(post.shift("t")[:, layer], measured, atol=1e-5, rtol=1e-4)
        assert measured.abs().min() > 1e-3
    intervals = post.intervals("t")
    assert intervals[0].value == 0 and intervals[K].low <= intervals[K].value <= intervals[K].high


def test_the_same_on_a_hooked_transformer_whose_b_O_is_edited_in_memory(tiny_model) -> None:
    """The GPT-2 directory loads as a TransformerBridge; tiny-random is a HookedTransformer
    (accelerated), whose ``b_O`` is edited in place."""
    other = load_model("tiny-random")
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        other.blocks[K].attn.b_O.add_(ALPHA * v)
    vectors = _vectors(v, "tiny-random")
    mid = tx.compare(tiny_model, other, vectors, PROMPTS, RESPONSES, hook="resid_mid")
    assert not mid.residual_shift[:, :K].any()
    torch.testing.assert_close(mid.residual_shift[:, K], (ALPHA * v).expand(3, -1))
    post = tx.compare(tiny_model, other, vectors, PROMPTS, RESPONSES)
    unit = vectors[K + 1] / vectors[K + 1].norm()
    measured = torch.stack(
        _independent_shift(tiny_model, other, f"blocks.{K + 1}.hook_resid_post", unit)
    )
    torch.testing.assert_close(post.shift("t")[:, K + 1], measured, atol=1e-5, rtol=1e-4)
    assert measured.abs().min() > 1e-3


def test_another_family_or_a_missing_layer_is_refused_in_memory(gpt2, tiny_model) -> None:
    base_dir, _, v = gpt2
    base = load_model(str(base_dir))
    with pytest.raises(TLExtractError, match="architecture") as err:
        tx.compare(base, tiny_model, _vectors(v, "x"), PROMPTS, RESPONSES)
    assert "\n" not in str(err.value)
    with pytest.raises(TLExtractError, match="have no layer 2"):
        tx.compare(base, base, _vectors(v, "x", (0, 1)), PROMPTS, RESPONSES, layers=[1, 2])


# --- the command on the tiny experiment ----------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_adapter: Path) -> Path:
    return tiny_adapter


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, adapter: Path) -> Path:
    """The tiny experiment with alpha run on tiny-random and on the adapter."""
    root = tmp_path_factory.mktemp("compare")
    write_experiment(root)
    exp = load_experiment("tiny", root)
    run_trait(settings_for(exp, "alpha"), get_model=lambda: tiny_model)
    run_trait(settings_for(exp, "alpha", model=str(adapter)),
              get_model=lambda: load_model(str(adapter)))  # fmt: skip
    return root


def _compare(root: Path, other: str, capsys, *flags: str) -> tuple[int, str]:
    argv = ["compare", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", "alpha"]
    code = main([*argv, "--other", other, *flags])
    out = capsys.readouterr()
    return code, out.out + out.err


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_the_command_writes_the_shift_of_the_runs_responses_and_the_vectors_cosines(
    tmp_path: Path, finished: Path, adapter: Path, tiny_model, capsys
) -> None:
    root = tmp_path / "exp"
    shutil.copytree(finished, root)
    code, out = _compare(root, str(adapter), capsys)
    assert code == 0, out
    exp = load_experiment("tiny", root)
    run = settings_for(exp, "alpha")
    out_dir = compare_dir(run, str(adapter))
    saved = json.loads((out_dir / "compare.json").read_text())
    assert (out_dir / "compare.md").read_text().startswith("# alpha:")
    assert (out_dir / "compare.png").stat().st_size > 0
    # Independently: every response through each model alone, its mean shift on the unit vector.
    other = load_model(str(adapter))
    mine = TraitVectors.load(run.stage_dir("vectors") / "mean_diff.pt")
    theirs = TraitVectors.load(settings_for(exp, "alpha", model=str(adapter)).stage_dir("vectors")
                               / "mean_diff.pt")  # fmt: skip
    rows = sorted((r for r in load_responses(run)[0] if r["n_response_tokens"]),
                  key=lambda r: (r["index"], r["polarity"]))  # fmt: skip
    for entry in saved["layers"]:
        layer = entry["layer"]
        unit = mine[layer] / mine[layer].norm()
        hook = f"blocks.{layer}.hook_resid_post"
        shifts = []
        for r in rows:
            tokens = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            _, a = tiny_model.run_with_cache(tokens, names_filter=[hook])
            _, b = other.run_with_cache(tokens, names_filter=[hook])
            shifts.append(float((b[hook] - a[hook])[0, len(r["prompt_ids"]) :].mean(0) @ unit))
        assert entry["value"] == pytest.approx(sum(shifts) / len(shifts), abs=1e-5)
        assert entry["low"] <= entry["value"] <= entry["high"]
        cosine = torch.nn.functional.cosine_similarity(mine[layer], theirs[layer], dim=0)
        assert entry["cosine"] == pytest.approx(float(cosine), abs=1e-6)
        # The gap: how far the extraction's pos and neg means lie apart along the unit vector.
        assert entry["gap"] == pytest.approx(float(mine[layer] @ unit), rel=1e-6)
        assert f"| {entry['value'] / entry['gap']:+.1%} |" in (out_dir / "compare.md").read_text()
    assert any(abs(e["value"]) > 1e-4 for e in saved["layers"])  # the adapter moved something
    at = saved["token_layer"]
    assert [(e["polarity"], e["index"]) for e in saved["responses"]] == [
        (r["polarity"], r["index"]) for r in rows
    ]
    assert all(len(e["tokens"]) == len(e["shift"]) for e in saved["responses"])
    assert at in [e["layer"] for e in saved["layers"]]

    # A second run: up to date, the same numbers.
    code, out = _compare(root, str(adapter), capsys)
    assert code == 0 and "compare: up to date, skipped" in out, out
    assert json.loads((out_dir / "compare.json").read_text()) == saved

    # A damaged output is moved aside and redone, to the same numbers.
    (out_dir / "comparison.pt").write_bytes(b"torn")
    code, out = _compare(root, str(adapter), capsys)
    assert code == 0 and "damaged output" in out, out
    assert json.loads((out_dir / "compare.json").read_text()) == saved


def test_an_interrupted_compare_resumes_from_its_finished_batches(
    tmp_path: Path, finished: Path, adapter: Path, capsys, monkeypatch
) -> None:
    root = tmp_path / "exp"
    shutil.copytree(finished, root)
    real, calls, stop = compare_stage.shift_batch, [], {"once": True}

    def interrupted(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2 and stop["once"]:  # the second batch of the first run only
            stop["once"] = False
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_stage, "shift_batch", interrupted)
    code, out = _compare(root, str(adapter), capsys)
    assert code == 130 and "run the same command again to resume" in out, out
    out_dir = compare_dir(settings_for(load_experiment("tiny", root), "alpha"), str(adapter))
    assert len(list(out_dir.glob("shards-*/batch_*.pt"))) == 1
    assert not (out_dir / ".lock").exists()
    calls.clear()
    code, out = _compare(root, str(adapter), capsys)
    assert code == 0, out
    assert len(calls) == 2  # 12 responses in batches of 4: the first was kept
    resumed = json.loads((out_dir / "compare.json").read_text())
    shutil.rmtree(out_dir)
    monkeypatch.setattr(compare_stage, "shift_batch", real)
    assert _compare(root, str(adapter), capsys)[0] == 0
    assert json.loads((out_dir / "compare.json").read_text()) == resumed


@pytest.mark.parametrize(
    ("arch", "overrides", "named"),
    [
        ("gpt2", {"n_layer": 3}, "architecture is GPT2LMHeadModel"),
        ("llama3", {"hidden_size": 32, "head_dim": 8, "num_hidden_layers": 3}, "d_model is 32"),
    ],
    ids=["architecture", "width"],
)
def test_a_model_of_another_family_is_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, finished: Path, arch: str, overrides: dict, named: str, capsys
) -> None:
    root = tmp_path / "exp"
    shutil.copytree(finished, root)
    other = save_checkpoint(arch, tmp_path / arch, **overrides)
    before = _files(root)
    code, out = _compare(root, str(other), capsys)
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and named in lines[0], out
    assert "not of tiny-random's model family" in lines[0]
    assert _files(root) == before


def test_a_layer_the_vectors_lack_is_refused(
    tmp_path: Path, finished: Path, adapter: Path, capsys
) -> None:
    root = tmp_path / "exp"
    shutil.copytree(finished, root)
    before = _files(root)
    code, out = _compare(root, str(adapter), capsys, "--layer", "7")
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "have no layer 7" in lines[0], out
    assert _files(root) == before
