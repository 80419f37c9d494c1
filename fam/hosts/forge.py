"""Forge host, torch level: FAM on the UNet of the Forge WebUIs through their `UnetPatcher`
(`backend/`: Forge main, Forge Neo, ersatzForge; `ldm_patched`: Forge Classic, reForge).

What Forge gives us (see docs/hosts.md) and how this module fits it:
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
  * FM edits the sampler's own latent in place in an instance wrapper of the CFG denoiser's
    `forward`, as on A1111.
Nothing here imports Forge: the script passes Forge's attention function in."""

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
from .a1111 import same_architecture
from .a1111_args import FamRequestError

__all__ = ["ForgeGeneration", "chunk_roles", "sdpa_attention", "forge_layout", "forge_schedule",
           "native_kwargs", "native_size_vector", "forge_generation", "webui_attention", "low_vram_mode", "FAM_MARK"]

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


def webui_attention(generation: str) -> Attention:
    """The attention function Forge itself uses now (it follows the user's setting)."""
    module_name, attr, _ = _WEBUI[generation]
    module = importlib.import_module(module_name)
    return lambda q, k, v, heads: getattr(module, attr)(q, k, v, heads)


def low_vram_mode(generation: str) -> bool:
    """Forge runs in low- or no-VRAM mode, or had to load a model in parts (it swaps modules
    to the CPU when one does not fit): FAM then keeps its record in RAM."""
    memory = importlib.import_module(_WEBUI[generation][2])
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


