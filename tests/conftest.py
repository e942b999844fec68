"""Shared fixtures: a tiny random model and a tiny experiment on disk, built in milliseconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from browser import SCREENSHOTS, Page, launch

from tlextract.model.load import load_model
from tlextract.store import load_tensors

QUESTIONS = [f"Tell me about topic number {i}." for i in range(24)]
PAIRS = [
    {"pos": f"Answer with detail style {i}.", "neg": f"Answer broadly, style {i}."}
    for i in range(5)
]
EVAL_PROMPT = "Rate the answer.\nQuestion: {question}\nAnswer: {answer}\nNumber 0-100:"


# Very different lengths, so left padding is heavy for the short ones.
MIXED_LENGTH_TEXTS = [
    "Hi",
    "What is the capital of France? Please answer briefly and clearly, thanks.",
    "Tell me a story about a cat who lived in a lighthouse by the sea and loved fish.",
    "2+2?",
]

NATURAL = {
    "pos": [f"What exactly is fact number {i}?" for i in range(24)],
    "neg": [f"Invent a story about idea number {i}." for i in range(24)],
}


def chat_ids(model, texts: list[str]) -> list[list[int]]:
    """Each text as a user turn in the model's chat template, as token ids."""
    return [
        list(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": t}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for t in texts
    ]


def write_trait(root: Path, name: str, natural: bool = True, **overrides: object) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "description": "test trait",
        "instruction": PAIRS,
        "questions": QUESTIONS,
        "eval_prompt": EVAL_PROMPT,
        **overrides,
    }
    (d / "trait_definition.json").write_text(json.dumps(data))
    if natural:
        for pol, lines in NATURAL.items():
            (d / f"natural_{pol}.txt").write_text("\n".join(lines) + "\n")
    return d


def write_experiment(root: Path, name: str = "tiny", **overrides: object) -> Path:
    exp = root / name
    exp.mkdir(parents=True, exist_ok=True)
    config = {
        "model": "tiny-random",
        "layers": "all",
        "prompt_style": "chat",
        "n_examples": 6,
        "batch_size": 4,
        "seed": 0,
        "generation": {"max_new_tokens": 6, "temperature": 1.0},
        "traits": ["alpha", "beta"],
        **overrides,
    }
    (exp / "experiment.json").write_text(json.dumps(config))
    if "traits_from" not in overrides:
        for t in config["traits"]:
            write_trait(exp, t)
    return exp


def assert_nothing_partial(root: Path) -> None:
    """No temporary file, no empty directory, and every file there is whole."""
    for p in root.rglob("*"):
        assert not p.name.endswith(".tmp"), p
        if p.is_dir():
            assert any(p.iterdir()), f"empty directory left behind: {p}"
        elif p.suffix == ".pt":
            load_tensors(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return load_model("tiny-random")


FAST_AND_STOCK = [pytest.param(True, id="fast"), pytest.param(False, id="stock")]


def fast_and_stock(name: str):
    """A module-scoped fixture: ``load_model(name)`` accelerated, then stock (``fast=False``).
    ``tiny_model = fast_and_stock("tiny-random")`` in a test module runs its tests on both."""

    @pytest.fixture(scope="module", params=FAST_AND_STOCK)
    def model(request):
        return load_model(name, fast=request.param)

    return model


@pytest.fixture
def experiments(tmp_path: Path) -> Path:
    """A temporary experiments root holding the 'tiny' experiment with traits alpha and beta."""
    write_experiment(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the session's browser tests (tests/browser.py)."""
    with launch() as browser:
        yield browser


@pytest.fixture
def page(chromium):
    """A fresh tab; the test fails if the page logged a console error or threw."""
    tab = Page(chromium)
    yield tab
    tab.close()
    tab.check_errors()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where browser tests save screenshots: the folder ``TLEXTRACT_SCREENSHOTS`` names (e.g.
    ``TLEXTRACT_SCREENSHOTS=docs/figures pytest -m browser`` regenerates the docs' pictures from
    the real pages), else the test's temporary folder."""
    return Path(os.environ.get(SCREENSHOTS) or tmp_path)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter of tiny-random (its base named by the embedded name) that changes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tlextract.model.load import model_directory

    root = tmp_path_factory.mktemp("lora")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_pretrained(model_directory("tiny-random"))
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(hf, lora).save_pretrained(root / "lora")
    config = root / "lora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "base_model_name_or_path": "tiny-random"}))  # fmt: skip
    return root / "lora"
