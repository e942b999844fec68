"""Reading the files a user writes (experiment.json, trait definitions, natural prompt lists):
every defect is one :class:`TLExtractError` naming the file, the field and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeAlias

from tlextract.errors import TLExtractError

# What a public function takes as a path: notebooks pass strings, libraries pathlib objects.
PathArg: TypeAlias = str | os.PathLike[str]


def read_text(path: Path) -> str:
    """The file as text; UTF-16, binary or otherwise non-UTF-8 content is named as such."""
    if not path.is_file():
        raise TLExtractError(f"{path}: file not found.")
    data = path.read_bytes()
    if b"\x00" in data:  # UTF-16/32 text or a binary file
        raise TLExtractError(f"{path}: not UTF-8 text (it holds NUL bytes). Save it as UTF-8.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TLExtractError(
            f"{path}: not UTF-8 text (byte {e.start} cannot be decoded). Save it as UTF-8."
        ) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise TLExtractError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Fix the syntax, e.g. a missing comma or quote."
        ) from None


def require_directory(path: Path, arg: str, holds: str) -> None:
    """One line when ``path`` (given as ``arg``: the caller's flag, keyword or variable) exists
    but is not a directory; ``holds`` says what the directory should hold."""
    if path.exists() and not path.is_dir():
        raise TLExtractError(
            f"{arg + ': ' if arg else ''}{path} is a file, not a directory; name the directory "
            f"that holds {holds}."
        )


def require(cond: bool, path: Path | str, field_name: str, fix: str) -> None:
    if not cond:
        raise TLExtractError(f"{path}: field '{field_name}' {fix}")
