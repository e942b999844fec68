"""Tests for the judge: scoring rule, exact digit-by-digit local judge, HTTP judge against a real
scripted server process, and the on-disk cache."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from local_server import control, started, use

from tlextract.errors import TLExtractError
from tlextract.judge.answers import JudgeCache, cache_key, judge_responses
from tlextract.judge.base import (
    COHERENCE_PROMPT,
    Judgment,
    Score,
    aggregate_score,
    fill_prompt,
    passes_filter,
)
from tlextract.judge.registry import make_judge

SERVER_SCRIPT = Path(__file__).with_name("fake_openai_server.py")
SECRET = "sk-test-SECRET-do-not-leak-123"
KEY_ENV = "TLX_TEST_JUDGE_KEY"
EVAL = "Rate the trait.\nQ: {question}\nA: {answer}\nScore:"


pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================
# Scoring rule and prompts
# ============================================================================================


def test_aggregate_score_is_the_weighted_mean_of_renormalised_probabilities() -> None:
    assert aggregate_score({0: 0.2, 100: 0.2}) == pytest.approx(50.0)
    # 0.3 on 10 and 0.1 on 20 renormalise to 0.75 / 0.25.
    assert aggregate_score({10: 0.3, 20: 0.1}) == pytest.approx(12.5)
    assert aggregate_score({42: 1.0}) == pytest.approx(42.0)


def test_aggregate_score_ignores_numbers_outside_0_to_100() -> None:
    assert aggregate_score({50: 0.5, 150: 0.4, -1: 0.1}) == pytest.approx(50.0)


def test_aggregate_score_is_missing_below_min_mass() -> None:
    assert aggregate_score({50: 0.2, 70: 0.04}) is None  # 0.24 < 0.25
    assert aggregate_score({50: 0.25}) == pytest.approx(50.0)  # at the threshold: kept
    assert aggregate_score({50: 0.2}, min_mass=0.1) == pytest.approx(50.0)
    assert aggregate_score({}) is None
    assert aggregate_score({}, min_mass=0.0) is None
    assert aggregate_score({150: 0.9}) is None


def test_fill_prompt_keeps_braces_and_substitutes_once() -> None:
    template = 'Q: {question}\nA: {answer}\nJSON like {"a": 1} stays.'
    filled = fill_prompt(template, "What is {answer}?", "Use {x} and {0} and {question}.")
    assert filled == (
        'Q: What is {answer}?\nA: Use {x} and {0} and {question}.\nJSON like {"a": 1} stays.'
    )


@pytest.mark.parametrize("template", ["Only {question}", "Only {answer}", "Nothing"])
def test_eval_prompt_without_both_placeholders_is_an_error(template: str) -> None:
    judge = CountingJudge()
    with pytest.raises(TLExtractError, match="placeholder"):
        judge_responses(judge, template, ["q"], ["a"])
    assert judge.calls == 0


def test_default_coherence_prompt_has_both_placeholders_and_asks_for_a_number() -> None:
    assert "{question}" in COHERENCE_PROMPT and "{answer}" in COHERENCE_PROMPT
    assert "number" in COHERENCE_PROMPT.lower()


def test_a_failed_score_cannot_carry_a_value() -> None:
    with pytest.raises(ValueError):
        Score(10.0, failed=True)
    assert Score.failure("boom").missing and Score(None).missing and not Score(0.0).missing


def test_keep_rule_never_keeps_missing_or_incoherent_judgments() -> None:
    assert passes_filter(Judgment(80.0, 90.0), positive=True)
    assert not passes_filter(Judgment(80.0, 90.0), positive=False)
    assert passes_filter(Judgment(10.0, 90.0), positive=False)
    assert passes_filter(Judgment(50.0, 50.0), positive=True)  # >= 50 on both
    assert not passes_filter(Judgment(80.0, 40.0), positive=True)
    assert not passes_filter(Judgment(None, 90.0), positive=False)
    assert not passes_filter(Judgment(10.0, None), positive=False)
    assert not passes_filter(Judgment(None, None, failed=True), positive=False)
    assert passes_filter(Judgment(10.0, None), positive=False, min_coherence=None)


# ============================================================================================
# Local judge: digit math on hand-built distributions
# ============================================================================================

# Token id -> text: single digits, a spaced digit, a lone space, a two-digit token, and tokens that
# start with a digit but are not numbers.
TEXTS = {i: str(i) for i in range(10)}
TEXTS.update({10: " 4", 11: " ", 12: "<eos>", 13: "x", 14: "2.", 15: "42", 16: "\n"})
VOCAB_SIZE = len(TEXTS)
DIGIT_START = [i for i, t in TEXTS.items() if t[:1].isdigit()]


def fake_dist(path: tuple[int, ...]) -> torch.Tensor:
    """A fixed, path-dependent next-token distribution (float64) with digits well represented."""
    g = torch.Generator().manual_seed(hash(path) % (2**31))
    logits = torch.randn(VOCAB_SIZE, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=-1)


def end_prob(path: tuple[int, ...]) -> float:
    d = fake_dist(path)
    return 1.0 - float(sum(d[i] for i in DIGIT_START))


def p_tok(path: tuple[int, ...], token: int) -> float:
    return float(fake_dist(path)[token])


def hand_tree_probs(dist_fn=fake_dist):
    from tlextract.judge.numbers import NumberTree, NumberVocab, next_token_stats, number_probs

    tree = NumberTree.build(NumberVocab.from_texts(TEXTS))
    dists = torch.stack([dist_fn(tree.path(i)) for i in range(tree.n_nodes)])
    tracked, end = next_token_stats(tree, torch.log(dists))
    return tree, number_probs(tree, tracked[None], end[None])[0]


def test_number_tree_lists_every_spelling() -> None:
    tree, _ = hand_tree_probs()
    # "4" "2", " 4" "2", " " "4" "2", "42" and " " "42"; never "2." or " 4" after a digit.
    assert sorted(tree.spellings(42)) == sorted([(4, 2), (10, 2), (11, 4, 2), (15,), (11, 15)])
    assert sorted(tree.spellings(100)) == sorted([(1, 0, 0), (11, 1, 0, 0)])
    # A leading zero is not a number: "05" is not 5.
    assert sorted(tree.spellings(5)) == [(5,), (11, 5)]
    assert all(path[0] != 0 or len(path) == 1 for n in range(101) for path in tree.spellings(n))


def test_byte_fallback_duplicates_are_not_spellings_but_keep_numbers_going() -> None:
    from tlextract.judge.numbers import NumberTree, NumberVocab

    texts = {0: "4", 1: "2", 2: "4", 3: " ", 4: " ", 5: "7"}  # 2 and 4 are <0x34>, <0x20>
    vocab = NumberVocab.from_texts(texts, byte_fallback=frozenset({2, 4, 5}))
    assert vocab.digits == {0: "4", 1: "2", 5: "7"}  # "7" has no regular token: kept
    assert vocab.spaces == (3,) and vocab.digit_start == (0, 1, 2, 5)
    assert sorted(NumberTree.build(vocab).spellings(42)) == [(0, 1), (3, 0, 1)]


def test_local_digit_math_matches_the_product_formula() -> None:
    _, probs = hand_tree_probs()
    expected_42 = (
        p_tok((), 4) * p_tok((4,), 2) * end_prob((4, 2))
        + p_tok((), 10) * p_tok((10,), 2) * end_prob((10, 2))
        + p_tok((), 11) * p_tok((11,), 4) * p_tok((11, 4), 2) * end_prob((11, 4, 2))
        + p_tok((), 15) * end_prob((15,))
        + p_tok((), 11) * p_tok((11,), 15) * end_prob((11, 15))
    )
    assert probs[42].item() == pytest.approx(expected_42, rel=1e-12)
    expected_0 = p_tok((), 0) * end_prob((0,)) + p_tok((), 11) * p_tok((11,), 0) * end_prob((11, 0))
    assert probs[0].item() == pytest.approx(expected_0, rel=1e-12)
    expected_100 = p_tok((), 1) * p_tok((1,), 0) * p_tok((1, 0), 0) * end_prob((1, 0, 0)) + (
        p_tok((), 11) * p_tok((11,), 1) * p_tok((11, 1), 0) * p_tok((11, 1, 0), 0)
        * end_prob((11, 1, 0, 0))
    )  # fmt: skip
    assert probs[100].item() == pytest.approx(expected_100, rel=1e-12)
    expected_5 = p_tok((), 5) * end_prob((5,)) + p_tok((), 11) * p_tok((11,), 5) * end_prob((11, 5))
    assert probs[5].item() == pytest.approx(expected_5, rel=1e-12)
    assert 0.0 < probs.sum().item() <= 1.0


def test_local_digit_math_gives_certainty_when_the_model_only_writes_one_number() -> None:
    def dist(path: tuple[int, ...]) -> torch.Tensor:
        d = torch.full((VOCAB_SIZE,), 1e-30, dtype=torch.float64)
        d[{(): 7, (7,): 12}.get(path, 13)] = 1.0  # "7" then <eos>; anything else then "x"
        return d / d.sum()

    _, probs = hand_tree_probs(dist)
    assert probs[7].item() == pytest.approx(1.0, abs=1e-12)
    assert aggregate_score(dict(enumerate(probs.tolist()))) == pytest.approx(7.0)


# ============================================================================================
# Local judge: end to end on real (tiny) HookedTransformers against a brute-force computation
# ============================================================================================


def brute_force_number_prob(model, prompt_ids: list[int], spellings, digit_start) -> float:
    """P(number) by running the model on each full sequence prompt + spelling (no cache, no
    padding) and multiplying softmax probabilities step by step, times P(end)."""
    total = 0.0
    for path in spellings:
        seq = torch.tensor([prompt_ids + list(path)])
        # An explicit mask: TransformerLens would otherwise take a leading BOS that shares the pad
        # id for padding.
        with torch.no_grad():
            logits = model(seq, attention_mask=torch.ones_like(seq))
        probs = torch.softmax(logits[0].double(), dim=-1)
        p = 1.0
        for k, token in enumerate(path):
            p *= probs[len(prompt_ids) - 1 + k, token].item()
        p *= 1.0 - probs[-1, digit_start].sum().item()
        total += p
    return total


def decoded_digit_start(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i])[:1].isdigit()]


@pytest.fixture(scope="module")
def bpe_model():
    return build_bpe_model()


def build_bpe_model():
    """A tiny GPT-2-style model (absolute positions) whose byte-level BPE has multi-digit and
    space-digit tokens ("42", " 4", " 42", "10", "100") and a chat template."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "4"), ("4", "2"), ("Ġ4", "2"), ("1", "0"), ("10", "0")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", padding_side="left",
        chat_template=(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        ),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        fast.save_pretrained(d)  # TransformerLens needs a tokenizer it can re-read from disk
        tokenizer = AutoTokenizer.from_pretrained(d)
        cfg = HookedTransformerConfig(
            d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=len(tokenizer),
            n_ctx=512, act_fn="gelu", normalization_type="LN", seed=0,
            positional_embedding_type="standard", default_prepend_bos=False,
        )  # fmt: skip
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


