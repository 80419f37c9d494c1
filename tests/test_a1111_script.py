"""scripts/fam_diffusion.py in a miniature A1111 (`a1111_like.MiniWebUI`): the script's hooks
called in the WebUI's order around `p.sample`, on tiny ldm-named UNets."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from a1111_like import ROOT, MiniWebUI, sd_model
from fam.hosts import a1111
from fam.hosts.webui_args import FamRequestError
from fam.params import FamParams
from ldm_like import sd1_like, sd1_without_top_attention, sdxl_like

FAM = [{"enabled": True}]


@pytest.fixture(scope="module")
def web():
    return MiniWebUI()


@pytest.fixture(autouse=True)
def fresh_log(web):
    web.logged.clear()
    web.encodes = 0


@pytest.fixture(scope="module")
def model():
    return sd_model(sd1_like())


@pytest.fixture(scope="module")
def big_model():
    """For img2img above 512² (FAM's SD1 native size): no attention at full latent size."""
    return sd_model(sd1_without_top_attention())


def forwards(model):
    return {n: m.__dict__.get("forward") for n, m in model.model.diffusion_model.named_modules()}


def assert_left_as_found(p, model):
    assert not {"sample", "sample_hr_pass", "_fam_generation"} & set(p.__dict__)
    assert all(v is None for v in forwards(model).values())


def image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def fam_settings(p):
    return {k: v for k, v in p.extra_generation_params.items() if k.startswith("FAM")}


# ---- UI, XYZ --------------------------------------------------------------------------------
def test_ui_gives_every_setting_in_params_order_and_no_side_effects(web):
    script = web.Script()
    first, again = script.ui(False), script.ui(True)
    assert len(first) == len(again) == len(FamParams.names())
    labels = [c.label for c in first[1:]]
    assert labels[:2] == ["Frequency Modulation", "FM cutoff c"]
    assert [c.value for c in first[1:]] == FamParams().to_positional()[1:]
    assert len(script.infotext_fields) == len(FamParams.names())
    assert sum(o.label.startswith("[FAM]") for o in web.xyz.axis_options) == len(FamParams.names())
    web.script_module.add_xyz_axes()                # on_before_ui runs it again: no duplicates
    assert sum(o.label.startswith("[FAM]") for o in web.xyz.axis_options) == len(FamParams.names())


ADVANCED = {"record_budget_mb", "record_offload"}   # engine internals, not what a user tunes


@pytest.mark.parametrize("is_img2img", [False, True])
def test_record_settings_sit_in_a_collapsed_advanced_group(web, is_img2img):
    controls = dict(zip(FamParams.names(), web.Script().ui(is_img2img)))
    for name, control in list(controls.items())[1:]:
        assert control.parents[0].kind == "InputAccordion", name     # inside the FAM accordion
        groups = [b for b in control.parents if b.kind == "Accordion"]
        if name in ADVANCED:
            assert [(g.label, g.open) for g in groups] == [("Advanced", False)], name
            assert groups[0].elem_id.endswith("fam_diffusion_advanced")
        else:
            assert groups == [], name


# ---- txt2img --------------------------------------------------------------------------------
def test_hires_fix_with_fam_and_p_left_as_found(web, model):
    plain = web.process_images(web.txt2img(model)).samples[0]
    p = web.txt2img(model, FAM)
    out = web.process_images(p)
    assert_left_as_found(p, model)
    assert out.samples[0].shape == (1, 4, 16, 16) and not torch.equal(out.samples[0], plain)
    assert out.infotexts[0]["FAM"] is True and "FAM AM skipped" not in out.infotexts[0]
    assert p.denoising_strength == 1.0 and not web.logged
    again = web.process_images(web.txt2img(model))  # a plain generation after FAM is unchanged
    assert torch.equal(again.samples[0], plain)


def test_fam_reference_is_the_bicubic_first_pass_latent(web, model, monkeypatch):
    """Hires upscaler "Latent" is bilinear; FAM's z̃₀ is bicubic (docs/method.md §1 step 2)."""
    seen = []
    guide = a1111.A1111Generation.guide_hires

    def spy(self, p, sampler, z0, eps, vp, reference=None, native_hw=None):
        seen.append((z0.clone(), self.first_pass_latent, eps))
        return guide(self, p, sampler, z0, eps, vp, reference, native_hw)

    monkeypatch.setattr(a1111.A1111Generation, "guide_hires", spy)
    web.process_images(web.txt2img(model, FAM))
    z0, native, eps = seen[0]
    assert native.shape[-2:] == (8, 8) and z0.shape == eps.shape == (1, 4, 16, 16)
    torch.testing.assert_close(z0, F.interpolate(native, size=(16, 16), mode="bicubic"))


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "UniPC"])
def test_samplers_guided_without_skips(web, model, sampler):
    out = web.process_images(web.txt2img(model, FAM, sampler_name=sampler))
    assert "FAM AM skipped" not in out.infotexts[0] and not web.logged


