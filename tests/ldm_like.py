"""Tiny UNets with ldm/sgm/Forge module names (`input_blocks`, `middle_block`, `output_blocks`,
`SpatialTransformer` at index 1): the benchmark's stand-in (benchmarks/ldm.py) at a few
thousand parameters, in the block layouts of SD1.x and SDXL."""

import torch

from benchmarks.ldm import LdmConfig, LdmUNet

# SD1: attention on levels 0-2, depth 1; SDXL: levels 1-2 with depths 2 and 3 (10 in SDXL)
SD1 = LdmConfig(channels=16, mult=(1, 2, 2, 2), depth=(1, 1, 1, 0), heads=(2,) * 4,
                context_dim=8, groups=8, native=8)
SDXL = LdmConfig(channels=16, mult=(1, 2, 2), depth=(0, 2, 3), heads=(2,) * 3, middle_depth=3,
                 context_dim=8, groups=8, linear=True, native=8)


def tiny(cfg: LdmConfig, seed: int = 0) -> LdmUNet:
    torch.manual_seed(seed)
    return LdmUNet(cfg).eval()


def sd1_like(seed=0):
    return tiny(SD1, seed)


def sdxl_like(seed=0):
    return tiny(SDXL, seed)


def sd1_without_top_attention(seed=0):
    """SD1's layout without attention at the full latent size: fast at large latents."""
    return tiny(LdmConfig(**{**vars(SD1), "depth": (0, 1, 1, 0)}), seed)