@pytest.mark.parametrize("packed", [True, False], ids=["tree-attention", "per-depth"])
def test_local_judge_handles_multi_digit_and_spaced_tokens_exactly(bpe_model, packed) -> None:
    from tlextract.judge.local import LocalJudge

    tok = bpe_model.tokenizer
    ids = tok.convert_tokens_to_ids
    judge = LocalJudge(bpe_model, batch_size=2, chat=False, packed=packed)
    spellings_42 = {
        tuple(ids(t))
        for t in (["4", "2"], ["42"], ["Ġ4", "2"], ["Ġ42"], ["Ġ", "4", "2"], ["Ġ", "42"])
    }
    assert set(judge.tree.spellings(42)) == spellings_42
    spellings_100 = {
        tuple(ids(t))
        for t in (["1", "0", "0"], ["10", "0"], ["100"], ["Ġ", "1", "0", "0"], ["Ġ", "10", "0"],
                  ["Ġ", "100"])
    }  # fmt: skip
    assert set(judge.tree.spellings(100)) == spellings_100
    # Different lengths in one batch (left padding), batch_size 2 over 3 prompts.
    prompts = ["Score it:", "A longer judge prompt that asks for a score, then ends with:", "Go"]
    probs = judge.number_probs(prompts)
    digit_start = decoded_digit_start(tok)
    for row, prompt in enumerate(prompts):
        prompt_ids = judge.tokenize([prompt])[0]
        for number, spellings in ((42, spellings_42), (100, spellings_100), (4, None), (0, None)):
            spellings = spellings or judge.tree.spellings(number)
            expected = brute_force_number_prob(bpe_model, prompt_ids, spellings, digit_start)
            assert probs[row, number].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert torch.all(probs.sum(dim=1) <= 1.0 + 1e-9)


