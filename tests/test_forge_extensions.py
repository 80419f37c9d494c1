"""FAM beside Forge's integrated extensions in the Forge miniature (`forge_like`): extra UNet
batches after the CFG (SelfAttentionGuidance, PerturbedAttentionGuidance) and the
extensions FAM's AM refuses to run beside, by name."""

import pytest
import torch

import forge_like
from fam.guidance import FamRun, NATIVE
from fam.hosts.webui_args import FamRequestError
from fam.record import Role
from test_a1111_script import fresh_log, web  # noqa: F401 - the same miniature WebUI
from test_forge_script import assert_left_as_found, base_state, fam_info, forge_model, run


@pytest.fixture
def calls(monkeypatch):
    """(phase, roles) of every FAM call the run opens (replays included)."""
    log = []
    begin = FamRun.begin_call

    def spy(self, sigma, roles, hw, *a, **k):
        log.append((self.phase, tuple(roles), tuple(hw)))
        return begin(self, sigma, roles, hw, *a, **k)

    monkeypatch.setattr(FamRun, "begin_call", spy)
    return log


CFG_ROLES = (Role(0, True), Role(0, False, 0))   # Forge runs the chunks from the back


@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
@pytest.mark.parametrize("kind, extra_roles", [("sag", (Role(0, True),)),
                                               ("pag", (Role(0, False, 0),))])
def test_batches_after_the_cfg_are_not_recorded_and_get_their_prompts_roles(
        web, calls, kind, extra_roles, budget):
    model = forge_model()
    state = base_state(model)
    ext = forge_like.PostCfgBatchLike(kind)
    p = forge_like.Txt2Img(web, model, [{"enabled": True, "record_budget_mb": budget}],
                           others=[(ext, [True])])
    out, info = run(web, p)
    assert not web.logged and torch.isfinite(out).all()
    assert "FAM AM skipped" not in info and "FAM note" not in info
    assert len(ext.batches) == 8                        # 4 first-pass + 4 hires steps
    native = [roles for phase, roles, hw in calls if phase == NATIVE]
    assert native == [CFG_ROLES] * 4                      # the extension's batches not recorded
    hires = [roles for phase, roles, hw in calls if hw == (16, 16)]
    assert hires == [CFG_ROLES, extra_roles] * 4         # its batch: the roles of its prompt
    assert_left_as_found(p, model, state)


def test_without_the_marker_the_extra_batches_pollute_the_record(web, calls, monkeypatch):
    """The stand-in fails the way SAG does when FAM cannot tell its batches apart."""
    from fam.hosts import patcher
    monkeypatch.setattr(patcher.PatcherHooks, "_cfg_done",
                        lambda self: patcher._mark(lambda args: args["denoised"], self))
    p = forge_like.Txt2Img(web, forge_model(), [{"enabled": True}],
                           others=[(forge_like.PostCfgBatchLike("sag"), [True])])
    run(web, p)
    native = [roles for phase, roles, hw in calls if phase == NATIVE]
    assert native != [CFG_ROLES] * 4


def test_a_cfg_function_replacing_the_mix_works_with_fam(web):
    """DynamicThresholding / LatentModifier replace the CFG mix: FAM's FM and AM run as
    without them, and their function shapes every step."""
    ext = forge_like.CfgFunctionLike()
    p = forge_like.Txt2Img(web, forge_model(), [{"enabled": True}], others=[(ext, [True])])
    out, info = run(web, p)
    plain, plain_info = run(web, forge_like.Txt2Img(web, forge_model(), [{"enabled": True}]))
    assert ext.calls == 8 and not web.logged and torch.isfinite(out).all()
    assert fam_info(info) == fam_info(plain_info) and "FAM AM skipped" not in info
    assert not torch.equal(out, plain)


REFUSED = [("Kohya HRFix Integrated", [True], "block"),
           ("StyleAlign Integrated", [True], "shares self-attention"),
           ("MultiDiffusion Integrated", [True], "tiles"),
           ("ControlNet", [{"enabled": True, "module": "reference_only"}], "reference_only"),
           ("ControlNet", [{"module": "reference_adain"}], "reference_adain")]   # API: on


