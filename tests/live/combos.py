"""What the live tests of FAM beside other extensions share: the WebUIs to run against (one
per URL set: FAM_A1111_URL, FAM_FORGE_URL), what each has installed — read from its API, so a
test skips only what a server lacks — and the checks every combination makes.

Jobs are small (128² first pass, x2 Latent Hires fix, 2 + 2 steps) so tiny random models on a
CPU finish in seconds; SD1 and SDXL are the first checkpoints whose names say so (shortest
name wins: "tiny-sdxl" before "tiny-sdxl-b"), or FAM_LIVE_SD1 / FAM_LIVE_SDXL."""

import base64
import functools
import io
import json
import os

import pytest

from client import TITLE, WebUI, infotext, pixels, same_pixels, settings

URLS = {"a1111": "FAM_A1111_URL", "forge": "FAM_FORGE_URL"}
PROMPT = "a lighthouse on a cliff"
FIRST = 128                                        # first pass side, any size works in txt2img
NATIVE = {"sd1": 512, "sdxl": 1024}                # FAM's native size per family
FAMILY_WORDS = {"sd1": ("sd1", "sd15", "v1-5", "1.5"), "sdxl": ("sdxl", "xl")}
ODD_KINDS = ("refiner", "vpred", "ztsnr", "inpaint", "sd2", "turbo", "lightning")


def family_of(name: str) -> str | None:
    low = name.lower()
    if any(w in low for w in FAMILY_WORDS["sdxl"]):
        return "sdxl"
    return "sd1" if any(w in low for w in FAMILY_WORDS["sd1"]) else None


class Host(WebUI):
    """One running WebUI and what it has installed."""

    def __init__(self, kind: str, url: str):
        super().__init__(url)
        self.kind = kind

    def __repr__(self):
        return f"{self.kind}({self.url})"

    def get(self, path):
        status, r = self.call(path)
        return r if status == 200 else None

    @functools.cached_property
    def scripts(self) -> dict[str, set]:
        """Script titles (lower case) per tab, as /sdapi/v1/scripts lists them."""
        r = self.get("/sdapi/v1/scripts") or {}
        return {tab: {t.lower() for t in r.get(tab, [])} for tab in ("txt2img", "img2img")}

    def need_script(self, title: str, tab: str = "txt2img") -> str:
        """The server's title for a script: `title`, or one that adds words to it (forks add
        or drop suffixes such as " (SD 1.x, SD 2.x, SDXL)"); skips when there is none."""
        low = title.lower()
        found = sorted(t for t in self.scripts[tab] if t == low or t.startswith(low + " "))
        if not found:
            pytest.skip(f"{self} has no {title!r} script ({tab})")
        return found[0]

    @functools.cached_property
    def options(self) -> dict:
        return self.get("/sdapi/v1/options") or {}

    @functools.cached_property
    def checkpoints(self) -> list[str]:
        return [m["model_name"] for m in self.get("/sdapi/v1/sd-models") or []]

    def checkpoint(self, family: str) -> str:
        """The family's plain base checkpoint (no refiner, v-pred, inpaint … variant)."""
        forced = os.environ.get(f"FAM_LIVE_{family.upper()}")
        names = [forced] if forced else sorted(
            (n for n in self.checkpoints if family_of(n) == family
             and not any(k in n.lower() for k in ODD_KINDS)), key=len)
        if not names:
            pytest.skip(f"{self} lists no {family} checkpoint: {self.checkpoints}")
        return names[0]

    def refiner(self) -> str:
        names = sorted((n for n in self.checkpoints if "refiner" in n.lower()), key=len)
        if not names or "refiner_checkpoint" not in self.txt2img_fields:
            pytest.skip(f"{self} has no refiner checkpoint or no refiner fields")
        return names[0]

    def loras(self, family: str, count: int = 1) -> list[str]:
        names = sorted(l["name"] for l in self.get("/sdapi/v1/loras") or []
                       if family_of(l["name"]) == family)
        if len(names) < count:
            pytest.skip(f"{self} lists fewer than {count} {family} LoRAs: {names}")
        return names[:count]

    @functools.cached_property
    def _controlnet(self) -> tuple[list, list]:
        models = (self.get("/controlnet/model_list") or {}).get("model_list", [])
        modules = (self.get("/controlnet/module_list") or {}).get("module_list", [])
        return models, modules

    def controlnet(self, family: str) -> tuple[str, str]:
        """(model, preprocessor "none") for a family's ControlNet, as the server names them
        (Forge main needs the listed "name [hash]"; A1111 spells the module "none", Forge "None")."""
        models, modules = self._controlnet
        if "controlnet" not in self.scripts["txt2img"] or not models:
            pytest.skip(f"{self} has no ControlNet or no ControlNet model")
        fits = [m for m in models if family_of(m) == family]
        if not fits:
            pytest.skip(f"{self} lists no {family} ControlNet: {models}")
        module = next((m for m in modules if m.lower() == "none"), "none")
        return fits[0], module

    def body(self, family: str, *, fam_args: dict | None = None, scripts: dict | None = None,
             **over) -> dict:
        """A txt2img Hires fix request for the family's checkpoint; FAM on when fam_args is
        given; Forge main's Hires fields where this WebUI has them."""
        fields = self.txt2img_fields
        b = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "width": FIRST,
             "height": FIRST, "sampler_name": "Euler", "cfg_scale": 7, "seed": 7,
             "enable_hr": True, "hr_scale": 2, "hr_upscaler": self.latent_upscaler,
             "hr_second_pass_steps": 2, "denoising_strength": 0.7,
             "override_settings": self.model_settings(family),
             "override_settings_restore_afterwards": False}
        if "scheduler" in fields:
            b["scheduler"] = "Automatic"
        if "hr_additional_modules" in fields:
            b.update(hr_cfg=7, hr_additional_modules=["Use same choices"])
        b.update(over)
        return with_scripts(b, fam_args, scripts)

    def img2img_body(self, family: str, image: str, *, fam_args: dict | None = None,
                     scripts: dict | None = None, **over) -> dict:
        """An img2img FAM upscaling request: the target just above the native size."""
        side = NATIVE[family] + 64
        b = {"init_images": [image], "prompt": PROMPT, "negative_prompt": "blurry", "steps": 4,
             "width": side, "height": side, "sampler_name": "Euler", "cfg_scale": 7, "seed": 3,
             "denoising_strength": 0.5, "override_settings": self.model_settings(family),
             "override_settings_restore_afterwards": False, **over}
        return with_scripts(b, fam_args, scripts)

    def model_settings(self, family: str) -> dict:
        s = {"sd_model_checkpoint": self.checkpoint(family)}
        if "sd_noise_schedule" in self.options:     # A1111: a sticky ZTSNR would change every image
            s["sd_noise_schedule"] = "Default"
        return s

    def source(self, family: str, side: int = FIRST) -> str:
        """A picture made by the model itself (no Hires fix), base64."""
        r = self.generate(**self.body(family, enable_hr=False, width=side, height=side))
        return r["images"][0]


