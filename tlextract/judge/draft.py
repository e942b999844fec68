"""Drafting a complete trait with an OpenAI-compatible chat model, from a name and a description.

The recipe follows persona_vectors' trait generation, in our own words, plus natural prompts: the
model is asked for one JSON object with the poles' description, 5 instruction pairs, 20 questions
for extraction and 20 more held out for evaluation, a judge prompt scoring 0-100, and ``n`` pairs
of natural prompts (user messages that draw out each pole with no instruction, line i of each side
sharing a topic).

The draft becomes the files a hand-written trait has (``trait_definition.json``,
``natural_pos.txt``, ``natural_neg.txt``) in a temporary directory next to the destination, and
passes :func:`tlextract.traits.load_trait`, the loader every trait goes through. A draft that fails
is sent back with the error, up to ``ATTEMPTS`` replies in all; the directory is renamed into
place only once a draft passes.

Questions: ``trait_definition.json`` has one ``questions`` list, the extraction questions followed
by the evaluation ones. A run uses the questions in order (one per example, cycling), so with
``n_examples`` up to 20 extraction uses the first 20 and ``steer`` asks the other 20,
the questions extraction did not use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

from tlextract.errors import TLExtractError
from tlextract.inputs import require
from tlextract.judge.chat import ChatEndpoint
from tlextract.store import atomic_dir
from tlextract.traits import MIN_INSTRUCTION_PAIRS, MIN_NATURAL, POLARITIES, Trait, load_trait

__all__ = ["ATTEMPTS", "DEFAULT_NATURAL", "DRAFT_TIMEOUT", "check_destination", "draft_trait",
           "drafting_prompt", "parse_reply", "trait_files"]  # fmt: skip

ATTEMPTS = 3
DEFAULT_NATURAL = 70
QUESTIONS_PER_SPLIT = 20
DRAFT_TIMEOUT = 300.0  # seconds: a whole trait is thousands of tokens
DEFINITION = "trait_definition.json"
TRAIT_FILES = (DEFINITION, *(f"natural_{pol}.txt" for pol in POLARITIES))
TRAIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
REPLY = "the reply"  # where draft problems are, in their messages

_PROMPT = Template("""\
You are writing the data for a steering-vector experiment on one trait of a language model's \
responses. The trait is a contrast between two poles.

Trait name: $name
What it means: $description

Reply with one JSON object with exactly these keys:

"description": one sentence per pole, in the form "Positive pole (<label>): the response ... \
Negative pole (<label>): the response ...". The positive pole is what the trait name points to; \
the negative pole is its natural opposite, not merely its absence.

"instruction": a list of $pairs objects {"pos": "...", "neg": "..."}. Each is a short system \
message in the second person ("You ...") that makes a model answer in that pole. Within a pair, \
keep the same sentence frame and change only the words that carry the trait. The pairs approach \
the trait from different angles.

"extraction_questions": a list of $split user questions, and "evaluation_questions": a list of \
$split more. Either pole must fit every question: the question alone pushes toward neither, so \
the system message decides. Keep them short, neutral and answerable in a few sentences, on varied \
topics (science, history, food, travel, work, technology, nature, health, money, art). The first \
list is used to extract the vector and the second is held out to test it, so no question appears \
twice or in both lists.

"eval_prompt": a prompt for a judge model that scores one response. It defines both poles in your \
own words, says to judge only the trait (not correctness or quality), contains the placeholders \
{question} and {answer} once each, literally with single braces, and no other text in braces, and \
ends by asking for only a number from 0 to 100: 100 for the positive pole, 0 for the negative \
pole, 50 for an even mix or neither.

"natural": a list of $natural objects {"pos": "...", "neg": "..."}, each a one-line user message \
with no instruction about style: the task itself draws out the pole ("pos" makes a positive-pole \
answer natural, "neg" a negative-pole one). The two messages of a pair share a topic, have about \
the same length and differ in as few words as possible; the topic changes from pair to pair. Mix \
questions and commands on both sides. No message repeats or appears on both sides.

