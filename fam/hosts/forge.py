"""Forge host, torch level: FAM on the UNet of the Forge WebUIs through their `UnetPatcher`
(`backend/`: Forge main, Forge Neo, ersatzForge; `ldm_patched`: Forge Classic, reForge).

What Forge gives us and how this module fits it:
  * the UNet is the `UnetPatcher` at `p.sd_model.forge_objects.unet`, shared with Forge's own
    copies and reset before every sampler run. Each pass puts a `clone()` with FAM's functions
    in its place; the patcher it replaced is never changed. `clone()` deep-copies the patch
    table, so FAM's functions are plain closures (a bound method or callable object would be
    copied with the whole run).
  * the UNet function wrapper (`set_model_unet_function_wrapper`) sees every UNet batch with
    its σ and `cond_or_uncond` (one entry per chunk of B rows, 0 = cond, 1 = uncond; the cond
    chunks of AND sub-prompts follow one another in a fixed order): each call opens a FAM call
    there, and the recompute path replays recorded native calls through it.
  * an `attn1_patch` sees the normalised attn1 input of every transformer block (it records,
    or fetches the native context); an `attn1_replace` on each AM layer gets q, k, v already
    projected and returns the attention before `to_out` (it modulates).
  * FM, the CFG denoiser wrapper, the refiner switch and the request checks are the
    WebUI-common part (`webui.WebUIGeneration`, `webui.begin_pass`), as on A1111.
Nothing here imports Forge at module level: the WebUI's attention function and memory state
are looked up per generation, by the generation of Forge the model comes from."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_projected_attention, merge_heads, split_heads
from ..guidance import FamRun, token_grid
from ..layers import AttnLayer, LayerSelectionError, UNetLayout, discover
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule, noised_reference
from .a1111 import same_architecture, with_native_size
from .webui import LATENT_FACTOR, WebUIGeneration, model_name, native_size_call
from .webui_args import FamRequestError

__all__ = ["ForgeGeneration", "ForgeHost", "HOST", "chunk_roles", "sdpa_attention", "forge_layout",
           "forge_schedule", "native_kwargs", "native_size_vector", "native_vector_fn",
           "forge_generation", "webui_attention", "low_vram_mode", "FAM_MARK"]

FAM_MARK = "_fam_generation"  # attribute naming the generation on each of FAM's patch functions
_RESERVED = "_fam_reserved_bytes"  # what FAM added to a clone's preserved sampling memory

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain attention on projected (rows, N, heads·d) inputs: the fallback when the script
    passes no attention function of the WebUI's own."""
    out = F.scaled_dot_product_attention(*(split_heads(t, heads) for t in (q, k, v)))
    return merge_heads(out)


# ---- the WebUI, looked up per generation (never imported with this module) -----------------
_WEBUI = {  # generation: (attention module, its function, memory module)
    "backend": ("backend.attention", "attention_function", "backend.memory_management"),
    "ldm_patched": ("ldm_patched.ldm.modules.attention", "optimized_attention",
                    "ldm_patched.modules.model_management"),
}


def forge_generation(sd_model: Any) -> str | None:
    """'backend' (Forge main, Neo, ersatzForge: the model is a backend diffusion engine),
    'ldm_patched' (Forge Classic, reForge: an ldm/sgm model with Forge objects), or None
    (not a Forge: A1111)."""
    if not hasattr(sd_model, "forge_objects"):
        return None
    root = type(sd_model).__module__.split(".")[0]
    return "backend" if root == "backend" else "ldm_patched"


def _webui_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:   # a fork that moved it: FAM's own equivalents serve
        return None


def webui_attention(generation: str) -> Attention:
    """The attention function Forge itself uses now (it follows the user's setting); plain
    SDPA where the fork keeps it elsewhere."""
    module_name, attr, _ = _WEBUI[generation]
    module = _webui_module(module_name)
    if module is None or not hasattr(module, attr):
        return sdpa_attention
    return lambda q, k, v, heads: getattr(module, attr)(q, k, v, heads)


def low_vram_mode(generation: str) -> bool:
    """Forge runs in low- or no-VRAM mode, or had to load a model in parts (it swaps modules
    to the CPU when one does not fit): FAM then keeps its record in RAM."""
    memory = _webui_module(_WEBUI[generation][2])
    state = getattr(getattr(memory, "vram_state", None), "name", "")
    swapped = any(getattr(m, "model_accelerated", False)
                  for m in getattr(memory, "current_loaded_models", ()))
    return state in ("LOW_VRAM", "NO_VRAM") or swapped


