"""FAM through the model-patcher dialect of the Forge family and ComfyUI: a `clone()` of the
UNet's patcher carries FAM's functions; the patcher it came from is never changed.

  * the UNet function wrapper (`set_model_unet_function_wrapper`) sees every UNet batch with
    its σ and `cond_or_uncond` (one entry per chunk of B rows, 0 = cond, 1 = uncond; the cond
    chunks of AND sub-prompts follow one another): it opens a FAM call, and native batches
    are replayed through the wrapper it was put over;
  * an `attn1_patch` sees the normalised attn1 input of every transformer block (it records,
    or fetches the native context); an `attn1_replace` on each AM layer gets q, k, v already
    projected and returns the attention before `to_out` (it modulates).
`clone()` deep-copies the patch table, so FAM's functions are plain closures marked with
`GEN_ATTR` (a bound method or callable object would be copied with the whole run)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_projected_attention, merge_heads, split_heads
from ..guidance import HIRES, NATIVE, FamRun
from ..layers import AttnLayer
from ..record import Role
from ..replay import ReplayUnavailable
from .unet_hooks import GEN_ATTR, LATENT_FACTOR, NativeCall, UNetHooks, _Current

__all__ = ["PatcherHooks", "Attention", "sdpa_attention", "chunk_roles", "native_kwargs",
           "is_fam", "native_control"]

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain attention on projected (rows, N, heads·d) inputs: the fallback when the host
    has no attention function of its own to pass."""
    out = F.scaled_dot_product_attention(*(split_heads(t, heads) for t in (q, k, v)))
    return merge_heads(out)


def chunk_roles(cond_or_uncond: Sequence[int], rows: int, first_part: int = 0) -> list[Role]:
    """Row roles of one UNet batch: one chunk of B = rows / chunks rows (images 0..B-1) per
    `cond_or_uncond` entry; cond chunks are AND sub-prompts numbered from `first_part` in the
    order they come. Empty when the layout is not one the patcher makes (FAM then skips,
    visibly)."""
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


def native_control(c: Mapping[str, Any], x: torch.Tensor, t: torch.Tensor, chunks: int,
                   cond: Mapping[str, Any]) -> Any:
    """ControlNet residuals for a native-size UNet batch from the ControlNet units of the
    high-res call `c` (`c['control_model']`, the head of Forge's linked list of units); None
    without units."""
    cnet = c.get("control_model")
    if cnet is None or not callable(getattr(cnet, "get_control", None)):
        return None
    return control_residuals(cnet, x, t, cond, chunks)


def control_residuals(control: Any, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any],
                      chunks: int) -> Any:
    """Residuals of a ControlNet object (and the units linked before it) for the UNet batch
    x: each unit resizes its hint to x itself, as for any call. The hint each unit keeps for
    the high-res size is put back afterwards, so the next high-res call does not resize
    again. A unit that cannot make them ends the replays, visibly."""
    nodes, node = [], control
    while node is not None and len(nodes) < 64:
        nodes.append((node, node.__dict__.get("cond_hint")))
        node = getattr(node, "previous_controlnet", None)
    args = [x, t, dict(cond), chunks]
    if len(inspect.signature(control.get_control).parameters) >= 5:   # reForge, ComfyUI
        args.append(cond.get("transformer_options", {}))
    try:
        return control.get_control(*args)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ReplayUnavailable(f"ControlNet could not condition a native-size UNet call "
                                f"({type(e).__name__}: {first})") from e
    finally:
        for node, hint in nodes:
            if hint is not None:
                node.cond_hint = hint


def is_fam(fn: Any) -> bool:
    return getattr(fn, GEN_ATTR, None) is not None


def _mark(fn, owner):
    setattr(fn, GEN_ATTR, owner)
    return fn