def test_local_judge_scores_a_too_long_prompt_as_missing(bpe_model) -> None:
    from tlextract.judge.local import LocalJudge

    judge = LocalJudge(bpe_model, chat=False)
    scores = judge.score(["x" * 600, "short:"])
    assert scores[0] == Score(None)  # missing, not failed
    assert not scores[1].failed


def test_local_judge_name_tells_models_apart(bpe_model) -> None:
    from tlextract.judge.local import LocalJudge

    other = copy.deepcopy(bpe_model)
    with torch.no_grad():
        other.blocks[0].mlp.W_in.mul_(1.5)
    a, b = LocalJudge(bpe_model), LocalJudge(other)
    assert a.name != b.name and a.name.startswith("local:") and ":chat:" in a.name
    assert ":plain:" in LocalJudge(bpe_model, chat=False).name


def test_local_judge_falls_back_to_exact_passes_under_a_sliding_window(bpe_model) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tlextract.judge.local import LocalJudge

    cfg = HookedTransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=bpe_model.cfg.d_vocab,
        n_ctx=512, act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        use_local_attn=True, attn_types=["local", "global"], window_size=6, seed=1,
        default_prepend_bos=False,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=bpe_model.tokenizer)
    with pytest.raises(TLExtractError, match="sliding window"):
        LocalJudge(model, chat=False, packed=True).number_probs(["Rate it:"])
    judge = LocalJudge(model, chat=False)  # auto: per-depth passes, exact
    probs = judge.number_probs(["A prompt longer than the window, rate it:"])
    prompt_ids = judge.tokenize(["A prompt longer than the window, rate it:"])[0]
    digit_start = decoded_digit_start(model.tokenizer)
    for number in (7, 42, 100):
        expected = brute_force_number_prob(
            model, prompt_ids, judge.tree.spellings(number), digit_start
        )
        assert probs[0, number].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)