def chunk_roles(cond_or_uncond: Sequence[int], rows: int, first_part: int = 0) -> list[Role]:
    """Row roles of one Forge UNet batch: one chunk of B = rows / chunks rows (images 0..B-1)
    per `cond_or_uncond` entry; cond chunks are AND sub-prompts numbered from `first_part` in
    the order they come. Empty when the layout is not one Forge makes (FAM then skips, visibly)."""
    chunks = len(cond_or_uncond)
    if not chunks or rows % chunks:
        return []
    b, part, roles = rows // chunks, first_part, []
    for kind in cond_or_uncond:
        if kind == 1:
            roles += [Role(i, True) for i in range(b)]
        elif kind == 0:
            roles += [Role(i, False, part) for i in range(b)]
            part += 1
        else:
            return []
    return roles


def native_kwargs(c: Mapping[str, Any], hw) -> dict:
    """UNet kwargs of a high-res call, for the same rows at native size (reference path):
    spatial image conditioning resized, ControlNet residuals (high-res sized) left out, and
    `transformer_options` copied, since the UNet writes into it."""
    out = {k: v for k, v in c.items() if k not in ("control", "control_model")}
    cc = out.get("c_concat")
    if isinstance(cc, torch.Tensor) and cc.ndim == 4 and tuple(cc.shape[-2:]) != tuple(hw):
        out["c_concat"] = F.interpolate(cc, size=tuple(hw), mode="bilinear", align_corners=False)
    if isinstance(out.get("transformer_options"), dict):
        out["transformer_options"] = dict(out["transformer_options"])
    return out


def native_size_vector(embedder: Callable[[torch.Tensor], torch.Tensor], vector: torch.Tensor,
                       height: int, width: int) -> torch.Tensor:
    """SDXL's `y` as Forge's backend builds it (pooled text, then one embedding each of the
    height, width, crop top, crop left, target height, target width) with the sizes set to
    height×width pixels, for a native-size call; the text and crop parts are kept."""
    sizes = [embedder(torch.tensor([float(v)])).flatten() for v in (height, width)]
    n = sizes[0].numel()
    out = vector.clone()
    for slot, emb in zip((6, 5, 2, 1), sizes + sizes):   # counted from the end, n wide each
        start = vector.shape[1] - slot * n
        out[:, start:start + n] = emb.to(out)
    return out


def native_vector_fn(sd_model) -> Callable[[torch.Tensor, int, int], torch.Tensor] | None:
    """How to make SDXL's `y` for a native-size call of this model: Forge's backend engine
    builds it with its own `embedder`, the ldm_patched forks with sgm's conditioner (as A1111).
    None for models without size conditioning (SD1.x, SD2.x; the SDXL refiner, whose `y`
    carries an aesthetic score instead of target sizes, keeps its own)."""
    if not getattr(sd_model, "is_sdxl", False) or "Refiner" in type(sd_model).__name__:
        return None
    embedder = getattr(sd_model, "embedder", None)
    if callable(embedder):
        return lambda y, h, w: native_size_vector(embedder, y, h, w)
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        return lambda y, h, w: with_native_size(conditioner, y, h, w)
    return None


def forge_layout(sd_model: Any, model_name: str = "this model") -> UNetLayout:
    """The attn1 layers of a Forge model's UNet, or a request error naming the model type
    (Flux, SD3, Chroma and Neo's other transformers have no UNet)."""
    net = getattr(getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None),
                          "model", None), "diffusion_model", None)
    kind = f"{type(sd_model).__name__} model ({type(net).__name__})"
    if net is None:
        raise FamRequestError(f"FAM: {model_name} has no UNet; FAM supports SD1.x, SD2.x and SDXL")
    try:
        return discover(net)
    except LayerSelectionError as e:
        raise FamRequestError(
            f"FAM: {model_name} is a {kind} without a UNet; FAM supports SD1.x, SD2.x and "
            f"SDXL only. Turn FAM off for this model. ({e})") from e


