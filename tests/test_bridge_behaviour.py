"""Steering, monitoring, the teacher-forced passes, sampling and stops on a TransformerBridge,
each checked against transformers itself (a separately loaded copy of the same checkpoint, fed
one unpadded row at a time, so padding and positions cannot agree by construction).

The models, both of which ``load_model`` puts on the bridge: a tiny Llama-3-shaped checkpoint
with scaled RoPE (which HookedTransformer's llama conversion lacks) and a tiny GPT-2, whose learned
absolute positions make a left-padded row wrong unless its positions are counted from the mask
(rotary attention is blind to a shift of a whole row); weights large enough that greedy tokens vary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_checkpoint
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
)

from tlextract import accelerate, is_accelerated, restore
from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.judge.local import LocalJudge
from tlextract.model.accel import has_hooks
from tlextract.model.load import load_model, model_info
from tlextract.monitoring.calibrate import neutral_token_scores
from tlextract.ops.fluency import answer_logprob, answer_logprobs, neutral_answers
from tlextract.ops.generate import generate_batch
from tlextract.ops.monitor import monitor
from tlextract.ops.pool import pooled_activations
from tlextract.ops.steer import REFERENCE_TEXTS, ablate, residual_norm, steer
from tlextract.ops.token_acts import answer_residuals
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.stages.autobatch import measure_peaks
from tlextract.steering.sweep import reread

LAYER = 0
TOL = 1e-4
PROMPTS = ["Hi", "Tell me a long story about a cat.", "2+2?", "What is the capital of France?"]
ANSWERS = ["Yes.", "Once upon a time", "4", "Paris, of course."]


@pytest.fixture(scope="module", params=["llama3", "gpt2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    m = load_model(str(checkpoint), dtype="float32")
    assert isinstance(m, TransformerBridge)
    return m


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def ids(model, texts: Sequence[str]) -> list[list[int]]:
    return [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def unit(seed: int = 1) -> Tensor:
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def blocks(hf: PreTrainedModel) -> torch.nn.ModuleList:
    """transformers' decoder layers (Llama's ``model.layers``, GPT-2's ``transformer.h``)."""
    return hf.model.layers if hasattr(hf, "model") else hf.transformer.h


