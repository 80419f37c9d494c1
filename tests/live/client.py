"""A small client for a running WebUI's API (A1111 or a Forge), for the live tests."""

import base64
import functools
import io
import json
import urllib.error
import urllib.request

import pytest

TITLE = "FAM Diffusion"


class WebUI:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, path, body=None, timeout=3600):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    @functools.cached_property
    def txt2img_fields(self) -> set:
        """The txt2img request's fields on this WebUI (Forge main has Hires CFG and modules,
        Forge Classic has neither and refuses them)."""
        status, schema = self.call("/openapi.json")
        assert status == 200, schema
        return set(schema["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"])

    @functools.cached_property
    def latent_upscaler(self) -> str:
        """A latent Hires upscaler this WebUI has without downloading anything: "Latent",
        or ersatzForge's "Latent (antialiased)" where plain "Latent" is gone."""
        status, modes = self.call("/sdapi/v1/latent-upscale-modes")
        assert status == 200, modes
        names = [m["name"] for m in modes]
        return next(n for n in ("Latent", "Latent (antialiased)", *names) if n in names)

    def generate(self, path="/sdapi/v1/txt2img", **body):
        status, r = self.call(path, body)
        assert status == 200, r
        return r


def fam(**settings):
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, **settings}]}}}


def pixels(r):
    Image = pytest.importorskip("PIL.Image")
    return [Image.open(io.BytesIO(base64.b64decode(i))) for i in r["images"]]


def same_pixels(a, b):
    return [im.tobytes() for im in pixels(a)] == [im.tobytes() for im in pixels(b)]


def infotext(r, i=0):
    return json.loads(r["info"])["infotexts"][i]


def settings(text):
    """FAM's entries of an infotext's parameter line."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]   # ersatzForge ends it with a newline
    return dict(kv.split(": ", 1) for kv in last.split(", ") if kv.startswith("FAM"))
