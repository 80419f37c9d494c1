"""Tiny, randomly initialised UNets with the real SD1.5 and SDXL block layouts.

Nothing heavy is imported at module level: pytest loads this file for tests/live too, which
runs in a WebUI's own Python with only pytest (and requests, numpy, Pillow) installed."""

import pytest

SCHED_KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)


def _diffusers():
    return pytest.importorskip("diffusers")


def tiny_sd15(seed=0):
    """SD1.5 layout: 4 levels, attention in down 0-2 / up 1-3, no attention in up_blocks.0."""
    import torch
    torch.manual_seed(seed)
    return _diffusers().UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16).eval()


def tiny_sdxl(seed=0):
    """SDXL layout: 3 levels, no attention at full latent size, deepest level first up-block
    with several transformer blocks, text_time added conditioning."""
    import torch
    torch.manual_seed(seed)
    return _diffusers().UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=32, use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8).eval()


def cfg_cond(arch, batch=1, seed=0, hw=(128, 128)):
    import torch
    from fam.hosts.diffusers import CfgCond
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(2 * batch, 7, 32, generator=g)
    if arch == "sd15":
        return CfgCond(states)
    time_ids = torch.tensor([[*hw, 0, 0, *hw]], dtype=torch.float32).repeat(2 * batch, 1)
    return CfgCond(states, {"text_embeds": torch.randn(2 * batch, 16, generator=g),
                            "time_ids": time_ids})


@pytest.fixture(scope="session")
def unets():
    return {"sd15": tiny_sd15(), "sdxl": tiny_sdxl()}


@pytest.fixture
def euler():
    return _diffusers().EulerDiscreteScheduler(**SCHED_KW)
