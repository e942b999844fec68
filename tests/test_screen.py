"""``screen``: each training sample's projection difference (its response's mean residual on the
trait's unit vector minus that of the model's own response to the same prompt), in memory
(``tx.screen``) and as a command whose own responses are a stage (cached, resumed, redone when
damaged); bad data and vectors of another model refused in one line before anything is written.

The tiny model has random weights, so the planted check here plants the vector: the difference
of the pooled means of a trait half (the run's responses to its positive prompts) and a half of
the model's own greedy answers. The ranking must then put the trait half first and the mean
must be positive; shuffled labels must not rank."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from datasets import Dataset

import tlextract as tx
import tlextract.engines.tl as tl_engine
from tlextract.cli.main import main
from tlextract.config import GenerationSettings, load_experiment
from tlextract.errors import TLExtractError
from tlextract.model.tokens import text_ids, tokenizer_of, user_prompts
from tlextract.ops.generate import generate_batch
from tlextract.ops.pool import pooled_activations
from tlextract.ops.trait_vectors import TraitVectors
from tlextract.screen_data import read_samples
from tlextract.settings import screen_dir, settings_for
from tlextract.stages.responses import load_responses
from tlextract.stages.run import run_trait
from tlextract.stages.screening import ranking_auroc

SAMPLED = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    """An experiments root whose trait alpha has saved vectors, and the run."""
    root = tmp_path_factory.mktemp("screen")
    write_experiment(root, n_examples=8)
    run = settings_for(load_experiment("tiny", root), "alpha")
    run_trait(run, get_model=lambda: tiny_model)
    return root, run


def own_answers(model, prompts: list[str], seeds: list[int]) -> list[str]:
    gens = generate_batch(model, user_prompts(model, prompts, "chat"), SAMPLED, seeds)
    return [tokenizer_of(model).decode(g.response_ids, skip_special_tokens=True) for g in gens]


@pytest.fixture(scope="module")
def planted(saved, tiny_model):
    """Half the run's responses to its positive prompts (label true), half the model's own
    answers (label false), each to the plain question; a vector planted at every layer as the
    difference of the two halves' pooled means; the seeds that make the false half the
    model's own answers again when screened."""
    _, run = saved
    rows = [r for r in load_responses(run)[0] if r["polarity"] == "pos" and r["response"].strip()]
    questions = [r["question"] for r in rows]
    own_seeds = [1000 + i for i in range(len(rows))]
    own = own_answers(tiny_model, questions, own_seeds)
    samples = [{"prompt": q, "response": r["response"], "label": True}
               for q, r in zip(questions, rows, strict=True)]  # fmt: skip
    seeds = [2000 + i for i in range(len(samples))]
    for q, o, seed in zip(questions, own, own_seeds, strict=True):
        if o.strip():
            samples.append({"prompt": q, "response": o, "label": False})
            seeds.append(seed)
    layers = list(range(tiny_model.cfg.n_layers))
    prompts = user_prompts(tiny_model, [s["prompt"] for s in samples], "chat")
    acts = pooled_activations(
        tiny_model, prompts, text_ids(tiny_model, [s["response"] for s in samples]), layers
    )
    label = torch.tensor([s["label"] for s in samples])
    vecs = acts[label].mean(0) - acts[~label].mean(0)
    tv = TraitVectors("planted", "mean_diff", "tiny-random", "resid_post", tuple(layers), vecs)
    return samples, tv, seeds


