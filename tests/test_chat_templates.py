"""Chat templates without a system role (gemma-2-it, Mistral Instruct v0.2): the instruction
variant would send its instruction as a system message, which those templates refuse with a
TemplateError. The instruction goes into the user turn instead, said once in the log and recorded
in the responses stage's meta. The templates are the models' own, applied by a real tokenizer."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from conftest import PAIRS, QUESTIONS
from jinja2.exceptions import TemplateError

import tlextract.traits
from tlextract.config import load_experiment
from tlextract.model.load import load_model, load_tokenizer
from tlextract.settings import settings_for
from tlextract.stages.responses import generate_responses
from tlextract.traits import build_examples, instruction_in_user_turn, load_trait, render_prompt

# The chat_template of google/gemma-2-2b-it's tokenizer_config.json (the same in 9b-it and 27b-it).
GEMMA2_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant"
    "/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = "
    "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
    "'\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if "
    "add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# The chat_template of mistralai/Mistral-7B-Instruct-v0.2's tokenizer_config.json.
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant"
    "/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)
BOS = "<|im_start|>"  # the tiny tokenizer's bos_token, which both templates print first
# What each template makes of one user turn "Be brief.\n\nWhat is 2+2?", written out by hand.
MERGED = {
    "gemma-2-it": f"{BOS}<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n",
    "mistral-v0.2": f"{BOS}[INST] Be brief.\n\nWhat is 2+2? [/INST]",
}
TEMPLATES = {"gemma-2-it": GEMMA2_IT, "mistral-v0.2": MISTRAL_V02}


@pytest.fixture(autouse=True)
def unseen_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test finds the templates unchecked (and so logs its own first sighting)."""
    monkeypatch.setattr(tlextract.traits, "_TAKES_SYSTEM", {})


def tokenizer_with(template: str):
    tok = copy.deepcopy(load_tokenizer("tiny-random"))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_real_template_refuses_a_system_message(name: str) -> None:
    tok = tokenizer_with(TEMPLATES[name])
    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError):
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_instruction_goes_into_the_user_turn(name: str) -> None:
    tok = tokenizer_with(TEMPLATES[name])
    assert render_prompt(tok, "chat", "Be brief.", "What is 2+2?") == MERGED[name]
    assert instruction_in_user_turn(tok, "chat", "instruction")
    assert not instruction_in_user_turn(tok, "chat", "natural")
    assert not instruction_in_user_turn(tok, "completion", "instruction")


def test_a_template_with_a_system_role_keeps_the_system_message() -> None:
    tok = load_tokenizer("tiny-random")
    prompt = render_prompt(tok, "chat", "Be brief.", "What is 2+2?")
    assert prompt.startswith(f"{BOS}system\nBe brief.<|im_end|>\n{BOS}user\nWhat is 2+2?")
    assert not instruction_in_user_turn(tok, "chat", "instruction")


def test_natural_prompts_are_unchanged_without_a_system_role() -> None:
    tok = tokenizer_with(GEMMA2_IT)
    assert render_prompt(tok, "chat", "", "Hi") == (
        f"{BOS}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_the_merge_is_logged_once(tmp_path, caplog) -> None:
    from conftest import write_trait

    trait = load_trait(write_trait(tmp_path, "alpha"))
    tok = tokenizer_with(GEMMA2_IT)
    with caplog.at_level(logging.INFO, logger="tlextract.traits"):
        first = build_examples(trait, 6, tok, "chat")
        build_examples(trait, 6, tok, "chat")
    said = [r.getMessage() for r in caplog.records if "no system role" in r.getMessage()]
    assert len(said) == 1, said
    assert "System role not supported" in said[0]
    pair = PAIRS[first[0].instruction_index]
    assert f"user\n{pair['pos']}\n\n{QUESTIONS[first[0].question_index]}<end_of_turn>" in (
        first[0].prompt
    )


def test_the_run_records_it_in_the_responses_meta(experiments) -> None:
    model = load_model("tiny-random")
    model.tokenizer = tokenizer_with(GEMMA2_IT)
    run = settings_for(load_experiment("tiny", experiments), "alpha", variant="instruction")
    dataset = generate_responses(run, lambda: model)
    meta = json.loads((run.stage_dir("responses") / "meta.json").read_text())
    assert meta["instruction_in_user_turn"] is True
    assert all("<start_of_turn>user\nAnswer" in p for p in dataset["prompt"])
