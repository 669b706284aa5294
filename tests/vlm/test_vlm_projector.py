"""Projectors: the paper's parameter count, shapes from any encoder, the official key mapping and
its computation (against an independent re-statement of the released module's structure)."""
import json
import math
from pathlib import Path

import pytest
import torch
from vlm_parts import OfficialProjector

from med3dvlm.models import MixerProjector, create_model, load_official_projector
from med3dvlm.models.vlm.projector import MLPProjector, build_projector

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "projector_official_state_dict_keys.json"


def small_official(seed=0):
    torch.manual_seed(seed)
    official = OfficialProjector((12, 10), (5, 14), (9, 7), (6, 8), (11, 22))
    with torch.no_grad():  # LayerNorm weights away from their 1 / 0 initialisation
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return official


def test_paper_sizes_have_47221248_parameters():
    with torch.device("meta"):
        projector = MixerProjector(low_input_size=(256, 384), high_input_size=(32, 768), output_dim=3584)
    assert sum(p.numel() for p in projector.parameters()) == 47_221_248
    assert projector.num_tokens == 256


def test_sizes_derive_from_the_encoder_and_input_size():
    with torch.device("meta"):
        encoder = create_model("dcformer_small")
        paper = build_projector("mixer", encoder, (128, 256, 256), (-2, -1), 3584)
        smaller = build_projector("mixer", encoder, (64, 128, 128), (-2, -1), 3584)
        vit = build_projector("mixer", create_model("vit3d_tiny"), (64, 128, 128), (-2, -1), 64)
    assert (paper.low_input_size, paper.high_input_size) == ((256, 384), (32, 768))
    assert sum(p.numel() for p in paper.parameters()) == 47_221_248
    assert (smaller.low_input_size, smaller.high_input_size) == ((32, 384), (4, 768))
    assert vit.low_input_size[1] == vit.high_input_size[1]  # a ViT's blocks share one width


def test_forward_shapes_and_a_clear_error_on_wrong_tokens():
    projector = MixerProjector((12, 10), (5, 14), 22, (9, 7), (6, 8))
    out = projector(torch.randn(3, 12, 10), torch.randn(3, 5, 14))
    assert out.shape == (3, 7 + 8, 22)
    with pytest.raises(ValueError, match=r"low_tokens must be \(B, 12, 10\).*got \(3, 11, 10\)"):
        projector(torch.randn(3, 11, 10), torch.randn(3, 5, 14))


def test_official_state_dict_loads_strictly_and_computes_as_the_released_module():
    official = small_official()
    state = {f"model.mm_projector.{k}": v for k, v in official.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.randn(3, 4)  # other modules of a full checkpoint are ignored
    ours = load_official_projector(state)
    low, high = torch.randn(2, 12, 10), torch.randn(2, 5, 14)
    torch.testing.assert_close(ours(low, high), official(low, high), rtol=0, atol=0)


def test_official_reference_keys_map_one_to_one():
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference is absent")
    reference = json.loads(REFERENCE.read_text())
    with torch.device("meta"):
        projector = load_official_projector({k: torch.empty(v) for k, v in reference["keys"].items()})
    config = reference["config"]
    assert projector.low_input_size == tuple(config["low_input_size"])
    assert projector.high_input_size == tuple(config["high_input_size"])
    assert projector.output_dim == config["output_dim"]
    assert sum(p.numel() for p in projector.parameters()) == reference["num_params"]


def test_official_mismatch_lists_missing_and_unexpected_keys():
    state = dict(small_official().state_dict())
    state.pop("high_mixer.1.ln2.bias")
    state["high_mixer.1.extra.weight"] = torch.zeros(1)
    expected = r"missing \['high_mixer.1.ln2.bias'\]; unexpected \['high_mixer.1.extra.weight'\]"
    with pytest.raises(KeyError, match=expected):
        load_official_projector(state)


def test_mlp_projector_pools_then_projects():
    torch.manual_seed(0)
    projector = MLPProjector(in_channels=6, input_grid=(2, 4, 4), output_dim=10, pooled_grid=(1, 2, 2))
    tokens = torch.randn(3, 32, 6)
    out = projector(tokens)
    assert out.shape == (3, 4, 10) and projector.num_tokens == 4
    grid = tokens.transpose(1, 2).reshape(3, 6, 2, 4, 4)
    first_window = grid[:, :, :, :2, :2].mean(dim=(2, 3, 4))  # pooled token 0: D all, H 0-1, W 0-1
    torch.testing.assert_close(out[:, 0], projector.mlp(first_window))
    with pytest.raises(ValueError, match="pooled_grid .* must divide"):
        MLPProjector(6, (2, 4, 4), 10, pooled_grid=(1, 3, 2))


def test_build_projector_checks_the_number_of_stages():
    encoder = create_model("dcformer_nano")
    with pytest.raises(ValueError, match=r"'mixer' projector takes 2 stage\(s\)"):
        build_projector("mixer", encoder, (32, 64, 64), (-1,), 16)
    mlp = build_projector("mlp", encoder, (32, 64, 64), (-3,), 16)
    assert mlp.num_tokens == math.prod((2, 4, 4))
