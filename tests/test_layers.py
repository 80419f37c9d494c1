"""Layer discovery on ldm/sgm-named and diffusers-named UNets."""

import pytest
import torch

from conftest import tiny_sd15, tiny_sdxl
from fam.layers import LayerSelectionError, discover
from ldm_like import sd1_like, sdxl_like


@pytest.mark.parametrize("make,naming,default,n_am,level", [
    (sd1_like, "ldm", (3, 4, 5), 3, 2),
    (sdxl_like, "ldm", (0, 1, 2), 9, 2),
    (tiny_sd15, "diffusers", (3, 4, 5), 3, 2),
    (tiny_sdxl, "diffusers", (0, 1, 2), 6, 2),
])
def test_default_am_layers_per_architecture(make, naming, default, n_am, level):
    layout = discover(make())
    assert layout.naming == naming
    assert layout.default_am_blocks() == default
    am = layout.am_layers()
    assert len(am) == n_am and all(l.block == "output" and l.level == level for l in am)
    assert all(l.name.endswith("attn1") and l.heads > 0 for l in am)


def test_both_namings_agree_on_block_numbering_and_levels():
    """diffusers up_blocks.i.attentions.j maps to ldm output_blocks.{3i+j}, down likewise."""
    ldm = {(l.block, l.index, l.level) for l in discover(sd1_like()).layers}
    dif = {(l.block, l.index, l.level) for l in discover(tiny_sd15()).layers}
    assert ldm == dif


def test_prefixed_names_are_found():
    wrapper = torch.nn.Module()
    wrapper.model = torch.nn.Module()
    wrapper.model.diffusion_model = sd1_like()
    names = [l.name for l in discover(wrapper).am_layers()]
    assert names[0] == "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1"


def test_explicit_blocks_and_clear_errors():
    layout = discover(sdxl_like())
    assert {l.index for l in layout.am_layers((3, 4))} == {3, 4}
    with pytest.raises(LayerSelectionError, match=r"\[7, 8\] have no self-attention in SDXL"):
        layout.am_layers((1, 7, 8), model_name="SDXL")
    with pytest.raises(LayerSelectionError, match="no attn1 layers"):
        discover(torch.nn.Sequential(torch.nn.Linear(2, 2)))