def _strip(model_options: dict) -> None:
    """Take FAM's functions out of a clone's patch table (a second patch of the same pass
    made without the host's reset in between must not stack)."""
    to = model_options.get("transformer_options", {})
    patches = to.get("patches", {})
    if "attn1_patch" in patches:
        patches["attn1_patch"] = [f for f in patches["attn1_patch"] if not is_fam(f)]
    replace = to.get("patches_replace", {}).get("attn1", {})
    for key in [k for k, f in replace.items() if is_fam(f)]:
        del replace[key]
    post = model_options.get("sampler_post_cfg_function")
    if post:
        model_options["sampler_post_cfg_function"] = [f for f in post if not is_fam(f)]
    wrapper = model_options.get("model_function_wrapper")
    if is_fam(wrapper):
        if wrapper.previous is None:
            del model_options["model_function_wrapper"]
        else:
            model_options["model_function_wrapper"] = wrapper.previous


def _through(previous, apply_model, args):
    """One UNet batch as the host would run it: through the wrapper FAM's own was put over."""
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


class _Inputs(NamedTuple):
    """A UNet batch as the wrapper got it: the wrapper below FAM's, the model, the args, and
    the batch's ControlNet object where the host can name it (its residuals in `args` are
    consumed by the UNet and made for this batch's size: native-size calls need their own)."""
    previous: Any
    apply_model: Callable
    args: dict
    control: Any = None


