"""The accelerator's door: restore() gives back a model equal to a freshly loaded stock one (types,
separate parameters, no trace, the same outputs bit for bit), accelerate() works again after it,
an untested TransformerLens or torch release and a component that does not match leave stock
numbers with one warning, and the process-wide malloc setting has its opt-out."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_fast import CONFIGS, assert_close, prompt_ids, random_batch, random_model
from tiny_families import family_model
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.components import TransformerBlock
from transformer_lens.components.mlps.gated_mlp import GatedMLP

import tlextract as tx
import tlextract.model.load
from tlextract.config import GenerationSettings
from tlextract.model.accel import KEEP_FREED_MEMORY_ENV, fused, guard, selfcheck
from tlextract.model.accel.components import _FastRMSNorm
from tlextract.model.load import load_model
from tlextract.model.tokens import left_pad
from tlextract.ops.generate import generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")
GUARD_LOG = "tlextract.model.accel"


def outputs(model: HookedTransformer) -> dict[str, Tensor]:
    """Logits, every hook's activation, and logits of five KV-cache decode steps."""
    tokens, mask = left_pad(prompt_ids(model), model.tokenizer.pad_token_id, "cpu")
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
        steps = [model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -1]]
        for t in range(5):
            new = torch.full((tokens.shape[0], 1), 5 + t)
            steps.append(model(new, attention_mask=torch.ones_like(new), past_kv_cache=kv)[:, -1])
    return {"logits": logits, "decode": torch.stack(steps, 1), **dict(cache.items())}


def assert_stock_like(model: HookedTransformer, stock: HookedTransformer) -> None:
    """Stock classes, no _tlx_ attribute, parameters laid out as stock's with storage of their
    own, the same state dict and no extra hook on the model."""
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert not tx.is_accelerated(model)
    left = [f"{n}.{k}" for n, m in model.named_modules() for k in vars(m) if "_tlx_" in k]
    assert not left, left
    params, stock_params = dict(model.named_parameters()), dict(stock.named_parameters())
    assert params.keys() == stock_params.keys()
    for name, p in params.items():
        assert p.stride() == stock_params[name].stride(), name
        assert p.untyped_storage().nbytes() == p.nbytes, f"{name} views a larger buffer"
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == len(params)
    sd, stock_sd = model.state_dict(), stock.state_dict()
    assert list(sd) == list(stock_sd) and all(torch.equal(sd[k], stock_sd[k]) for k in sd)
    assert len(model._forward_pre_hooks) == len(stock._forward_pre_hooks)


def assert_outputs_equal(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].device == tensor.device, name
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def stock() -> HookedTransformer:
    return load_model("tiny-random", fast=False)


def test_restore_gives_a_model_equal_to_a_freshly_loaded_stock_one(stock) -> None:
    model = load_model("tiny-random")
    assert tx.is_accelerated(model)
    ids = prompt_ids(model)
    greedy = GenerationSettings(max_new_tokens=8, do_sample=False)
    generate_batch(model, ids, greedy, seeds=[0] * len(ids))  # packed weights, KV buffers made
    assert tx.restore(model) is model
    assert_stock_like(model, stock)
    assert_outputs_equal(outputs(model), outputs(stock))
    assert generate_batch(model, ids, greedy, seeds=[0] * len(ids)) == generate_batch(
        stock, ids, greedy, seeds=[0] * len(ids)
    )


def test_accelerate_after_restore_equals_a_freshly_loaded_fast_model(stock) -> None:
    model = tx.restore(load_model("tiny-random"))
    assert tx.accelerate(model) is model and tx.is_accelerated(model)
    fresh = load_model("tiny-random")
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert_outputs_equal(outputs(model), outputs(fresh))
    assert_close(outputs(stock)["logits"], outputs(model)["logits"], "logits")
    tx.restore(model)
    assert_stock_like(model, stock)