def with_scripts(body: dict, fam_args: dict | None, scripts: dict | None) -> dict:
    always = {k: {"args": v} for k, v in (scripts or {}).items()}
    if fam_args is not None:
        always[TITLE] = {"args": [{"enabled": True, **fam_args}]}
    if always:
        body["alwayson_scripts"] = always
    return body


def _hosts():
    found = [pytest.param(Host(kind, os.environ[var].rstrip("/")), id=kind)
             for kind, var in URLS.items() if os.environ.get(var)]
    return found or [pytest.param(None, id="no-url", marks=pytest.mark.skip(
        reason="neither FAM_A1111_URL nor FAM_FORGE_URL is set"))]


@pytest.fixture(params=_hosts(), scope="module")
def webui(request) -> Host:
    return request.param


@pytest.fixture(params=["sd1", "sdxl"], scope="module")
def family(request) -> str:
    """Module scope: pytest then runs a file's tests family by family (a switch is a load)."""
    return request.param


def hint(side: int, seed: int = 0) -> str:
    """A ControlNet hint: a gradient with a light disc, base64 PNG."""
    Image = pytest.importorskip("PIL.Image")
    ImageDraw = pytest.importorskip("PIL.ImageDraw")
    im = Image.new("RGB", (side, side))
    im.putdata([(x * 255 // side, y * 255 // side, (x + y + 40 * seed) % 256)
                for y in range(side) for x in range(side)])
    ImageDraw.Draw(im).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4],
                               fill=(240, 240, 240))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def check(r: dict, side: int, *, index: int = 0, images: slice = slice(None),
          note: str | None = None, skipped: str | None = None) -> dict:
    """The checks every FAM generation makes: the images' size, pixels that vary (a NaN
    generation decodes to one flat colour), FAM's infotext entries, no `FAM AM skipped` and
    no `FAM note` unless `skipped` / `note` (a part of each) is expected. Returns FAM's
    entries."""
    for im in pixels(r)[images]:
        assert im.size == (side, side)
        assert any(lo < hi for lo, hi in im.getextrema()), "a flat image (NaN?)"
    text = infotext(r, index)
    info = settings(text)
    assert info.get("FAM") == "True" and "FAM AM lambda" in info, text
    assert "AM did not run" not in text, text
    for key, part in (("FAM note", note), ("FAM AM skipped", skipped)):
        assert (key not in info) if part is None else (part in info.get(key, "")), text
    return info


def refused(host: Host, path: str, body: dict, name: str) -> str:
    """A request FAM refuses before sampling: 422 naming the conflict, no traceback."""
    status, r = host.call(path, body)
    assert status == 422, r
    assert name in r["detail"] and "Traceback" not in json.dumps(r), r
    return r["detail"]


def plain_unchanged(host: Host, path: str, plain: dict, with_fam: dict) -> dict:
    """The plain request gives the same pixels before and after the FAM one (nothing of
    FAM's is left on the UNet or on the other extension's hooks). A warm-up plain call comes
    first: A1111's first img2img after a txt2img differs even without FAM. Returns the FAM
    response."""
    host.generate(path, **plain)
    before = host.generate(path, **plain)
    r = host.generate(path, **with_fam)
    assert same_pixels(before, host.generate(path, **plain))
    return r