def forge_schedule(k_model: Any) -> VPSchedule:
    """The discrete noise schedule of a Forge model: its σ table (`predictor` in backend/,
    `model_sampling` in ldm_patched) as ᾱ = 1 / (1 + σ²)."""
    sampling = getattr(k_model, "predictor", None) or getattr(k_model, "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise FamRequestError("FAM: this model has no discrete noise schedule (SD1.x, SD2.x, "
                              "SDXL have one)")
    s = sigmas.detach().double().cpu()
    return VPSchedule(1.0 / (1.0 + s * s))


def _is_fam(fn: Any) -> bool:
    return getattr(fn, FAM_MARK, None) is not None


def _strip(model_options: dict) -> None:
    """Take FAM's functions out of a clone's patch table (a second patch of the same pass
    made without Forge's reset in between must not stack)."""
    to = model_options.get("transformer_options", {})
    patches = to.get("patches", {})
    if "attn1_patch" in patches:
        patches["attn1_patch"] = [f for f in patches["attn1_patch"] if not _is_fam(f)]
    replace = to.get("patches_replace", {}).get("attn1", {})
    for key in [k for k, f in replace.items() if _is_fam(f)]:
        del replace[key]
    wrapper = model_options.get("model_function_wrapper")
    if _is_fam(wrapper):
        if wrapper.previous is None:
            del model_options["model_function_wrapper"]
        else:
            model_options["model_function_wrapper"] = wrapper.previous


def _mark(fn, gen):
    setattr(fn, FAM_MARK, gen)
    return fn


def _through(previous, apply_model, args):
    """One UNet batch as Forge would run it: through the wrapper FAM's own was put over."""
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


class _NativeCall(NamedTuple):
    """Replay payload of one recorded native UNet batch."""
    sigma: float
    roles: tuple[Role, ...]
    hw: tuple[int, int]
    previous: Any
    args: dict


class ForgeGeneration(WebUIGeneration):
    """FAM for one batch of one Forge generation (one `p.sample` call): the UNet clones with
    FAM's patches on top of the WebUI-common generation; `remove()` puts every replaced
    patcher back. A pass is patched when it begins (`_on_pass`) and again when Forge runs
    the hook a second time for it after resetting its objects (`refresh`)."""

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model", attention: Attention | None = None,
                 low_vram: bool = False):
        if low_vram and not params.record_offload:
            params = params.replace(record_offload=True)
        super().__init__(params, layout.am_layers(params.am_block_indices, model_name=model_name),
                         schedule)
        self.layout = layout
        self.attention = attention or sdpa_attention
        if low_vram:
            self.notes["FAM record"] = "kept in RAM (low VRAM)"
        self.in_unet_call = False
        self._by_key = {(l.block, l.index, l.transformer): l for l in self.layers}
        self._pending: tuple[str, Any] | None = None   # attn1 patch -> attn1 replace
        self._part = 0                                  # next AND part in this CFG step
        self._clones: list[tuple[Any, Any, Any]] = []   # (forge_objects, replaced, clone)
        self._current: tuple[Callable, dict, tuple[Role, ...]] | None = None
        self._ref = self._ref_eps = None
        self._native_vector = None
        self._hires_steps = self._hires_unet_calls = 0
        self._late_skips = 0
        self._fetched = self._applied = 0   # AM contexts the attn1 patch got / the replace used
        self._shape: tuple[int, int, int] | None = None   # (batch, h, w) of the native latent

    # ---- passes --------------------------------------------------------------------
    def _on_pass(self, p, sampler, reference) -> None:
        sd_model = p.sd_model
        if self.mode == "native":
            self._shape = (p.batch_size, p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
        else:
            layout = forge_layout(sd_model, model_name(sd_model))
            if layout.layers[0].module is not self.layout.layers[0].module:
                self.move_to(layout, model_name(sd_model))
            if reference is not None:
                eps = self.noise
                self._shape = (reference.shape[0], *reference.shape[-2:])
                self._ref = reference.to(eps.device, eps.dtype)
                self._ref_eps = F.interpolate(eps.float(), size=tuple(reference.shape[-2:]),
                                              mode="nearest").to(eps.dtype)
                self._native_vector = native_vector_fn(sd_model)
        self.patch_unet(sd_model.forge_objects, steps=getattr(p, "steps", 0))

    def refresh(self, p) -> None:
        """Forge main runs the hook twice in the high-res pass, with the same sampler and its
        UNet objects reset in between: only the second call's patcher samples."""
        if self.mode != "idle":
            self.patch_unet(p.sd_model.forge_objects)

    def _on_cfg_call(self, x, sigma, args, kwargs) -> None:
        self._part = 0
        if self.mode == "hires":
            self._hires_steps += 1

    def move_to(self, layout: UNetLayout, model_name: str) -> None:
        """The hires pass runs another UNet (a hires checkpoint): follow it when it has the
        same architecture, refuse clearly otherwise."""
        if not same_architecture(self.layout, layout):
            raise FamRequestError(
                f"FAM: the hires checkpoint {model_name} has a different architecture from the "
                "first-pass model; FAM needs both passes on the same kind of model "
                "(SD1.x, SD2.x or SDXL). Choose a hires checkpoint of the same kind or turn FAM off.")
        self.layout = layout
        self.layers = layout.am_layers(self.params.am_block_indices, model_name=model_name)
        self._by_key = {(l.block, l.index, l.transformer): l for l in self.layers}

    def remove(self) -> None:
        """Each UNet clone still in place gives way to the patcher it replaced, then the
        WebUI-common part comes off; safe to call twice."""
        for forge_objects, replaced, clone in reversed(self._clones):
            if getattr(forge_objects, "unet", None) is clone:
                forge_objects.unet = replaced
        self._clones.clear()
        super().remove()
        self._current = self._ref = self._ref_eps = self._pending = self._native_vector = None

    def report(self) -> dict[str, str]:
        """Infotext entries: the run's skips and paths, plus what only the host can see."""
        out = super().report()
        run, am_on = self.run, self.params.am_active and not self._switched
        lost = self._fetched - self._applied - self._late_skips
        if self._late_skips:
            out["FAM note"] = (f"AM fell back to plain attention in {self._late_skips} calls: "
                               "another attn1 patch changed the tokens after FAM's")
        elif lost:
            out["FAM note"] = (f"AM did not run in {lost} of {self._fetched} calls: another "
                               "extension replaced the attention of the AM layers after FAM")
        elif am_on and self._hires_steps and not self._hires_unet_calls:
            out["FAM note"] = ("AM did not run: another extension replaced Forge's UNet "
                               "function wrapper")
        elif am_on and self._hires_unet_calls and run.am_calls == 0 and not run.am_skipped:
            out["FAM note"] = "AM did not run: the UNet never called its attn1 layers"
        return out

    # ---- the UNet clone ------------------------------------------------------------
    def patch_unet(self, forge_objects: Any, steps: int = 0) -> None:
        """Put a clone of `forge_objects.unet` carrying FAM's functions in its place. Without
        AM (off, or λ = 0) the UNet is left alone: FM needs only the denoiser."""
        if not self.params.am_active:
            return
        replaced = forge_objects.unet
        unet = replaced.clone()
        _strip(unet.model_options)
        unet.set_model_attn1_patch(self._attn1_patch())
        if self.mode == "hires":
            for layer in self.layers:
                unet.set_model_attn1_replace(self._attn1_replace(layer), layer.block,
                                             layer.index, layer.transformer)
        unet.set_model_unet_function_wrapper(
            self._unet_wrapper(unet.model_options.get("model_function_wrapper")))
        # a clone of a FAM clone (no reset in between) carries its reservation: count it once
        reserve = self.reserve_bytes(getattr(unet, "load_device", None), steps)
        change = reserve - getattr(replaced, _RESERVED, 0)
        if change:
            unet.add_extra_preserved_memory_during_sampling(change)
        setattr(unet, _RESERVED, reserve)
        forge_objects.unet = unet
        self._clones.append((forge_objects, replaced, unet))

    def reserve_bytes(self, device: Any, steps: int = 0) -> int:
        """GPU memory FAM's record needs during this pass, for Forge's memory manager: the
        whole record in the native pass when it stays on the GPU (bounded by the budget), one
        step's maps in the high-res pass. Nothing on the CPU."""
        if (getattr(device, "type", "cpu") == "cpu" or self._shape is None
                or not self.params.am_active):
            return 0
        if self.mode == "native":
            if self.params.record_offload:
                return 0
            return min(self.params.record_budget_bytes, 2 * max(steps, 1) * self._step_bytes())
        return self._step_bytes()

    def _step_bytes(self) -> int:
        """One native UNet evaluation's maps: a cond and an uncond row per image, per layer."""
        batch, h, w = self._shape
        size = 0
        for layer in self.layers:
            th, tw = token_grid((h, w), layer.level)
            proj = layer.module.to_q
            channels = getattr(proj, "in_features", None) or proj.weight.shape[1]
            elem = 4 if proj.weight.dtype == torch.float32 else 2
            size += 2 * batch * th * tw * channels * elem
        return size

    # ---- FAM's functions on the clone ----------------------------------------------
    def _attn1_patch(self):
        def attn1_patch(n, context, value, extra_options):
            layer = self._layer_of(extra_options)
            if layer is not None and self.in_unet_call:
                ctx = self.run.on_attn1(layer.name, n)
                self._pending = (layer.name, ctx)
                self._fetched += ctx is not None
            return n, context, value
        return _mark(attn1_patch, self)

    def _attn1_replace(self, layer: AttnLayer):
        def attn1_replace(q, k, v, extra_options):
            pending, self._pending = self._pending, None
            heads = int(extra_options.get("n_heads") or layer.heads)
            ctx = pending[1] if pending is not None and pending[0] == layer.name else None
            if ctx is not None:
                tokens = ctx.hires_hw[0] * ctx.hires_hw[1]
                if q.shape[:2] == k.shape[:2] == v.shape[:2] == (ctx.native_hidden.shape[0], tokens):
                    self._applied += 1
                    return am_projected_attention(q, k, v, heads, layer.module, ctx)
                self._late_skips += 1
            return self.attention(q, k, v, heads)
        return _mark(attn1_replace, self)

    def _unet_wrapper(self, previous):
        def unet_wrapper(apply_model, args):
            if self.mode not in ("native", "hires") or self._switched:
                return _through(previous, apply_model, args)
            return self._unet_call(previous, apply_model, args)
        unet_wrapper.previous = previous
        return _mark(unet_wrapper, self)

    def _layer_of(self, extra_options: Mapping[str, Any]) -> AttnLayer | None:
        block = extra_options.get("block")
        if not block:
            return None
        return self._by_key.get((block[0], block[1], extra_options.get("block_index", 0)))

    # ---- per UNet batch -------------------------------------------------------------
    def _unet_call(self, previous, apply_model, args):
        x, t = args["input"], args["timestep"]
        kinds = args.get("cond_or_uncond") or ()
        roles = tuple(chunk_roles(kinds, x.shape[0], self._part))
        self._part += sum(1 for k in kinds if k == 0)
        sigma = float(t.flatten()[0])   # Forge's UNet always gets σ (timestep samplers too)
        hw = tuple(x.shape[-2:])
        if self.mode == "native":
            self.run.begin_call(sigma, roles, hw,
                                replay=_NativeCall(sigma, roles, hw, previous, args))
        else:
            self._hires_unet_calls += 1
            self._current = (apply_model, args, roles)
            self.run.begin_call(sigma, roles, hw)
        return self._in_unet(functools.partial(_through, previous, apply_model, args))

    def _in_unet(self, call):
        self.in_unet_call, self._pending = True, None
        try:
            return call()
        finally:
            self.in_unet_call, self._pending = False, None

    def _replay(self, payload) -> None:
        """FamRun's replay: re-run a recorded native batch, or (reference path, payload = σ)
        run the native UNet on the reference re-noised to σ for the current batch's rows.
        Both go through the model of the current high-res call."""
        apply_model, args, roles = self._current
        if isinstance(payload, _NativeCall):
            self.run.begin_call(payload.sigma, payload.roles, payload.hw)
            with native_size_call():
                self._in_unet(functools.partial(_through, payload.previous, apply_model,
                                                payload.args))
            return
        sigma = float(payload)
        x = args["input"]
        if len(roles) != x.shape[0]:
            return  # rows without a role: no maps, the call is skipped and reported
        idx = [r.image for r in roles]
        z = noised_reference(self._ref[idx], self._ref_eps[idx], sigma).to(x.dtype)
        self.run.begin_call(sigma, roles, tuple(z.shape[-2:]))
        kwargs = native_kwargs(args["c"], z.shape[-2:])
        if self._native_vector is not None and isinstance(kwargs.get("y"), torch.Tensor):
            h, w = (LATENT_FACTOR * n for n in z.shape[-2:])
            kwargs["y"] = self._native_vector(kwargs["y"], h, w)
        with native_size_call():
            self._in_unet(lambda: apply_model(z, args["timestep"], **kwargs))


class ForgeHost:
    """`Host` for the Forge family: one `ForgeGeneration` per batch on the loaded model, with
    the attention function and memory state of the Forge generation it comes from."""

    def generation(self, p, params: FamParams) -> ForgeGeneration:
        sd_model = p.sd_model
        generation, name = forge_generation(sd_model), model_name(sd_model)
        layout = forge_layout(sd_model, name)
        try:
            return ForgeGeneration(params, layout, forge_schedule(sd_model.forge_objects.unet.model),
                                   name, attention=webui_attention(generation),
                                   low_vram=low_vram_mode(generation))
        except LayerSelectionError as e:
            raise FamRequestError(str(e)) from e


HOST = ForgeHost()
