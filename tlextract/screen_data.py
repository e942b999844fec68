"""The samples ``screen`` reads: a JSONL file or a ``datasets`` directory (``save_to_disk``) of
``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}`` rows (the last
message is the assistant's response, the ones before it the prompt), each with an optional
boolean ``label`` (a planted check: the ranking's AUROC is then reported). Every defect is one
:class:`TLExtractError` naming the file, the line and the expected fields, before a model loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlextract.errors import TLExtractError
from tlextract.inputs import PathArg, read_text

ROLES = ("system", "user", "assistant")
EXPECTED = (
    'expected {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...] '
    'ending in an assistant message}, with an optional boolean "label"'
)


@dataclass(frozen=True)
class Sample:
    """One training sample: the conversation before the response (``messages``: role and
    content, ending in a user turn), the response, an optional label, and where it was read."""

    messages: tuple[tuple[str, str], ...]
    response: str
    label: bool | None = None
    where: str = ""  # "file, line N" (or "sample N" in memory): named by errors

    @property
    def prompt(self) -> str:
        """The last user message: what a table shows of the prompt."""
        return self.messages[-1][1]


def parse_sample(row: Any, where: str) -> Sample:
    """One row (a mapping as in the module docstring) as a Sample, or one line saying why not."""
    if not isinstance(row, Mapping):
        raise TLExtractError(f"{where}: not an object; {EXPECTED}.")
    label = row.get("label")
    if label is not None and not isinstance(label, bool):
        raise TLExtractError(f"{where}: 'label' is {label!r}; use true or false (or leave it out).")
    if isinstance(row.get("messages"), list):
        messages = [_message(m, where) for m in row["messages"]]
        if len(messages) < 2 or messages[-1][0] != "assistant" or messages[-2][0] != "user":
            raise TLExtractError(
                f"{where}: 'messages' must end in a user message then the assistant's response; "
                f"{EXPECTED}."
            )
        prompt, response = tuple(messages[:-1]), messages[-1][1]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        prompt, response = (("user", row["prompt"]),), row["response"]
    else:
        raise TLExtractError(f"{where}: fields {sorted(map(str, row))}; {EXPECTED}.")
    if not response.strip():
        raise TLExtractError(f"{where}: the response is empty; drop the sample or fill it in.")
    return Sample(prompt, response, label, where)


def _message(m: Any, where: str) -> tuple[str, str]:
    if not (
        isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)
    ):
        raise TLExtractError(
            f"{where}: a message is {m!r}; each needs a 'role' ({', '.join(ROLES)}) and a "
            "string 'content'."
        )
    return m["role"], m["content"]


def as_samples(samples: Iterable[Sample | Mapping[str, Any]]) -> list[Sample]:
    """Samples given in memory: Sample objects or rows as in a data file."""
    out = [
        s if isinstance(s, Sample) else parse_sample(s, f"sample {i}")
        for i, s in enumerate(samples)
    ]
    return check_samples(out, "samples")


def check_samples(samples: Sequence[Sample], source: str) -> list[Sample]:
    if not samples:
        raise TLExtractError(f"{source}: no samples.")
    labelled = {s.label is not None for s in samples}
    if len(labelled) > 1:
        raise TLExtractError(
            f"{source}: 'label' is on some samples only; give it on every sample or on none."
        )
    return list(samples)


def read_samples(path: PathArg, max_samples: int | None = None) -> list[Sample]:
    """The samples of a JSONL file or a ``datasets`` directory (the first ``max_samples``)."""
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise TLExtractError(f"--max-samples {max_samples}: use 1 or more.")
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.is_file():
        rows = _jsonl_rows(path)
    else:
        raise TLExtractError(f"{path}: no such file or directory (--data).")
    samples = [parse_sample(row, where) for row, where in rows[:max_samples]]
    return check_samples(samples, str(path))


def _jsonl_rows(path: Path) -> list[tuple[Any, str]]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}, line {n}"))
        except json.JSONDecodeError as e:
            raise TLExtractError(
                f"{path}, line {n}: not JSON ({e.msg}); use JSON Lines, one object a line: "
                f"{EXPECTED}."
            ) from None
    return rows


def _dataset_rows(path: Path) -> list[tuple[Any, str]]:
    from datasets import Dataset, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TLExtractError(
            f"{path}: not a dataset saved with datasets' save_to_disk ({str(e).splitlines()[0]}); "
            "give a JSONL file or such a directory."
        ) from None
    if not isinstance(data, Dataset):
        raise TLExtractError(
            f"{path}: a DatasetDict ({', '.join(data)}); save one split, e.g. "
            "data['train'].save_to_disk(...)."
        )
    return [(row, f"{path}, row {i}") for i, row in enumerate(data)]