def test_a_planted_trait_half_ranks_first_and_the_mean_is_positive(tiny_model, planted) -> None:
    samples, tv, seeds = planted
    result = tx.screen(tiny_model, tv, samples, layer=1, settings=SAMPLED, seeds=seeds)
    result = result.traits["planted"]
    assert result.auroc is not None and result.auroc.low > 0.5
    assert result.mean.low > 0
    means = result.by_label()
    for y in (True, False):  # each label's mean, by hand
        diffs = [r.diff for r in result.rows if r.label is y]
        assert means[y].value == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert means[True].low > 0 and means[True].value > means[False].value  # the planted push
    shuffled = [s["label"] for s in samples]
    random.Random(0).shuffle(shuffled)
    control = [{**s, "label": y} for s, y in zip(samples, shuffled, strict=True)]
    again = tx.screen(tiny_model, tv, control, 1, settings=SAMPLED, seeds=seeds).traits["planted"]
    assert again.auroc is not None and again.auroc.covers(0.5)
    # The ranking itself is the labels' business only through the AUROC.
    assert [r.diff for r in again.ranked()] == [r.diff for r in result.ranked()]


def test_the_models_own_sampled_answers_score_zero_by_default(tiny_model) -> None:
    """The baseline is the model's own answer sampled as it answers, so a dataset of its own
    answers (other seeds) scores 0 on average: even along the direction where greedy answers
    differ from sampled ones, which a greedy baseline reads as a push."""
    questions = [f"Tell me about thing number {i}." for i in range(40)]
    prompts = user_prompts(tiny_model, questions, "chat")
    sampled = GenerationSettings()  # what the model writes: temperature 1, 40 tokens

    def answers(settings: GenerationSettings, first_seed: int) -> list[list[int]]:
        seeds = [first_seed + i for i in range(len(prompts))]
        return [g.response_ids for g in generate_batch(tiny_model, prompts, settings, seeds)]

    greedy = GenerationSettings(do_sample=False)
    layers = list(range(tiny_model.cfg.n_layers))
    mean = {name: pooled_activations(tiny_model, prompts, answers(s, 9000), layers).mean(0)
            for name, s in (("sampled", sampled), ("greedy", greedy))}  # fmt: skip
    tv = TraitVectors("typical", "mean_diff", "tiny-random", "resid_post", tuple(layers),
                      mean["sampled"] - mean["greedy"])  # fmt: skip
    texts = tokenizer_of(tiny_model).batch_decode(answers(sampled, 5000), skip_special_tokens=True)
    own = [{"prompt": q, "response": t} for q, t in zip(questions, texts, strict=True) if t.strip()]
    by_default = tx.screen(tiny_model, tv, own, layer=1).traits["typical"]
    assert by_default.mean.covers(0.0), by_default.mean
    against_greedy = tx.screen(tiny_model, tv, own, layer=1, settings=greedy).traits["typical"]
    assert against_greedy.mean.low > 0  # what the baseline would read if it were greedy


def _projection(model, prompt: list[int], response: list[int], layer: int, unit) -> float:
    """A fresh run_with_cache pass: the hook's output averaged over the response positions."""
    tokens = torch.tensor([prompt + response])
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_post")
    resid = cache[f"blocks.{layer}.hook_resid_post"][0, len(prompt) :]
    return float(resid.float().mean(0) @ unit)


def test_the_difference_is_the_projection_of_the_data_minus_the_own_answer(
    tiny_model, planted
) -> None:
    samples, tv, _ = planted
    some = samples[:3] + samples[-2:]
    rows = tx.screen(tiny_model, tv, some, layer=2, settings=SAMPLED).traits["planted"].rows
    unit = tv[2].float() / tv[2].float().norm()
    prompts = user_prompts(tiny_model, [s["prompt"] for s in some], "chat")
    gens = generate_batch(tiny_model, prompts, SAMPLED, list(range(len(some))))
    for row, s, p, g in zip(rows, some, prompts, gens, strict=True):
        data = _projection(tiny_model, p, text_ids(tiny_model, [s["response"]])[0], 2, unit)
        own_text = tokenizer_of(tiny_model).decode(g.response_ids, skip_special_tokens=True)
        # The own answer read back from its text, as the data's response is.
        own = _projection(tiny_model, p, text_ids(tiny_model, [own_text])[0], 2, unit)
        assert row.own_response == own_text
        assert row.projection == pytest.approx(data, abs=1e-4)
        assert row.diff == pytest.approx(data - own, abs=1e-4)


