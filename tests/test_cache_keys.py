"""Stage cache keys pinned to the values runs made before the package was reorganised were
stored under: a key that changes makes every earlier result look stale and be recomputed.
A deliberate change of what a stage depends on updates these values in the same commit."""

from __future__ import annotations

import pytest
import torch

from tlextract.config import load_experiment
from tlextract.evaluation.evaluate import evaluation_key
from tlextract.settings import settings_for
from tlextract.stages.activations import Activations, activations_key
from tlextract.stages.judge import judge_key
from tlextract.stages.responses import responses_key
from tlextract.stages.vectors import vectors_key


@pytest.fixture(autouse=True)
def _cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned keys are a CPU machine's: the default device and dtype follow the machine
    (cuda and bfloat16 where a GPU is visible), so pretend there is none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("variant", "mode", "responses", "activations", "judge"),
    [
        ("natural", "two-stage", "99b47403992c09c5", "f723c4a1922d59f3", "cd0bdd7f0b729fcc"),
        ("natural", "combined", "04640a2207eb4f69", "e6c27c3dc0299b3b", "79e3c2fe8f980bc5"),
        ("instruction", "two-stage", "ebe1984aff79bfd6", "8f4bcc0b62976c3f", "88b39e390620a0b5"),
        ("instruction", "combined", "bc0e63624d2a430f", "cf12a940a4b4f180", "035beccf82a86573"),
    ],
)
def test_default_experiment_keys_are_unchanged(variant, mode, responses, activations, judge):
    # n_examples as shipped when the keys were pinned (the default is now 48).
    run = settings_for(
        load_experiment("smollm2_cognitive"),
        "local_global",
        variant=variant,
        mode=mode,
        n_examples=20,
    )
    assert responses_key(run) == responses
    assert activations_key(run, responses) == activations
    assert judge_key(run, responses) == judge


def test_overridden_settings_keys_are_unchanged() -> None:
    run = settings_for(
        load_experiment("smollm2_cognitive"),
        "local_global",
        n_examples=8,
        batch_size=4,
        layers=[3, 7],
        judge="local",
    )
    assert responses_key(run) == "0ad0129e03ff7ee4"
    assert activations_key(run, "0ad0129e03ff7ee4") == "6216c24f862e9472"
    assert judge_key(run, "0ad0129e03ff7ee4") == "9e20f80ef7759743"


def test_vectors_and_evaluation_keys_are_unchanged() -> None:
    kept = {"pos": [0, 1, 3], "neg": [0, 2]}
    assert vectors_key("f723c4a1922d59f3", kept, "mean_diff") == "47ea73082d01ba14"
    acts = Activations(
        torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), [0], [0], (0,), "resid_post", "f723c4a1922d59f3"
    )
    assert evaluation_key(acts, ["mean_diff", "probe"], 0.25, 0, "auroc") == "f20c3cb98b6bc511"
