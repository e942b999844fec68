"""``make bench-backends``: which backend serves each architecture, and tlextract's generation on
each backend against transformers' own ``generate``, all in one run on this machine. Writes
``docs/benchmarks/backends.md`` (docs/models.md quotes it). No timing is asserted.

Every architecture of tests/tiny_checkpoints.py at a small size (4 layers, d_model 512, random
weights: speed only), then the two embedded models. Greedy, at most 32 new tokens, prompts
left-padded; tlextract records every layer's ``hook_resid_post`` while generating (what the
pipeline's combined mode does); transformers runs with no hooks. Both stop a row at the same
tokens (tlextract's stop tokens), and each counts the tokens its rows produced up to their stop,
so finished rows kept in transformers' batch count for nothing. Best of 2 rounds after a
warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import ARCHITECTURES, save_checkpoint

from tlextract.benchmarks.pipeline import machine
from tlextract.config import GenerationSettings
from tlextract.errors import TLExtractError
from tlextract.model.load import load_hf_model, load_model
from tlextract.model.source import backend_of
from tlextract.model.tokens import left_pad, stop_token_ids, tokenize
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import hook_name

pytestmark = [pytest.mark.bench, pytest.mark.slow]

OUT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "backends.md"
NEW, ROUNDS, BATCHES = 32, 2, (1, 8)
EMBEDDED = ("smollm2-135m-instruct", "gemma-3-270m")
LLAMA_SIZE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64)  # fmt: skip
GEMMA_SIZE = LLAMA_SIZE | dict(layer_types=["sliding_attention", "full_attention"] * 2)
SIZES = {"gpt2": dict(n_embd=512, n_layer=4, n_head=8), "gemma2": GEMMA_SIZE,
         "gemma3": GEMMA_SIZE,
         "qwen3_moe": LLAMA_SIZE | dict(moe_intermediate_size=384)}  # fmt: skip
TEXTS = ["What is a spark plug?", "Tell me about the sea, the moon and the tides at night.",
         "Name a colour.", "Why do cats purr when they are happy or hurt?"] * 2  # fmt: skip
Generate = Callable[[list[list[int]]], int]


def _best_rate(generate: Generate, ids: list[list[int]]) -> float:
    """Tokens per second, best of ROUNDS (after one short warm-up)."""
    generate([ids[0][:4]])
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        n = generate(ids)
        best = max(best, n / (time.perf_counter() - start))
    return best


def _ours(name: str, backend: str) -> Generate | None:
    try:
        model = load_model(name, dtype="float32", backend=backend)
    except TLExtractError:
        return None
    capture = [hook_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    greedy = GenerationSettings(max_new_tokens=NEW, do_sample=False)

    def generate(ids: list[list[int]]) -> int:
        gens = generate_batch(model, ids, greedy, [0] * len(ids), capture=capture)
        return sum(len(g.response_ids) + g.stopped for g in gens)

    return generate


def _transformers(name: str) -> tuple[Generate, Callable[[list[str]], list[list[int]]]]:
    hf_model, tok = load_hf_model(name, dtype="float32")

    stops = stop_token_ids(tok)

    def generate(ids: list[list[int]]) -> int:
        tokens, mask = left_pad(ids, tok.pad_token_id, "cpu")
        with torch.inference_mode():
            out = hf_model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=NEW,
                                    do_sample=False, eos_token_id=stops,
                                    pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[:, tokens.shape[1] :].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)

    return generate, lambda texts: tokenize(tok, texts, "completion")


def _rows(name: str, label: str) -> list[str]:
    hf, encode = _transformers(name)
    contenders = {b: _ours(name, b) for b in ("hooked", "bridge")}
    rows = []
    for batch in BATCHES:
        ids = encode(TEXTS[:batch])
        ref = _best_rate(hf, ids)
        cells = []
        for generate in contenders.values():
            rate = _best_rate(generate, ids) if generate else None
            cells.append(f"{rate:.0f} ({rate / ref:.2f}x)" if rate else "not loaded")
        rows.append(f"| {label} | {backend_of(name)} | {batch} | {' | '.join(cells)} | {ref:.0f} |")
    return rows


def test_backend_speed(benchmark, tmp_path: Path, capsys) -> None:
    rows: list[str] = []

    def measure() -> None:
        for arch in ARCHITECTURES:
            directory = save_checkpoint(arch, tmp_path / arch, **SIZES.get(arch, LLAMA_SIZE))
            rows.extend(_rows(str(directory), arch))
        for name in EMBEDDED:
            rows.extend(_rows(name, name))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    OUT.write_text(
        "# Backends: which serves each architecture, and how fast (`make bench-backends`)\n\n"
        f"Machine: {machine()}; float32. Produced by `tests/benchmarks/test_backend_speed.py`; "
        "its docstring has the method. Tokens per second (and the ratio to transformers' "
        "`generate` in the same run); `auto` is the backend `load_model` picks; "
        '"not loaded": that backend refuses the architecture.\n\n'
        "| model | auto | batch | hooked (tlextract, accelerated) | bridge (tlextract) | "
        "transformers generate |\n|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    with capsys.disabled():
        print("\n" + OUT.read_text())