@contextmanager
def hf_edit(hf: PreTrainedModel, layer: int, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """transformers' own forward hook on decoder layer ``layer``: ``edit`` its output."""

    def hook(module: object, args: object, out: Tensor | tuple) -> Tensor | tuple:
        return edit(out) if isinstance(out, Tensor) else (edit(out[0]), *out[1:])

    handle = blocks(hf)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def hf_run(hf: PreTrainedModel, seq: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """One unpadded row through transformers: logits [pos, vocab] and each decoder layer's
    output [pos, d_model] (a forward hook: the last layer's is not among hidden_states)."""
    outs: list[Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: outs.append((o if isinstance(o, Tensor) else o[0])[0])
        )
        for layer in blocks(hf)
    ]
    try:
        logits = hf(torch.tensor([list(seq)])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, outs


@torch.no_grad()
def hf_greedy(hf: PreTrainedModel, seq: Sequence[int], n: int, eos: int | None = None) -> list[int]:
    out = hf.generate(torch.tensor([list(seq)]), max_new_tokens=n, do_sample=False,
                      eos_token_id=eos, pad_token_id=0)  # fmt: skip
    return out[0, len(seq) :].tolist()


def test_teacher_forced_reads_equal_transformers(model, hf) -> None:
    """answer_residuals, answer_logprobs/answer_logprob and pooled_activations on a left-padded
    batch: each row as transformers computes it alone."""
    prompts, answers = ids(model, PROMPTS), ids(model, ANSWERS)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    resid = answer_residuals(model, prompts, answers, names)
    logp = answer_logprobs(model, prompts, answers)
    mean_lp = answer_logprob(model, prompts, answers)
    pooled = pooled_activations(model, prompts, answers, [0, 1])
    at = 0
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        logits, outs = hf_run(hf, p + a)
        ref = torch.stack([o[len(p) :] for o in outs], dim=1)
        assert (resid[r] - ref).abs().max() < TOL
        assert (pooled[r] - ref.mean(0)).abs().max() < TOL
        ref_lp = logits[len(p) - 1 : -1].log_softmax(-1)
        assert (logp[at : at + len(a)] - ref_lp).abs().max() < TOL
        at += len(a)
        picked = ref_lp.gather(-1, torch.tensor(a)[:, None]).mean()
        assert mean_lp[r] == pytest.approx(float(picked), abs=TOL)
    assert at == logp.shape[0]


def test_monitoring_reads_equal_transformers(model, hf) -> None:
    """neutral_token_scores (calibration) and sweep.reread project transformers' residuals."""
    u = unit()
    name = f"blocks.{LAYER}.hook_resid_post"
    scores = neutral_token_scores(model, u, name, "completion", texts=REFERENCE_TEXTS)
    prompts, answers = neutral_answers(model, "completion", REFERENCE_TEXTS)
    proj, lps = reread(model, prompts, answers, name, u)
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        logits, outs = hf_run(hf, p + a)
        ref = outs[LAYER][len(p) :] @ u
        assert torch.tensor(scores[r]).sub(ref).abs().max() < TOL
        assert proj[r] == pytest.approx(float(ref.mean()), abs=TOL)
        lp = logits[len(p) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(a)[:, None])
        assert lps[r] == pytest.approx(float(lp.mean()), abs=TOL)


@pytest.mark.parametrize("layer", [0, 1])
def test_residual_norm_equals_transformers(model, hf, layer: int) -> None:
    """The last block too: stop_at_layer=n_layers on a bridge must still give its residual."""
    seqs = ids(model, REFERENCE_TEXTS)
    norms = torch.cat([hf_run(hf, s)[1][layer].norm(dim=-1) for s in seqs])
    assert residual_norm(model, layer) == pytest.approx(float(norms.median()), rel=1e-5)


def test_steer_and_ablate_forward_equal_transformers_hook(model, hf) -> None:
    """Inside steer/ablate the bridge's logits are transformers' with the same edit at the same
    layer; after the block they are unsteered again."""
    prompts, answers = ids(model, PROMPTS), ids(model, ANSWERS)
    u, scale = unit(), 3.0
    delta = 0.7 * scale * u
    with steer(model, u, LAYER, 0.7, scale=scale):
        steered = answer_logprobs(model, prompts, answers)
    with ablate(model, u, LAYER):
        ablated = answer_logprobs(model, prompts, answers)
    after = answer_logprobs(model, prompts, answers)

    def reference(edit: Callable[[Tensor], Tensor] | None) -> Tensor:
        rows = []
        for p, a in zip(prompts, answers, strict=True):
            if edit is None:
                logits = hf_run(hf, p + a)[0]
            else:
                with hf_edit(hf, LAYER, edit):
                    logits = hf_run(hf, p + a)[0]
            rows.append(logits[len(p) - 1 : -1].log_softmax(-1))
        return torch.cat(rows)

    plain = reference(None)
    assert (steered - plain).abs().max() > 100 * TOL  # the edit matters
    assert (steered - reference(lambda x: x + delta)).abs().max() < TOL
    assert (ablated - reference(lambda x: x - (x @ u)[..., None] * u)).abs().max() < TOL
    assert (after - plain).abs().max() < TOL


def hf_positions(positions: str, delta: Tensor) -> Callable[[Tensor], Tensor]:
    """steer's positions rule, written for transformers' generate of one row: its prompt pass
    has the whole prompt, each decode step one token."""

    def edit(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            return x if positions == "prompt" else x + delta
        if positions == "response":
            return torch.cat([x[:, :-1], x[:, -1:] + delta], dim=1)
        return x + delta

    return edit


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_generation_equals_transformers_generate(model, hf, positions) -> None:
    prompts = ids(model, PROMPTS)
    u, scale = unit(), 10.0
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False)
    with steer(model, u, LAYER, 0.7, positions, scale=scale):
        gens = generate_batch(model, prompts, greedy, seeds=range(len(prompts)))
    with hf_edit(hf, LAYER, hf_positions(positions, 0.7 * scale * u)):
        ref = [hf_greedy(hf, p, 8, eos=-1) for p in prompts]
    assert [g.response_ids for g in gens] == ref
    plain = [g.response_ids for g in generate_batch(model, prompts, greedy, seeds=[0] * 4)]
    assert plain == [hf_greedy(hf, p, 8, eos=-1) for p in prompts]
    assert plain != ref  # steering changed something


def test_monitor_scores_equal_transformers(model, hf) -> None:
    """Per-token scores while generating (sampled, batched) are the projections transformers
    gives on the final text."""
    tv = TraitVectors("t", "test", "tiny", "resid_post", (0, 1), torch.stack([unit(1), unit(2)]))
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0)
    for layer in (0, 1):
        mon = monitor(model, PROMPTS, tv, layer, style="completion", settings=settings)
        for text in mon.texts:
            ref = hf_run(hf, text.token_ids)[1][layer] @ tv[layer]
            assert torch.tensor(text.scores["t"]).sub(ref).abs().max() < TOL


def test_monitor_inside_steer_scores_the_steered_residual(model, hf) -> None:
    """The steering hook at the monitored hook point runs first: scores include the vector, as
    in transformers with the edit on that layer."""
    tv = TraitVectors("t", "test", "tiny", "resid_post", (LAYER,), unit(2)[None])
    u, scale = unit(), 3.0
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0)
    with steer(model, u, LAYER, 0.7, scale=scale):
        mon = monitor(model, PROMPTS, tv, LAYER, style="completion", settings=settings)
    with hf_edit(hf, LAYER, lambda x: x + 0.7 * scale * u):
        for text in mon.texts:
            ref = hf_run(hf, text.token_ids)[1][LAYER] @ tv[LAYER]
            assert torch.tensor(text.scores["t"]).sub(ref).abs().max() < TOL


