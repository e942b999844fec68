"""Hub models (tlextract.model.hub) against a loopback server that serves the hub's file endpoints
(tests/fake_hub_server.py): download, offline cache reads, and one-line errors for gated, missing,
unreachable and unsupported models. No test contacts anything but 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import write_experiment
from local_server import started
from tiny_checkpoints import save_checkpoint
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tlextract.cli.main import main
from tlextract.errors import TLExtractError
from tlextract.model import hub
from tlextract.model.cache import MANIFEST, TINY_MODEL
from tlextract.model.load import load_model, model_directory, model_info

SERVER_SCRIPT = Path(__file__).with_name("fake_hub_server.py")
TINY = "tiny-org/tiny-model"
GATED = "tiny-org/gated-model"
QWEN = "tiny-org/tiny-qwen"
EXOTIC = "tiny-org/tiny-exotic"  # an architecture neither backend supports
GEMMA2 = "tiny-org/tiny-gemma2"  # one only TransformerBridge builds
BIN_ONLY = "tiny-org/bin-only"
GGUF_ONLY = "tiny-org/gguf-only"
MISSING = "tiny-org/no-such-model"
TOKEN = "hf_fake_token_for_tests"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Files of the tiny repo that a model does not need: they must stay on the hub.
EXTRAS = {"README.md": b"# tiny\n", "pytorch_model.bin": b"not needed: safetensors exist"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The directories the fake hub serves, by repo id."""
    root = tmp_path_factory.mktemp("repos")
    tiny = root / "tiny"
    shutil.copytree(model_directory(TINY_MODEL), tiny, ignore=shutil.ignore_patterns(MANIFEST))
    for name, data in EXTRAS.items():
        (tiny / name).write_bytes(data)
    qwen = root / "qwen"
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    Qwen2ForCausalLM(config).save_pretrained(qwen)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, qwen)
    exotic = root / "exotic"
    exotic.mkdir()
    config_json = {"model_type": "exotic", "architectures": ["ExoticForCausalLM"]}
    (exotic / "config.json").write_text(json.dumps(config_json))
    (exotic / "model.safetensors").write_bytes(b"must not be downloaded")
    bin_only = root / "bin-only"
    bin_only.mkdir()
    shutil.copy(tiny / "config.json", bin_only)
    (bin_only / "pytorch_model.bin").write_bytes(b"weights")
    gguf_only = root / "gguf-only"
    gguf_only.mkdir()
    (gguf_only / "model.gguf").write_bytes(b"GGUF")
    return {
        TINY: tiny,
        GATED: tiny,
        QWEN: qwen,
        EXOTIC: exotic,
        GEMMA2: save_checkpoint("gemma2", root / "gemma2"),
        BIN_ONLY: bin_only,
        GGUF_ONLY: gguf_only,
    }


@contextmanager
def serving(repos: dict[str, Path]) -> Iterator[str]:
    """The fake hub in a process of its own; yields its base URL."""
    args = [f"{r}={d}" for r, d in repos.items() if r != GATED]
    args += ["--gated", f"{GATED}={repos[GATED]}"]
    env = dict(os.environ, FAKE_HUB_TOKEN=TOKEN)
    with started(SERVER_SCRIPT, *args, env=env) as base:
        yield base


@pytest.fixture(scope="module")
def server(repos: dict[str, Path]) -> Iterator[str]:
    with serving(repos) as url:
        yield url


def control(url: str, path: str) -> list[str]:
    data = b"{}" if path == "/_reset" else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url + path, data=data), timeout=5) as r:
        return json.loads(r.read())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Online, an empty Hugging Face cache, no token, and every connection but loopback refused.
    Returns the cache directory."""
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    # huggingface_hub reads these at import time, before this module runs.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    # A refusing endpoint until a test points HF_ENDPOINT at a server: never the real hub.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    elsewhere: list[object] = []
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        if not (isinstance(address, tuple) and address[0] in LOOPBACK):
            elsewhere.append(address)
            raise OSError(f"tlextract tests only connect to loopback ({address})")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    yield hf_home / "hub"
    assert elsewhere == []


@pytest.fixture
def online(server: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fake hub as HF_ENDPOINT, its request log emptied; returns its URL."""
    monkeypatch.setenv("HF_ENDPOINT", server)
    control(server, "/_reset")
    return server


def _error(name: str) -> str:
    with pytest.raises(TLExtractError) as err:
        load_model(name, device="cpu")
    message = str(err.value)
    assert "\n" not in message and name in message
    return message


def _tokens(model) -> torch.Tensor:
    return model.to_tokens("<|im_start|>user\nHello, hub!<|im_end|>\n", prepend_bos=False)


