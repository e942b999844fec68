"""Generation speed on SmolLM2-135M-Instruct, all contenders timed in one run.

Run with ``pytest tests/benchmarks --benchmark-only`` (prefix ``OMP_NUM_THREADS=1`` on a busy
machine: two threads competing with another process make every op milliseconds slower). Per batch
size, each round times, one after the other:

* ``tl_generate``: TransformerLens' ``HookedTransformer.generate`` as shipped,
* ``ours``: ``tlextract.generation.generate_batch`` on the unaccelerated model,
* ``ours_accelerated``: the same after ``tlextract.fast.accelerate``,
* ``tl_generate_accelerated``: TransformerLens' ``generate`` on the accelerated model,
* ``hf_generate``: transformers' own ``generate`` on the same weights,

greedy, the same chat prompts, ``N_NEW`` new tokens. TransformerLens and transformers are forced
to produce all of them (no eos stop); ``generate_batch`` drops a row when it ends its turn, so its
count is the tokens it actually sampled (the prompts ask for long answers: normally all of them).
Rounds are interleaved and each contender keeps its best round, so a burst of load on this shared
machine hits all of them alike. The table (tokens/s and ratios to ``tl_generate``) is printed and
stored in the benchmark's ``extra_info`` with the thread count and the load average. No timing is
asserted. ``TLEXTRACT_BENCH_ROUNDS`` sets the number of rounds (default 2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from tlextract.fast import accelerate
from tlextract.generation import generate_batch, left_pad
from tlextract.models import DEFAULT_MODEL, load_hf_model, load_model
from tlextract.traits import GenerationSettings

pytestmark = [pytest.mark.bench, pytest.mark.slow]

N_NEW = 32
ROUNDS = int(os.environ.get("TLEXTRACT_BENCH_ROUNDS", "2"))
PROMPTS = [
    "Write a detailed essay about the history of the printing press.",
    "Explain, step by step, how a car engine works.",
    "Describe your ideal city in great detail.",
    "Write a long story about a dragon who loves books.",
    "Explain photosynthesis to a ten-year-old, with examples.",
    "Give me a thorough guide to starting a vegetable garden, covering soil, seeds, watering, "
    "pests and harvest times.",
    "Describe the water cycle in detail.",
    "Write a long poem about the sea.",
    "Explain how the internet works, from cables to web pages.",
    "Tell me everything you know about the Roman Empire.",
    "Describe a day in the life of a medieval blacksmith.",
    "Write a detailed recipe for bread and explain each step.",
    "Explain the theory of evolution with several examples from different animals and plants.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Describe how airplanes fly.",
    "Explain why the sky is blue, in depth.",
]
CONTENDERS = ("tl_generate", "ours", "ours_accelerated", "tl_generate_accelerated", "hf_generate")


@pytest.fixture(scope="module")
def models():
    ref = load_model(DEFAULT_MODEL)
    fast = accelerate(load_model(DEFAULT_MODEL))
    hf_model, hf_tok = load_hf_model(DEFAULT_MODEL)
    return ref, fast, hf_model, hf_tok


def contenders(models, batch_size: int) -> dict[str, Callable[[int], int]]:
    """Each runs ``n`` new tokens for the batch and returns how many tokens it generated."""
    ref, fast, hf_model, hf_tok = models
    tok = ref.tokenizer
    ids = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for p in PROMPTS[:batch_size]
    ]
    tokens, mask = left_pad(ids, tok.pad_token_id, "cpu")

    def tl(model):
        def run(n: int) -> int:
            out = model.generate(tokens, max_new_tokens=n, stop_at_eos=False, do_sample=False,
                                 verbose=False, return_type="tokens")
            return (out.shape[1] - tokens.shape[1]) * out.shape[0]

        return run

    def ours(model):
        def run(n: int) -> int:
            settings = GenerationSettings(max_new_tokens=n, do_sample=False)
            gens = generate_batch(model, ids, settings, seeds=[0] * len(ids))
            return sum(len(g.response_ids) + g.stopped for g in gens)

        return run

    def hf(n: int) -> int:
        with torch.inference_mode():
            out = hf_model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False,
                                    pad_token_id=hf_tok.pad_token_id)
        return (out.shape[1] - tokens.shape[1]) * out.shape[0]

    return {
        "tl_generate": tl(ref),
        "ours": ours(ref),
        "ours_accelerated": ours(fast),
        "tl_generate_accelerated": tl(fast),
        "hf_generate": hf,
    }


@pytest.mark.parametrize("batch_size", [8, 16])
def test_generation_speed(benchmark, models, batch_size: int, capsys) -> None:
    runs = contenders(models, batch_size)
    for run in runs.values():  # warm-up: first-call allocations, lazy imports
        run(2)
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    load_before = os.getloadavg()

    def timed_rounds() -> None:
        for _ in range(ROUNDS):
            for name, run in runs.items():
                start = time.perf_counter()
                n = run(N_NEW)
                rate = n / (time.perf_counter() - start)
                best[name] = max(best.get(name, 0.0), rate)
                counts[name] = n

    benchmark.pedantic(timed_rounds, rounds=1, iterations=1)
    load_after = os.getloadavg()
    base = best["tl_generate"]
    benchmark.extra_info.update({
        "model": DEFAULT_MODEL,
        "batch_size": batch_size,
        "new_tokens": N_NEW,
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "tokens_per_s": {k: round(v, 2) for k, v in best.items()},
        "generated_tokens": counts,
        "ratio_to_tl_generate": {k: round(v / base, 2) for k, v in best.items()},
    })
    lines = [
        f"\nSmolLM2-135M, batch {batch_size}, {N_NEW} new tokens, best of {ROUNDS}, "
        f"{torch.get_num_threads()} threads, load {load_before[0]:.2f} -> {load_after[0]:.2f}",
        f"{'contender':<26}{'tokens':>8}{'tok/s':>9}{'x tl_generate':>15}"
        f"{'x hf_generate':>15}",
    ]
    for name in CONTENDERS:
        lines.append(f"{name:<26}{counts[name]:>8}{best[name]:>9.1f}{best[name] / base:>15.2f}"
                     f"{best[name] / best['hf_generate']:>15.2f}")
    with capsys.disabled():
        print("\n".join(lines))