@pytest.fixture(scope="module")
def tiny_random():
    from tlextract.model.load import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="module")
def tiny_digits(tiny_random):
    """tiny-random with digits made likely (a bias on their logits), so scores are not missing."""
    model = copy.deepcopy(tiny_random)
    tok = model.tokenizer
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    with torch.no_grad():
        model.unembed.b_U[digits] += 3.0
    return model


@pytest.mark.parametrize("packed", [True, False], ids=["tree-attention", "per-depth"])
def test_local_judge_on_tiny_random_matches_brute_force(tiny_digits, packed) -> None:
    from tlextract.judge.local import LocalJudge

    model = tiny_digits
    tok = model.tokenizer
    judge = LocalJudge(model, batch_size=2, min_mass=0.05, packed=packed)
    assert judge.chat  # tiny-random has a chat template
    assert judge.format_prompt("hello").endswith("assistant\n")
    prompts = [EVAL.replace("{question}", "Why?").replace("{answer}", "Because {x}."), "Rate: 1"]
    probs = judge.number_probs(prompts)
    assert torch.all(probs.sum(dim=1) <= 1.0 + 1e-9) and torch.all(probs >= 0)
    space = tok.convert_tokens_to_ids("Ġ")
    digit_start = decoded_digit_start(tok)
    for row, prompt in enumerate(prompts):
        prompt_ids = judge.tokenize([prompt])[0]
        for number in (0, 7, 42, 100):
            # Spelled independently of the judge's tree: digit by digit, with or without a lone
            # space token first.
            plain = [tok.convert_tokens_to_ids(c) for c in str(number)]
            spellings = [tuple(plain), (space, *plain)]
            expected = brute_force_number_prob(model, prompt_ids, spellings, digit_start)
            assert probs[row, number].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    scores = judge.score(prompts)
    for score, row in zip(scores, probs, strict=True):
        assert score.value == pytest.approx(aggregate_score(dict(enumerate(row.tolist()))))
        assert score.value is not None and 0.0 <= score.value <= 100.0