Never name the trait or its poles in a question or a natural message. Reply with the JSON object \
only, no commentary.""")

_FEEDBACK = """\
That reply does not pass validation: $problem
(trait_definition.json holds description, instruction, eval_prompt and questions: \
extraction_questions followed by evaluation_questions; line i of natural_pos.txt and \
natural_neg.txt is the pos and neg message of natural[i-1].) Reply with the complete corrected \
JSON object only."""


def drafting_prompt(name: str, description: str, n_natural: int = DEFAULT_NATURAL) -> str:
    """The request for a whole trait (the JSON object :func:`trait_files` reads)."""
    return _PROMPT.substitute(name=name, description=description, pairs=MIN_INSTRUCTION_PAIRS,
                              split=QUESTIONS_PER_SPLIT, natural=n_natural)  # fmt: skip


def parse_reply(text: str) -> dict[str, Any]:
    """The JSON object in a reply: the body of a ```json fence if there is one, else the text from
    its first ``{`` to its last ``}`` (models add prose despite being asked not to)."""
    fence = re.search(r"```(?:json)?[ \t]*\n(.*?)```", text, re.S)
    body = fence.group(1) if fence else text[text.find("{") : text.rfind("}") + 1]
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise TLExtractError(
            f"{REPLY} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); reply "
            "with one JSON object."
        ) from None
    require(isinstance(data, dict), REPLY, "<top level>", "must be a JSON object.")
    return data


def _items(draft: dict[str, Any], key: str, n: int, what: str) -> list[Any]:
    value = draft.get(key)
    found = len(value) if isinstance(value, list) else type(value).__name__
    require(isinstance(value, list) and len(value) >= n, REPLY, key,
            f"must be a list of {n} {what} (found {found}).")  # fmt: skip
    return value  # type: ignore[return-value]


def _natural(draft: dict[str, Any], n_natural: int) -> dict[str, list[str]]:
    """The natural prompts by side; one line each (a file line is a prompt)."""
    pairs = _items(draft, "natural", n_natural, '{"pos": ..., "neg": ...} objects')
    sides: dict[str, list[str]] = {pol: [] for pol in POLARITIES}
    for i, pair in enumerate(pairs):
        for pol in POLARITIES:
            text = pair.get(pol) if isinstance(pair, dict) else None
            ok = isinstance(text, str) and text.strip().splitlines() == [text.strip()]
            require(ok, REPLY, f"natural[{i}].{pol}", "must be a non-empty one-line string.")
            sides[pol].append(str(text).strip())
    return sides


def trait_files(draft: dict[str, Any], n_natural: int = DEFAULT_NATURAL) -> dict[str, str]:
    """The trait's files (name to text) from a drafted JSON object. Only the draft's own shape
    is checked here; what a trait must be is :func:`load_trait`'s to say."""
    questions = [
        *_items(draft, "extraction_questions", QUESTIONS_PER_SPLIT, "question strings"),
        *_items(draft, "evaluation_questions", QUESTIONS_PER_SPLIT, "question strings"),
    ]
    description = draft.get("description")
    require(isinstance(description, str) and bool(description.strip()), REPLY, "description",
            "must be a non-empty string naming both poles.")  # fmt: skip
    definition = {
        "description": description,
        "instruction": draft.get("instruction"),
        "questions": questions,
        "eval_prompt": draft.get("eval_prompt"),
    }
    files = {DEFINITION: json.dumps(definition, indent=2, ensure_ascii=False) + "\n"}
    for pol, lines in _natural(draft, n_natural).items():
        files[f"natural_{pol}.txt"] = "\n".join(lines) + "\n"
    return files


def _stage(reply: str, staging: Path, n_natural: int) -> Trait:
    """Write the reply's files into ``staging`` and load them as any trait is loaded. Plain
    writes: the whole directory is renamed into place at once."""
    for name, text in trait_files(parse_reply(reply), n_natural).items():
        (staging / name).write_text(text, encoding="utf-8")
    return load_trait(staging)


def _draft_until_valid(endpoint: ChatEndpoint, staging: Path, prompt: str, n_natural: int) -> Trait:
    messages = [{"role": "user", "content": prompt}]
    problem = ""
    for _ in range(ATTEMPTS):
        reply = endpoint.complete(messages)  # HTTP errors end the drafting: retrying won't help
        try:
            return _stage(reply, staging, n_natural)
        except TLExtractError as e:
            # The model never saw the staging directory: name the files alone.
            problem = str(e).replace(f"{staging}{os.sep}", "")
        feedback = Template(_FEEDBACK).substitute(problem=problem)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": feedback}]
    raise TLExtractError(
        f"the drafted trait failed validation {ATTEMPTS} times; nothing was written. Last "
        f"problem: {problem} Try again, or make the description more specific."
    )


def check_destination(traits_dir: Path, name: str, force: bool) -> Path:
    """Where the trait named ``name`` goes: a valid name, and no trait there unless ``force``."""
    if not TRAIT_NAME.fullmatch(name):
        raise TLExtractError(
            f"trait name {name!r}: use letters, digits, '_' and '-' (up to 64, starting with a "
            "letter or digit), e.g. 'local_global'."
        )
    dest = traits_dir / name
    if dest.exists() and not dest.is_dir():
        raise TLExtractError(f"{dest} exists and is not a trait directory; move it away.")
    if dest.exists() and not force:
        raise TLExtractError(
            f"{dest} already exists; pass force=True to replace its trait files.",
            parameters=("force",),
        )
    return dest


def _keep_other_entries(old: Path, new: Path) -> None:
    """Move what an existing trait directory holds besides the trait files (run outputs such as
    ``extraction/``) into the new one: replacing a trait replaces its files, not its results."""
    if old.is_dir():
        for entry in old.iterdir():
            if entry.name not in TRAIT_FILES:
                os.replace(entry, new / entry.name)


def draft_trait(
    endpoint: ChatEndpoint,
    traits_dir: Path,
    name: str,
    description: str,
    n_natural: int = DEFAULT_NATURAL,
    force: bool = False,
    review: Callable[[Trait], None] = lambda trait: None,
) -> Trait:
    """Draft the trait ``name`` and write it to ``traits_dir / name``; the written trait.

    Inputs are checked before any request. ``review`` sees the validated draft before it is moved
    into place (a preview, a confirmation); it raises TLExtractError to discard it. With
    ``force``, an existing trait's files are replaced and its other entries kept.
    """
    dest = check_destination(traits_dir, name, force)
    if not description.strip():
        raise TLExtractError("the trait description is empty; say what each pole looks like.")
    if n_natural < MIN_NATURAL:
        raise TLExtractError(
            f"natural prompts: use at least {MIN_NATURAL} pairs (got {n_natural})."
        )
    prompt = drafting_prompt(name, description.strip(), n_natural)
    with atomic_dir(dest) as staging:
        trait = _draft_until_valid(endpoint, staging, prompt, n_natural)
        review(trait)
        check_destination(traits_dir, name, force)  # it may have appeared while the model wrote
        _keep_other_entries(dest, staging)
        staging.chmod(traits_dir.stat().st_mode & 0o777)  # not the private mode of a temp dir
    return load_trait(dest)