def test_restore_of_a_stock_model_changes_nothing(stock) -> None:
    model = load_model("tiny-random", fast=False)
    tx.restore(model)
    assert_stock_like(model, stock)
    assert_outputs_equal(outputs(model), outputs(stock))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_restore_on_every_random_config(name: str) -> None:
    ref = random_model(name)
    model = tx.restore(tx.accelerate(copy.deepcopy(ref)))
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert not any("_tlx_" in k for m in model.modules() for k in vars(m))
    tokens, mask = random_batch()
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        logits_ref, cache_ref = ref.run_with_cache(tokens, attention_mask=mask)
    assert torch.equal(logits, logits_ref)
    assert all(torch.equal(cache[k], cache_ref[k]) for k in cache_ref.keys())


# --- the version guard ---


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's once-per-process warnings and self-check verdicts start unseen."""
    monkeypatch.setattr(guard, "_warned", set())
    monkeypatch.setattr(selfcheck, "_verdicts", {})


@pytest.fixture
def untested_release(monkeypatch: pytest.MonkeyPatch, fresh_warnings) -> list[object]:
    """An untested TransformerLens installed; returns the list of self-checks run."""
    monkeypatch.setattr(
        guard, "installed", lambda: {"transformer-lens": "3.10.0", "torch": "2.13.0"}
    )
    runs: list[object] = []
    real = selfcheck._self_check

    def counted(cfg, accelerate_untested):
        runs.append(cfg)
        return real(cfg, accelerate_untested)

    monkeypatch.setattr(selfcheck, "_self_check", counted)
    return runs