# ============================================================================================
# HTTP judge against a real server process
# ============================================================================================


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ, FAKE_OPENAI_KEY=SECRET, FAKE_OPENAI_MODEL="judge-model")
    with started(SERVER_SCRIPT, env=env) as base:
        yield base


@pytest.fixture
def http(server, monkeypatch):
    """The server's base URL, reset, with the key in the environment and no proxy."""
    return use(server, monkeypatch, KEY_ENV, SECRET)


def make_http_judge(base: str, **kwargs):
    from tlextract.judge.http import OpenAIJudge

    options = dict(api_key_env=KEY_ENV, timeout=2.0, max_retries=3, backoff_base=0.01,
                   backoff_max=2.0, max_concurrency=4)  # fmt: skip
    options.update(kwargs)
    return OpenAIJudge(base, "judge-model", **options)


def test_http_judge_reads_scores_from_top_logprobs(http) -> None:
    judge = make_http_judge(http)
    scores = judge.score(
        ["[[dist=40:0.5,60:0.25]] a", "[[dist= 4:0.3,4:0.2,100:0.1]] b", "[[dist=30:0.1]] c"]
    )
    assert scores[0].value == pytest.approx((40 * 0.5 + 60 * 0.25) / 0.75)
    # " 4" and "4" both count for 4.
    assert scores[1].value == pytest.approx((4 * 0.5 + 100 * 0.1) / 0.6)
    assert scores[2] == Score(None)  # low mass: missing, not failed
    assert control(http, "/stats")["requests"] == 3


def test_http_judge_retries_429_then_succeeds(http) -> None:
    judge = make_http_judge(http)
    (score,) = judge.score(["[[dist=70:0.9;fail=429x2]] q"])
    assert score.value == pytest.approx(70.0) and not score.failed
    assert control(http, "/stats")["requests"] == 3


def test_http_judge_honours_retry_after(http) -> None:
    judge = make_http_judge(http, backoff_base=0.001)
    start = time.monotonic()
    (score,) = judge.score(["[[dist=20:0.9;fail=503x1;retry_after=0.4]] q"])
    assert time.monotonic() - start >= 0.38
    assert score.value == pytest.approx(20.0)


def test_http_judge_retries_a_timeout_then_succeeds(http) -> None:
    judge = make_http_judge(http, timeout=0.4)
    start = time.monotonic()
    (score,) = judge.score(["[[dist=55:0.9;sleep=1.5x1]] q"])
    assert score.value == pytest.approx(55.0)
    assert time.monotonic() - start < 1.4  # did not wait for the slow answer
    assert control(http, "/stats")["attempts"]["[[dist=55:0.9;sleep=1.5x1]] q"] == 2


def test_http_judge_timeouts_after_retries_are_failed_not_zero(http) -> None:
    judge = make_http_judge(http, timeout=0.3, max_retries=1)
    (score,) = judge.score(["[[dist=0:1.0;sleep=1.0]] q"])
    assert score.failed and score.value is None and "attempts" in score.error


