"""Batched generation on a HookedTransformer or a TransformerBridge with left padding and a KV
cache (:mod:`tlextract.model.decoding` holds what differs between the two).

TransformerLens' own ``generate`` samples every row from the global RNG and keeps finished rows in
the batch. This loop drives the same forward pass and ``TransformerLensKeyValueCache`` but gives
each example its own seeded generator, so a sample does not depend on its batch partners or on
where an interrupted run resumed, and drops finished rows from the batch. Responses are kept as
token ids after the prompt, so slicing never depends on padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.model_bridge import TransformerBridge

from tlextract.config import GenerationSettings
from tlextract.model.accel import decode_session, has_hooks
from tlextract.model.decoding import (
    BridgeCache,
    KVCache,
    Model,
    bridge_pass,
    empty_cache,
    forward_hooks,
    keep_rows,
    prefix_filled,
    shares_prefix,
)
from tlextract.model.tokens import device_of, left_pad, stop_token_ids, tokenizer_of

Hook = tuple[str, Callable[..., object]]  # a hook name and its function
# After each decode step: the prompts (original indices) in the batch and what each sampled.
OnStep = Callable[[list[int], Int[Tensor, " batch"]], None]

# A common prefix shorter than this is not worth a pass of its own.
MIN_SHARED_PREFIX = 4


def next_token_logits(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    cache: KVCache,
) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position only: unembedding every prompt position is wasted work."""
    if isinstance(model, TransformerBridge):
        assert isinstance(cache, BridgeCache)
        logits = bridge_pass(model, tokens, mask, cache, last_logits=True)
        assert logits is not None
        return logits[:, -1, :].float()
    assert isinstance(cache, TransformerLensKeyValueCache)
    resid = model(
        tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers
    )
    last = resid if resid.shape[1] == 1 else resid[:, -1:, :]  # a decode step has one position
    return final_logits(model, last)[:, 0, :]


def final_logits(
    model: Model, resid: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos vocab"]:
    """Logits from final-block residuals: final norm, unembedding, the model's logit soft-cap
    (Gemma 2), in float32."""
    logits = model.unembed(model.ln_final(resid))
    logits = logits if logits.dtype == torch.float32 else logits.float()  # .float() is an op
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def sample(
    logits: Float[Tensor, "batch vocab"],
    settings: GenerationSettings,
    generators: Sequence[torch.Generator],
) -> Int[Tensor, " batch"]:
    """One token per row; a row's uniform comes from its own generator."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    return sample_with(logits, settings, uniforms(generators, 1, logits.device)[:, 0])


def uniforms(
    generators: Sequence[torch.Generator], n: int, device: str | torch.device
) -> Float[Tensor, "batch n"]:
    """``n`` uniforms per row from the row's own generator, drawn at once before decoding (one
    op per row, not per row and step). On the CPU these are the numbers ``n`` one-number draws
    give; a CUDA generator's differ (its offset advances per call)."""
    return torch.stack([torch.rand(n, generator=g, device=device) for g in generators])


