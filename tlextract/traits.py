"""Trait definitions (loading, validation) and the prompts built from them.

A trait definition is persona_vectors-compatible JSON (``instruction`` pairs, ``questions``,
``eval_prompt`` with ``{question}`` and ``{answer}``), optionally with natural prompt files
(``natural_pos.txt``, ``natural_neg.txt``) that draw out each pole with no instruction.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jinja2.exceptions import TemplateError

from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg, read_json, read_text, require

MIN_INSTRUCTION_PAIRS = 5
MIN_QUESTIONS = 20
MIN_NATURAL = 20
PLACEHOLDERS = ("{question}", "{answer}")
Polarity = Literal["pos", "neg"]
POLARITIES: tuple[Polarity, Polarity] = ("pos", "neg")
Variant = Literal["instruction", "natural"]
VARIANTS: tuple[Variant, Variant] = ("instruction", "natural")

log = logging.getLogger(__name__)


def template_problem(template: str) -> str | None:
    """What is wrong with a judge prompt template, or None: it must contain ``{question}`` and
    ``{answer}`` and no other ``{name}`` placeholder (nothing would fill it)."""
    for ph in PLACEHOLDERS:
        if ph not in template:
            return (f"is missing the placeholder {ph}; the judge fills it with the "
                    f"{ph.strip('{}')}. Add {ph} where it belongs.")  # fmt: skip
    unknown = sorted(set(re.findall(r"\{[A-Za-z_]\w*\}", template)) - set(PLACEHOLDERS))
    if unknown:
        return (f"has the unknown placeholder {unknown[0]}; only {{question}} and {{answer}} are "
                "filled. Rename it to one of those or remove the braces.")  # fmt: skip
    return None


@dataclass(frozen=True)
class InstructionPair:
    pos: str
    neg: str

    def for_polarity(self, polarity: Polarity) -> str:
        return self.pos if polarity == "pos" else self.neg


@dataclass(frozen=True)
class Trait:
    name: str
    path: Path
    description: str
    instructions: tuple[InstructionPair, ...]
    questions: tuple[str, ...]
    eval_prompt: str
    # Natural elicitation: prompts that draw out each pole with no instruction (line i of each
    # side is meant to match in topic and length). None when the trait has no natural files.
    natural: dict[Polarity, tuple[str, ...]] | None = None


def _natural_file(path: Path) -> tuple[str, ...]:
    """One prompt per line; every defect is named with its line number."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise TLExtractError(f"{path}: line {n} is empty. Remove empty lines.")
        if line != line.strip():
            raise TLExtractError(f"{path}: line {n} has leading or trailing spaces. Trim it.")
        if line in seen:
            raise TLExtractError(
                f"{path}: line {n} repeats line {seen[line]} ({line!r}). Remove the duplicate."
            )
        seen[line] = n
    if len(lines) < MIN_NATURAL:
        raise TLExtractError(
            f"{path}: {len(lines)} prompts; natural elicitation needs at least {MIN_NATURAL} "
            "(one per line). Add more."
        )
    return tuple(lines)


def _load_natural(trait_dir: Path) -> dict[Polarity, tuple[str, ...]] | None:
    paths = {pol: trait_dir / f"natural_{pol}.txt" for pol in POLARITIES}
    present = [pol for pol, p in paths.items() if p.exists()]
    if not present:
        return None
    if len(present) == 1:
        missing = paths["neg" if present == ["pos"] else "pos"]
        raise TLExtractError(f"{missing}: file not found; natural prompts need both sides.")
    natural = {pol: _natural_file(p) for pol, p in paths.items()}
    both = sorted(set(natural["pos"]) & set(natural["neg"]))
    if both:
        raise TLExtractError(
            f"{paths['neg']}: {len(both)} prompt(s) also appear in {paths['pos'].name}, e.g. "
            f"{both[0]!r}. A prompt cannot elicit both poles; remove it from one side."
        )
    return natural


def _list(data: dict[str, Any], key: str, minimum: int, items: str, path: Path) -> list[Any]:
    value = data.get(key)
    found = len(value) if isinstance(value, list) else type(value).__name__
    require(isinstance(value, list) and len(value) >= minimum, path, key,
            f"must be a list of at least {minimum} {items} (found {found}).")  # fmt: skip
    return value  # type: ignore[return-value]


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def load_trait(trait_dir: PathArg, natural_dir: PathArg | None = None) -> Trait:
    """Load and validate ``<trait_dir>/trait_definition.json``; one clear error per defect.
    Natural prompt files come from ``natural_dir`` when it has them (an experiment that borrows
    another's traits but needs prompts suited to its own model), else from ``trait_dir``."""
    trait_dir = Path(trait_dir)
    own = Path(natural_dir) if natural_dir is not None else None
    natural_from = (
        own
        if own is not None and any((own / f"natural_{pol}.txt").exists() for pol in POLARITIES)
        else trait_dir
    )
    path = trait_dir / "trait_definition.json"
    data = read_json(path)
    require(isinstance(data, dict), path, "<top level>", "must be a JSON object.")
    pairs = _list(data, "instruction", MIN_INSTRUCTION_PAIRS, '{"pos": ..., "neg": ...} objects',
                  path)  # fmt: skip
    for i, pair in enumerate(pairs):
        for side in POLARITIES:
            ok = isinstance(pair, dict) and _text(pair.get(side))
            require(ok, path, f"instruction[{i}].{side}", "must be a non-empty string.")
    questions = _list(data, "questions", MIN_QUESTIONS, "question strings", path)
    for i, q in enumerate(questions):
        require(_text(q), path, f"questions[{i}]", "must be a non-empty string.")
    dupes = sorted({q for q in questions if questions.count(q) > 1})
    require(not dupes, path, "questions", f"has duplicates: {dupes[:3]}; remove them.")
    eval_prompt = data.get("eval_prompt")
    require(
        isinstance(eval_prompt, str),
        path,
        "eval_prompt",
        "must be a string containing {question} and {answer}.",
    )
    problem = template_problem(eval_prompt)
    require(problem is None, path, "eval_prompt", f"{problem}")
    description = data.get("description", "")
    require(isinstance(description, str), path, "description", "must be a string.")
    return Trait(
        name=trait_dir.name,
        path=trait_dir,
        description=description,
        instructions=tuple(InstructionPair(p["pos"], p["neg"]) for p in pairs),
        questions=tuple(questions),
        eval_prompt=eval_prompt,
        natural=_load_natural(natural_from),
    )