def test_http_judge_connection_refused_is_failed(http) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_http_judge(f"http://127.0.0.1:{port}", max_retries=1)
    (score,) = judge.score(["q"])
    assert score.failed and score.value is None


def test_http_judge_401_raises_at_once_without_leaking_the_key(http, monkeypatch, caplog) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
    judge = make_http_judge(http)
    start = time.monotonic()
    with pytest.raises(TLExtractError) as info:
        judge.score(["[[dist=50:1]] q"])
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert KEY_ENV in message and "401" in message and SECRET not in message
    assert SECRET not in repr(judge) and SECRET not in judge.name
    assert SECRET not in caplog.text
    assert control(http, "/stats")["requests"] == 1  # not retried


def test_http_judge_404_names_base_url_and_model(http) -> None:
    from tlextract.judge.http import OpenAIJudge

    judge = OpenAIJudge(http, "no-such-model", api_key_env=KEY_ENV, backoff_base=0.01)
    with pytest.raises(TLExtractError, match="base_url") as info:
        judge.score(["[[dist=50:1]] q"])
    assert "no-such-model" in str(info.value) and http in str(info.value)
    assert SECRET not in str(info.value)


def test_http_judge_without_logprobs_support_is_an_error(http) -> None:
    with pytest.raises(TLExtractError, match="logprobs"):
        make_http_judge(http).score(["[[nologprobs]] q"])


