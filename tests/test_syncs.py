"""Host reads and aten ops per decode step, counted with a TorchDispatchMode.

On a GPU every read of a device value by the host waits for the queue of launched kernels to
drain, and a small model is bound by launches: so tlextract's decode loop must read the device at
most twice per step at any batch size, and launch no more ops per step than transformers'
``generate`` with a forward hook on every layer (measured here on the same tiny model, same run).

What counts as a host read (this machine has no GPU, so reads are counted, not timed):
* aten ops that hand a device value to the host or size an output by the data, and so sync on
  CUDA: ``item`` and ``_local_scalar_dense`` (``int(t)``, ``float(t)``), ``is_nonzero``
  (``bool(t)``), ``equal``, ``nonzero``, ``masked_select``, ``_unique2``,
  ``unique_consecutive``, ``unique_dim``, ``repeat_interleave`` (without ``output_size``);
* ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu``: on a CPU tensor these dispatch nothing
  (the data is already on the host), so they are counted by patching the Tensor methods for the
  duration of the count, one read per call. ``Tensor.to`` is not counted: on this CPU a move to
  the model's device (TransformerLens' forward makes several) cannot be told from a read; code
  that reads the device says ``cpu()`` or ``tolist()``.
A step is what happens between two calls of the model's forward pass (tlextract:
``next_token_logits``; transformers: a forward pre-hook on the model), so a step's count includes
sampling and the bookkeeping of finished rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import pytest
import torch
from conftest import chat_ids
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import tlextract.ops.generate as gen
from tlextract.config import GenerationSettings
from tlextract.model.cache import TINY_MODEL, embedded, ensure_cached
from tlextract.model.tokens import left_pad
from tlextract.ops.monitor import monitor
from tlextract.ops.pool import hook_name
from tlextract.ops.trait_vectors import TraitVectors

pytestmark = pytest.mark.usefixtures("one_thread")
aten = torch.ops.aten
SYNC_OPS = {
    aten.item.default,
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
N_TOKENS = 8  # forced decode steps per generation
TEXTS = [f"Question {i}: {'why ' * (i % 5)}is the sky blue?" for i in range(16)]


class Counter(TorchDispatchMode):
    """Every aten op and every host read, with the counts at each step boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.marks: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        if func in SYNC_OPS:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def mark(self) -> None:
        self.marks.append((self.ops, self.reads))

    def steps(self) -> list[tuple[int, int]]:
        """(ops, reads) of each complete step: between consecutive marks."""
        return [(o2 - o1, r2 - r1) for (o1, r1), (o2, r2) in pairwise(self.marks)]


@contextmanager
def counting() -> Iterator[Counter]:
    """A Counter active on every op, with the host-side Tensor reads patched to count too."""
    counter = Counter()
    originals: dict[str, Callable[..., Any]] = {}

    def counted(name: str, is_read: Callable[..., bool]) -> Callable[..., Any]:
        original = originals[name] = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if is_read(*args, **kwargs):
                counter.reads += 1
            return original(self, *args, **kwargs)

        return method

    patched = {
        "tolist": counted("tolist", lambda *a, **k: True),
        "numpy": counted("numpy", lambda *a, **k: True),
        "cpu": counted("cpu", lambda *a, **k: True),
    }
    for name, method in patched.items():
        setattr(torch.Tensor, name, method)
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _forced(model) -> GenerationSettings:  # type: ignore[no-untyped-def]
    return GenerationSettings(max_new_tokens=N_TOKENS, do_sample=True, temperature=1.0)


def steps_of(run: Callable[[], object], monkeypatch) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(ops, reads) per decode step of ``run``, which generates through generate_batch."""
    # Warm-up: checks made once per process or model (oneDNN's self-check, packed weights,
    # rotary tables compared across layers) are not a decode step's.
    run()
    forward = gen.next_token_logits
    with counting() as counter:

        def marked(*args: Any) -> torch.Tensor:
            counter.mark()
            return forward(*args)

        monkeypatch.setattr(gen, "next_token_logits", marked)
        run()
    monkeypatch.setattr(gen, "next_token_logits", forward)
    return counter.steps()


def tlextract_steps(model, prompts, monkeypatch, stops) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(ops, reads) per decode step of generate_batch with capture on every layer."""
    names = [hook_name("resid_post", layer) for layer in range(model.cfg.n_layers)]
    monkeypatch.setattr(gen, "stop_token_ids", lambda _: stops)
    settings, seeds = _forced(model), list(range(len(prompts)))
    return steps_of(
        lambda: gen.generate_batch(model, prompts, settings, seeds=seeds, capture=names),
        monkeypatch,
    )