def test_batches_do_not_change_the_scores(tiny_model, planted) -> None:
    samples, tv, _ = planted
    settings = GenerationSettings(max_new_tokens=5)  # sampled: one seed per sample
    one = tx.screen(tiny_model, tv, samples, 1, settings=settings, batch_size=1)
    many = tx.screen(tiny_model, tv, samples, 1, settings=settings, batch_size=5)
    a, b = one.traits["planted"].rows, many.traits["planted"].rows
    assert [r.own_response for r in a] == [r.own_response for r in b]
    assert [r.diff for r in a] == pytest.approx([r.diff for r in b], abs=1e-4)


def test_vectors_of_another_model_width_or_layer_are_refused(tiny_model, planted) -> None:
    samples, tv, _ = planted
    other = TraitVectors("x", "mean_diff", "smollm2-135m-instruct", tv.hook, tv.layers, tv.vectors)
    with pytest.raises(TLExtractError, match="made on smollm2-135m-instruct"):
        tx.screen(tiny_model, other, samples)
    wide = TraitVectors("x", "mean_diff", "", tv.hook, tv.layers, torch.ones(len(tv.layers), 7))
    with pytest.raises(TLExtractError, match="d_model"):
        tx.screen(tiny_model, wide, samples)
    two = TraitVectors("x", "mean_diff", "tiny-random", tv.hook, (0, 1), tv.vectors[:2])
    with pytest.raises(TLExtractError, match="no layer 2"):
        tx.screen(tiny_model, two, samples, layer=2)


# --- the data files ------------------------------------------------------------------------------