class PatcherHooks(UNetHooks):
    """FAM's functions on patcher clones for one generation. `patched(unet)` gives the clone
    for the pass the run is in; `begin_step()` is called once per CFG step. `attention` is
    the host's own attention function (for the calls FAM does not modulate);
    `native_vector(y, h, w)` makes SDXL's `y` for an h×w-pixel call (reference path); `host`
    names the host in the infotext."""

    def __init__(self, run: FamRun, layers: Sequence[AttnLayer],
                 attention: Attention | None = None,
                 native_vector: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
                 host: str = "the host"):
        super().__init__(run, layers)
        self.host = host
        self.attention = attention or sdpa_attention
        self.native_vector = native_vector
        self.steps = 0                  # high-res CFG steps
        self._by_key = self._keys(self.layers)
        self._pending: tuple[str, Any, int] | None = None   # attn1 patch -> attn1 replace
        self._part = 0                                  # next AND part in this CFG step
        self._late_skips = 0
        self._fetched = self._applied = 0   # AM contexts the attn1 patch got / the replace used
        self._taken: set[str] = set()       # AM layers another extension replaced before FAM
        self._taken_calls = 0
        self._after_cfg = False   # the step's CFG is done: UNet batches now are extensions'
        self.controlnet_calls = 0   # native-size calls conditioned by ControlNet units
        self._step_chunks: list[tuple[torch.Tensor, list[Role]]] = []   # this step's chunks

    @staticmethod
    def _keys(layers):
        return {(l.block, l.index, l.transformer): l for l in layers}

    def set_layers(self, layers: Sequence[AttnLayer]) -> None:
        super().set_layers(layers)
        self._by_key = self._keys(self.layers)

    def begin_step(self) -> None:
        self._part = 0
        self._after_cfg, self._step_chunks = False, []
        if self.run.phase == HIRES:
            self.steps += 1

    def remove(self) -> None:
        super().remove()
        self._pending = None

    def patched(self, unet: Any) -> Any:
        """A clone of `unet` with FAM's functions for the current pass (replacements on the AM
        layers in the high-res pass only)."""
        unet = unet.clone()
        _strip(unet.model_options)
        unet.set_model_attn1_patch(self._attn1_patch())
        if self.run.phase == HIRES:
            theirs = (unet.model_options.get("transformer_options", {})
                      .get("patches_replace", {}).get("attn1", {}))
            for layer in self.layers:
                if (layer.block, layer.index, layer.transformer) in theirs:
                    self._taken.add(layer.name)   # another extension's attention stays
                    continue
                unet.set_model_attn1_replace(self._attn1_replace(layer), layer.block,
                                             layer.index, layer.transformer)
        unet.set_model_unet_function_wrapper(
            self._unet_wrapper(unet.model_options.get("model_function_wrapper")))
        post = unet.model_options.get("sampler_post_cfg_function") or []
        unet.model_options["sampler_post_cfg_function"] = [self._cfg_done()] + list(post)
        return unet

    def report(self) -> dict[str, str]:
        run = self.run
        lost = self._fetched - self._applied - self._late_skips
        if self._late_skips:
            note = (f"AM fell back to plain attention in {self._late_skips} calls: "
                    "another attn1 patch changed the tokens after FAM's")
        elif lost:
            note = (f"AM did not run in {lost} of {self._fetched} calls: another "
                    "extension replaced the attention of the AM layers after FAM")
        elif self._taken_calls:
            note = (f"AM did not run in {self._taken_calls} of "
                    f"{self._taken_calls + self._fetched} calls: another extension replaced "
                    "the attention of the AM layers before FAM")
        elif run.params.am_active and not self.paused and self.steps and not self.hires_calls:
            note = f"AM did not run: another extension replaced {self.host}'s UNet function wrapper"
        else:
            return {**super().report(), **self._controlnet_report()}
        return {"FAM note": note, **self._controlnet_report()}

    def _controlnet_report(self) -> dict[str, str]:
        if not self.controlnet_calls:
            return {}
        return {"FAM ControlNet": "native-size control from the high-res units"}

    # ---- FAM's functions on the clone ---------------------------------------------------
    def _attn1_patch(self):
        def attn1_patch(n, context, value, extra_options):
            layer = self._layer_of(extra_options)
            if layer is None or not self.in_unet_call:
                return n, context, value
            if self.run.phase == HIRES and layer.name in self._taken:
                self._taken_calls += 1
            else:
                ctx = self.run.on_attn1(layer.name, n)
                self._pending = (layer.name, ctx, n.shape[0])
                self._fetched += ctx is not None
            return n, context, value
        return _mark(attn1_patch, self)

    def _attn1_replace(self, layer: AttnLayer):
        def attn1_replace(q, k, v, extra_options):
            pending, self._pending = self._pending, None
            heads = int(extra_options.get("n_heads") or layer.heads)
            name, ctx, rows = pending if pending is not None else (None, None, 0)
            if ctx is not None and name == layer.name:
                tokens = ctx.hires_hw[0] * ctx.hires_hw[1]
                if q.shape[:2] == k.shape[:2] == v.shape[:2] == (rows, tokens):
                    self._applied += 1
                    return am_projected_attention(q, k, v, heads, layer.module, ctx)
                self._late_skips += 1
            return self.attention(q, k, v, heads)
        return _mark(attn1_replace, self)

    def _unet_wrapper(self, previous):
        def unet_wrapper(apply_model, args):
            if self.paused or self.run.phase not in (NATIVE, HIRES):
                return _through(previous, apply_model, args)
            return self._unet_call(_Inputs(previous, apply_model, args))
        unet_wrapper.previous = previous
        return _mark(unet_wrapper, self)

    def _cfg_done(self):
        """First of the post-CFG functions: UNet batches from here to the next step are
        other extensions' (SelfAttentionGuidance's blurred uncond batch, PerturbedAttention-
        Guidance's cond batch)."""
        def cfg_done(args):
            self._after_cfg = True
            return args["denoised"]
        return _mark(cfg_done, self)

    def _layer_of(self, extra_options: Mapping[str, Any]) -> AttnLayer | None:
        block = extra_options.get("block")
        if not block:
            return None
        return self._by_key.get((block[0], block[1], extra_options.get("block_index", 0)))

    # ---- per UNet batch -------------------------------------------------------------------
    def _unet_call(self, inputs: _Inputs):
        x, t = inputs.args["input"], inputs.args["timestep"]
        kinds = inputs.args.get("cond_or_uncond") or ()
        if self._after_cfg:
            if self.run.phase == NATIVE:   # not the native image's features: not recorded
                return _through(inputs.previous, inputs.apply_model, inputs.args)
            roles = self._roles_by_prompt(inputs.args, len(kinds))
        else:
            roles = self._roles(inputs.args, x.shape[0])
            self._keep_chunks(inputs.args, roles, len(kinds))
        # the CFG call's σ when the host gave it, else one read (the UNet always gets σ)
        sigma = self.sigma if self.sigma is not None else float(t.flatten()[0])
        self.open_call(sigma, roles, x, inputs)
        return self.inside(_through, inputs.previous, inputs.apply_model, inputs.args)

    def _roles(self, args: Mapping[str, Any], rows: int) -> list[Role]:
        """Row roles of one UNet batch; AND parts are counted through the CFG step."""
        kinds = args.get("cond_or_uncond") or ()
        roles = chunk_roles(kinds, rows, self._part)
        self._part += sum(1 for k in kinds if k == 0)
        return roles

    def _keep_chunks(self, args: Mapping[str, Any], roles: Sequence[Role], chunks: int) -> None:
        """The prompt of each chunk of this step's CFG batches, with its rows' roles."""
        prompts = args.get("c", {}).get("c_crossattn")
        if self.run.phase != HIRES or not isinstance(prompts, torch.Tensor) or not roles:
            return
        b = len(roles) // chunks
        for i, chunk in enumerate(prompts.split(b)):
            self._step_chunks.append((chunk, list(roles[i * b:(i + 1) * b])))

    def _roles_by_prompt(self, args: Mapping[str, Any], chunks: int) -> list[Role]:
        """Roles of a batch another extension runs after the step's CFG: each chunk takes
        the roles of the CFG chunk with the same prompt (SelfAttentionGuidance hands its
        uncond prompt over as a cond); a chunk whose prompt matches none gets no roles, and
        FAM skips that call, visibly."""
        prompts = args.get("c", {}).get("c_crossattn")
        if not isinstance(prompts, torch.Tensor) or not chunks or prompts.shape[0] % chunks:
            return []
        roles = []
        for chunk in prompts.split(prompts.shape[0] // chunks):
            match = next((r for c, r in self._step_chunks
                          if c.shape == chunk.shape and torch.equal(c, chunk)), None)
            if match is None:
                return []
            roles += match
        return roles

    def inside(self, fn: Callable, *args, **kwargs):
        self._pending = None
        try:
            return super().inside(fn, *args, **kwargs)
        finally:
            self._pending = None

    def _replay_native(self, call: NativeCall, current: _Current) -> None:
        """Through the model of the current high-res call, below FAM's wrapper. The native
        call's ControlNet residuals were used up by it: the high-res call's units make them
        again at the native size."""
        args = dict(call.inputs.args)
        c = {k: v for k, v in args["c"].items() if k not in ("control", "control_model")}
        control = self._control(current.inputs.args, args["input"], args["timestep"], args, c)
        if control is not None:
            c["control"] = control
        args["c"] = c
        self.inside(_through, call.inputs.previous, current.inputs.apply_model, args)

    def _replay_reference(self, z: torch.Tensor, sigma: float, current: _Current) -> None:
        kwargs = self._native_kwargs(current.inputs, z)
        self.inside(current.inputs.apply_model, z, current.inputs.args["timestep"], **kwargs)

    def _native_kwargs(self, inputs: _Inputs, z: torch.Tensor) -> dict:
        """UNet kwargs of the batch `inputs` for its rows at z's native size (SDXL's `y`
        saying that size, ControlNet residuals its units make at that size)."""
        kwargs = native_kwargs(inputs.args["c"], z.shape[-2:])
        if self.native_vector is not None and isinstance(kwargs.get("y"), torch.Tensor):
            h, w = (LATENT_FACTOR * n for n in z.shape[-2:])
            kwargs["y"] = self.native_vector(kwargs["y"], h, w)
        control = self._control(inputs.args, z, inputs.args["timestep"], inputs.args, kwargs)
        if control is not None:
            kwargs["control"] = control
        return kwargs

    def _control(self, units: Mapping[str, Any], x, t, args: Mapping[str, Any], cond) -> Any:
        """Residuals of the ControlNet units of the batch `units` for the rows of the batch
        `args` at x's size."""
        chunks = len(args.get("cond_or_uncond") or ()) or 1
        control = native_control(units["c"], x, t, chunks, cond)
        self.controlnet_calls += control is not None
        return control
