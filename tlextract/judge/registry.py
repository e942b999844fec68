"""Judges by kind: the experiment's judge block (validated by :mod:`tlextract.config`) to a
:class:`~tlextract.judge.base.Judge`. Implementations are imported when asked for, so using the
HTTP judge never imports torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tlextract.config import validate_judge
from tlextract.errors import TLExtractError
from tlextract.judge.base import Judge


def make_judge(config: dict[str, Any], model: Any = None) -> Judge | None:
    """Build the judge an experiment's ``judge`` config asks for.

    * ``{"kind": "none"}``: no judge (None).
    * ``{"kind": "local", "model": "self"}``: :class:`LocalJudge` on ``model`` (the
      HookedTransformer being studied); ``"model": "<name>"`` loads that embedded model with
      ``tlextract.model.load.load_model``. Optional: ``batch_size``, ``min_mass``, ``chat``,
      ``packed``.
    * ``{"kind": "openai", "base_url": ..., "model": ..., "api_key_env": "OPENAI_API_KEY"}``:
      :class:`OpenAIJudge`. Optional: ``max_concurrency``, ``timeout``, ``max_retries``,
      ``min_mass``, ``backoff_base``, ``backoff_max``, ``top_logprobs``.
    """
    validate_judge(config, "the judge config")
    kind = config["kind"]
    if kind == "none":
        return None
    return _FACTORIES[kind](config, model)


def _local(config: dict[str, Any], model: Any) -> Judge:
    from tlextract.judge.local import LocalJudge

    name = config.get("model", "self")
    if name == "self":
        if model is None:
            raise TLExtractError(
                'judge {"kind": "local", "model": "self"} needs the experiment\'s model, '
                "but none was given"
            )
        judge_model = model
    else:
        from tlextract.model.load import load_model

        judge_model = load_model(name)
    options = {k: v for k, v in config.items() if k not in ("kind", "model")}
    return LocalJudge(judge_model, **options)


def _openai(config: dict[str, Any], model: Any) -> Judge:
    from tlextract.judge.http import OpenAIJudge

    options = {k: v for k, v in config.items() if k not in ("kind", "base_url", "model")}
    return OpenAIJudge(config["base_url"], config["model"], **options)


_FACTORIES: dict[str, Callable[[dict[str, Any], Any], Judge]] = {
    "local": _local,
    "openai": _openai,
}
