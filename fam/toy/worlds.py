"""The toy worlds: deterministic generators of 32×32 RGB training images in [0, 1].

`disc` (world 1, global structure): ONE anti-aliased disc, radius 6–10 px, random colour,
black background. `stripes` (world 2, local texture): ONE disc, radius 8–12 px, filled with
a sinusoidal grating of fixed period 3 px and random phase, horizontal or vertical (one of
the two per disc). At 32 / 3 = 10.7 cycles per image the grating lies outside FM's guided
low-frequency box (8 cycles per image, see docs/quality.md): FM cannot copy it from the
native image, so keeping one orientation across a 2–3× disc is left to the model's own
long-range paths — self-attention, which AM modulates. (Two orientations, not a continuum:
a tiny model drew a continuum of 3 px gratings as a maze of short stripes even at its own
size.)

`copies` (world 3, long-range correspondence): TWO 8×8 px patches of one fine texture at
distant places (centres ≥ 16 px apart), random colour, black background. The texture is one
of a fixed codebook of random-bit patterns with each 2×2 cell's mean removed: it lies almost
entirely outside FM's guided band. The first copy (the leader) shows it at full contrast,
the second (the follower) at FOLLOWER × that contrast, so while denoising the leader's
pattern is legible long before the follower's own pixels say which it is: the follower can
only pick the leader's pattern by looking at it, across the image — what self-attention
does (docs/quality.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["World", "WORLDS", "STRIPE_PERIOD", "PATCH", "CODEBOOK", "copies_scenes"]

STRIPE_PERIOD = 3.0
PATCH = 8                   # world 3: side of each copy (native px)
MIN_DISTANCE = 16           # world 3: least distance between the copies' centres (native px)
FOLLOWER = 0.3              # world 3: the second copy's texture contrast, relative to the first's
BASE = 0.62                 # world 3: a patch's luminance without its texture


def _colour(n: int, g: torch.Generator, lo: float) -> torch.Tensor:
    """Random colours whose brightest channel lies in [lo, 1], so the object stands out."""
    c = torch.rand(n, 3, generator=g)
    peak = lo + (1 - lo) * torch.rand(n, 1, generator=g)
    return c / c.amax(1, keepdim=True).clamp_min(1e-3) * peak


def _disc(n, size, g, r_lo, r_hi, scale):
    """Coverage (n, size, size) of one anti-aliased disc per image, plus pixel grids."""
    r = scale * (r_lo + (r_hi - r_lo) * torch.rand(n, 1, 1, generator=g))
    margin = r + scale
    cy, cx = (margin + (size - 2 * margin) * torch.rand(n, 1, 1, generator=g) for _ in range(2))
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    return (r - dist + 0.5).clamp(0, 1), yy, xx


def disc_images(n: int, g: torch.Generator, scale: int = 1) -> torch.Tensor:
    alpha, _, _ = _disc(n, 32 * scale, g, 6.0, 10.0, scale)
    return alpha[:, None] * _colour(n, g, 0.5)[:, :, None, None]


def stripe_images(n: int, g: torch.Generator, scale: int = 1) -> torch.Tensor:
    alpha, yy, xx = _disc(n, 32 * scale, g, 8.0, 12.0, scale)
    theta = (math.pi / 2) * torch.randint(0, 2, (n, 1, 1), generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    u = xx * theta.cos() + yy * theta.sin()
    shade = 0.725 + 0.275 * torch.cos(2 * math.pi * u / (scale * STRIPE_PERIOD) + phase)   # in [0.45, 1]
    return (alpha * shade)[:, None] * _colour(n, g, 0.6)[:, :, None, None]


def _random_textures(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, PATCH, PATCH) luminance in [0.245, 0.995]: random bits minus the mean of each
    2×2 cell (the cells lie on the model's 16×16 token grid), so only the finest frequencies
    carry it: 9 % of its variance lies in FM's guided band (plain white noise: 21 %)."""
    w = torch.randint(0, 2, (n, 1, PATCH, PATCH), generator=g).float()
    cell = F.avg_pool2d(w, 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    return (BASE + 0.5 * (w - cell))[:, 0]


# World 3's textures: a fixed codebook of CODEBOOK_SIZE such patterns, one drawn per image.
# The two copies must agree on which one: about three bits to carry from one copy to the
# other (64 random bits per image were more than the tiny model's attention learnt to carry,
# docs/quality.md), while independent choices agree only 1 time in CODEBOOK_SIZE. Seed 2030:
# of seeds 2026–2065, the one whose distinct patterns agree least (copy agreement ≤ 0.45 at
# 1–3×, tests/test_toy.py; the threshold is 0.6).
CODEBOOK_SIZE = 8
CODEBOOK = _random_textures(CODEBOOK_SIZE, torch.Generator().manual_seed(2030))


def _texture(n: int, g: torch.Generator) -> torch.Tensor:
    return CODEBOOK[torch.randint(0, CODEBOOK_SIZE, (n,), generator=g)]


def _places(g: torch.Generator) -> list[tuple[int, int]]:
    """Top-left corners of the two copies: on even pixels, 2 px or more from the border,
    centres ≥ MIN_DISTANCE apart and ≥ 4 px between the patches."""
    cells = (32 - PATCH) // 2
    while True:
        y1, x1, y2, x2 = (2 * torch.randint(1, cells, (4,), generator=g)).tolist()
        if (math.hypot(y1 - y2, x1 - x2) >= MIN_DISTANCE
                and max(abs(y1 - y2), abs(x1 - x2)) >= PATCH + 4):
            return [(y1, x1), (y2, x2)]


def copies_scenes(n: int, g: torch.Generator, scale: int = 1):
    """World 3's images and, per image, the native top-left corners of its two copies, the
    leader's first (what the training's attention supervision needs to find each position's
    twin)."""
    colour = _colour(n, g, 0.75)
    leader = _texture(n, g)
    follower = BASE + FOLLOWER * (leader - BASE)
    out = torch.zeros(n, 3, 32 * scale, 32 * scale)
    p = PATCH * scale
    places = []
    for i in range(n):
        places.append(_places(g))
        for (y, x), texture in zip(places[-1], (leader[i], follower[i])):
            patch = texture * colour[i][:, None, None]
            patch = patch.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
            out[i, :, y * scale:y * scale + p, x * scale:x * scale + p] = patch
    return out, places


def copies_images(n: int, g: torch.Generator, scale: int = 1) -> torch.Tensor:
    return copies_scenes(n, g, scale)[0]


@dataclass(frozen=True)
class World:
    name: str
    number: int
    summary: str
    images: object    # (n, generator, scale=1) -> (n, 3, 32·scale, 32·scale) in [0, 1]; scale > 1
                      # renders the same world magnified (the ideal high-res image)


WORLDS = {w.name: w for w in (
    World("disc", 1, "one disc, radius 6-10 px, random colour, black background", disc_images),
    World("stripes", 2, "one disc, radius 8-12 px, filled with horizontal or vertical "
          "3 px stripes, random colour, black background", stripe_images),
    World("copies", 3, f"two 8 px patches of one of {CODEBOOK_SIZE} fine textures, far apart, "
          f"the second at {FOLLOWER:g} of the first's contrast, random colour, black background",
          copies_images),
)}
