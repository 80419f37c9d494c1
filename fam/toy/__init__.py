"""Toy worlds: tiny diffusion models trained on this CPU on synthetic images, where the
high-resolution failure FAM fixes is real and measurable without downloading a model
(docs/quality.md). Needs the `standalone` extra; the WebUI extension never imports it.

    import fam.toy
    model = fam.toy.load("disc")                      # world 1 (or "stripes", world 2)
    images = model.render(["native", "hires_1.0", "fam"], scale=2, seed=0, batch=8)
"""

from .render import METHODS, NO_ATTENTION, Method, ToyModel, load, method, self_attention_off
from .worlds import WORLDS, World

__all__ = ["load", "ToyModel", "METHODS", "Method", "method", "NO_ATTENTION", "self_attention_off",
           "WORLDS", "World"]