def test_http_judge_needs_its_key_variable(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(TLExtractError, match=KEY_ENV):
        make_http_judge("http://127.0.0.1:9")


def test_http_judge_bounds_concurrency(http) -> None:
    judge = make_http_judge(http, max_concurrency=3)
    scores = judge.score([f"[[dist=10:0.9;hold=0.25]] {i}" for i in range(10)])
    assert [s.value for s in scores] == [pytest.approx(10.0)] * 10
    stats = control(http, "/stats")
    assert stats["requests"] == 10
    assert 2 <= stats["max_in_flight"] <= 3


def test_retry_after_header_parsing() -> None:
    from email.utils import formatdate

    from tlextract.judge.http import parse_retry_after

    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 <= later <= 31
    assert parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


# ============================================================================================
# Cache and judge_responses
# ============================================================================================


class CountingJudge:
    """Scores the length of the answer mod 101; 'FAIL' in a prompt fails, 'REFUSE' is missing."""

    def __init__(self, name: str = "counting") -> None:
        self.name = name
        self.calls = 0
        self.prompts: list[str] = []

    def score(self, prompts: list[str]) -> list[Score]:
        self.calls += 1
        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            if "FAIL" in p:
                out.append(Score.failure("scripted"))
            elif "REFUSE" in p:
                out.append(Score(None))
            else:
                out.append(Score(float(len(p) % 101)))
        return out


QUESTIONS = ["What is {braces}?", "Second question", "Third"]
ANSWERS = ["An answer with {answer} in it", "REFUSE", "FAIL"]


def test_second_judge_responses_makes_no_judge_calls(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.jsonl"
    judge = CountingJudge()
    first = judge_responses(judge, EVAL, QUESTIONS[:2], ANSWERS[:2], JudgeCache(path))
    assert judge.calls == 1 and len(judge.prompts) == 4  # 2 trait + 2 coherence prompts
    assert first[0].trait == float(len(fill_prompt(EVAL, QUESTIONS[0], ANSWERS[0])) % 101)
    assert first[1] == Judgment(None, first[1].coherence, failed=False)  # missing, cached
    again = judge_responses(judge, EVAL, QUESTIONS[:2], ANSWERS[:2], JudgeCache(path))
    assert judge.calls == 1 and again == first
    # The same cache under another judge name is not reused.
    other = CountingJudge("other")
    judge_responses(other, EVAL, QUESTIONS[:2], ANSWERS[:2], JudgeCache(path))
    assert other.calls == 1


def test_failed_judgments_are_never_cached_or_counted(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.jsonl"
    judge = CountingJudge()
    result = judge_responses(judge, EVAL, QUESTIONS, ANSWERS, JudgeCache(path))
    assert result[2].failed and result[2].trait is None and result[2].coherence is None
    assert not passes_filter(result[2], positive=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4  # 2 pairs x (trait, coherence); nothing for the failed pair
    failed_prompt = fill_prompt(EVAL, QUESTIONS[2], ANSWERS[2])
    assert cache_key(judge.name, failed_prompt) not in {r["key"] for r in records}
    assert all(set(r) == {"key", "judge", "score"} for r in records)
    # A rerun asks the judge again for exactly the failed prompts.
    judge.prompts.clear()
    judge_responses(judge, EVAL, QUESTIONS, ANSWERS, JudgeCache(path))
    assert len(judge.prompts) == 2 and all("FAIL" in p for p in judge.prompts)


def test_duplicate_prompts_are_judged_once() -> None:
    judge = CountingJudge()
    result = judge_responses(judge, EVAL, ["q", "q"], ["a", "a"], JudgeCache(None))
    assert len(judge.prompts) == 2 and result[0] == result[1]


def test_plain_float_judges_are_accepted() -> None:
    class FloatJudge:
        name = "floats"

        def score(self, prompts: list[str]) -> list[float | None]:
            return [None if "REFUSE" in p else 60.0 for p in prompts]

    result = judge_responses(FloatJudge(), EVAL, ["q", "q2"], ["a", "REFUSE"], None)
    assert result[0] == Judgment(60.0, 60.0) and result[1].trait is None and not result[1].failed


def test_truncated_last_cache_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.jsonl"
    judge = CountingJudge()
    judge_responses(judge, EVAL, QUESTIONS[:2], ANSWERS[:2], JudgeCache(path))
    complete = path.read_text()
    with open(path, "a") as f:
        f.write('{"key": "abc", "judge": "counting", "sco')  # a crash mid-write
    cache = JudgeCache(path)
    assert len(cache) == 4 and path.read_text() == complete  # partial line dropped
    judge_responses(judge, EVAL, QUESTIONS[:2], ANSWERS[:2], cache)
    assert judge.calls == 1
    cache.put_many([("k2", "counting", Score(12.5))])
    assert JudgeCache(path).get("k2") == Score(12.5)


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.jsonl"
    path.write_text('{"key": "k1", "judge": "j", "score": 3.0}')
    cache = JudgeCache(path)
    assert cache.get("k1") == Score(3.0)
    cache.put_many([("k2", "j", Score(None))])
    reloaded = JudgeCache(path)
    assert reloaded.get("k1") == Score(3.0) and reloaded.get("k2") == Score(None)
    assert reloaded.get("nope") is None


def test_corrupt_cache_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "judge_cache.jsonl"
    path.write_text('{"key": "k1", "judge": "j", "score": 3.0}\nnot json\n{"key": "k2", '
                    '"judge": "j", "score": 4.0}\n')  # fmt: skip
    with pytest.raises(TLExtractError, match=r"judge_cache.jsonl:2"):
        JudgeCache(path)


def test_http_judge_through_the_cache_never_stores_the_key_and_retries_failures(
    http, tmp_path: Path
) -> None:
    path = tmp_path / "judge_cache.jsonl"
    judge = make_http_judge(http, max_retries=1)
    questions = ["q1", "q2"]
    answers = ["[[dist=80:0.9]] fine", "[[dist=80:0.9;fail=500x3]] flaky"]
    first = judge_responses(judge, EVAL, questions, answers, JudgeCache(path), chunk_size=3)
    assert first[0].trait == pytest.approx(80.0) and first[0].coherence == pytest.approx(80.0)
    assert first[1].failed and first[1].trait is None  # 2 attempts, both 500
    assert SECRET not in path.read_text()
    requests = control(http, "/stats")["requests"]
    # The rerun sends only the failed pair's prompts again (the server recovers on attempt 4).
    second = judge_responses(judge, EVAL, questions, answers, JudgeCache(path))
    assert second[1].trait == pytest.approx(80.0) and not second[1].failed
    assert control(http, "/stats")["requests"] - requests == 4  # 2 prompts x attempts 3 and 4
    third = judge_responses(judge, EVAL, questions, answers, JudgeCache(path))
    assert third == second and control(http, "/stats")["requests"] - requests == 4


# ============================================================================================
# make_judge
# ============================================================================================


def test_make_judge_from_config(bpe_model, monkeypatch) -> None:
    from tlextract.judge.http import OpenAIJudge
    from tlextract.judge.local import LocalJudge

    assert make_judge({"kind": "none"}) is None
    local = make_judge({"kind": "local", "model": "self", "batch_size": 2}, model=bpe_model)
    assert isinstance(local, LocalJudge) and local.batch_size == 2
    monkeypatch.setenv(KEY_ENV, SECRET)
    remote = make_judge(
        {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
         "api_key_env": KEY_ENV, "max_concurrency": 2}
    )  # fmt: skip
    assert (
        isinstance(remote, OpenAIJudge) and remote.url == "http://127.0.0.1:9/v1/chat/completions"
    )
    assert SECRET not in remote.name and "m@http://127.0.0.1:9/v1" in remote.name


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"kind": "gpt"}, "none, local, openai"),
        ({}, "valid kinds"),
        ({"kind": "local", "model": "self"}, "needs the experiment's model"),
        ({"kind": "openai", "model": "m"}, "base_url"),
        ({"kind": "local", "modle": "self"}, "unknown key"),
    ],
)
def test_make_judge_rejects_bad_configs(config: dict, match: str) -> None:
    with pytest.raises(TLExtractError, match=match):
        make_judge(config)


