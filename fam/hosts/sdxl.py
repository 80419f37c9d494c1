"""SDXL's size conditioning for a native-size UNet call: the replays of the recompute path run
the UNet at the native size, and its `y` / `vector` must say that size, as the host would
make it for a pass there. Two builders of that vector exist: sgm's `GeneralConditioner`
(A1111, Forge Classic, reForge) and one `Timestep` embedder (Forge's backend, ComfyUI)."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["with_native_size", "native_size_vector"]

_SIZE_KEYS = ("original_size_as_tuple", "target_size_as_tuple")
_FIXED_KEYS = {"crop_coords_top_left": 2, "aesthetic_score": 1}   # key: values per row


def with_native_size(conditioner: Any, vector: torch.Tensor, height: int, width: int
                     ) -> torch.Tensor:
    """sgm: `vector` with its original-size and target-size embeddings made for height×width
    pixels; the pooled text, crop and aesthetic-score parts are kept. The conditioner
    concatenates its embedders' vector outputs in order and the size-like ones come after the
    text ones, so they are found walking back from the end with the model's own embedders."""
    out, end = vector.clone(), vector.shape[1]
    for embedder in reversed(list(getattr(conditioner, "embedders", ()))):
        key = getattr(embedder, "input_key", None)
        if key not in _SIZE_KEYS and key not in _FIXED_KEYS:
            break
        values = [height, width] if key in _SIZE_KEYS else [0.0] * _FIXED_KEYS[key]
        emb = embedder(torch.tensor([values], dtype=torch.float32, device=vector.device))
        start = end - emb.shape[1]
        if key in _SIZE_KEYS:
            out[:, start:end] = emb.to(out.dtype)
        end = start
    return out


def native_size_vector(embedder: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor,
                       height: int, width: int) -> torch.Tensor:
    """One embedder: `y` is the pooled text, then one embedding each of the height, width,
    crop top, crop left, target height, target width; the sizes are set to height×width
    pixels, the text and crop parts kept."""
    sizes = [embedder(torch.tensor([float(v)])).flatten() for v in (height, width)]
    n = sizes[0].numel()
    out = vector.clone()
    for slot, emb in zip((6, 5, 2, 1), sizes + sizes):   # counted from the end, n wide each
        start = vector.shape[1] - slot * n
        out[:, start:start + n] = emb.to(out)
    return out