def test_two_process_images_on_one_p(web, model):
    """Loopback, SD upscale and img2img Batch run process_images on one p."""
    p = web.txt2img(model, FAM)
    first = web.process_images(p)
    assert_left_as_found(p, model)
    second = web.process_images(p)
    assert_left_as_found(p, model)
    fresh = web.process_images(web.txt2img(model, FAM))
    assert torch.equal(first.samples[0], second.samples[0])
    assert torch.equal(second.samples[0], fresh.samples[0]) and not web.logged


def test_img2img_batch_of_two_images_on_one_p(web, big_model):
    """As img2img's Batch tab and SD upscale do: new init images, same p, process_images again."""
    p = web.img2img(big_model, FAM, init_images=[image(1)], width=520, height=520)
    outs = []
    for im in (image(1), image(2)):
        p.init_images = [im]
        outs.append(web.process_images(p))
        assert_left_as_found(p, big_model)
    assert not torch.equal(outs[0].samples[0], outs[1].samples[0])
    assert outs[1].infotexts[0]["FAM AM path"] == "recompute" and not web.logged
    alone = web.process_images(web.img2img(big_model, FAM, init_images=[image(2)], width=520, height=520))
    assert torch.equal(alone.samples[0], outs[1].samples[0])


def test_an_exception_in_the_first_pass_leaves_nothing_behind(web, model):
    unet = model.model.diffusion_model
    calls = {"n": 0}

    def failing(x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return type(unet).forward(unet, x, *args, **kwargs)

    p = web.txt2img(model, FAM)
    unet.forward = failing
    try:
        with pytest.raises(RuntimeError, match="boom"):
            web.process_images(p)
    finally:
        del unet.forward
    assert_left_as_found(p, model)
    assert torch.equal(web.process_images(p).samples[0],
                       web.process_images(web.txt2img(model, FAM)).samples[0])


def test_interrupt_between_the_passes(web, model):
    p = web.txt2img(model, FAM, n_iter=2, interrupt_after_first_pass=True)
    out = web.process_images(p)
    assert len(out.samples) == 1 and out.samples[0].shape[-2:] == (8, 8)
    assert set(fam_settings(p)) == set(FamParams(enabled=True).to_infotext())
    assert_left_as_found(p, model)
    assert not web.logged


def test_batch_count_two_each_batch_reports_its_own(web, model):
    """Batch 1's first pass switches to a refiner, batch 2's does not: the second image's
    infotext must not carry the first one's notes."""
    refiner = sdxl_like()
    p = web.txt2img(model, FAM, n_iter=2)
    p.cfg_kw_for = lambda q: (dict(refiner_at=2, refiner=refiner)
                              if q.iteration == 0 and not q.is_hr_pass else {})
    out = web.process_images(p)
    assert "FAM note" in out.infotexts[0] and "FAM AM skipped" in out.infotexts[0]
    assert "FAM note" not in out.infotexts[1] and "FAM AM skipped" not in out.infotexts[1]
    assert_left_as_found(p, model)


def test_the_hook_may_run_twice_for_one_pass(web, model, monkeypatch):
    """Forge main calls process_before_every_sampling twice in the hires pass."""
    once = web.process_images(web.txt2img(model, FAM)).samples[0]
    runner_cls = type(web.txt2img(model).scripts)
    hook = runner_cls.process_before_every_sampling

    def twice(self, p, **kw):
        hook(self, p, **kw)
        if p.is_hr_pass:
            hook(self, p, **kw)

    monkeypatch.setattr(runner_cls, "process_before_every_sampling", twice)
    assert torch.equal(web.process_images(web.txt2img(model, FAM)).samples[0], once)


def test_hires_checkpoint_on_the_recompute_path(web, model):
    """The first-pass model is moved away; replays run on the hires checkpoint."""
    hires = sd_model(sd1_like(seed=1), title="other.safetensors")
    p = web.txt2img(model, [{"enabled": True, "record_budget_mb": 0}], hr_model=hires)
    unet = model.model.diffusion_model
    p.after_first_pass = lambda: setattr(unet, "forward", lambda *a: pytest.fail("old model ran"))
    try:
        out = web.process_images(p)
    finally:
        unet.__dict__.pop("forward", None)
    info = out.infotexts[0]
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info
    assert_left_as_found(p, hires)
    assert not web.logged


# ---- the ✨ upscale button --------------------------------------------------------------------
@pytest.mark.parametrize("upscaler, encodes", [("Latent", 1), ("Lanczos", 2)])
def test_upscale_button_reference_and_the_global_rng(web, model, upscaler, encodes):
    args = dict(firstpass_image=image(3), hr_upscaler=upscaler)
    plain = web.process_images(web.txt2img(model, **args))
    plain_rng, plain_encodes = torch.random.get_rng_state(), web.encodes
    web.encodes = 0
    out = web.process_images(web.txt2img(model, FAM, **args))
    assert web.encodes == encodes and plain_encodes == 1
    assert torch.equal(torch.random.get_rng_state(), plain_rng)   # FAM's encode forks the RNG
    assert not torch.equal(out.samples[0], plain.samples[0])
    assert out.infotexts[0]["FAM AM path"] == "recompute" and "FAM AM skipped" not in out.infotexts[0]


# ---- img2img --------------------------------------------------------------------------------
def test_img2img_batch_of_two_images(web, big_model):
    p = web.img2img(big_model, FAM, init_images=[image(1), image(2)], batch_size=2,
                    width=520, height=520)
    out = web.process_images(p)
    assert out.samples[0].shape == (2, 4, 65, 65) and "FAM AM skipped" not in out.infotexts[0]
    assert web.encodes == 2 and not web.logged            # the WebUI's and FAM's reference
    assert_left_as_found(p, big_model)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_img2img_without_am_encodes_no_reference(web, big_model, lam):
    settings = [{"enabled": True, "am_lambda": lam}]
    out = web.process_images(web.img2img(big_model, settings, init_images=[image(1)],
                                         width=520, height=520))
    assert web.encodes == (1 if lam == 0 else 2)
    assert ("FAM AM path" in out.infotexts[0]) == (lam > 0)


# ---- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make, args, match", [
    ("txt2img", [{"enabled": True, "am_lambda": 2}], "'am_lambda' = 2"),
    ("txt2img", [True, True, "wide"], "'fm_cutoff'"),
    ("txt2img", [{"enabled": True, "am_blocks": "0,1"}], r"AM blocks \[0, 1\] have no self-attention"),
    ("txt2img", [{"enabled": True, "am_blocks": "²"}], "'am_blocks' = '²'"),
    ("txt2img", [{"enabled": True, "record_budget_mb": 10**400}], "'record_budget_mb'"),
    ("txt2img", [True, True, float("nan")], "'fm_cutoff' = nan"),
    ("txt2img", [{"enabled": True, 7: 0.5}], "FAM setting '7'"),
    ("no_hires", FAM, "enable Hires. fix"),
    ("img2img_small", FAM, "larger than the model's native size 512x512"),
    ("img2img_mask", FAM, "does not inpaint"),
    ("other_hires_model", FAM, "tiny-xl.safetensors has a different architecture"),
])
def test_errors_stop_the_generation_with_a_request_error(web, model, big_model, make, args, match):
    p = {"txt2img": lambda: web.txt2img(model, args),
         "no_hires": lambda: web.txt2img(model, args, enable_hr=False),
         "img2img_small": lambda: web.img2img(big_model, args, init_images=[image()], width=512, height=512),
         "img2img_mask": lambda: web.img2img(big_model, args, init_images=[image()], width=520,
                                             height=520, image_mask=image()),
         "other_hires_model": lambda: web.txt2img(
             model, args, hr_model=sd_model(sdxl_like(), title="tiny-xl.safetensors")),
         }[make]()
    with pytest.raises(FamRequestError, match=match) as e:
        web.process_images(p)
    assert e.value.status_code == 422 and not web.logged   # no hook raised: nothing logged
    assert_left_as_found(p, p.sd_model)
    assert_left_as_found(p, model)