@pytest.mark.parametrize("title, args, why", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_name_with_am_and_allowed_with_fm_alone(web, title, args, why):
    model = forge_model()
    state = base_state(model)
    ext = forge_like.IntegratedLike(title)
    p = forge_like.Txt2Img(web, model, [{"enabled": True}], others=[(ext, args)])
    with pytest.raises(FamRequestError, match=why) as e:
        run(web, p)
    assert title.split()[0] in str(e.value) and "set FAM AM off" in str(e.value)
    assert_left_as_found(p, model, state)
    p = forge_like.Txt2Img(web, model, [{"enabled": True, "am_enabled": False}],
                           others=[(ext, args)])
    out, info = run(web, p)
    assert fam_info(info)["FAM AM"] is False and torch.isfinite(out).all() and not web.logged


@pytest.mark.parametrize("title, args", [("Kohya HRFix Integrated", [False]),
                                         ("FreeU Integrated (SD 1.x, SD 2.x, SDXL)", [True]),
                                         ("ControlNet", [{"enabled": True, "module": "canny"}])])
def test_switched_off_or_harmless_extensions_are_not_refused(web, title, args):
    p = forge_like.Txt2Img(web, forge_model(), [{"enabled": True}],
                           others=[(forge_like.IntegratedLike(title), args)])
    out, info = run(web, p)
    assert "FAM AM skipped" not in info and not web.logged


# ---- ControlNet (Forge's built-in) -------------------------------------------------------------
def img2img_cn(web, fam, units, flavor="main"):
    from ldm_like import sd1_without_top_attention
    from test_a1111_script import image
    from test_forge import SIGMA_TABLE
    model = forge_like.sd_model(forge_like.forge_unet(sd1_without_top_attention()), SIGMA_TABLE)
    p = forge_like.Img2Img(web, model, [fam], init_images=[image(1)], width=520, height=520,
                           flavor=flavor, others=[(forge_like.ControlNetForgeLike(), units)])
    return model, p


TILE = {"enabled": True}


@pytest.mark.parametrize("flavor", ["main", "classic", "reforge"])
@pytest.mark.parametrize("units", [[TILE], [TILE, {"enabled": True, "weight": 0.2}]],
                         ids=["tile unit", "two units"])
def test_img2img_native_size_calls_get_native_size_control(web, flavor, units):
    model, p = img2img_cn(web, {"enabled": True}, units, flavor)
    state = base_state(model)
    out, info = run(web, p)
    k = model.forge_objects.unet.model
    assert not web.logged and not k.control_warnings and torch.isfinite(out).all()
    assert "FAM AM skipped" not in info
    assert info["FAM ControlNet"] == "native-size control from the high-res units"
    sizes = {hw for hw, _ in k.control_log}
    assert sizes == {(64, 64), (65, 65)}
    assert all(applied == hw for hw, applied in k.control_log)   # every call, its own size
    assert_left_as_found(p, model, state)


@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
def test_txt2img_replays_get_native_size_control(web, budget):
    from test_a1111_script import image
    model = forge_model()
    p = forge_like.Txt2Img(web, model, [{"enabled": True, "record_budget_mb": budget}],
                           others=[(forge_like.ControlNetForgeLike(), [{"enabled": True,
                                                                       "image": image(4)}])])
    out, info = run(web, p)
    k = model.forge_objects.unet.model
    assert not web.logged and not k.control_warnings and "FAM AM skipped" not in info
    assert all(applied == hw for hw, applied in k.control_log)
    replays = sum(1 for hw, _ in k.control_log if hw == (8, 8)) - 4
    assert replays == (4 if budget == 0 else 0)
    assert ("FAM ControlNet" in info) == (budget == 0)


def test_without_native_control_the_replays_run_without_it(web, monkeypatch):
    """The stand-in fails as Forge does: replays without residuals, silently."""
    from fam.hosts import patcher
    monkeypatch.setattr(patcher, "native_control", lambda *a: None)
    model, p = img2img_cn(web, {"enabled": True}, [TILE])
    run(web, p)
    assert (64, 64) in {hw for hw, applied in model.forge_objects.unet.model.control_log
                        if applied is None}


def test_controlnet_alone_repeats_exactly_after_a_fam_run(web):
    model, p = img2img_cn(web, {"enabled": False}, [TILE])
    before, _ = run(web, p)
    run(web, img2img_cn(web, {"enabled": True}, [TILE])[1])
    after, _ = run(web, img2img_cn(web, {"enabled": False}, [TILE])[1])
    assert torch.equal(before, after)


@pytest.mark.parametrize("kind, name", [("multidiffusion", "MultiDiffusion Integrated"),
                                        ("kohya", "Kohya HRFix Integrated"),
                                        ("stylealign", "StyleAlign Integrated")])
def test_refused_by_what_the_unet_carries_under_any_title(web, kind, name):
    """A fork that renames the extension: the patch on the UNet still names it."""
    model = forge_model()
    state = base_state(model)
    ext = forge_like.PatchingLike(kind)
    p = forge_like.Txt2Img(web, model, [{"enabled": True}], others=[(ext, [True])])
    with pytest.raises(FamRequestError, match=name):
        run(web, p)
    assert_left_as_found(p, model, state)
    out, info = run(web, forge_like.Txt2Img(web, model, [{"enabled": True, "am_enabled": False}],
                                            others=[(ext, [True])]))
    assert torch.isfinite(out).all() and not web.logged
