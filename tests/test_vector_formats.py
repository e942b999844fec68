"""``TraitVectors.load`` opens every format tlextract knows by content (tlextract .pt,
persona_vectors .pt, GGUF control vectors, safetensors), exactly; anything else, or a damaged
file, is one error line naming the file. The safetensors file stands alone for other tools."""

from __future__ import annotations

import importlib.metadata
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tlextract.config import load_experiment
from tlextract.errors import TLExtractError
from tlextract.ops.trait_vectors import FORMATS, TraitVectors
from tlextract.settings import settings_for
from tlextract.stages.run import run_trait

N_LAYERS, D_MODEL = 6, 8
LAYERS = (5, 0, 3)  # not sorted: the row order must survive
META = {
    "experiment": "tiny", "variant": None, "n_pos": 4, "n_neg": 3, "norms": [1.5, 0.25, 2.0],
    "judge": "none", "kept": {"pos": 4, "neg": 3}, "mean_score": 71.25,
}  # fmt: skip


@pytest.fixture
def tv() -> TraitVectors:
    vectors = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))
    return TraitVectors(trait="alpha", method="mean_diff", model="tiny-random", hook="resid_post",
                        layers=LAYERS, vectors=vectors, metadata=dict(META))  # fmt: skip


def assert_same(a: TraitVectors, b: TraitVectors) -> None:
    assert (a.trait, a.method, a.model, a.hook) == (b.trait, b.method, b.model, b.hook)
    assert a.layers == b.layers and a.metadata == b.metadata
    assert a.vectors.dtype == b.vectors.dtype and torch.equal(a.vectors, b.vectors)


def one_line_error(path: Path, match: str | None = None) -> str:
    with pytest.raises(TLExtractError, match=match) as err:
        TraitVectors.load(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# round trips


def test_tlextract_file_round_trip(tv: TraitVectors, tmp_path: Path) -> None:
    tv.save(tmp_path / "mean_diff.pt")
    assert_same(TraitVectors.load(tmp_path / "mean_diff.pt"), tv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_round_trip_is_exact(tv: TraitVectors, tmp_path: Path, dtype) -> None:
    tv = TraitVectors(tv.trait, tv.method, tv.model, tv.hook, tv.layers, tv.vectors.to(dtype),
                      tv.metadata)  # fmt: skip
    tv.save_safetensors(tmp_path / "mean_diff.safetensors")
    back = TraitVectors.load(tmp_path / "mean_diff.safetensors")
    assert_same(back, tv)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(back.vectors.view(bits), tv.vectors.view(bits))  # bit-equal, NaN-proof
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


def test_persona_vectors_file_loads_with_every_exact_block(
    tv: TraitVectors, tmp_path: Path
) -> None:
    path = tmp_path / "trait_response_avg_diff.pt"
    # block 5 is the last: its row would be the final norm's output's, so it is left out
    written = tv.save(path, "persona_vectors", n_layers=N_LAYERS, skip_unsupported=True)
    assert written == [0, 3]
    back = TraitVectors.load(path)
    assert back.layers == tuple(range(N_LAYERS - 1)) and back.hook == "resid_post"
    assert back.method == "imported" and back.metadata["format"] == "persona_vectors"
    assert "final norm" in back.metadata["not_read"]
    for layer in written:
        assert torch.equal(back[layer], tv[layer])
    assert torch.equal(back[1], torch.zeros(D_MODEL))  # a block not extracted


def test_persona_vectors_file_at_resid_pre(tv: TraitVectors, tmp_path: Path) -> None:
    path = tmp_path / "pre.pt"
    pre = TraitVectors(tv.trait, tv.method, tv.model, "resid_pre", tv.layers, tv.vectors)
    pre.save(path, "persona_vectors", n_layers=N_LAYERS)
    back = TraitVectors.load(path, hook="resid_pre")
    assert back.hook == "resid_pre" and torch.equal(back[5], tv[5])


def test_gguf_round_trip(tv: TraitVectors, tmp_path: Path) -> None:
    path = tmp_path / "alpha.gguf"
    two = TraitVectors(tv.trait, tv.method, tv.model, tv.hook, (5, 3), tv.vectors[[0, 2]])
    two.save(path, "gguf", model_hint="llama")
    back = TraitVectors.load(path)
    assert back.layers == (3, 5) and back.model == "llama" and back.hook == "resid_post"
    assert (back.method, back.metadata) == ("imported", {"format": "gguf"})
    assert torch.equal(back.vectors, tv.vectors[[2, 0]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_save_writes_load_reads(tv: TraitVectors, tmp_path: Path, fmt) -> None:
    path = tmp_path / "alpha.vectors"
    # block 0 has no GGUF layer, block 5 (the last) no exact persona_vectors row
    written = tv.save(path, fmt, n_layers=N_LAYERS, skip_unsupported=True)
    back = TraitVectors.load(path)
    assert written == {"gguf": [5, 3], "persona_vectors": [0, 3]}.get(fmt, list(LAYERS))
    assert written == [b for b in LAYERS if b in back.layers]
    for layer in written:
        assert torch.equal(back[layer], tv[layer])
    if fmt in ("pt", "safetensors"):
        assert_same(back, tv)


def test_persona_vectors_save_names_the_missing_parameter(tv, tmp_path: Path) -> None:
    with pytest.raises(TLExtractError, match="needs n_layers"):
        tv.save(tmp_path / "p.pt", "persona_vectors")
    assert not (tmp_path / "p.pt").exists()


# ---------------------------------------------------------------------------------------------
# recognised by content, not by name


def test_formats_are_recognised_by_content_not_name(tv: TraitVectors, tmp_path: Path) -> None:
    tv.save_safetensors(tmp_path / "vectors.pt")
    assert_same(TraitVectors.load(tmp_path / "vectors.pt"), tv)
    tv.save(tmp_path / "control.bin", "gguf", skip_unsupported=True)
    assert TraitVectors.load(tmp_path / "control.bin").layers == (3, 5)
    tv.save(tmp_path / "ours.safetensors")
    assert_same(TraitVectors.load(tmp_path / "ours.safetensors"), tv)


def test_safetensors_from_another_tool_loads_sorted(tmp_path: Path) -> None:
    path = tmp_path / "theirs.safetensors"
    save_file({"layers.7": torch.ones(4), "layers.2": torch.zeros(4)}, path)
    back = TraitVectors.load(path)
    assert back.layers == (2, 7) and back.method == "imported" and back.hook == "resid_post"
    assert back.metadata == {"format": "safetensors"}
    assert torch.equal(back.vectors, torch.stack([torch.zeros(4), torch.ones(4)]))


def test_safetensors_with_other_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, path)
    one_line_error(path, "lm_head.weight")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(range(256)) * 4,
        b"layer,value\n0,1.5\n",
        pickle.dumps({"vectors": [1.0, 2.0]}, protocol=2),
    ],
    ids=["empty", "random", "text", "pickle"],
)
def test_unknown_files_get_one_line_naming_file_and_formats(tmp_path: Path, content) -> None:
    path = tmp_path / "mystery.pt"
    path.write_bytes(content)
    message = one_line_error(path)
    for fmt in ("tlextract", "persona_vectors", "GGUF", "safetensors"):
        assert fmt in message


def test_a_torch_file_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2, 2)}, path)
    one_line_error(path, "dict")


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "tlextract"])
@pytest.mark.parametrize("cut", [9, 0.5, -1], ids=["header", "half", "last-byte"])
def test_truncated_files_get_one_line(tv: TraitVectors, tmp_path: Path, fmt, cut) -> None:
    path = tmp_path / f"cut.{fmt}"
    if fmt == "safetensors":
        tv.save_safetensors(path)
    elif fmt == "gguf":
        tv.save(path, "gguf", skip_unsupported=True)
    else:
        tv.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    one_line_error(path)


