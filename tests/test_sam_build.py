"""anaus_core.sam: building SAM from segment_anything modules, official-format checkpoints."""

from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from anaus_core.errors import UserInputError
from anaus_core.sam import SAM_SPECS, build_sam, file_sha256, save_random_sam_checkpoint, spec_from_state_dict


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", "tiny", seed=0)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_specs_match_segment_anything_registry(name):
    # Same parameter names and shapes as the package's own builder (both on the meta device).
    with torch.device("meta"):
        ours = build_sam(name).state_dict()
        reference = sam_model_registry[name]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert spec_from_state_dict(ours) == SAM_SPECS[name]


def test_random_checkpoint_is_a_plain_state_dict_and_reloads(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert spec_from_state_dict(state) == SAM_SPECS["tiny"]
    sam = build_sam("tiny", checkpoint=tiny_checkpoint)
    for key, value in sam.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Same seed, same bytes-level content; different seed, different weights.
    again = save_random_sam_checkpoint(tiny_checkpoint.parent / "again.pth", "tiny", seed=0)
    other = save_random_sam_checkpoint(tiny_checkpoint.parent / "other.pth", "tiny", seed=1)
    state_again, state_other = torch.load(again, weights_only=True), torch.load(other, weights_only=True)
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert not torch.equal(state["image_encoder.pos_embed"], state_other["image_encoder.pos_embed"])
    assert len(file_sha256(tiny_checkpoint)) == 64


def test_reduced_input_size_interpolates_position_embeddings(tiny_checkpoint):
    sam = build_sam("tiny", checkpoint=tiny_checkpoint, image_size=128)
    encoder = sam.image_encoder
    assert encoder.pos_embed.shape == (1, 8, 8, 64)
    assert encoder.blocks[1].attn.rel_pos_h.shape == (15, 32)  # global block: 2*8-1
    assert encoder.blocks[0].attn.rel_pos_h.shape == (27, 32)  # windowed block keeps 2*14-1
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert torch.equal(encoder.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    # Independent check of the absolute embedding: bicubic resize of the (C, 64, 64) map.
    expected = torch.nn.functional.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic")
    torch.testing.assert_close(encoder.pos_embed.detach(), expected.permute(0, 2, 3, 1))
    out = encoder(torch.zeros(2, 3, 128, 128))
    assert out.shape == (2, 32, 8, 8)
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 10, 60, 60]]), masks=None)
    low_res, iou = sam.mask_decoder(image_embeddings=out[:1], image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    assert low_res.shape == (1, 1, 32, 32) and iou.shape == (1, 1)


def test_mismatched_checkpoint_fails_in_one_line(tiny_checkpoint, tmp_path):
    with pytest.raises(UserInputError) as info:
        build_sam("vit_b", checkpoint=tiny_checkpoint)
    message = str(info.value)
    assert "\n" not in message and "vit_b" in message and "'tiny'" in message and str(tiny_checkpoint) in message
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="junk.pth"):
        build_sam("tiny", checkpoint=junk)
    with pytest.raises(UserInputError, match="not found"):
        build_sam("tiny", checkpoint=tmp_path / "absent.pth")
