"""FAM beside other extensions in the miniature A1111 (`a1111_like`): stand-ins for
sd-webui-controlnet, Tiled Diffusion / Tiled VAE and ADetailer, each failing the way the
real one fails, in both load orders."""

import pytest
import torch
from PIL import Image

from a1111_like import ADetailerLike, ControlNetLike, TiledDiffusionLike, TiledVAELike
from fam.hosts.a1111 import resize_hint
from test_a1111_script import big_model, fresh_log, image, model, web  # noqa: F401 - same miniature

FAM = {"enabled": True}
RECOMPUTE = {"enabled": True, "record_budget_mb": 0}
SIZE = 520   # img2img above SD1's native 512²: native latent 64², target 65²


def fam_keys(info):
    return {k: v for k, v in info.items() if k.startswith("FAM")}


def left_as_found(model):
    return all("forward" not in m.__dict__ for m in model.model.diffusion_model.modules())


# ---- ControlNet ----------------------------------------------------------------------------
TILE = {"enabled": True, "module": "none"}                  # hint = the img2img input
OWN = {"enabled": True, "module": "none", "weight": 0.3}     # a unit with its own image


def img2img_cn(web, model, fam, units, fam_first=False):
    cn = ControlNetLike()
    p = web.img2img(model, [fam], init_images=[image(1)], width=SIZE, height=SIZE,
                    others=[(cn, units)], fam_first=fam_first)
    return cn, p


@pytest.mark.parametrize("fam_first", [False, True], ids=["controlnet first", "fam first"])
@pytest.mark.parametrize("units", [[TILE], [TILE, {**OWN, "image": image(7)}],
                                   [{**TILE, "uses_latent": True}]],
                         ids=["tile unit", "two units", "unit with a latent"])
def test_img2img_native_size_calls_get_native_size_hints(web, big_model, units, fam_first):
    cn, p = img2img_cn(web, big_model, FAM, units, fam_first)
    out = web.process_images(p)
    info = out.infotexts[0]
    assert not web.logged and "FAM AM skipped" not in info
    assert info["FAM AM path"] == "recompute"
    assert info["FAM ControlNet"] == "native-size hints in native-size calls"
    assert {hw for hw, _ in cn.log} == {(64, 64), (65, 65)}
    assert all(hint == (8 * hw[0], 8 * hw[1]) for hw, hint in cn.log)   # every call its size
    if units[0].get("uses_latent"):
        assert cn.encodes == 2   # once at the target size, once at the native size
    assert torch.isfinite(out.samples[0]).all() and left_as_found(big_model)


def test_controlnet_alone_repeats_exactly_after_a_fam_run(web, big_model):
    """With FAM off, ControlNet's images are bit-identical before and after a FAM run."""
    off = {"enabled": False}
    before = web.process_images(img2img_cn(web, big_model, off, [TILE])[1]).samples[0]
    web.process_images(img2img_cn(web, big_model, FAM, [TILE])[1])
    after = web.process_images(img2img_cn(web, big_model, off, [TILE])[1]).samples[0]
    assert torch.equal(before, after) and not web.logged and left_as_found(big_model)


def test_fields_hold_controlnet_objects_between_calls(web, big_model):
    cn, p = img2img_cn(web, big_model, FAM, [{**TILE, "uses_latent": True}])
    states = []
    unet = big_model.model.diffusion_model
    cls_forward = type(unet).forward

    def spy(self, x, *a, **k):
        hook = cn.latest_network
        if hook is not None and tuple(x.shape[-2:]) == (65, 65):   # a call of the WebUI's
            param = hook.control_params[0]
            states.append(param.used_hint_cond is param.hint_cond)
        return cls_forward(self, x, *a, **k)

    type(unet).forward = spy
    try:
        web.process_images(p)
    finally:
        type(unet).forward = cls_forward
    assert states and all(states)


@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
@pytest.mark.parametrize("hr_option", ["Both", "Low res only", "High res only"])
def test_txt2img_hires_controlnet_picks_by_size_itself(web, model, budget, hr_option):
    """txt2img with Hires. fix: ControlNet holds both hints and picks by size; FAM leaves
    them alone, and replays of the first pass see what it saw (hint and on/off)."""
    cn = ControlNetLike()
    p = web.txt2img(model, [{"enabled": True, "record_budget_mb": budget}],
                    others=[(cn, [{**OWN, "image": image(3), "hr_option": hr_option}])])
    info = web.process_images(p).infotexts[0]
    assert not web.logged and "FAM AM skipped" not in info and "FAM ControlNet" not in info
    native = {hint for hw, hint in cn.log if hw == (8, 8)}
    high = {hint for hw, hint in cn.log if hw == (16, 16)}
    assert native == ({None} if hr_option == "High res only" else {(64, 64)})
    assert high == ({None} if hr_option == "Low res only" else {(128, 128)})
    assert sum(hw == (8, 8) for hw, _ in cn.log) == (8 if budget == 0 else 4)   # + replays
    assert left_as_found(model)