def test_any_decoding_failure_stops_the_generation_with_a_request_error(web, model, monkeypatch):
    """The script runner swallows what `process` raises: a failure no check foresaw must
    still reach the user, as the request's error."""
    monkeypatch.setattr(FamParams, "from_dict", classmethod(lambda cls, d: {}["unforeseen"]))
    p = web.txt2img(model, FAM)
    with pytest.raises(FamRequestError, match="could not be read"):
        web.process_images(p)
    assert not web.logged
    assert_left_as_found(p, model)


def test_a_malformed_pasted_infotext_leaves_those_controls_unchanged(web, capsys):
    """A1111's paste: the `on_infotext_pasted` callbacks, then each paste field's function;
    an exception in one would be logged with a traceback. The API's `infotext` field runs
    the functions without the callbacks: there a malformed entry is a 422 naming it."""
    script = web.Script()
    script.ui(False)
    entries = {"FAM": "True", "FAM FM cutoff": "0.25", "FAM AM lambda": "1e400", "FAM AM blocks": "３"}
    api = [fn for _, fn in script.infotext_fields]
    with pytest.raises(FamRequestError, match="'am_lambda' = inf is invalid"):
        [fn(entries) for fn in api]
    pasted = dict(entries)
    for callback in web.infotext_pasted:
        callback("a lighthouse\nSteps: 4, FAM: True", pasted)
    values = dict(zip(FamParams.names(), (fn(pasted) for fn in api)))
    assert values == {**dict.fromkeys(FamParams.names()), "enabled": True, "fm_cutoff": 0.25}
    log = capsys.readouterr().out
    assert "Traceback" not in log and len(log.splitlines()) == 2
    assert "'FAM AM lambda'" in log and "'FAM AM blocks'" in log and "digits 0-9" in log