class ForgeGeneration:
    """FAM for one batch of one Forge generation (one `p.sample` call): owns the `FamRun`, the
    patched UNet clones and the denoiser wrapper, and takes them all off in `remove()`.

    Per pass: `record_native(forge_objects, cfg, vp)` or `guide_hires(forge_objects, cfg, z0,
    eps, vp, reference)`, from `process_before_every_sampling` after Forge's reset; a second
    call for the same sampler (Forge main runs that hook twice in the hires pass) only patches
    the new UNet."""

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model", attention: Attention | None = None,
                 low_vram: bool = False):
        if low_vram and not params.record_offload:
            params = params.replace(record_offload=True)
        self.params, self.layout, self.schedule = params, layout, schedule
        self.layers = layout.am_layers(params.am_block_indices, model_name=model_name)
        self.run = FamRun(params, self.layers, schedule)
        self.attention = attention or sdpa_attention
        self.notes: dict[str, str] = {"FAM record": "kept in RAM (low VRAM)"} if low_vram else {}
        self.mode = "idle"
        self.in_unet_call = False
        self.error: BaseException | None = None
        self._by_key = {(l.block, l.index, l.transformer): l for l in self.layers}
        self._pending: tuple[str, Any] | None = None   # attn1 patch -> attn1 replace
        self._part = 0                                  # next AND part in this CFG step
        self._patches: list[tuple[Any, str, bool, Any]] = []
        self._clones: list[tuple[Any, Any, Any]] = []   # (forge_objects, replaced, clone)
        self._hires_cfg = None
        self._current: tuple[Callable, dict, tuple[Role, ...]] | None = None
        self._ref = self._ref_eps = None
        self._hires_steps = self._hires_unet_calls = 0
        self._late_skips = 0
        self._shape: tuple[int, int, int] | None = None   # (batch, h, w) of the native latent

    # ---- passes --------------------------------------------------------------------
    def record_native(self, forge_objects: Any, cfg: Any, x: torch.Tensor, vp: bool,
                      steps: int = 0) -> None:
        """First pass (x: its initial latent, `steps` sampler steps): patch the UNet to record
        every native UNet batch."""
        self.mode = "native"
        self._shape = (x.shape[0], *x.shape[-2:])
        self.run.begin_native()
        self._wrap_denoiser(cfg, vp)
        self.patch_unet(forge_objects, steps=steps)

    def guide_hires(self, forge_objects: Any, cfg: Any, z0: torch.Tensor, eps: torch.Tensor,
                    vp: bool, reference: torch.Tensor | None = None) -> None:
        """High-res pass on this sampler. z0: the latent the pass starts from, eps: its noise.
        With `reference` (clean native latents) no native pass was recorded: the native maps
        come from re-noising the reference at each σ (img2img, the upscale button)."""
        if self.mode == "hires" and cfg is self._hires_cfg:
            self.patch_unet(forge_objects)   # the same pass again, after Forge's reset
            return
        if reference is None and self.mode != "native":
            raise FamRequestError("FAM: the high-res pass has no native pass to follow")
        self.mode, self._hires_cfg = "hires", cfg
        native_hw = None
        if reference is not None:
            native_hw = tuple(reference.shape[-2:])
            self._shape = (z0.shape[0], *native_hw)
            self._ref = reference.to(z0.device, z0.dtype)
            self._ref_eps = F.interpolate(eps.float(), size=native_hw, mode="nearest").to(eps.dtype)
        self.run.begin_hires(z0, eps, vp=vp, replay_fn=self._replay, replay_can_stop=True,
                             reference_native_hw=native_hw)
        self._wrap_denoiser(cfg, vp)
        self.patch_unet(forge_objects)

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

    def fail(self, cfg: Any, error: BaseException) -> None:
        """Set-up of a pass failed where the WebUI swallows exceptions (script hooks): keep the
        error and make this sampler's first step raise it, so nothing runs half-way."""
        self.error = error
        if cfg is not None:
            def raise_error(*args, **kwargs):
                raise error
            self._patch(cfg, "forward", raise_error)

    def remove(self) -> None:
        """Everything off: each UNet clone still in place gives way to the patcher it replaced,
        the denoiser wrapper comes off, the run drops its record; safe to call twice."""
        for forge_objects, replaced, clone in reversed(self._clones):
            if getattr(forge_objects, "unet", None) is clone:
                forge_objects.unet = replaced
        self._clones.clear()
        for obj, attr, had_own, value in reversed(self._patches):
            if had_own:
                setattr(obj, attr, value)
            else:
                obj.__dict__.pop(attr, None)
        self._patches.clear()
        self.run.end()
        self.mode, self._hires_cfg = "idle", None
        self._current = self._ref = self._ref_eps = self._pending = None

    def report(self) -> dict[str, str]:
        """Infotext entries: the run's skips and paths, plus what only the host can see."""
        run, notes = self.run, dict(self.notes)
        am_on = self.params.am_enabled and self.params.am_lambda > 0
        if self._late_skips:
            notes["FAM note"] = (f"AM fell back to plain attention in {self._late_skips} calls: "
                                 "another attn1 patch changed the tokens after FAM's")
        elif am_on and self._hires_steps and not self._hires_unet_calls:
            notes["FAM note"] = ("AM did not run: another extension replaced Forge's UNet "
                                 "function wrapper")
        elif am_on and self._hires_unet_calls and run.am_calls == 0 and not run.am_skipped:
            notes["FAM note"] = "AM did not run: the UNet never called its attn1 layers"
        return {**run.report(), **notes}

    # ---- the UNet clone ------------------------------------------------------------
    def patch_unet(self, forge_objects: Any, steps: int = 0) -> None:
        """Put a clone of `forge_objects.unet` carrying FAM's functions in its place."""
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
                or not self.params.am_enabled or self.params.am_lambda == 0):
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
                self._pending = (layer.name, self.run.on_attn1(layer.name, n))
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
                    return am_projected_attention(q, k, v, heads, layer.module, ctx)
                self._late_skips += 1
            return self.attention(q, k, v, heads)
        return _mark(attn1_replace, self)

    def _unet_wrapper(self, previous):
        def unet_wrapper(apply_model, args):
            if self.mode not in ("native", "hires"):
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
        roles = tuple(chunk_roles(args.get("cond_or_uncond") or (), x.shape[0], self._part))
        self._part += sum(1 for k in args.get("cond_or_uncond") or () if k == 0)
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
            self._in_unet(functools.partial(_through, payload.previous, apply_model, payload.args))
            return
        sigma = float(payload)
        x = args["input"]
        if len(roles) != x.shape[0]:
            return  # rows without a role: no maps, the call is skipped and reported
        idx = [r.image for r in roles]
        z = noised_reference(self._ref[idx], self._ref_eps[idx], sigma).to(x.dtype)
        self.run.begin_call(sigma, roles, tuple(z.shape[-2:]))
        kwargs = native_kwargs(args["c"], z.shape[-2:])
        self._in_unet(lambda: apply_model(z, args["timestep"], **kwargs))

    # ---- the denoiser ----------------------------------------------------------------
    def sigma_of(self, sigma: Any, vp: bool) -> float:
        """σ of a denoiser call: k-diffusion passes σ, the timestep samplers pass t."""
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return self.schedule.t_to_sigma(s) if vp else s

    def _wrap_denoiser(self, cfg: Any, vp: bool) -> None:
        cfg_forward = cfg.forward

        def forward(x, sigma, *args, **kwargs):
            self._part = 0
            if self.mode == "hires":
                self._hires_steps += 1
                self.run.guide_latent(x, self.sigma_of(sigma, vp))
            return cfg_forward(x, sigma, *args, **kwargs)

        self._patch(cfg, "forward", forward)

    def _patch(self, obj: Any, attr: str, value: Any) -> None:
        had_own = attr in obj.__dict__
        self._patches.append((obj, attr, had_own, obj.__dict__.get(attr)))
        setattr(obj, attr, value)