@dataclass(frozen=True)
class Example:
    """One prompt to answer. ``index`` is the example's position within its polarity; pos and
    neg examples with the same index share the question and the instruction pair."""

    polarity: Polarity
    index: int
    question: str
    question_index: int
    instruction: str
    instruction_index: int
    prompt: str


def plan_examples(trait: Trait, n: int) -> list[tuple[int, int]]:
    """(question, instruction pair) indices for n examples: pairs in turn (balanced on every
    prefix), every question before any repeats, and no (question, pair) combination repeated
    before all are used (the question order shifts by one after each full cycle of both)."""
    nq, npairs = len(trait.questions), len(trait.instructions)
    cycle = math.lcm(nq, npairs)
    return [((k + k // cycle) % nq, k % npairs) for k in range(n)]


# Chat template text -> whether it renders a system message (checked once per template).
_TAKES_SYSTEM: dict[str, bool] = {}


def takes_system_role(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message. Some raise instead:
    gemma-2-it's "System role not supported", Mistral Instruct v0.1/v0.2's "Conversation roles
    must alternate user/assistant/..."; the first such template logs it once."""
    template = str(tokenizer.chat_template)
    if template not in _TAKES_SYSTEM:
        probe = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
        try:
            tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
            _TAKES_SYSTEM[template] = True
        except TemplateError as e:
            _TAKES_SYSTEM[template] = False
            log.info("the model's chat template has no system role (%s): each instruction goes "
                     "in the user turn, before its question", e)  # fmt: skip
    return _TAKES_SYSTEM[template]


def instruction_in_user_turn(tokenizer: Any, style: str, variant: Variant) -> bool:
    """Whether instructions are merged into the user turn (chat style, instruction variant, a
    template without a system role): a fact the run records in its meta."""
    return style == "chat" and variant == "instruction" and not takes_system_role(tokenizer)


def render_prompt(tokenizer: Any, style: str, instruction: str, question: str) -> str:
    """The text the model sees: the chat template (instruction as system message) or Q/A text.
    An empty instruction (natural elicitation) gives the plain template with no system message.
    A template without a system role gets ``"{instruction}\n\n{question}"`` as the user turn."""
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TLExtractError(
                'The model\'s tokenizer has no chat template; set "prompt_style": "completion" '
                "in experiment.json for base models."
            )
        if instruction and not takes_system_role(tokenizer):
            messages = [{"role": "user", "content": f"{instruction}\n\n{question}"}]
        else:
            system = [{"role": "system", "content": instruction}] if instruction else []
            messages = [*system, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{instruction}\n\nQ: {question}\nA:" if instruction else f"Q: {question}\nA:"


def build_examples(
    trait: Trait, n: int, tokenizer: Any, style: str, variant: Variant = "instruction"
) -> list[Example]:
    """n positive then n negative examples, matched by index. The natural variant takes line i
    of each natural prompt file (cycling when n exceeds them), with no instruction."""
    if variant == "natural":
        if trait.natural is None:
            raise TLExtractError(
                f"{trait.path}: trait '{trait.name}' has no natural prompts. Add natural_pos.txt "
                "and natural_neg.txt (one prompt per line) or use variant=instruction."
            )
        natural = trait.natural
        return [
            Example(
                pol,
                i,
                natural[pol][i % len(natural[pol])],
                i % len(natural[pol]),
                "",
                -1,
                render_prompt(tokenizer, style, "", natural[pol][i % len(natural[pol])]),
            )
            for pol in POLARITIES
            for i in range(n)
        ]
    plan = plan_examples(trait, n)
    return [
        Example(
            polarity=pol,
            index=i,
            question=trait.questions[q],
            question_index=q,
            instruction=trait.instructions[p].for_polarity(pol),
            instruction_index=p,
            prompt=render_prompt(
                tokenizer, style, trait.instructions[p].for_polarity(pol), trait.questions[q]
            ),
        )
        for pol in POLARITIES
        for i, (q, p) in enumerate(plan)
    ]
