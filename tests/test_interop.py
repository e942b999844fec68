"""persona_vectors .pt and GGUF control vectors: exact round trips and layer-index mappings."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tlextract.errors import TLExtractError
from tlextract.ops.formats import (
    final_norm_row,
    gguf_layer_index,
    hidden_state_index,
    persona_blocks,
    save_gguf,
    save_persona_vectors,
    to_persona_vectors,
)
from tlextract.ops.trait_vectors import from_persona_vectors, load_gguf, load_persona_vectors

N_LAYERS, D_MODEL = 6, 8


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# persona_vectors


def test_block_l_lands_at_hidden_states_row_l_plus_1(vectors):
    table = to_persona_vectors(vectors, [0, 3, 4], N_LAYERS)
    assert table.shape == (N_LAYERS + 1, D_MODEL) and table.dtype == torch.float32
    assert torch.equal(table[1], vectors[0])  # blocks.0.hook_resid_post = hidden_states[1]
    assert torch.equal(table[4], vectors[1])
    assert torch.equal(table[5], vectors[2])  # the last row that is a block's output
    for row in (0, 2, 3, 6):  # embeddings, blocks not extracted, the final norm's row
        assert torch.equal(table[row], torch.zeros(D_MODEL))


def test_the_last_block_is_not_exported_to_the_final_norm_row(vectors):
    # persona_vectors computes row n_layers from hidden_states[n_layers], the final norm's
    # output: a resid_post vector of the last block does not belong there
    with pytest.raises(TLExtractError, match="row 6.*final norm's output"):
        to_persona_vectors(vectors, [0, 3, 5], N_LAYERS)
    table = to_persona_vectors(vectors, [0, 3, 5], N_LAYERS, skip_unsupported=True)
    assert torch.equal(table[6], torch.zeros(D_MODEL))
    assert torch.equal(table[[1, 4]], vectors[:2])
    assert persona_blocks([5, 0, 3], N_LAYERS) == [0, 3]
    assert persona_blocks([5, 0, 3], N_LAYERS, "resid_pre") == [5, 0, 3]
    assert final_norm_row(N_LAYERS) == 6


def test_resid_pre_is_not_shifted_and_keeps_the_last_block(vectors):
    table = to_persona_vectors(vectors, [0, 3, 5], N_LAYERS, hook="resid_pre")
    assert torch.equal(table[[0, 3, 5]], vectors)
    assert torch.equal(table[6], torch.zeros(D_MODEL))
    assert hidden_state_index(3, "resid_pre") == 3 and hidden_state_index(3) == 4


def test_persona_file_round_trip_is_exact(vectors, tmp_path: Path):
    path = tmp_path / "trait_response_avg_diff.pt"
    assert save_persona_vectors(path, vectors, [4, 0, 3], N_LAYERS) == [4, 0, 3]
    raw = torch.load(path, weights_only=True)  # what persona_vectors' own code reads
    assert isinstance(raw, torch.Tensor) and raw.shape == (N_LAYERS + 1, D_MODEL)
    back = load_persona_vectors(path, layers=[4, 0, 3])
    assert list(back.layers) == [4, 0, 3]
    assert torch.equal(back.vectors, vectors)
    written = save_persona_vectors(path, vectors, [5, 0, 3], N_LAYERS, skip_unsupported=True)
    assert written == [0, 3]


def test_loading_without_layers_drops_the_embedding_and_the_final_norm_rows():
    table = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)
    back = from_persona_vectors(table)
    assert list(back.layers) == list(range(5))  # blocks 0..4 = rows 1..5; row 6 is no block
    assert torch.equal(back.vectors, table[1:6])
    assert back.metadata["format"] == "persona_vectors"
    assert "row 6" in back.metadata["not_read"] and "final norm" in back.metadata["not_read"]
    pre = from_persona_vectors(table, hook="resid_pre")
    assert list(pre.layers) == list(range(6)) and torch.equal(pre.vectors, table[:6])


def test_asking_for_the_last_block_of_a_persona_table_says_what_its_row_is():
    table = torch.zeros(7, 2)
    with pytest.raises(TLExtractError, match=r"final norm's output.*torch.load\(path\)\[6\]"):
        from_persona_vectors(table, layers=[0, 5])


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