def test_capture_while_generating_equals_transformers(model, hf) -> None:
    """Combined mode: each response's residuals averaged while generating (sampled, prompts
    sharing a long prefix) are transformers' on prompt + response."""
    prompts = ids(model, [f"Tell me about topic number {i}{'!' * i}" for i in range(4)])
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    gens = generate_batch(model, prompts, settings, [5, 6, 7, 8], capture=names)
    for g, p in zip(gens, prompts, strict=True):
        assert g.pooled is not None and len(g.response_ids) == 6
        outs = hf_run(hf, p + g.response_ids)[1]
        ref = torch.stack([o[len(p) :].mean(0) for o in outs])
        assert (g.pooled - ref).abs().max() < TOL


def test_capture_inside_steering_leaves_only_the_steering_hook(model, hf) -> None:
    """generate_batch's capture hooks (added to the bridge's hook points directly) come off
    after it, the steering hook on the same hook point stays until its own block ends, and a
    name the model lacks is one line."""
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    greedy = GenerationSettings(max_new_tokens=4, do_sample=False)
    prompts = ids(model, PROMPTS[:2])
    point = model.hook_dict[names[0]]
    with steer(model, unit(), LAYER, 0.7, "all", scale=10.0):
        assert len(point.fwd_hooks) == 1
        steered = generate_batch(model, prompts, greedy, [0, 1], capture=names)
        assert len(point.fwd_hooks) == 1
        again = generate_batch(model, prompts, greedy, [0, 1])
    assert not has_hooks(model)
    assert [g.response_ids for g in steered] == [g.response_ids for g in again]
    with pytest.raises(TLExtractError, match="has no hook named blocks.0.hook_nothing"):
        generate_batch(model, prompts, greedy, [0, 1], capture=["blocks.0.hook_nothing"])
    assert not has_hooks(model)


def test_sampling_per_row_seed_ignores_batch_partners(model) -> None:
    prompts = ids(model, PROMPTS)
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9)
    seeds = [11, 12, 13, 14]
    batched = generate_batch(model, prompts, settings, seeds)
    alone = [
        generate_batch(model, [p], settings, [s])[0] for p, s in zip(prompts, seeds, strict=True)
    ]
    assert [g.response_ids for g in batched] == [g.response_ids for g in alone]
    other = generate_batch(model, prompts, settings, [21, 22, 23, 24])
    assert [g.response_ids for g in other] != [g.response_ids for g in batched]


def test_stop_token_ends_a_row_as_transformers_does(model, hf) -> None:
    """Make a token that one row writes mid-answer the eos: that row stops there, as in
    transformers' generate with that eos; the others run on."""
    prompts = ids(model, PROMPTS)
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False)
    full = [hf_greedy(hf, p, 8, eos=-1) for p in prompts]
    stop = full[1][3]
    tok = model.tokenizer
    eos = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    try:
        gens = generate_batch(model, prompts, greedy, seeds=[0] * 4)
    finally:
        tok.eos_token = eos
    for g, p, f in zip(gens, prompts, full, strict=True):
        ref = hf_greedy(hf, p, 8, eos=stop)
        assert g.stopped == (stop in f)
        assert g.response_ids == (ref[: ref.index(stop)] if stop in ref else ref)
    assert gens[1].stopped and len(gens[1].response_ids) <= 3


def test_batch_size_probes_run_on_a_bridge(model) -> None:
    """--batch-size auto's probes (generation with capture, the teacher-forced pass the vLLM
    engine's activations stage runs) on a bridge."""
    peaks = measure_peaks(model, [0, 1], "resid_post", probes=((1, 8), (2, 8)))
    assert [(r, n) for r, n, _ in peaks] == [(1, 8), (2, 8)]


def test_accelerator_on_a_bridge(model, hf) -> None:
    """A bridge runs transformers' forward: never accelerated, restore a no-op, accelerate a
    clear error."""
    assert not is_accelerated(model)
    assert restore(model) is model
    with pytest.raises(TLExtractError, match="TransformerBridge"):
        accelerate(model)
    assert model_info(model)["architecture"] == type(hf).__name__


def test_local_judge_refuses_a_bridge(model) -> None:
    """Its packed scoring drives TransformerLens' own KV cache: HookedTransformer only."""
    with pytest.raises(TLExtractError, match="HookedTransformer"):
        LocalJudge(model)
