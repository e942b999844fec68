"""Experiments and trait definitions: loading, validation, and prompt building.

A trait definition is persona_vectors-compatible JSON (``instruction`` pairs, ``questions``,
``eval_prompt``). An experiment either holds its trait directories itself or names another
experiment's with ``traits_from``, so one fix to a trait reaches every experiment that uses it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlextract.errors import TLExtractError

MIN_INSTRUCTION_PAIRS = 5
MIN_QUESTIONS = 20
MIN_NATURAL = 20
PLACEHOLDERS = ("{question}", "{answer}")
Polarity = Literal["pos", "neg"]
POLARITIES: tuple[Polarity, Polarity] = ("pos", "neg")
Variant = Literal["instruction", "natural"]
VARIANTS: tuple[Variant, Variant] = ("instruction", "natural")


def experiments_root() -> Path:
    """``$TLEXTRACT_EXPERIMENTS`` or ./experiments."""
    return Path(os.environ.get("TLEXTRACT_EXPERIMENTS", "experiments"))


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise TLExtractError(f"{path}: file not found.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TLExtractError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix the syntax, e.g. a missing comma or quote."
        ) from None


def _require(cond: bool, path: Path, field_name: str, fix: str) -> None:
    if not cond:
        raise TLExtractError(f"{path}: field '{field_name}' {fix}")


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
    lines = path.read_text(encoding="utf-8").split("\n")
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


def load_trait(trait_dir: Path) -> Trait:
    """Load and validate ``<trait_dir>/trait_definition.json``; one clear error per defect."""
    path = trait_dir / "trait_definition.json"
    data = _read_json(path)
    _require(isinstance(data, dict), path, "<top level>", "must be a JSON object.")
    pairs = data.get("instruction")
    _require(
        isinstance(pairs, list) and len(pairs) >= MIN_INSTRUCTION_PAIRS,
        path,
        "instruction",
        f'must be a list of at least {MIN_INSTRUCTION_PAIRS} {{"pos": ..., "neg": ...}} '
        f"objects (found {len(pairs) if isinstance(pairs, list) else type(pairs).__name__}).",
    )
    for i, pair in enumerate(pairs):
        for side in POLARITIES:
            ok = isinstance(pair, dict) and isinstance(pair.get(side), str) and pair[side].strip()
            _require(bool(ok), path, f"instruction[{i}].{side}", "must be a non-empty string.")
    questions = data.get("questions")
    _require(
        isinstance(questions, list) and len(questions) >= MIN_QUESTIONS,
        path,
        "questions",
        f"must be a list of at least {MIN_QUESTIONS} question strings "
        f"(found {len(questions) if isinstance(questions, list) else type(questions).__name__}).",
    )
    for i, q in enumerate(questions):
        _require(
            isinstance(q, str) and bool(q.strip()),
            path,
            f"questions[{i}]",
            "must be a non-empty string.",
        )
    dupes = sorted({q for q in questions if questions.count(q) > 1})
    _require(not dupes, path, "questions", f"has duplicates: {dupes[:3]}; remove them.")
    eval_prompt = data.get("eval_prompt")
    _require(
        isinstance(eval_prompt, str),
        path,
        "eval_prompt",
        "must be a string containing {question} and {answer}.",
    )
    for ph in PLACEHOLDERS:
        _require(
            ph in eval_prompt,
            path,
            "eval_prompt",
            f"is missing the placeholder {ph}; the judge fills it with the "
            f"{ph.strip('{}')}. Add {ph} where it belongs.",
        )
    description = data.get("description", "")
    _require(isinstance(description, str), path, "description", "must be a string.")
    return Trait(
        name=trait_dir.name,
        path=trait_dir,
        description=description,
        instructions=tuple(InstructionPair(p["pos"], p["neg"]) for p in pairs),
        questions=tuple(questions),
        eval_prompt=eval_prompt,
        natural=_load_natural(trait_dir),
    )


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float | None = None
    do_sample: bool = True


@dataclass(frozen=True)
class Experiment:
    """``experiments/<name>/experiment.json``. Layers are TransformerLens block indices."""

    name: str
    path: Path
    model: str
    layers: tuple[int, ...] | Literal["all"] = "all"
    hook: str = "resid_post"
    prompt_style: Literal["chat", "completion"] = "chat"
    n_examples: int = 20
    batch_size: int | Literal["auto"] = 8
    seed: int = 0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    traits: tuple[str, ...] = ()
    variant: Variant = "instruction"  # what a run uses unless told otherwise
    traits_from: str | None = None

    @property
    def traits_dir(self) -> Path:
        """Where the trait directories live (this experiment's, or the one named by traits_from)."""
        return self.path.parent / self.traits_from if self.traits_from else self.path

    def trait(self, name: str) -> Trait:
        if name not in self.traits:
            raise TLExtractError(
                f"{self.path / 'experiment.json'}: unknown trait '{name}'. "
                f"This experiment has: {', '.join(self.traits)}."
            )
        return load_trait(self.traits_dir / name)

    def output_dir(
        self, trait: str, model: str | None = None, variant: Variant = "instruction"
    ) -> Path:
        """Results of one trait: ``extraction``, with ``-natural`` for the natural variant and
        ``-<model>`` for a model other than the experiment's, so no run overwrites another."""
        suffix = "" if variant == "instruction" else f"-{variant}"
        if model not in (None, self.model):
            suffix += "-" + model.replace("/", "_")
        return self.path / trait / f"extraction{suffix}"


_EXPERIMENT_KEYS = {f for f in Experiment.__dataclass_fields__ if f not in ("name", "path")}
_GENERATION_KEYS = set(GenerationSettings.__dataclass_fields__)


def load_experiment(name: str, root: Path | None = None) -> Experiment:
    """Load and validate ``<root>/<name>/experiment.json`` (root: ``experiments_root()``)."""
    root = experiments_root() if root is None else root
    exp_dir = root / name
    path = exp_dir / "experiment.json"
    if not path.exists():
        known = sorted(p.parent.name for p in root.glob("*/experiment.json"))
        raise TLExtractError(
            f"{path}: unknown experiment '{name}'. Known experiments in {root}: "
            f"{', '.join(known) or 'none'}."
        )
    data = _read_json(path)
    _require(isinstance(data, dict), path, "<top level>", "must be a JSON object.")
    unknown = sorted(set(data) - _EXPERIMENT_KEYS)
    _require(
        not unknown,
        path,
        unknown[0] if unknown else "",
        f"is not a known setting. Known settings: {', '.join(sorted(_EXPERIMENT_KEYS))}.",
    )
    _require(
        isinstance(data.get("model"), str),
        path,
        "model",
        'must name a model, e.g. "smollm2-135m-instruct".',
    )
    gen = data.get("generation", {})
    _require(
        isinstance(gen, dict) and not set(gen) - _GENERATION_KEYS,
        path,
        "generation",
        f"must be an object with keys among {', '.join(sorted(_GENERATION_KEYS))}.",
    )
    layers = data.get("layers", "all")
    if layers != "all":
        _require(
            isinstance(layers, list)
            and all(isinstance(x, int) and x >= 0 for x in layers)
            and len(layers) > 0,
            path,
            "layers",
            'must be "all" or a non-empty list of block indices (0-based).',
        )
        layers = tuple(sorted(set(layers)))
    style = data.get("prompt_style", "chat")
    _require(
        style in ("chat", "completion"),
        path,
        "prompt_style",
        'must be "chat" (chat template) or "completion" (plain Q/A text).',
    )
    for key in ("n_examples", "batch_size", "seed"):
        if key in data and not (key == "batch_size" and data[key] == "auto"):
            _require(
                isinstance(data[key], int) and data[key] >= (0 if key == "seed" else 1),
                path,
                key,
                'must be a positive integer' + (' or "auto".' if key == "batch_size" else "."),
            )
    variant = data.get("variant", "instruction")
    _require(variant in VARIANTS, path, "variant", f"must be one of {', '.join(VARIANTS)}.")
    exp = Experiment(
        name=name,
        path=exp_dir,
        model=data["model"],
        layers=layers,
        hook=data.get("hook", "resid_post"),
        prompt_style=style,
        n_examples=data.get("n_examples", 20),
        batch_size=data.get("batch_size", 8),
        seed=data.get("seed", 0),
        generation=GenerationSettings(**gen),
        judge=data.get("judge", {"kind": "none"}),
        traits=tuple(data.get("traits", ())),
        variant=variant,
        traits_from=data.get("traits_from"),
    )
    if exp.traits_from is not None and not (root / exp.traits_from).is_dir():
        raise TLExtractError(
            f"{path}: field 'traits_from' names '{exp.traits_from}', which is not a directory in "
            f"{root}. Name an experiment that holds the trait directories."
        )
    _require(len(exp.traits) > 0, path, "traits", "must list at least one trait directory name.")
    for t in exp.traits:
        if not (exp.traits_dir / t / "trait_definition.json").exists():
            raise TLExtractError(
                f"{path}: trait '{t}' has no {exp.traits_dir / t / 'trait_definition.json'}. "
                "Create it or remove the trait from 'traits'."
            )
    return exp


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


def render_prompt(tokenizer: Any, style: str, instruction: str, question: str) -> str:
    """The text the model sees: the chat template (instruction as system message) or Q/A text.
    An empty instruction (natural elicitation) gives the plain template with no system message."""
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TLExtractError(
                'The model\'s tokenizer has no chat template; set "prompt_style": "completion" '
                "in experiment.json for base models."
            )
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