def test_request_errors_are_quiet_fastapi_errors():
    """The WebUI API prints a traceback for every exception but FastAPI's HTTPException:
    with FastAPI present, a FAM request error is one, and keeps its 422 body."""
    code = textwrap.dedent("""
        import sys, types
        fastapi = types.ModuleType("fastapi")
        class HTTPException(Exception):
            def __init__(self, status_code, detail=None, headers=None):
                self.status_code, self.detail, self.headers = status_code, detail, headers
            def __str__(self):
                return f"{self.status_code}: {self.detail}"
        fastapi.HTTPException = HTTPException
        sys.modules["fastapi"] = fastapi
        from fam.hosts.webui_args import FamRequestError, decode_args
        try:
            decode_args([{"am_lambda": 2}])
        except Exception as e:
            assert isinstance(e, HTTPException) and isinstance(e, FamRequestError), type(e).__mro__
            assert vars(e)["status_code"] == 422 and vars(e)["detail"] == str(e)
            assert str(e).startswith("FAM setting 'am_lambda' = 2 is invalid"), str(e)
            assert type(e).__name__ == "FamRequestError"
            print("quiet")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "quiet", r.stderr


def test_live_suite_imports_with_only_pytest(tmp_path):
    """tests/live runs in the WebUI's own Python: collecting it must need nothing
    but pytest (torch, diffusers, hypothesis and the project itself blocked here)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        BLOCKED = {"torch", "diffusers", "hypothesis", "fam", "transformers", "safetensors"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked: not in the WebUI's test deps")
        sys.meta_path.insert(0, Block())
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FAM_A1111_URL": ""}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/live", "-p", "no:hypothesispytest"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "skipped" in r.stdout, r.stdout + r.stderr