# ---------------------------------------------------------------------------------------------
# the safetensors file for tools that know nothing about tlextract


def test_safetensors_file_reads_with_safetensors_alone(tv: TraitVectors, tmp_path: Path) -> None:
    path = tmp_path / "alpha.safetensors"
    tv.save_safetensors(path)
    tensors = load_file(path)
    assert sorted(tensors) == ["layers.0", "layers.3", "layers.5"]
    for i, layer in enumerate(tv.layers):
        assert torch.equal(tensors[f"layers.{layer}"], tv.vectors[i])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("trait", "method", "model", "hook", "n_pos", "n_neg")} == {
        "trait": "alpha", "method": "mean_diff", "model": "tiny-random", "hook": "resid_post",
        "n_pos": "4", "n_neg": "3",
    }  # fmt: skip
    assert json.loads(meta["layers"]) == list(LAYERS)
    assert json.loads(meta["hook_names"])[0] == "blocks.5.hook_resid_post"
    assert meta["layer_convention"] == (
        "layer l = TransformerLens block l, read at blocks.l.hook_resid_post (the output of "
        "block l) = transformers hidden_states[l+1] for every block but the last; the last "
        "block's output is not among transformers' hidden_states, whose last entry "
        "hidden_states[n_layers] is the final norm's output"
    )
    torch.testing.assert_close(torch.tensor(json.loads(meta["norms"])), tv.vectors.norm(dim=-1))
    assert meta["tlextract_version"] == importlib.metadata.version("tlextract")
    assert json.loads(meta["metadata"]) == META


# ---------------------------------------------------------------------------------------------
# the vectors stage


@pytest.mark.usefixtures("one_thread")
def test_vectors_stage_writes_the_same_vectors_as_safetensors(experiments: Path, tiny_model):
    run = settings_for(load_experiment("tiny", experiments), "alpha", n_examples=4)
    assert run_trait(run, get_model=lambda: tiny_model) is not None
    stage = run.stage_dir("vectors")
    assert_same(
        TraitVectors.load(stage / "mean_diff.safetensors"),
        TraitVectors.load(stage / "mean_diff.pt"),
    )