def test_jsonl_chat_messages_and_a_saved_dataset_read_alike(tmp_path: Path) -> None:
    rows = [{"prompt": "Hi?", "response": "Hello.", "label": True},
            {"messages": [{"role": "system", "content": "Be kind."},
                          {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello."}]}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n")
    s = read_samples(tmp_path / "d.jsonl")[0]
    assert (s.messages, s.response, s.label, s.prompt) == (
        (("user", "Hi?"),),
        "Hello.",
        True,
        "Hi?",
    )
    Dataset.from_list([rows[1]]).save_to_disk(str(tmp_path / "ds"))
    m = read_samples(tmp_path / "ds")[0]
    assert m.messages == (("system", "Be kind."), ("user", "Hi?")) and m.response == "Hello."


BAD = {
    "not JSON": ('{"prompt": "a", "response": "b"}\n{oops\n', "line 2: not JSON"),
    "missing field": ('{"prompt": "a"}\n', "line 1: fields"),
    "empty response": ('{"prompt": "a", "response": "  "}\n', "line 1: the response is empty"),
    "unknown format": ("prompt,response\na,b\n", "line 1: not JSON"),
    "bad label": ('{"prompt": "a", "response": "b", "label": "yes"}\n', "'label'"),
    "last message not the assistant's": (
        '{"messages": [{"role": "user", "content": "a"}]}\n', "must end in a user message"),
    "labels on some lines": ('{"prompt": "a", "response": "b", "label": true}\n'
                             '{"prompt": "a", "response": "b"}\n', "some samples only"),
}  # fmt: skip


@pytest.mark.parametrize("body, message", BAD.values(), ids=BAD.keys())
def test_bad_data_is_one_line_naming_the_file_and_line(tmp_path: Path, body, message) -> None:
    (tmp_path / "d.jsonl").write_text(body)
    with pytest.raises(TLExtractError, match=message) as e:
        read_samples(tmp_path / "d.jsonl")
    assert "\n" not in str(e.value)


# --- the command ---------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _write_data(path: Path, planted) -> Path:
    samples, _, _ = planted
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _argv(root: Path, data: Path, *more: str) -> list[str]:
    return ["screen", "--experiment", "tiny", "--traits", "alpha", "--data", str(data),
            "--experiments-dir", str(root), *more]  # fmt: skip


def test_the_command_writes_its_files_and_a_second_run_generates_nothing(
    saved, planted, monkeypatch, capsys
) -> None:
    root, run = saved
    data = _write_data(root / "planted.jsonl", planted)
    assert main(_argv(root, data)) == 0
    out = screen_dir(run, "planted")
    written = json.loads((out / "screen.json").read_text())
    ranked = written["traits"]["alpha"]["ranked"]
    assert len(ranked) == len(planted[0]) and ranked[0]["diff"] >= ranked[-1]["diff"]
    assert written["traits"]["alpha"]["auroc"] is not None
    assert (out / "screen.png").stat().st_size > 0 and "| rank |" in (out / "screen.md").read_text()
    assert "mean projection difference" in capsys.readouterr().out

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(tl_engine, "generate_batch", no_generation)
    assert main(_argv(root, data)) == 0
    assert "up to date" in capsys.readouterr().out
    assert json.loads((out / "screen.json").read_text()) == written


def test_an_interrupted_screen_resumes_and_a_damaged_output_is_redone(
    saved, planted, monkeypatch, capsys
) -> None:
    root, run = saved
    data = _write_data(root / "resume.jsonl", planted)
    real, calls = tl_engine.generate_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tl_engine, "generate_batch", interrupted)
    assert main(_argv(root, data)) == 130
    out = screen_dir(run, "resume")
    assert len(list((out / "responses").glob("shards-*/batch_*.pt"))) == 1
    calls.clear()
    monkeypatch.setattr(
        tl_engine, "generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main(_argv(root, data)) == 0
    n_batches = -(-len(planted[0]) // run.batch_size)
    assert len(calls) == n_batches - 1  # the saved batch is not generated again
    (out / "responses" / "own_responses.json").write_text('[[1, 2], "torn')
    calls.clear()
    assert main(_argv(root, data)) == 0
    assert len(calls) == n_batches and list((out / "responses" / "damaged").iterdir())
    assert "damaged output" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["bad data", "no --data", "no such file", "layer", "width"])
def test_the_command_refuses_in_one_line_and_writes_nothing(saved, tmp_path, case, capsys) -> None:
    root, run = saved
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    argv = _argv(root, data)
    if case == "bad data":
        data.write_text('{"prompt": "a", "reply": "b"}\n')
    elif case == "no --data":
        argv = argv[:5] + argv[7:]
    elif case == "no such file":
        argv = _argv(root, tmp_path / "nope.jsonl")
    elif case == "layer":
        argv += ["--layer", "9"]
    vectors = run.stage_dir("vectors") / "mean_diff.pt"
    kept = vectors.read_bytes()
    if case == "width":
        tv = TraitVectors.load(vectors)
        TraitVectors(tv.trait, tv.method, tv.model, tv.hook, tv.layers,
                     torch.ones(len(tv.layers), 5)).save(vectors)  # fmt: skip
    before = _files(root)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a required flag
            code = e.code
    finally:
        vectors.write_bytes(kept)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    after = _files(root)
    after[str(vectors.relative_to(root))] = before[str(vectors.relative_to(root))]
    assert after == before


# --- the acceptance check on a real model ---------------------------------------------------
LAYERS = (12, 16, 20)  # middle blocks: the last ones' huge norms drown the trait


@pytest.fixture(scope="module")
def smollm2():
    return tx.load_model("smollm2-135m-instruct")


def _instruction_run(tmp_path_factory, model, trait: str):
    """smollm2-135m-instruct's run of ``trait`` (instruction variant, 48 examples, 40 tokens)."""
    source = Path(__file__).resolve().parents[1] / "experiments" / "smollm2_cognitive"
    root = tmp_path_factory.mktemp("real")
    shutil.copytree(source / trait, root / "real" / trait)
    config = json.loads((source / "experiment.json").read_text())
    config.update(variant="instruction", traits=[trait], batch_size=16,
                  generation={"max_new_tokens": 40, "temperature": 1.0})  # fmt: skip
    (root / "real" / "experiment.json").write_text(json.dumps(config))
    run = settings_for(load_experiment("real", root), trait)
    return model, run, run_trait(run, get_model=lambda: model)


@pytest.fixture(scope="module")
def local_global_run(tmp_path_factory, smollm2):
    return _instruction_run(tmp_path_factory, smollm2, "local_global")


@pytest.fixture(scope="module")
def serial_parallel_run(tmp_path_factory, smollm2):
    return _instruction_run(tmp_path_factory, smollm2, "serial_parallel")


def _screen_planted(model, run, tv, samples: list[dict]) -> tuple[dict, dict]:
    """The samples screened at each of LAYERS, and the ranking's AUROC with the labels shuffled
    (the differences do not depend on the labels: the tiny test checks that, so the control
    needs no second screening). The figures are printed: they are what the report quotes."""
    from dataclasses import replace

    shuffled = [s["label"] for s in samples]
    random.Random(0).shuffle(shuffled)
    vectors = {f"layer {b}": replace(tv, trait=f"layer {b}") for b in LAYERS}
    at = {f"layer {b}": b for b in LAYERS}
    kw = {"settings": run.experiment.generation, "batch_size": 16}
    planted = tx.screen(model, vectors, samples, at, **kw).traits
    again = {
        name: ranking_auroc([replace(r, label=shuffled[r.index]) for r in t.rows])
        for name, t in planted.items()
    }
    for name, t in planted.items():  # all printed first: the figures to report
        half = t.by_label()
        print(f"{name}: mean {t.mean:+.2f}, AUROC {t.auroc:.2f}, labelled true {half[True]:+.2f}, "
              f"false {half[False]:+.2f}, shuffled labels AUROC {again[name]:.2f}")  # fmt: skip
    return planted, again


@pytest.mark.slow
def test_on_the_embedded_model_the_positive_half_ranks_above_the_negative(local_global_run) -> None:
    """Half the run's responses to the trait's positive prompts, half to its negative ones,
    all to the plain question: the ranking separates them; shuffled labels do not."""
    model, run, tv = local_global_run
    rows = [r for r in load_responses(run)[0] if r["response"].strip()]
    samples = [{"prompt": r["question"], "response": r["response"], "label": r["polarity"] == "pos"}
               for r in rows]  # fmt: skip
    planted, again = _screen_planted(model, run, tv, samples)
    for name in planted:
        assert planted[name].auroc.low > 0.5 and again[name].covers(0.5)


@pytest.mark.slow
def test_on_the_embedded_model_the_positive_half_ranks_above_plain_answers(
    serial_parallel_run,
) -> None:
    """The acceptance as written: half the run's responses to the trait's positive prompts,
    half the model's own answers to the plain question (other seeds than the screen's). The
    positive half ranks first, the mean difference is above 0, the plain half's is not off 0
    (the baseline is unbiased) and shuffled labels rank at chance; asserted at block 12, the
    worked example's. serial_parallel: on local_global the positive answers project like the
    plain ones (docs/applications.md has all four traits)."""
    model, run, tv = serial_parallel_run
    rows = [r for r in load_responses(run)[0] if r["polarity"] == "pos" and r["response"].strip()]
    questions = [r["question"] for r in rows]
    gens = generate_batch(model, user_prompts(model, questions, "chat"), run.experiment.generation,
                          [10_000 + i for i in range(len(questions))])  # fmt: skip
    plain = tokenizer_of(model).batch_decode(
        [g.response_ids for g in gens], skip_special_tokens=True
    )
    samples = [{"prompt": q, "response": r["response"], "label": True}
               for q, r in zip(questions, rows, strict=True)]  # fmt: skip
    samples += [{"prompt": q, "response": t, "label": False}
                for q, t in zip(questions, plain, strict=True) if t.strip()]  # fmt: skip
    planted, again = _screen_planted(model, run, tv, samples)
    at12 = planted["layer 12"]
    assert at12.auroc.low > 0.5 and at12.mean.low > 0
    assert at12.by_label()[False].covers(0.0)
    assert again["layer 12"].covers(0.5)