def sample_with(
    logits: Float[Tensor, "batch vocab"],
    settings: GenerationSettings,
    u: Float[Tensor, " batch"] | None,
) -> Int[Tensor, " batch"]:
    """Sample each row by inverse CDF at its uniform ``u`` (greedy: the argmax; ``u`` unused).
    torch.multinomial draws one exponential per vocabulary entry (49k per token, ~0.8 ms: a
    fifth of a batch-16 decode step here); this uses one number."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    assert u is not None, "sampling needs one uniform per row"
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= settings.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    # u < 1, but u * total may round up to total; stay strictly below it.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # First index whose cdf exceeds the target: never a token of probability 0.
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)


def prefix_cache(
    model: Model,
    seqs: Sequence[Sequence[int]],
    limit: int,
    share: bool,
    stop_at_layer: int | None = None,
) -> tuple[KVCache, int]:
    """A KV cache for ``len(seqs)`` rows holding their longest common prefix (at most ``limit``
    tokens), computed once at batch 1, and the prefix length; the caller feeds each row's
    remaining tokens. Chat prompts share the template's system prompt and turn markers, more
    than half of a short prompt, so batched prefill and teacher-forced passes do that much less
    work. Positions come from the attention mask, so a row's tokens sit where they would
    without sharing (where :func:`tlextract.model.decoding.shares_prefix` says positions and
    attention allow it). ``share=False`` (or a prefix under MIN_SHARED_PREFIX, or one row): an
    empty cache and 0. ``stop_at_layer``: fill only the blocks before it. Callers pass
    ``share=False`` when hooks are attached: a hook may depend on batch rows or positions, and
    the prefix pass has one row and only the prefix."""
    device = device_of(model)
    n = 0
    if share and len(seqs) > 1 and shares_prefix(model):
        first = seqs[0]
        while n < limit and all(s[n] == first[n] for s in seqs):
            n += 1
    if n < MIN_SHARED_PREFIX:
        return empty_cache(model, len(seqs), device), 0
    prefix = torch.tensor([list(seqs[0][:n])], device=device)
    return prefix_filled(model, prefix, len(seqs), stop_at_layer), n


@dataclass(frozen=True)
class Generation:
    response_ids: list[int]
    stopped: bool  # True when an end-of-turn/eos token ended it (not included in response_ids)
    # Combined mode: the captured hooks averaged over the response tokens, [hook, d_model].
    pooled: Float[Tensor, "hook d_model"] | None = None


class _Capture:
    """Forward hooks that add each response token's activation to a per-row running sum.

    A response token is the input of the decode step after it was sampled, so only decode steps
    are recorded (``recording`` is off during the prompt pass)."""

    def __init__(self, names: Sequence[str], n_rows: int, d_model: int, device: str | torch.device):
        self.names = list(names)
        # [hook, row, 1, d_model] on the model's device: a decode step's activation [batch, 1,
        # d_model] is added by one index_add_ per hook and step, with no reshape (a hook runs
        # once per layer and step, so every op here is paid at every token).
        self.sums = torch.zeros(len(names), n_rows, 1, d_model, dtype=torch.float32, device=device)
        self.per_hook = self.sums.unbind(0)
        self.rows = torch.arange(n_rows, device=device)  # batch row -> original row
        self.recording = False

    def hooks(self) -> list[Hook]:
        def record(j: int) -> Callable[..., None]:
            def hook(act: Tensor, hook: object) -> None:
                if self.recording:
                    last = act if act.shape[1] == 1 else act[:, -1:]
                    if last.dtype != torch.float32:
                        last = last.float()
                    self.per_hook[j].index_add_(0, self.rows, last)

            return hook

        return [(name, record(j)) for j, name in enumerate(self.names)]

    def pooled(self) -> Float[Tensor, "row hook d_model"]:
        """Every row's sums on the host, in one copy."""
        return einops.rearrange(self.sums, "hook row 1 d -> row hook d").cpu()


@torch.inference_mode()
def generate_batch(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seeds: Sequence[int],
    capture: Sequence[str] = (),
    share_prefix: bool = True,
    on_step: OnStep | None = None,
) -> list[Generation]:
    """Generate a response for each prompt; ``seeds[i]`` alone decides prompt i's samples.

    ``capture`` names hooks (e.g. ``blocks.3.hook_resid_post``) to average over each response's
    tokens while generating, so no second forward pass is needed. ``share_prefix``: compute the
    prompts' common prefix once (see :func:`prefix_cache`; never while hooks are attached).
    ``on_step(rows, tokens)``, after each decode step: the prompts (indices) still in the batch
    and the token each sampled, on the device (a stop token ends its row)."""
    recorder = _Capture(capture, len(prompt_ids), model.cfg.d_model, device_of(model))
    share = share_prefix and not has_hooks(model)  # before our recorder's hooks are attached
    with forward_hooks(model, recorder.hooks()), decode_session(model):
        gens = _generate(model, prompt_ids, settings, seeds, recorder, share, on_step)
    if not capture:
        return gens
    sums = recorder.pooled()
    return [
        Generation(g.response_ids, g.stopped, sums[i] / len(g.response_ids))
        if g.response_ids
        else g
        for i, g in enumerate(gens)
    ]


