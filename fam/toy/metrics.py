"""Structure metrics of the toy worlds, per image, pass/fail (so a rate has a binomial SE).

Segmentation: pixels whose colour differs from the median border colour by more than
`THRESHOLD` (max over channels) are object pixels; enclosed holes are filled; 4-connected
components smaller than `SPECK` of the image are specks and ignored.

- `one_round_disc`: exactly one object, bounding-box aspect ≥ `ASPECT`, and its area is
  `FILL` × the area of the circle of its bounding box (a disc: 1, a square: 1.27).
- `matches_native`: that, in the high-res image and in its native image, with the centre
  within `CENTRE_TOL` native px of s × the native centre and the radius within `RADIUS_TOL`
  of s × the native radius (the high-res image keeps the native layout).
- `coherent_stripes` (world 2): one round disc whose inner part (within 0.75 of its radius)
  is textured (luminance std / mean ≥ `CONTRAST`) with ONE orientation: the coherence of the
  summed structure tensor, |λ₁ − λ₂| / (λ₁ + λ₂), is ≥ `COHERENCE` (a grating: ≈ 1; two
  halves 90° apart: 0; 45° apart: 0.71; isotropic noise: ≈ 0).
- `native_orientation` (world 2): coherent stripes in both images whose orientations agree
  within `ANGLE_TOL` degrees.
- `two_patches` (world 3): exactly two objects, each a filled square (bounding-box aspect
  ≥ `ASPECT`, ≥ `SQUARE_FILL` of its box filled), sides within `SIZE_RATIO` of each other.
- `copies_agree` (world 3): two patches whose textures agree: `copy_agreement` ≥ `AGREEMENT`.
- `copies_agree_in_place` (world 3, a diagnostic added after the first FAM results, not in
  the verdict rule): the native image has two patches, and at their places (× s) the
  high-res image's textures agree, ≥ `AGREEMENT`. The high-res image is not segmented, so
  squares drawn with soft edges (which fail `two_patches`) still show whether their
  textures agree.

The thresholds were fixed from the worlds' own images at 1×, 2× and 3× and from constructed
failures (tests/test_toy.py) before any FAM output was scored; docs/quality.md says why."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Disc", "objects", "round_disc", "stripes", "two_patches", "copy_agreement",
           "score", "METRICS"]

THRESHOLD = 0.15
SPECK = 0.01
ASPECT = 0.8
FILL = (0.8, 1.15)
CENTRE_TOL = 2.0
RADIUS_TOL = (0.8, 1.25)
CONTRAST = 0.08
COHERENCE = 0.7
ANGLE_TOL = 15.0
SQUARE_FILL = 0.85
SIZE_RATIO = 1.25
AGREEMENT = 0.6

METRICS = {"disc": ("one_round_disc", "matches_native"),
           "stripes": ("one_round_disc", "coherent_stripes", "native_orientation"),
           "copies": ("two_patches", "copies_agree", "copies_agree_in_place")}


@dataclass(frozen=True)
class Disc:
    cy: float
    cx: float
    r: float                 # radius of the circle with the object's area
    mask: np.ndarray


def _labels(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background): every pixel takes the largest label
    among itself and its neighbours until nothing changes."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        nxt = lab.copy()
        np.maximum(nxt[1:], lab[:-1], out=nxt[1:])
        np.maximum(nxt[:-1], lab[1:], out=nxt[:-1])
        np.maximum(nxt[:, 1:], lab[:, :-1], out=nxt[:, 1:])
        np.maximum(nxt[:, :-1], lab[:, 1:], out=nxt[:, :-1])
        nxt *= mask
        if np.array_equal(nxt, lab):
            return lab
        lab = nxt


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions that do not reach the border become object pixels."""
    lab = _labels(~mask)
    outside = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return mask | ~np.isin(lab, outside)


