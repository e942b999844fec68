"""A researcher's own checkpoint end to end: a local Llama-3-shaped directory with scaled RoPE
(which HookedTransformer cannot load) and a LoRA adapter of it run `python -m tlextract run` on the
TransformerBridge; the saved activations equal transformers' own hidden states of the same
tokens; the backend is in the result card, the stage records and the cache keys, and the keys of
the embedded models are what they were before the bridge existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_experiment
from tiny_checkpoints import save_checkpoint
from transformers import AutoModelForCausalLM

from tlextract.cli.main import main
from tlextract.config import load_experiment
from tlextract.settings import settings_for
from tlextract.stages.activations import load_activations
from tlextract.stages.responses import load_responses, responses_key

# The tiny experiment's responses key for trait alpha, computed on main at 9b0a0b8 (before
# backends existed).
BEFORE_BACKENDS = "54dcd666e86eae29"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """``llama3/``: a tiny random Llama 3 with scaled RoPE (tests/tiny_checkpoints.py);
    ``lora/``: a LoRA adapter of it whose weights change its outputs."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("checkpoints")
    save_checkpoint("llama3", root / "llama3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(root / "llama3")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(base, lora).save_pretrained(root / "lora")
    adapter = json.loads((root / "lora" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(root / "llama3")
    return root


def _run(root: Path, model: str, capsys, *flags: str) -> tuple[int, str]:
    argv = ["run", "--experiment", "tiny", "--experiments-dir", str(root), "--traits", "alpha"]
    code = main([*argv, "--model", model, *flags])
    out = capsys.readouterr()
    return code, out.out + out.err


def _hidden_state_means(directory: Path, run, layer: int) -> dict[str, torch.Tensor]:
    """Each kept response's mean of transformers' hidden_states[layer + 1] over its response
    tokens, the prompt and response run alone (no padding), by polarity, in saved row order."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    if (directory / "adapter_config.json").is_file():
        raise AssertionError("pass the merged model's directory")
    rows = {(r["polarity"], r["index"]): r for r in load_responses(run)[0]}
    acts = load_activations(run)
    out = {}
    for pol, index in (("pos", acts.pos_index), ("neg", acts.neg_index)):
        means = []
        for i in index:
            r = rows[(pol, i)]
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1]
            means.append(hidden[0, -len(r["response_ids"]) :].mean(0))
        out[pol] = torch.stack(means)
    return out


def test_a_local_llama3_checkpoint_runs_end_to_end_on_the_bridge(
    checkpoints: Path, tmp_path: Path, capsys
) -> None:
    # The experiment names the checkpoint by a path relative to its own directory.
    write_experiment(tmp_path, model="../llama3", n_examples=4, layers=[0])
    (tmp_path / "llama3").symlink_to(checkpoints / "llama3")
    exp = load_experiment("tiny", tmp_path)
    assert exp.model == str(tmp_path.absolute() / "llama3")
    code, out = _run(tmp_path, exp.model, capsys)
    assert code == 0, out
    assert f"model {exp.model} on TransformerBridge" in out
    run = settings_for(exp, "alpha")
    meta = json.loads((run.stage_dir("activations") / "meta.json").read_text())
    assert meta["backend"] == "bridge"
    saved = load_activations(run)
    expected = _hidden_state_means(checkpoints / "llama3", run, layer=0)
    torch.testing.assert_close(saved.pos[:, 0], expected["pos"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(saved.neg[:, 0], expected["neg"], atol=1e-5, rtol=1e-4)


def test_a_lora_adapter_directory_runs_merged_into_its_base(
    checkpoints: Path, tmp_path: Path, capsys
) -> None:
    from peft import PeftModel

    lora = str(checkpoints / "lora")
    write_experiment(tmp_path, model=lora, n_examples=4, layers=[0])
    code, out = _run(tmp_path, lora, capsys)
    assert code == 0, out
    assert f"model {lora} on TransformerBridge" in out
    # The independent computation: peft's own merge, saved as a plain checkpoint.
    base = AutoModelForCausalLM.from_pretrained(checkpoints / "llama3")
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    run = settings_for(load_experiment("tiny", tmp_path), "alpha")
    expected = _hidden_state_means(tmp_path / "merged", run, layer=0)
    saved = load_activations(run)
    torch.testing.assert_close(saved.pos[:, 0], expected["pos"], atol=1e-5, rtol=1e-4)
    # The adapter is not a no-op: the base model's states of the same tokens differ.
    unmerged = _hidden_state_means(checkpoints / "llama3", run, layer=0)
    assert (unmerged["pos"] - expected["pos"]).abs().max() > 1e-3


def test_the_backend_is_in_the_keys_but_embedded_keys_are_unchanged(
    checkpoints: Path, experiments: Path
) -> None:
    exp = load_experiment("tiny", experiments)
    key = {b: responses_key(settings_for(exp, "alpha", model_backend=b)) for b in
           ("auto", "hooked", "bridge")}  # fmt: skip
    assert key["auto"] == key["hooked"] == BEFORE_BACKENDS
    assert key["bridge"] != key["auto"]
    llama3 = str(checkpoints / "llama3")
    auto = responses_key(settings_for(exp, "alpha", model=llama3))
    assert auto == responses_key(settings_for(exp, "alpha", model=llama3, model_backend="bridge"))


@pytest.mark.parametrize(
    ("setting", "flags", "message"),
    [
        ({"model_backend": "hooked"}, [], "no scaled RoPE or biases; load it with --model-backend"),
        (
            {"model_backend": "transformers"},
            [],
            "'model_backend' must be one of auto, hooked",
        ),
        ({}, ["--model-backend", "hooked"], "load it with --model-backend bridge"),
        ({}, ["--engine", "vllm"], "is a LoRA adapter, merged only when tlextract loads it"),
    ],
)
def test_impossible_backend_settings_exit_2_before_any_file(
    checkpoints: Path, tmp_path: Path, capsys, setting: dict, flags: list[str], message: str
) -> None:
    model = str(checkpoints / ("lora" if "--engine" in flags else "llama3"))
    write_experiment(tmp_path, model=model, **setting)
    before = sorted(tmp_path.rglob("*"))
    code, out = _run(tmp_path, model, capsys, *flags)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out
    assert sorted(tmp_path.rglob("*")) == before


def test_the_bridge_shares_a_prompt_prefix_and_still_equals_transformers(checkpoints) -> None:
    from tlextract.config import GenerationSettings
    from tlextract.model.accel import has_hooks
    from tlextract.model.load import load_model
    from tlextract.ops.generate import generate_batch, prefix_cache
    from tlextract.ops.pool import pooled_activations

    directory = checkpoints / "llama3"
    model = load_model(str(directory), dtype="float32")
    model(torch.tensor([[5, 6, 7]]))
    # The bridge's own pre-hooks on the norms, wired at its first pass, are not a caller's
    # hooks: they must not switch prefix sharing off.
    assert not has_hooks(model)
    prefix = [5, 6, 7, 8, 9, 10, 11]
    prompts = [prefix + [20, 21, 22], prefix + [30], prefix + [40, 41, 42, 43, 44]]
    assert prefix_cache(model, prompts, 8, share=True)[1] == len(prefix)
    greedy = GenerationSettings(max_new_tokens=6, do_sample=False)
    shared = generate_batch(model, prompts, greedy, seeds=[0, 1, 2])
    alone = generate_batch(model, prompts, greedy, seeds=[0, 1, 2], share_prefix=False)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    for p, a, b in zip(prompts, shared, alone, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p) :]
        assert a.response_ids == b.response_ids == ref.tolist()[: len(a.response_ids)]
    responses = [g.response_ids for g in shared]
    pooled = pooled_activations(model, prompts, responses, [0])
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            hidden = hf(torch.tensor([p + r]), output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(pooled[i, 0], hidden[0, -len(r) :].mean(0), atol=1e-5, rtol=1e-4)
