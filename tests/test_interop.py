"""persona_vectors .pt and GGUF control vectors: exact round trips and layer-index mappings."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tlextract.errors import TLExtractError
from tlextract.ops.formats import (
    from_persona_vectors,
    gguf_layer_index,
    hidden_state_index,
    load_gguf,
    load_persona_vectors,
    save_gguf,
    save_persona_vectors,
    to_persona_vectors,
)

N_LAYERS, D_MODEL = 6, 8


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# persona_vectors


def test_block_l_lands_at_hidden_states_row_l_plus_1(vectors):
    table = to_persona_vectors(vectors, [0, 3, 5], N_LAYERS)
    assert table.shape == (N_LAYERS + 1, D_MODEL) and table.dtype == torch.float32
    assert torch.equal(table[1], vectors[0])  # blocks.0.hook_resid_post = hidden_states[1]
    assert torch.equal(table[4], vectors[1])
    assert torch.equal(table[6], vectors[2])  # the last block's output
    for row in (0, 2, 3, 5):  # embeddings and blocks not extracted
        assert torch.equal(table[row], torch.zeros(D_MODEL))


def test_resid_pre_is_not_shifted(vectors):
    table = to_persona_vectors(vectors, [0, 3, 5], N_LAYERS, hook="resid_pre")
    assert torch.equal(table[[0, 3, 5]], vectors)
    assert hidden_state_index(3, "resid_pre") == 3 and hidden_state_index(3) == 4


def test_persona_file_round_trip_is_exact(vectors, tmp_path: Path):
    path = tmp_path / "trait_response_avg_diff.pt"
    save_persona_vectors(path, vectors, [5, 0, 3], N_LAYERS)
    raw = torch.load(path, weights_only=True)  # what persona_vectors' own code reads
    assert isinstance(raw, torch.Tensor) and raw.shape == (N_LAYERS + 1, D_MODEL)
    back = load_persona_vectors(path, layers=[5, 0, 3])
    assert list(back.layers) == [5, 0, 3]
    assert torch.equal(back.vectors, vectors)


def test_loading_without_layers_gives_every_block_and_drops_the_embedding_row():
    table = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)
    back = from_persona_vectors(table)
    assert list(back.layers) == list(range(6))
    assert torch.equal(back.vectors, table[1:])


def test_persona_rejects_blocks_the_model_does_not_have(vectors):
    with pytest.raises(TLExtractError, match="not blocks"):
        to_persona_vectors(vectors, [0, 3, 6], N_LAYERS)
    with pytest.raises(TLExtractError, match="layer indices for 3 vectors"):
        to_persona_vectors(vectors, [0, 3], N_LAYERS)
    with pytest.raises(TLExtractError, match="no hidden_states equivalent"):
        to_persona_vectors(vectors, [0, 1, 2], N_LAYERS, hook="resid_mid")


def test_loading_something_else_names_the_file(tmp_path: Path):
    path = tmp_path / "not_vectors.pt"
    torch.save({"vectors": torch.zeros(2, 2)}, path)
    with pytest.raises(TLExtractError, match="not_vectors.pt"):
        load_persona_vectors(path)


# ---------------------------------------------------------------------------------------------
# GGUF


def test_gguf_round_trip_is_exact(vectors, tmp_path: Path):
    path = tmp_path / "trait.gguf"
    assert save_gguf(path, vectors, [4, 1, 2], "llama") == [4, 1, 2]
    back = load_gguf(path)
    assert list(back.layers) == [1, 2, 4]  # sorted by block
    assert torch.equal(back.vectors, vectors[[1, 2, 0]])
    assert back.model == "llama"


def test_gguf_metadata_and_tensor_names(vectors, tmp_path: Path):
    path = tmp_path / "trait.gguf"
    save_gguf(path, vectors, [1, 2, 5], "gemma3")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "gemma3"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.5"]
    t = tensors["direction.5"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(t.data), vectors[2].numpy())


def test_gguf_index_is_the_block_whose_output_llama_cpp_steers():
    # llama.cpp adds direction.{i} to layer il == i's output (l_out); TL calls that output
    # blocks.{i}.hook_resid_post. resid_pre of block i is the output of block i - 1.
    assert gguf_layer_index(7) == 7
    assert gguf_layer_index(7, "resid_pre") == 6


def test_gguf_refuses_block_0_unless_told_to_skip_it(vectors, tmp_path: Path):
    path = tmp_path / "trait.gguf"
    with pytest.raises(TLExtractError, match="skip_unsupported"):
        save_gguf(path, vectors, [0, 1, 2], "llama")
    assert not path.exists()
    assert save_gguf(path, vectors, [0, 1, 2], "llama", skip_unsupported=True) == [1, 2]
    back = load_gguf(path)
    assert list(back.layers) == [1, 2] and torch.equal(back.vectors, vectors[1:])
    assert gguf.GGUFReader(path).get_field("controlvector.layer_count").contents() == 2


def test_gguf_resid_pre_round_trip(vectors, tmp_path: Path):
    path = tmp_path / "trait.gguf"
    save_gguf(path, vectors, [2, 3, 4], "llama", hook="resid_pre")
    assert sorted(t.name for t in gguf.GGUFReader(path).tensors) == [
        "direction.1",
        "direction.2",
        "direction.3",
    ]
    back = load_gguf(path, hook="resid_pre")
    assert list(back.layers) == [2, 3, 4] and torch.equal(back.vectors, vectors)


def test_loads_a_control_vector_written_the_way_repeng_writes_it(tmp_path: Path):
    path = tmp_path / "repeng.gguf"
    directions = {i: np.full(4, float(i), dtype=np.float32) for i in (10, 3, 7)}
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = load_gguf(path)
    assert list(back.layers) == [3, 7, 10] and back.model == "mistral"
    assert torch.equal(back.vectors[:, 0], torch.tensor([3.0, 7.0, 10.0]))


def test_load_gguf_rejects_other_architectures(tmp_path: Path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TLExtractError, match="not a control vector"):
        load_gguf(path)