def test_without_the_fix_controlnet_hints_make_am_skip(web, big_model, monkeypatch):
    """The stand-in fails as ControlNet does when FAM does not hand it native-size hints."""
    from fam.hosts import a1111
    monkeypatch.setattr(a1111, "native_hints", lambda p, unet: None)
    cn, p = img2img_cn(web, big_model, FAM, [TILE])
    info = web.process_images(p).infotexts[0]
    assert info["FAM AM skipped"].startswith("12 of 12 calls")


def test_inpaint_hint_keeps_a_binary_mask():
    g = torch.Generator().manual_seed(0)
    hint = torch.cat([torch.full((1, 3, 40, 40), 0.25),
                      (torch.rand(1, 1, 40, 40, generator=g) > 0.5).float()], 1)
    out = resize_hint(hint, (16, 24))
    assert out.shape == (1, 4, 16, 24)
    assert set(out[:, 3].unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out[:, :3], torch.full((1, 3, 16, 24), 0.25))


# ---- Tiled Diffusion / Tiled VAE -------------------------------------------------------------
@pytest.mark.parametrize("fam_first", [False, True], ids=["tiled first", "fam first"])
@pytest.mark.parametrize("make", ["txt2img", "img2img"])
def test_tiled_diffusion_is_refused_by_name_before_sampling(web, model, big_model, make, fam_first):
    tiled = TiledDiffusionLike()
    calls = []
    unet = (model if make == "txt2img" else big_model).model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        if make == "txt2img":
            p = web.txt2img(model, [FAM], others=[(tiled, [True])], fam_first=fam_first)
        else:
            p = web.img2img(big_model, [FAM], init_images=[image(1)], width=SIZE, height=SIZE,
                            others=[(tiled, [True])], fam_first=fam_first)
        with pytest.raises(Exception, match="Tiled Diffusion") as e:
            web.process_images(p)
    finally:
        handle.remove()
        tiled.postprocess(p, None)
    assert type(e.value).__name__ == "FamRequestError" and calls == []
    assert "Tiled VAE can stay on" in str(e.value)


def test_tiled_diffusion_off_and_tiled_vae_on_run(web, model):
    vae = TiledVAELike()
    p = web.txt2img(model, [FAM], others=[(TiledDiffusionLike(), [False]), (vae, [True])])
    info = web.process_images(p).infotexts[0]
    assert vae.enabled_in == [True] and not web.logged and "FAM AM skipped" not in info


# ---- ADetailer -------------------------------------------------------------------------------
@pytest.mark.parametrize("stems", [("dynamic_prompting",), ("dynamic_prompting", "fam_diffusion")],
                         ids=["default scripts", "FAM among its scripts"])
@pytest.mark.parametrize("batch_size, n_iter", [(1, 1), (2, 1), (1, 2)])
def test_adetailer_inpaint_passes_are_plain_and_the_image_keeps_its_fam_infotext(
        web, model, stems, batch_size, n_iter):
    ad = ADetailerLike(web, stems)
    p = web.txt2img(model, [RECOMPUTE], others=[(ad, [True])], batch_size=batch_size,
                    n_iter=n_iter)
    out = web.process_images(p)
    assert not web.logged
    assert len(ad.inner) == batch_size * n_iter
    for info in out.infotexts:
        assert info["FAM AM path"] == "recompute" and info["FAM"] is True
    for inner, processed in ad.inner:
        assert "sample" not in inner.__dict__ and "_fam_generation" not in inner.__dict__
        assert torch.isfinite(processed.samples[0]).all()
    assert left_as_found(model) and "sample" not in p.__dict__


def test_a_users_own_masked_img2img_is_still_refused(web, big_model):
    p = web.img2img(big_model, [FAM], init_images=[image(1)], width=SIZE, height=SIZE)
    p.image_mask = Image.new("L", (SIZE, SIZE), 255)
    with pytest.raises(Exception, match="does not inpaint"):
        web.process_images(p)


# ---- an extension that hands both passes one sampler -------------------------------------
@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
def test_one_sampler_object_for_both_passes_still_guides_the_hires_pass(web, model, budget):
    """Some extensions cache samplers by name (Tiled Diffusion's factory does): the high-res
    pass on the first pass's sampler object is still a FAM pass, wrapped once."""
    args = [{"enabled": True, "record_budget_mb": budget}]
    fresh = web.process_images(web.txt2img(model, args))
    p = web.txt2img(model, args)
    cache = {}
    make = p.create_sampler
    p.create_sampler = lambda name: cache.setdefault(name, make(name))
    cached = web.process_images(p)
    assert fam_keys(cached.infotexts[0]) == fam_keys(fresh.infotexts[0]) and not web.logged
    torch.testing.assert_close(cached.samples[0], fresh.samples[0])
    assert left_as_found(model)


def test_demofusion_is_refused_by_name(web, model):
    class DemoFusionLike(TiledDiffusionLike):
        filename = "tileglobal.py"

        def title(self):
            return "demofusion"

    demo = DemoFusionLike()
    p = web.txt2img(model, [FAM], others=[(demo, [True])])
    try:
        with pytest.raises(Exception, match="cannot run together with DemoFusion: it denoises"):
            web.process_images(p)
    finally:
        demo.postprocess(p, None)
    assert left_as_found(model)
