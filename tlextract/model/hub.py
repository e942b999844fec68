"""Models on the Hugging Face Hub: a snapshot downloaded with ``huggingface_hub`` (its own progress
bars; the token from ``HF_TOKEN`` or a prior ``hf auth login``), or read from the local Hugging
Face cache only when offline (``HF_HUB_OFFLINE=1``, which ``--offline`` sets).

``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a model is fetched, not only when
huggingface_hub is imported, so setting them later (the CLI, a notebook, tests) takes effect.
Every failure becomes one TLExtractError line that names the id and the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tlextract.errors import TLExtractError

log = logging.getLogger(__name__)

# What transformers needs for the model and its tokenizer: READMEs, other frameworks' weights, GGUF
# and original checkpoints stay on the hub.
CONFIG = ["config.json", "generation_config.json"]
TOKENIZER = [
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model (sentencepiece)
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",  # .jinja or .json
    "additional_chat_templates/*",
]
SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
NEEDS = (
    "tlextract loads models saved by transformers (config.json with model*.safetensors or "
    "pytorch_model*.bin weights), not GGUF-only or other formats"
)


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub model id ``org/name``."""
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def fetch_config(repo_id: str, *, offline: bool | None = None) -> Path:
    """The snapshot directory of ``repo_id`` holding at least its config.json: enough to check
    the architecture before a download of many GB."""
    snapshot = _snapshot(repo_id, ["config.json"], offline)
    if (snapshot / "config.json").is_file():
        return snapshot
    if _offline(offline):
        raise _not_cached(repo_id)
    raise TLExtractError(f"{repo_id} has no config.json on {_endpoint()}: {NEEDS}")


def fetch(repo_id: str, *, offline: bool | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` with its config, tokenizer and weights.

    Downloads what is missing unless offline (``offline=None``: ``HF_HUB_OFFLINE``); offline, reads
    the local Hugging Face cache only. Raises TLExtractError (one line) when the model is gated,
    missing, unreachable or not cached.
    """
    from huggingface_hub import constants

    if not _offline(offline):
        log.info("fetching %s from %s (cache: %s)", repo_id, _endpoint(), constants.HF_HUB_CACHE)
    snapshot = _snapshot(repo_id, [*CONFIG, *TOKENIZER, *SAFETENSORS], offline)
    if not _has_weights(snapshot):
        # Older repos ship only PyTorch pickles; many carry both, so these are fetched only then.
        snapshot = _snapshot(repo_id, [*CONFIG, *TOKENIZER, *PYTORCH_BIN], offline)
    if _has_weights(snapshot):
        return snapshot
    if _offline(offline):
        raise _not_cached(repo_id)
    raise TLExtractError(f"{repo_id} has no transformers weights on {_endpoint()}: {NEEDS}")


def _snapshot(repo_id: str, patterns: list[str], offline: bool | None) -> Path:
    """The snapshot of the files matching ``patterns``: downloaded, or from the cache only."""
    from huggingface_hub import snapshot_download

    local_only = _offline(offline)
    endpoint = _endpoint()
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=patterns, local_files_only=local_only, endpoint=endpoint
            )
        )
    except Exception as e:
        if isinstance(e, OSError) or _transport_error(e):
            raise _explain(e, repo_id, endpoint, local_only) from e
        raise


def _offline(offline: bool | None) -> bool:
    from huggingface_hub import constants

    if offline is not None:
        return offline
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in constants.ENV_VARS_TRUE_VALUES or constants.HF_HUB_OFFLINE


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _has_weights(snapshot: Path) -> bool:
    return any(any(snapshot.glob(p)) for p in (SAFETENSORS[0], PYTORCH_BIN[0]))


def _transport_error(e: Exception) -> bool:
    # huggingface_hub 2.x raises httpx2's errors, 1.x httpx's: recognised without importing either.
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")


def _explain(e: Exception, repo_id: str, endpoint: str, offline: bool) -> TLExtractError:
    """One line for what huggingface_hub raised: what went wrong with which id, and the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return TLExtractError(
            f"{repo_id} is a gated model: accept its licence at {endpoint}/{repo_id} and log in "
            "with `hf auth login` or set HF_TOKEN (a token of the account that accepted it)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return TLExtractError(
            f"no model {repo_id} on {endpoint} (or it is private): check the id; for a private "
            "model log in with `hf auth login` or set HF_TOKEN"
        )
    if isinstance(e, LocalEntryNotFoundError):
        if offline or not isinstance(e.__cause__, Exception):
            return _not_cached(repo_id)
        e = e.__cause__  # the hub could not be asked, and the cache does not have the model
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        fix = (
            "log in again with `hf auth login` or set a valid HF_TOKEN"
            if status == 401
            else "try again later"
        )
        reason = _first_line(getattr(e, "server_message", None) or str(e))
        return TLExtractError(f"{endpoint} answered HTTP {status} for {repo_id} ({reason}): {fix}")
    reason = f"{type(e).__name__}: {_first_line(str(e))}"
    if _transport_error(e) or isinstance(e, ConnectionError):
        return TLExtractError(
            f"could not reach {endpoint} for {repo_id} ({reason}): check the network, proxy or "
            "HF_ENDPOINT; with the model in the local Hugging Face cache, --offline "
            "(HF_HUB_OFFLINE=1) reads it from there"
        )
    return TLExtractError(f"could not fetch {repo_id} from {endpoint} ({reason})")


def _not_cached(repo_id: str) -> TLExtractError:
    from huggingface_hub import constants

    return TLExtractError(
        f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        "downloads are off (--offline or HF_HUB_OFFLINE=1): run without them to download it, or "
        f"download it with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli "
        "download`; gated models need `hf auth login` and accepted terms first), or pass the "
        "path of a local directory holding the model"
    )


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no details"