def test_download_matches_the_embedded_model_and_skips_unneeded_files(
    online: str, cache: Path, tiny_model
) -> None:
    model = load_model(TINY, device="cpu")
    assert model.cfg.model_name == TINY
    tokens = _tokens(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tiny_model(tokens), rtol=0, atol=1e-6)
    assert model.tokenizer.chat_template == tiny_model.tokenizer.chat_template
    snapshot = hub.fetch(TINY)
    assert snapshot.is_relative_to(cache)
    names = {p.name for p in snapshot.iterdir()}
    assert "model.safetensors" in names and "chat_template.jinja" in names
    assert not names & EXTRAS.keys()
    fetched = [r for r in control(online, "/_requests") if r.startswith(f"GET /{TINY}/")]
    assert any(r.endswith("/model.safetensors") for r in fetched)  # downloaded from the server
    assert not any(r.endswith(tuple(EXTRAS)) for r in fetched)


def test_offline_reads_the_cache_after_the_server_stops(
    repos: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch, tiny_model
) -> None:
    with serving(repos) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        tokens = _tokens(tiny_model)
        with torch.no_grad():
            expected = load_model(TINY, device="cpu")(tokens)
    # Online but unreachable: huggingface_hub falls back to the cached snapshot.
    assert hub.fetch(TINY) == hub.fetch(TINY, offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("offline: no connection expected")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with torch.no_grad():
        torch.testing.assert_close(load_model(TINY, device="cpu")(tokens), expected)
    assert attempts == []  # offline means no connection at all


def test_offline_miss_names_the_id_and_how_to_download(
    online: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error(TINY)
    assert f"hf download {TINY}" in message and str(cache) in message
    assert control(online, "/_requests") == []


def test_gated_model_says_what_to_accept_and_how_to_log_in(
    online: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _error(GATED)
    assert f"accept its licence at {online}/{GATED}" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert "log in again with `hf auth login` or set a valid HF_TOKEN" in _error(GATED)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub sends it: the download goes through
    assert (hub.fetch(GATED) / "model.safetensors").is_file()


def test_a_stored_login_is_used(online: str, cache: Path) -> None:
    cache.parent.mkdir(parents=True)
    (cache.parent / "token").write_text(TOKEN)  # where `hf auth login` keeps it
    assert (hub.fetch(GATED) / "model.safetensors").is_file()


def test_missing_model_says_check_the_id(online: str) -> None:
    assert f"no model {MISSING} on {online}" in _error(MISSING)


def test_unreachable_hub_is_named(cache: Path) -> None:
    assert f"could not reach {os.environ['HF_ENDPOINT']} for {MISSING}" in _error(MISSING)


def test_unsupported_architecture_fails_before_the_weights(online: str) -> None:
    message = _error(EXOTIC)
    assert "ExoticForCausalLM" in message and "TransformerBridge" in message
    requests = control(online, "/_requests")
    assert any(r.endswith("/config.json") for r in requests)
    assert not any(r.endswith("/model.safetensors") for r in requests)


def test_other_architectures_go_through_transformer_lens(
    online: str, repos: dict[str, Path]
) -> None:
    model = load_model(QWEN, device="cpu")
    assert model.cfg.original_architecture == "Qwen2ForCausalLM"
    reference = AutoModelForCausalLM.from_pretrained(repos[QWEN]).eval()
    tokens = torch.tensor([[5, 70, 80, 90, 100, 3]])
    with torch.no_grad():
        assert (model(tokens) - reference(tokens).logits).abs().max() < 1e-4


def test_a_hub_id_only_the_bridge_builds_downloads_and_runs_on_it(
    online: str, repos: dict[str, Path]
) -> None:
    model = load_model(GEMMA2, device="cpu", dtype="float32")
    assert model_info(model)["backend"] == "bridge"
    reference = AutoModelForCausalLM.from_pretrained(repos[GEMMA2], attn_implementation="eager")
    tokens = torch.tensor([[5, 70, 80, 90, 100, 3]])
    with torch.no_grad():
        assert (model(tokens) - reference.eval()(tokens).logits).abs().max() < 1e-4


def test_a_repo_without_config_is_not_a_transformers_model(online: str) -> None:
    message = _error(GGUF_ONLY)
    assert f"{GGUF_ONLY} has no config.json on {online}" in message and "GGUF" in message


def test_pytorch_weights_only_when_there_are_no_safetensors(online: str) -> None:
    assert {p.name for p in hub.fetch(BIN_ONLY).iterdir()} == {"config.json", "pytorch_model.bin"}


@pytest.mark.parametrize(
    ("model", "flags", "expected"),
    [(MISSING, [], f"no model {MISSING}"), (TINY, ["--offline"], f"hf download {TINY}")],
    ids=["missing", "offline-miss"],
)
def test_cli_prints_one_line_and_exits_2(
    model: str,
    flags: list[str],
    expected: str,
    online: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_experiment(tmp_path)
    argv = ["run", "--experiment", "tiny", "--experiments-dir", str(tmp_path), "--model", model]
    assert main([*argv, "--traits", "alpha", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    if flags:
        assert control(online, "/_requests") == []  # --offline: not one request
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # --offline held for the command only