@dataclass
class _Batch:
    """The rows still decoding, on the host (original indices) and on the device (their cache,
    uniforms, recorder rows); every step's sampled tokens stay on the device until the end."""

    rows: list[int]
    uniforms: Float[Tensor, "batch step"] | None
    ones: Int[Tensor, "batch 1"]  # the attention mask of a decode step's single token
    picked: list[Int[Tensor, " batch"]]  # one tensor per step, over that step's rows
    history: list[tuple[list[int], list[bool]]]  # per step: its rows and which of them ended

    def drop(self, done: list[bool], cache: KVCache, recorder: _Capture) -> Int[Tensor, " kept"]:
        """Drop the finished rows everywhere; the kept rows' indices in the old batch."""
        keep = [j for j, d in enumerate(done) if not d]
        index = torch.tensor(keep, device=self.ones.device)  # host to device: not a sync
        keep_rows(cache, index)
        recorder.rows = recorder.rows[index]
        self.rows = [self.rows[j] for j in keep]
        self.uniforms = None if self.uniforms is None else self.uniforms[index]
        self.ones = self.ones[: len(keep)]
        return index

    def responses(self, n: int) -> list[Generation]:
        """The responses, from one copy of every sampled token to the host."""
        flat = torch.cat(self.picked).tolist() if self.picked else []
        out: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        at = 0
        for rows, done in self.history:
            for r, d, t in zip(rows, done, flat[at : at + len(rows)], strict=True):
                if d:
                    stopped[r] = True
                else:
                    out[r].append(t)
            at += len(rows)
        return [Generation(ids, s) for ids, s in zip(out, stopped, strict=True)]


def _generate(
    model: Model,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    seeds: Sequence[int],
    recorder: _Capture,
    share: bool,
    on_step: OnStep | None,
) -> list[Generation]:
    """The decode loop. It reads the device once per step (which rows ended, one copy) and once
    at the end (the tokens): on a GPU every read waits for the queued kernels."""
    device = device_of(model)
    stops = torch.tensor(stop_token_ids(model), device=device)
    limit = min(map(len, prompt_ids)) - 1  # every row keeps a token to predict from
    cache, shared = prefix_cache(model, prompt_ids, limit, share)
    tokens, mask = left_pad(
        [p[shared:] for p in prompt_ids], tokenizer_of(model).pad_token_id, device
    )
    budget = settings.max_new_tokens
    draws = None
    if settings.do_sample and budget:
        draws = uniforms(
            [torch.Generator(device=device).manual_seed(s) for s in seeds], budget, device
        )
    batch = _Batch(
        rows=list(range(len(prompt_ids))),
        uniforms=draws,
        ones=torch.ones(len(prompt_ids), 1, dtype=torch.long, device=device),
        picked=[],
        history=[],
    )
    for step in range(budget):
        recorder.recording = step > 0
        logits = next_token_logits(model, tokens, mask, cache)
        u = None if batch.uniforms is None else batch.uniforms[:, step]
        new = sample_with(logits, settings, u)
        done: list[bool] = torch.isin(new, stops).tolist()  # the step's one read
        if on_step is not None:
            on_step(batch.rows, new)
        batch.picked.append(new)
        batch.history.append((batch.rows, done))
        if all(done):
            break
        if any(done):
            new = new[batch.drop(done, cache, recorder)]
        tokens, mask = new[:, None], batch.ones
    else:
        if recorder.names and budget:
            # Rows that ran out of budget still have their last token to record.
            recorder.recording = True
            last = max(int(n.split(".")[1]) for n in recorder.names)
            if isinstance(cache, BridgeCache):
                assert isinstance(model, TransformerBridge)
                bridge_pass(model, tokens, mask, cache, stop_at_layer=last + 1)
            else:
                model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=last + 1)
    return batch.responses(len(prompt_ids))