def test_local_build_tags_count_as_the_tested_release(monkeypatch) -> None:
    tested = {"transformer-lens": "3.9.0", "torch": "2.13.0+cu128"}
    monkeypatch.setattr(guard, "installed", lambda: tested)
    assert guard.untested_versions() == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_untested_release_is_accelerated_when_the_self_check_agrees(
    dtype, untested_release, caplog
) -> None:
    """Checked once per architecture and dtype; the accelerated model's numbers are stock's."""
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        first = load_model("tiny-random", dtype=dtype)
        second = load_model("tiny-random", dtype=dtype)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert tx.is_accelerated(first) and tx.is_accelerated(second)
    # Once for the two loads: in the model's dtype, and in float32 too for bf16.
    assert [str(tiny.dtype) for tiny in untested_release] == sorted(
        {f"torch.{dtype}", "torch.float32"}, key=f"torch.{dtype}".__ne__
    )
    assert all(tiny.n_layers == 2 for tiny in untested_release)
    assert all(tiny.n_key_value_heads is not None for tiny in untested_release)  # like tiny's
    if dtype == "float32":
        stock = load_model("tiny-random", fast=False)
        assert_close(outputs(stock)["logits"], outputs(first)["logits"], "logits")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_untested_release_stays_stock_with_one_warning_when_the_self_check_differs(
    dtype, stock, monkeypatch, caplog, untested_release
) -> None:
    """A fast forward made wrong (RMS norm 1% off, within bf16's tolerance: the float32 leg of
    a bf16 check sees it): every model stays stock with one warning naming the versions and
    what differed; the override still works."""
    right = _FastRMSNorm.forward
    monkeypatch.setattr(_FastRMSNorm, "forward", lambda self, x: right(self, x) * 1.01)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        first, second = (load_model("tiny-random", dtype=dtype) for _ in range(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "transformer-lens 3.10.0 (tested: 3.9.0)" in warnings[0]
    said = f"self-check on a tiny LlamaForCausalLM in {dtype} differed (logits in float32 off by"
    assert said in warnings[0]
    assert not tx.is_accelerated(first) and not tx.is_accelerated(second)
    if dtype == "bfloat16":
        return  # the rest compares with the float32 stock model
    for model in (first, second):
        assert_stock_like(model, stock)
    assert_outputs_equal(outputs(first), outputs(stock))
    monkeypatch.setattr(_FastRMSNorm, "forward", right)
    # Checking a new release: the override accelerates all the same.
    assert tx.is_accelerated(tx.accelerate(first, untested=True))
    assert_close(outputs(stock)["logits"], outputs(first)["logits"], "logits")


def test_a_component_that_does_not_match_stays_stock_with_one_warning(
    stock, monkeypatch, caplog, fresh_warnings
) -> None:
    """As if TransformerLens had added an argument to GatedMLP.forward: the MLPs stay stock,
    everything else is accelerated, and the numbers are TransformerLens'."""
    original = GatedMLP.forward

    def forward(self, x: Tensor, new_argument: bool = False) -> Tensor:
        return original(self, x)

    monkeypatch.setattr(GatedMLP, "forward", forward)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        model = tx.accelerate(load_model("tiny-random", fast=False), sdpa=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "blocks.0.mlp, blocks.1.mlp, blocks.2.mlp" in warnings[0]
    assert "new_argument" in warnings[0]
    assert all(type(b.mlp) is GatedMLP for b in model.blocks)
    assert all(
        type(b.attn) is not type(s.attn) for b, s in zip(model.blocks, stock.blocks, strict=True)
    )
    got, expected = outputs(model), outputs(stock)
    for name in expected:
        assert_close(expected[name], got[name], name)
    tx.restore(model)
    assert_stock_like(model, stock)


def test_a_parameter_of_another_shape_is_a_mismatch() -> None:
    model = random_model("llama-gqa")
    mlp = model.blocks[0].mlp
    fast = type(tx.accelerate(copy.deepcopy(model)).blocks[0].mlp)
    assert guard.mismatch(mlp, fast) is None
    mlp.W_in = torch.nn.Parameter(mlp.W_in.detach().T.contiguous())  # as if stored [out, in]
    assert "parameter W_in shaped (96, 48), expected (48, 96)" == guard.mismatch(mlp, fast)
    del mlp.hook_post
    assert guard.mismatch(mlp, fast) == "no hook_post"


# --- the process-wide malloc setting ---


@pytest.mark.parametrize(
    ("env", "fast", "applied"), [(None, True, 1), ("0", True, 0), (None, False, 0)]
)
def test_load_model_sets_malloc_only_for_a_fast_cpu_model_unless_opted_out(
    env, fast, applied, monkeypatch
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(tlextract.model.load, "keep_freed_memory", lambda: calls.append(None))
    if env is None:
        monkeypatch.delenv(KEEP_FREED_MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEEP_FREED_MEMORY_ENV, env)
    load_model("tiny-random", fast=fast)
    assert len(calls) == applied


# --- components left stock by design ---


def test_a_parallel_block_model_is_accelerated_without_a_warning(caplog, fresh_warnings) -> None:
    """NeoX/Phi/GPT-J blocks (attention and MLP side by side) are left to TransformerLens by
    design: no warning; their attention is accelerated and the numbers are stock's."""
    ref = family_model("neox-like")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        model = tx.accelerate(copy.deepcopy(ref))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all(type(b) is TransformerBlock for b in model.blocks)
    assert all(
        type(b.attn) is not type(r.attn) for b, r in zip(model.blocks, ref.blocks, strict=True)
    )
    tokens, mask = random_batch()
    with torch.inference_mode():
        assert_close(ref(tokens, attention_mask=mask), model(tokens, attention_mask=mask))


# --- the packed weights' memory check ---


@pytest.mark.parametrize(("device", "skipped"), [("meta", False), ("cpu", True)])
def test_only_host_weights_count_against_free_ram(device, skipped, monkeypatch, caplog) -> None:
    """With almost no free RAM, packing host (CPU) weights is skipped, said once in the log;
    weights elsewhere (``meta`` here, as a GPU's) are never packed, take no host RAM and must
    not be counted (nor the skip said)."""
    module = torch.nn.Module()
    module.W_in = torch.nn.Parameter(torch.zeros(8, 16, device=device), requires_grad=False)
    layer = fused.FusedLinear(module, [("W_in", "in_out")])
    monkeypatch.setattr(fused, "available_ram", lambda: 4 * layer._weight.nbytes - 1)
    with caplog.at_level(logging.INFO, logger=fused.__name__), torch.inference_mode():
        with fused.packed_weights([layer]):
            pass
    said = [r.getMessage() for r in caplog.records if "packed weights skipped" in r.getMessage()]
    assert len(said) == int(skipped), said