def transformers_steps(hf, prompts, pad_id: int) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(ops, reads) per decode step of transformers' generate, sampling, with a forward hook on
    every decoder layer adding its last position's output to a running sum (what tlextract's
    capture does)."""
    tokens, mask = left_pad(prompts, pad_id, "cpu")
    sums = torch.zeros(len(hf.model.layers), len(prompts), hf.config.hidden_size)

    def record(j: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            sums[j] += out[:, -1].float()

        return hook

    handles = [layer.register_forward_hook(record(j)) for j, layer in enumerate(hf.model.layers)]
    with counting() as counter:
        handles.append(hf.register_forward_pre_hook(lambda *_: counter.mark()))
        with torch.inference_mode():
            hf.generate(
                tokens,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=N_TOKENS,
                min_new_tokens=N_TOKENS,
                pad_token_id=pad_id,
            )
    for h in handles:
        h.remove()
    return counter.steps()


@pytest.fixture(scope="module")
def hf_tiny():  # type: ignore[no-untyped-def]
    """transformers' model from the same weights tlextract's tiny-random is converted from."""
    spec = embedded(TINY_MODEL)
    assert spec is not None
    return AutoModelForCausalLM.from_pretrained(ensure_cached(TINY_MODEL, spec)).eval()


@pytest.mark.parametrize("batch", [1, 8, 16])
def test_a_decode_step_reads_the_host_at_most_twice(tiny_model, monkeypatch, batch) -> None:
    """Forced tokens (no stop token), capture on every layer: every step, the prompt pass
    included, reads the device at most twice."""
    steps = tlextract_steps(tiny_model, chat_ids(tiny_model, TEXTS[:batch]), monkeypatch, [])
    assert len(steps) == N_TOKENS - 1
    assert max(reads for _, reads in steps) <= 2, steps


def test_finished_rows_cost_no_extra_reads(tiny_model, monkeypatch) -> None:
    """Rows that stop at different steps (stop tokens: what the tiny model emits often) are
    dropped from the batch without reading the device row by row."""
    prompts = chat_ids(tiny_model, TEXTS)
    settings = _forced(tiny_model)
    seeds = list(range(len(prompts)))
    free = gen.generate_batch(tiny_model, prompts, settings, seeds=seeds)
    counts: dict[int, int] = {}
    for g in free:
        for t in g.response_ids[1:4]:
            counts[t] = counts.get(t, 0) + 1
    stops = sorted(counts, key=lambda t: -counts[t])[:2]
    steps = tlextract_steps(tiny_model, prompts, monkeypatch, stops)
    monkeypatch.setattr(gen, "stop_token_ids", lambda _: stops)
    ended = gen.generate_batch(tiny_model, prompts, settings, seeds=seeds)
    assert len({len(g.response_ids) for g in ended}) > 1  # rows did stop at different steps
    assert max(reads for _, reads in steps) <= 2, steps


def test_ops_per_step_at_most_transformers_with_hooks(tiny_model, hf_tiny, monkeypatch) -> None:
    """Aten ops per decode step (median over the generation's steady steps), capture on every
    layer, against transformers' generate with a forward hook on every layer on the same weights,
    at batch 1, 8 and 16; both counts are printed (``pytest -s``)."""
    pad = tiny_model.tokenizer.pad_token_id
    for batch in (1, 8, 16):
        prompts = chat_ids(tiny_model, TEXTS[:batch])
        ours = tlextract_steps(tiny_model, prompts, monkeypatch, [])[1:]
        theirs = transformers_steps(hf_tiny, prompts, pad)[1:]
        ops_ours = statistics.median(o for o, _ in ours)
        ops_theirs = statistics.median(o for o, _ in theirs)
        reads_theirs = max(r for _, r in theirs)
        print(
            f"batch {batch}: aten ops per decode step tlextract {ops_ours:g}, transformers "
            f"{ops_theirs:g}; host reads per step tlextract {max(r for _, r in ours)}, "
            f"transformers {reads_theirs}"
        )
        assert ops_ours <= ops_theirs


def test_monitoring_reads_the_host_at_most_twice_per_step(tiny_model, monkeypatch) -> None:
    """monitor() scores every token at every step: the scores stay on the device until the
    generation ends."""
    layers = tuple(range(tiny_model.cfg.n_layers))
    v = torch.randn(len(layers), tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    vectors = [TraitVectors(t, "mean_diff", "tiny-random", "resid_post", layers, v) for t in "tu"]
    monkeypatch.setattr(gen, "stop_token_ids", lambda _: [])
    settings = _forced(tiny_model)
    steps = steps_of(  # two traits read at two layers: two hooks per step
        lambda: monitor(tiny_model, TEXTS[:4], vectors, {"t": 0, "u": 2}, settings=settings),
        monkeypatch,
    )
    assert len(steps) == N_TOKENS  # monitor generates one token more than it keeps
    assert max(reads for _, reads in steps) <= 2, steps