def test_make_judge_loads_a_named_local_model(tiny_random) -> None:
    judge = make_judge({"kind": "local", "model": "tiny-random"})
    assert judge is not None and judge.name.startswith("local:tiny-random#")


def test_a_server_failing_every_request_gives_one_warning_per_cause_with_a_count(
    http, caplog
) -> None:
    judge = make_http_judge(http, max_retries=2)
    prompts = [f"[[status=503]] q{i}" for i in range(6)] + ["[[fail=429x1]] ok [[dist=40:0.9]]"]
    with caplog.at_level(logging.WARNING, logger="tlextract"):
        scores = judge.score(prompts)
    assert all(s.failed for s in scores[:6]) and scores[6].value == pytest.approx(40)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # HTTP 503 and HTTP 429, not one per attempt
    (busy,) = [w for w in warnings if "HTTP 503" in w]
    assert "18 failed attempts" in busy and "6 requests gave up" in busy
    (once,) = [w for w in warnings if "HTTP 429" in w]
    assert "1 failed attempts" in once and "every request then succeeded" in once


def test_a_malformed_response_is_not_retried(http) -> None:
    judge = make_http_judge(http, max_retries=3)
    (score,) = judge.score(["[[malformed]] q"])
    assert score.failed and "malformed response" in score.error
    assert control(http, "/stats")["attempts"] == {"[[malformed]] q": 1}


def test_api_key_env_null_is_a_valid_setting_and_sends_no_key(http, monkeypatch) -> None:
    """The unset-key error says to set "api_key_env" to null; the validator takes it."""
    from tlextract.config import validate_judge
    from tlextract.judge.registry import make_judge

    monkeypatch.delenv(KEY_ENV)
    config = {"kind": "openai", "base_url": http, "model": "judge-model", "api_key_env": None}
    assert validate_judge(config, "experiment.json") == config
    judge = make_judge(config)
    assert judge is not None and judge._api_key is None
    with pytest.raises(TLExtractError, match="no key is sent because api_key_env is null"):
        judge.score(["[[dist=40:0.9]] q"])  # this server wants a key: 401, said plainly
    with pytest.raises(TLExtractError, match='set "api_key_env" to null'):
        make_judge({**config, "api_key_env": KEY_ENV})