def objects(img: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the objects in an (H, W, 3) image in [0, 1]."""
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    diff = np.abs(img - np.median(border, axis=0)).max(-1)
    lab = _labels(_fill_holes(diff > THRESHOLD))
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return [lab == i for i, c in zip(ids, counts) if c >= SPECK * lab.size]


def round_disc(img: np.ndarray) -> Disc | None:
    """The image's one round disc, or None."""
    objs = objects(img)
    if len(objs) != 1:
        return None
    ys, xs = np.nonzero(objs[0])
    bh, bw = np.ptp(ys) + 1, np.ptp(xs) + 1
    fill = len(ys) / (math.pi * (bh + bw) ** 2 / 16)
    if min(bh, bw) / max(bh, bw) < ASPECT or not FILL[0] <= fill <= FILL[1]:
        return None
    return Disc(ys.mean() + 0.5, xs.mean() + 0.5, math.sqrt(len(ys) / math.pi), objs[0])


def stripes(img: np.ndarray, disc: Disc) -> tuple[float, float, float]:
    """(contrast, coherence, orientation in degrees [0, 180)) of the disc's inner part.
    Orientation and coherence come from the structure tensor of its power spectrum,
    Σ P(k) k kᵀ: exact for a grating at any frequency up to Nyquist (finite-difference
    gradients bend the orientation of fine gratings by 10° and more)."""
    lum = img.mean(-1)
    yy, xx = np.mgrid[:lum.shape[0], :lum.shape[1]] + 0.5
    rho = np.hypot(yy - disc.cy, xx - disc.cx) / (0.75 * disc.r)
    inner = rho <= 1
    values = lum[inner]
    window = np.where(inner, 0.5 + 0.5 * np.cos(np.pi * rho), 0.0)    # Hann: little leakage
    power = np.abs(np.fft.fft2(window * (lum - values.mean()))) ** 2
    ky, kx = np.meshgrid(np.fft.fftfreq(lum.shape[0]), np.fft.fftfreq(lum.shape[1]), indexing="ij")
    jxx, jyy, jxy = ((power * a * b).sum() for a, b in ((kx, kx), (ky, ky), (kx, ky)))
    coherence = math.hypot(jxx - jyy, 2 * jxy) / max(jxx + jyy, 1e-12)
    angle = math.degrees(0.5 * math.atan2(2 * jxy, jxx - jyy)) % 180
    return float(values.std() / max(values.mean(), 1e-6)), coherence, angle


def _coherent(img, disc):
    if disc is None:
        return None
    contrast, coherence, angle = stripes(img, disc)
    return angle if contrast >= CONTRAST and coherence >= COHERENCE else None


def two_patches(img: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """Bounding boxes (y, x, h, w) of the image's two square patches, or None."""
    objs = objects(img)
    if len(objs) != 2:
        return None
    boxes = []
    for mask in objs:
        ys, xs = np.nonzero(mask)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        if min(h, w) / max(h, w) < ASPECT or len(ys) < SQUARE_FILL * h * w:
            return None
        boxes.append((int(ys.min()), int(xs.min()), int(h), int(w)))
    (_, _, ha, wa), (_, _, hb, wb) = boxes
    sides = sorted((math.sqrt(ha * wa), math.sqrt(hb * wb)))
    return boxes if sides[1] <= SIZE_RATIO * sides[0] else None


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    """Adaptive average pooling of a square (S, S) array to (k, k) (torch's bins)."""
    S = x.shape[0]
    edges = [(i * S // k, -(-(i + 1) * S // k)) for i in range(k)]
    return np.array([[x[a:b, c:d].mean() for c, d in edges] for a, b in edges])


def copy_agreement(img: np.ndarray, boxes, scale: float) -> float:
    """How far the two patches carry the same texture, seen on the native pixel grid:
    the correlation of their high-pass luminance. Both patches are cut at their boxes'
    top-left corners to the smaller side, averaged to native pixels, high-passed (minus the
    3×3 mean; shading shared by the copies does not count), and correlated over the inner
    part (one native pixel off the edge); the best of the nine 1-px offsets of the second
    copy is taken (an edge misdrawn by a pixel does not count either)."""
    lum = img.mean(-1)
    side = min(min(h, w) for _, _, h, w in boxes)
    k = max(3, round(side / scale))

    def texture(y, x):
        if y < 0 or x < 0 or y + side > lum.shape[0] or x + side > lum.shape[1]:
            return None
        p = _pool(lum[y:y + side, x:x + side], k)
        padded = np.pad(p, 1, mode="edge")
        mean3 = sum(padded[i:i + k, j:j + k] for i in range(3) for j in range(3)) / 9
        t = (p - mean3)[1:-1, 1:-1].ravel()
        return t - t.mean()

    (ya, xa, _, _), (yb, xb, _, _) = boxes
    a, best = texture(ya, xa), -1.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            b = texture(yb + dy, xb + dx)
            if b is not None:
                best = max(best, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    return best


def _scaled(box, scale: float) -> tuple[int, int, int, int]:
    """A native box (y, x, h, w) at `scale`, its edges rounded (so it stays inside the image)."""
    y, x, h, w = box
    y0, x0 = round(y * scale), round(x * scale)
    return y0, x0, round((y + h) * scale) - y0, round((x + w) * scale) - x0


def score(world: str, img: np.ndarray, native: np.ndarray, scale: float) -> dict[str, bool]:
    """Every metric of `world` for one image and the native image it came from."""
    if world == "copies":
        boxes = two_patches(img)
        in_place = [_scaled(box, scale) for box in two_patches(native) or ()]
        return {"two_patches": boxes is not None,
                "copies_agree": boxes is not None and copy_agreement(img, boxes, scale) >= AGREEMENT,
                "copies_agree_in_place": bool(in_place) and copy_agreement(img, in_place, scale) >= AGREEMENT}
    disc, ref = round_disc(img), round_disc(native)
    out = {"one_round_disc": disc is not None}
    if world == "disc":
        out["matches_native"] = (
            disc is not None and ref is not None
            and math.hypot(disc.cy / scale - ref.cy, disc.cx / scale - ref.cx) <= CENTRE_TOL
            and RADIUS_TOL[0] <= disc.r / (scale * ref.r) <= RADIUS_TOL[1])
    else:
        a, b = _coherent(img, disc), _coherent(native, ref)
        out["coherent_stripes"] = a is not None
        out["native_orientation"] = (a is not None and b is not None
                                     and min(abs(a - b), 180 - abs(a - b)) <= ANGLE_TOL)
    return out
