"""FAM beside multidiffusion-upscaler (Tiled VAE, Tiled Diffusion, DemoFusion), live, on every
WebUI whose URL is set that lists those scripts. Tiled VAE works; the tiled denoisers are
refused before sampling with a 422 naming them."""

import pytest

from combos import check, family, hint, plain_unchanged, refused, webui  # noqa: F401

TXT, IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
# enabled, encoder tile, decoder tile (16 latent px: a 512² decode is cut into 3 x 3), VAE to
# GPU, fast decoder, fast encoder, colour fix
TILED_VAE = [True, 256, 16, False, False, False, False]


def tiled_diffusion(method):
    """Its API args, tiles small enough that a 256² first pass is cut into several."""
    return [True, method, False, False, 1024, 1024, 16, 16, 8, 4, "None", 2, False, 10, 1, 1,
            64, False, False, False, False]


DEMOFUSION = [True, "DemoFusion", False, 16, 8, 4, 2.0, False, 10, 1, 1, 64, False, True,
              3, 1, 1, True, 0.85, 0.6, 4, False]


def test_tiled_vae_with_fam(webui, family):
    webui.need_script("tiled vae")
    tiled = {"Tiled VAE": TILED_VAE}
    size = {"width": 256, "height": 256}
    r = plain_unchanged(webui, TXT, webui.body(family, scripts=tiled, **size),
                        webui.body(family, fam_args={}, scripts=tiled, **size))
    check(r, 512)


@pytest.mark.parametrize("path", [TXT, IMG])
@pytest.mark.parametrize("method", ["MultiDiffusion", "Mixture of Diffusers"])
def test_tiled_diffusion_is_refused(webui, method, path):
    webui.need_script("tiled diffusion", path.rsplit("/", 1)[1])
    td = {"Tiled Diffusion": tiled_diffusion(method)}
    if path == TXT:
        b = webui.body("sd1", fam_args={}, scripts=td, width=256, height=256)
    else:
        b = webui.img2img_body("sd1", hint(256), fam_args={}, scripts=td)
    refused(webui, path, b, "Tiled Diffusion")


def test_demofusion_is_refused(webui):
    webui.need_script("demofusion")
    b = webui.body("sd1", fam_args={}, scripts={"demofusion": DEMOFUSION}, width=256, height=256)
    refused(webui, TXT, b, "DemoFusion")
