"""The logit lens of a trait vector (``tx.vector_tokens``): a planted token's own unembedding
direction comes out first, on a HookedTransformer and on a TransformerBridge; the logits equal
transformers' own final norm and lm_head applied by hand; the report saves it per trait run at
the cross-validated layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from tiny_checkpoints import save_checkpoint

import tlextract as tx
from tlextract.evaluation.cosines import saved_vectors
from tlextract.evaluation.crossval import layer_for
from tlextract.model.load import load_hf_model, model_info
from tlextract.report.summary import build_report
from tlextract.settings import report_dir

K = 10


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict[str, str]:
    """Model names: the embedded tiny-random (HookedTransformer), a tiny Llama 3 (bridge) and a
    tiny GPT-2 (LayerNorm with a bias)."""
    root = tmp_path_factory.mktemp("checkpoints")
    local = {arch: str(save_checkpoint(arch, root / arch)) for arch in ("llama3", "gpt2")}
    return {"tiny-random": "tiny-random", **local}


@pytest.fixture(scope="module", params=["tiny-random", "llama3", "gpt2"])
def loaded(request, names):
    """(tlextract's model, the transformers model it was built from)."""
    name = names[request.param]
    return tx.load_model(name), load_hf_model(name)[0]


def _norm_and_unembedding(hf) -> tuple[torch.nn.Module, torch.Tensor]:
    norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    return norm, hf.get_output_embeddings().weight.detach().T  # [d_model, vocab]


def test_tiny_random_is_hooked_and_llama3_is_on_the_bridge(names):
    assert model_info(tx.load_model("tiny-random"))["backend"] == "hooked"
    assert model_info(tx.load_model(names["llama3"]))["backend"] == "bridge"


@torch.no_grad()
def test_a_planted_token_direction_comes_first_and_its_negative_last(loaded):
    """The vector whose RMS-normed image is token t's unembedding column promotes t first: for
    the column of largest norm no other token's logit (a dot product with it) can be higher
    (Cauchy-Schwarz), and its negative suppresses t first."""
    model, hf = loaded
    norm, w_u = _norm_and_unembedding(hf)
    if not hasattr(norm, "variance_epsilon"):
        pytest.skip("planting by dividing by the weight holds for RMSNorm; GPT-2 centres too")
    t = int(w_u.norm(dim=0).argmax())
    planted = w_u[:, t] / norm.weight.detach()
    up = tx.vector_tokens(model, planted, layer=1, k=K)
    down = tx.vector_tokens(model, -planted, layer=1, k=K)
    assert up.promoted[0][0] == t and down.suppressed[0][0] == t
    # The norm maps it to w_u[:, t] / rms(planted) (eps inside the root), whose logit for t is
    # known: a lens that skipped the norm or its weight would not give it.
    rms = (planted.square().mean() + norm.variance_epsilon).sqrt()
    expected = float(w_u[:, t].square().sum() / rms)
    assert up.promoted[0][2] == pytest.approx(expected, rel=1e-4)
    assert down.suppressed[0][2] == pytest.approx(-expected, rel=1e-4)
    assert up.promoted[0][1] == model.tokenizer.decode([t])
    assert (up.trait, up.method, up.layer) == (None, None, 1)
    # One token's column is not every token's: a different column puts t first no longer.
    other = tx.vector_tokens(model, w_u[:, (t + 1) % w_u.shape[1]] / norm.weight, 1, K)
    assert other.promoted[0][0] != t


@torch.no_grad()
def test_logits_equal_transformers_final_norm_and_lm_head_by_hand(loaded):
    """Independent: transformers' own final norm (its bias removed: a direction has no offset)
    and lm_head weight, on a random vector; ids, order and logits."""
    model, hf = loaded
    norm, w_u = _norm_and_unembedding(hf)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    normed = norm(v)
    if getattr(norm, "bias", None) is not None:
        normed = normed - norm.bias
    logits = normed @ w_u
    lens = tx.vector_tokens(model, v, layer=0, k=K)
    for side, largest in ((lens.promoted, True), (lens.suppressed, False)):
        values, ids = logits.topk(K, largest=largest)
        assert [i for i, _, _ in side] == ids.tolist()
        got = torch.tensor([x for _, _, x in side])
        torch.testing.assert_close(got, values, atol=1e-5, rtol=0)


def test_the_unembedding_bias_is_left_out():
    model = tx.load_model("tiny-random", fast=False)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    before = tx.vector_tokens(model, v, 0, K)
    with torch.no_grad():
        model.unembed.b_U.copy_(torch.linspace(-50, 50, model.cfg.d_vocab_out))
    assert tx.vector_tokens(model, v, 0, K) == before


def test_bad_input_is_one_clear_error(tiny_model):
    with pytest.raises(tx.TLExtractError, match="shape"):
        tx.vector_tokens(tiny_model, torch.zeros(3), 0)
    with pytest.raises(tx.TLExtractError, match="k=0"):
        tx.vector_tokens(tiny_model, torch.ones(tiny_model.cfg.d_model), 0, k=0)


@pytest.mark.slow  # a trait run and a report: 5-10 s on a busy 2-core machine
def test_the_report_saves_the_lens_at_the_cross_validated_layer(tmp_path: Path):
    write_experiment(tmp_path)
    run = tx.settings_for(tx.load_experiment("tiny", tmp_path), "alpha")
    tx.run_trait(run)
    summary = build_report(run.experiment, ["alpha"], methods=("mean_diff",))
    saved = json.loads((report_dir(run) / "vector_tokens.json").read_text())
    crossval = json.loads((report_dir(run) / "crossval.json").read_text())
    vectors = saved_vectors(run)
    assert vectors is not None
    assert saved["layer"] == crossval["layer"]["mean_diff"] == layer_for(run, vectors)[0]
    again = tx.vector_tokens(tx.load_model("tiny-random"), vectors, saved["layer"], K)
    assert saved["trait"] == "alpha" and saved["method"] == "mean_diff"
    assert [tuple(row) for row in saved["promoted"]] == again.promoted
    assert [tuple(row) for row in saved["suppressed"]] == again.suppressed
    assert saved["hook_name"] == f"blocks.{saved['layer']}.hook_resid_post"
    text = summary.read_text()
    assert "(logit lens)" in text
    assert f"| alpha | instruction | {saved['layer']} |" in text
