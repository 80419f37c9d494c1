"""Toy worlds, their structure metrics, training determinism and the shipped checkpoints."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from fam.toy import METHODS, WORLDS, load
from fam.toy.metrics import copy_agreement, round_disc, score, stripes, two_patches
from fam.toy.model import CHECKPOINTS, to_image, to_model


def disc(size, cy, cx, r, colour=(0.9, 0.4, 0.2), theta=None, period=3.0, theta2=None):
    """An anti-aliased disc, optionally striped (a second orientation on its right half)."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    alpha = np.clip(r - np.hypot(yy - cy, xx - cx) + 0.5, 0, 1)
    shade = np.ones_like(alpha)
    if theta is not None:
        th = np.where((xx > cx) & (theta2 is not None), theta2 if theta2 is not None else 0, theta)
        u = xx * np.cos(np.radians(th)) + yy * np.sin(np.radians(th))
        shade = 0.725 + 0.275 * np.cos(2 * np.pi * u / period)
    return (alpha * shade)[..., None] * np.asarray(colour)


def images(world, n, scale, seed=5):
    x = WORLDS[world].images(n, torch.Generator().manual_seed(seed), scale)
    return x.permute(0, 2, 3, 1).numpy()


def test_worlds_are_deterministic_and_magnify_exactly():
    for w in WORLDS.values():
        a = w.images(4, torch.Generator().manual_seed(1))
        b = w.images(4, torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
        assert 0 <= a.min() and a.max() <= 1
        assert w.images(2, torch.Generator().manual_seed(1), 3).shape == (2, 3, 96, 96)


def test_model_space_puts_the_background_at_zero():
    """The background is 0 in model space (the schedule's σ_max must not leave a readable
    image mean in the noise) and decoding inverts encoding."""
    x = WORLDS["disc"].images(8, torch.Generator().manual_seed(2))
    z = to_model(x)
    assert torch.equal(z[:, :, 0, 0], torch.zeros(8, 3))
    assert torch.allclose(to_image(z), x)


def test_stripes_are_horizontal_or_vertical_and_both_occur():
    angles = [stripes(img, round_disc(img))[2] for img in images("stripes", 40, 1)]
    near = [min((0, 90, 180), key=lambda a0: abs(a - a0)) % 180 for a in angles]
    assert all(min(abs(a - 0), abs(a - 90), abs(a - 180)) < 3 for a in angles), angles
    assert set(near) == {0, 90}


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_the_worlds_own_images_pass_every_metric(world, scale):
    """The ideal high-res image is the same scene magnified: it must pass everything."""
    native, hi = images(world, 40, 1), images(world, 40, scale)
    for h, n in zip(hi, native):
        assert all(score(world, h, n, scale).values()), score(world, h, n, scale)


def test_one_round_disc_rejects_duplicates_fusions_and_squares():
    one = disc(64, 30, 30, 14)
    assert round_disc(one) is not None
    assert round_disc(one + disc(64, 50, 52, 8)) is None            # two discs
    assert round_disc(np.clip(one + disc(64, 30, 44, 14), 0, 1)) is None   # fused pair
    square = np.zeros((64, 64, 3))
    square[16:44, 16:44] = 0.8
    assert round_disc(square) is None
    yy, xx = np.mgrid[:64, :64] + 0.5
    ellipse = ((yy - 32) / 10) ** 2 + ((xx - 32) / 18) ** 2 <= 1                # aspect 0.56
    assert round_disc(ellipse[..., None] * np.array([0.2, 0.9, 0.5])) is None
    assert round_disc(np.zeros((64, 64, 3))) is None
    speck = one.copy()
    speck[60:62, 2:4] = 0.9                                          # < 1 % of the image
    assert round_disc(speck) is not None


def test_matches_native_needs_the_native_layout():
    native = disc(32, 12, 14, 8)
    assert score("disc", disc(64, 24, 28, 16), native, 2)["matches_native"]
    assert not score("disc", disc(64, 40, 28, 16), native, 2)["matches_native"]   # moved
    assert not score("disc", disc(64, 24, 28, 24), native, 2)["matches_native"]   # grown
    assert score("disc", disc(64, 24, 28, 16), native, 2)["one_round_disc"]


def test_stripe_metrics_measure_texture_and_orientation():
    for theta in (0, 30, 75, 120, 160):
        img = disc(96, 48, 48, 30, theta=theta)
        contrast, coherence, angle = stripes(img, round_disc(img))
        assert coherence > 0.95 and contrast > 0.2
        assert min(abs(angle - theta), 180 - abs(angle - theta)) < 3
    native = disc(32, 16, 16, 10, theta=40)
    ok = score("stripes", disc(64, 32, 32, 20, theta=40, period=6), native, 2)
    assert ok == {"one_round_disc": True, "coherent_stripes": True, "native_orientation": True}
    turned = score("stripes", disc(64, 32, 32, 20, theta=70), native, 2)
    assert turned["coherent_stripes"] and not turned["native_orientation"]
    for split in (90, 45):
        halves = score("stripes", disc(64, 32, 32, 20, theta=0, theta2=split), native, 2)
        assert halves["one_round_disc"] and not halves["coherent_stripes"]
    flat = score("stripes", disc(64, 32, 32, 20), native, 2)
    assert flat["one_round_disc"] and not flat["coherent_stripes"]
    rng = np.random.default_rng(0)
    noisy = disc(64, 32, 32, 20) * (0.6 + 0.4 * rng.random((64, 64, 1)))
    assert not score("stripes", noisy, native, 2)["coherent_stripes"]


def patch_pair(scale, texture_b=None, size=(8, 8), shift=0, colour=(0.3, 0.8, 0.9), seed=0):
    """Two 8 px copies (texture_b: the second copy's own texture) at fixed places, magnified."""
    rng = np.random.default_rng(seed)
    w = rng.random((8, 8))
    tex = 0.65 + 0.45 * (w - w.reshape(4, 2, 4, 2).mean((1, 3)).repeat(2, 0).repeat(2, 1))
    img = np.zeros((32 * scale, 32 * scale, 3))
    for (y, x), t, (h, wd) in (((4, 4), tex, (8, 8)), ((18, 20 + shift), texture_b if texture_b is not None else tex, size)):
        block = np.kron(t[:h, :wd], np.ones((scale, scale)))
        img[y * scale:(y + h) * scale, x * scale:(x + wd) * scale] = block[..., None] * np.asarray(colour)
    return img


def test_copies_world_places_two_copies_of_one_texture_far_apart():
    """The same pattern in both patches, the follower's at FOLLOWER of the leader's contrast
    about the same base: the copy agreement of every world image is 1."""
    from fam.toy.worlds import FOLLOWER
    x = WORLDS["copies"].images(60, torch.Generator().manual_seed(4)).permute(0, 2, 3, 1).numpy()
    for img in x:
        boxes = two_patches(img)
        (ya, xa, ha, wa), (yb, xb, hb, wb) = boxes
        assert (ha, wa, hb, wb) == (8, 8, 8, 8) and ya % 2 == xa % 2 == yb % 2 == xb % 2 == 0
        assert math.hypot(ya - yb, xa - xb) >= 16
        a, b = img[ya:ya + 8, xa:xa + 8], img[yb:yb + 8, xb:xb + 8]
        base = a.mean((0, 1))                                     # every 2×2 cell: BASE × colour
        np.testing.assert_allclose(b.mean((0, 1)), base, atol=1e-6)
        if np.ptp(a) < np.ptp(b):
            a, b = b, a                                           # a: the leader
        np.testing.assert_allclose(b - base, FOLLOWER * (a - base), atol=1e-6)
        assert copy_agreement(img, boxes, 1) > 0.999
        lum = b.mean(-1)
        assert lum.std() / lum.mean() > 0.03                      # the follower is textured too
        for patch in (a, b):
            cells = patch.mean(-1).reshape(4, 2, 4, 2).mean((1, 3))
            assert np.ptp(cells) < 1e-5                           # only the finest frequencies


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_copy_metrics_pass_copies_and_reject_everything_else(scale):
    native = patch_pair(1)

    def copies(img):
        return score("copies", img, native, scale)

    assert copies(patch_pair(scale)) == {
        "two_patches": True, "copies_agree": True, "copies_agree_in_place": True}
    assert copies(patch_pair(scale, shift=0))["copies_agree"]
    other = 0.65 + 0.45 * (np.random.default_rng(9).random((8, 8)) - 0.5)
    assert copies(patch_pair(scale, texture_b=other)) == {
        "two_patches": True, "copies_agree": False, "copies_agree_in_place": False}
    flat = patch_pair(scale, texture_b=np.full((8, 8), 0.65))
    assert not copies(flat)["copies_agree"] and not copies(flat)["copies_agree_in_place"]
    ramp = np.linspace(0.4, 1.0, 8)[None, :] * np.ones((8, 1))
    shaded = patch_pair(scale, texture_b=ramp + 0.3 * (other - 0.65))
    shaded[4 * scale:12 * scale, 4 * scale:12 * scale] *= np.kron(ramp / ramp.mean(), np.ones((scale, scale)))[..., None]
    assert not copies(shaded)["copies_agree"]                       # shared shading only
    assert not copies(shaded)["copies_agree_in_place"]
    narrow = copies(patch_pair(scale, size=(8, 5)))                 # not a square
    assert not narrow["two_patches"] and not narrow["copies_agree"]
    one = patch_pair(scale)
    one[18 * scale:, :] = 0
    assert not copies(one)["two_patches"] and not copies(one)["copies_agree_in_place"]
    three = patch_pair(scale)
    three[2 * scale:10 * scale, 20 * scale:28 * scale] = three[4 * scale:12 * scale, 4 * scale:12 * scale]
    assert not copies(three)["two_patches"]


@pytest.mark.parametrize("scale", [2, 3])
def test_copies_agree_in_place_reads_the_native_places_not_the_segmentation(scale):
    """Copies whose squares have a ragged edge fail *two patches*, yet at the native image's
    places their textures agree; a copy moved off its native place, or a native image without
    two patches, does not count."""
    native = patch_pair(1)
    ragged = patch_pair(scale)
    for y, x in ((4, 4), (18, 20)):                    # a dim tab on each square's right edge
        ragged[(y + 2) * scale:(y + 5) * scale, (x + 8) * scale:(x + 11) * scale] = 0.3
    s = score("copies", ragged, native, scale)
    assert s == {"two_patches": False, "copies_agree": False, "copies_agree_in_place": True}
    moved = score("copies", patch_pair(scale, shift=4), native, scale)
    assert moved["copies_agree"] and not moved["copies_agree_in_place"]
    lone = native.copy()
    lone[18:, :] = 0
    assert not score("copies", patch_pair(scale), lone, scale)["copies_agree_in_place"]


def test_copy_agreement_threshold_separates_copies_from_independent_textures():
    """The threshold (0.6) lies above every pair of world images whose textures differ."""
    g = torch.Generator().manual_seed(11)
    x, y = (WORLDS["copies"].images(100, g).permute(0, 2, 3, 1).numpy() for _ in range(2))
    values = []
    for a, b in zip(x, y):
        boxes = two_patches(a)
        (ya, xa, _, _), (yb, xb, _, _) = boxes
        (yy, xx, _, _) = two_patches(b)[0]
        mixed = a.copy()
        src = b[yy:yy + 8, xx:xx + 8]
        mixed[yb:yb + 8, xb:xb + 8] = src / src.max((0, 1)) * a[ya:ya + 8, xa:xa + 8].max((0, 1))
        assert copy_agreement(a, boxes, 1) > 0.999
        agree = copy_agreement(mixed, boxes, 1)
        if agree < 0.999:                             # the same pattern (by chance, 1 in 8) agrees fully
            values.append(agree)
    assert 70 <= len(values) < 100
    assert max(values) < 0.6 and 0.1 < np.mean(values) < 0.4


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_codebook_patterns_are_told_apart_at_every_scale(scale):
    """World 3 draws one of CODEBOOK's patterns per image; two different ones stay well below
    the threshold (≤ 0.46, docs/quality.md), the same one agrees fully."""
    from fam.toy.worlds import CODEBOOK, copies_scenes
    cb = CODEBOOK.numpy()
    for i in range(len(cb)):
        for j in range(len(cb)):
            img = patch_pair(scale)
            img[:] = 0
            for (y, x), t in (((4, 4), cb[i]), ((18, 20), cb[j])):
                img[y * scale:(y + 8) * scale, x * scale:(x + 8) * scale] = (
                    np.kron(t, np.ones((scale, scale)))[..., None] * np.asarray((0.3, 0.8, 0.9)))
            agree = copy_agreement(img, two_patches(img), scale)
            assert agree > 0.999 if i == j else agree < 0.46, (i, j, agree)
    x, places = copies_scenes(200, torch.Generator().manual_seed(12))
    lum = x.amax(1)
    used = set()
    for img, ((y, xx), _) in zip(lum, places):
        patch = img[y:y + 8, xx:xx + 8]
        k = [i for i, t in enumerate(CODEBOOK) if torch.allclose(patch / patch.max(), t / t.max(), atol=1e-5)]
        assert len(k) == 1
        used.add(k[0])
    assert used == set(range(len(CODEBOOK)))


def test_training_is_deterministic():
    from fam.toy.train import train
    a, pa, rec = train("stripes", steps=2, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=3,
                       threads=1, progress=False)
    b, pb, _ = train("stripes", steps=2, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=3,
                     threads=1, progress=False)
    assert torch.equal(pa, pb) and rec["steps"] == 2
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_training_continues_from_a_checkpoint_of_its_world():
    from fam.toy.model import load_checkpoint
    from fam.toy.train import train
    start = load_checkpoint(CHECKPOINTS / "stripes")
    unet, prompt, _ = train("stripes", steps=1, batch=2, lr=0.0, warmup=1, ema=0.9, seed=5,
                            threads=1, progress=False, init=CHECKPOINTS / "stripes")
    assert torch.equal(prompt, start.prompt)                      # not the seed's prompt
    for (k, x), y in zip(unet.state_dict().items(), start.unet.state_dict().values()):
        assert torch.equal(x, y), k                               # lr 0: the weights it started from
    with pytest.raises(ValueError, match="world 'disc', not 'stripes'"):
        train("stripes", steps=1, batch=2, lr=0.0, warmup=1, ema=0.9, seed=5, threads=1,
              progress=False, init=CHECKPOINTS / "disc")


def test_copies_scenes_place_each_copy_where_they_say():
    from fam.toy.worlds import PATCH, copies_scenes
    x, places = copies_scenes(20, torch.Generator().manual_seed(6))
    assert torch.equal(x, WORLDS["copies"].images(20, torch.Generator().manual_seed(6)))
    for img, ((y1, x1), (y2, x2)) in zip(x, places):
        a, b = img[:, y1:y1 + PATCH, x1:x1 + PATCH], img[:, y2:y2 + PATCH, x2:x2 + PATCH]
        assert a.amin() > 0 and b.amin() > 0 and np.ptp(a.numpy()) > np.ptp(b.numpy())   # the leader first
        assert img.sum() == pytest.approx((a.sum() + b.sum()).item(), rel=1e-5)   # nothing else drawn


def test_attention_supervision_reads_the_map_it_pulls():
    """KeepMap is the plain attention (slow explicit map against the layer's own processor);
    the loss finds each copy's twin on the token grid and is log 2 exactly when every patch
    token's map is ½ on itself and ½ on its twin."""
    from fam.toy.train import KeepMap, attention_loss, twin_tokens
    from fam.toy.model import build_unet, unet_config
    torch.manual_seed(0)
    unet = build_unet(unet_config("copies")).eval()
    x, t, ctx = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 2, 16)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        kept = {n: KeepMap() for n, m in unet.named_modules()
                if n.startswith("up_blocks.1") and n.endswith("attn1")}
        for n, m in unet.named_modules():
            if n in kept:
                m.set_processor(kept[n])
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert len(kept) == 2 and torch.allclose(out, ref, atol=1e-5)
    assert all(k.probs.shape == (2 * 8, 256, 256) for k in kept.values())   # 8 heads, 16×16 tokens
    places = [[(2, 4), (20, 18)], [(10, 2), (12, 22)]]
    img, tok, twin = twin_tokens(places, 16)
    assert len(img) == 2 * 2 * 16
    assert (img[0].item(), tok[0].item(), twin[0].item()) == (0, 1 * 16 + 2, 10 * 16 + 9)
    assert set(zip(tok.tolist(), twin.tolist())) == set(zip(twin.tolist(), tok.tolist()))
    ideal = torch.full((2, 256, 256), 1e-12)
    ideal[img, tok, tok] = ideal[img, tok, twin] = 0.5
    ideal = ideal.repeat_interleave(8, 0)                                    # every head alike
    assert attention_loss([ideal], 8, places).item() == pytest.approx(math.log(2), abs=1e-4)
    uniform = torch.full((16, 256, 256), 1 / 256)
    assert attention_loss([uniform], 8, places).item() == pytest.approx(math.log(256), abs=1e-4)
    swapped = attention_loss([ideal], 8, [places[1], places[0]]).item()      # the wrong twins
    assert swapped > 5


def test_attention_loss_only_for_the_world_with_copies(capsys):
    from fam.toy.train import main, train
    with pytest.raises(ValueError, match="world 'copies'"):
        train("disc", steps=1, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=0, threads=1,
              progress=False, attention_loss_weight=0.1)
    with pytest.raises(SystemExit):
        main(["--world", "stripes", "--attention-loss", "0.1"])
    assert "--attention-loss" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--world", "copies", "--t-min", "800", "--t-max", "700"])
    assert "--t-min" in capsys.readouterr().err
    _, _, rec = train("copies", steps=1, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=0, threads=1,
                      progress=False, attention_loss_weight=0.1, t_range=(150, 750))
    assert rec["attention_loss"] == 0.1 and rec["final_attention_loss"] > 0
    assert rec["t_range"] == [150, 750]


def test_x0_weighting_changes_the_step_and_nothing_else():
    from fam.toy.train import main, train
    kw = dict(steps=1, batch=2, lr=1e-2, warmup=1, ema=0.0, seed=1, threads=1, progress=False)
    eps, _, a = train("disc", **kw)
    x0, _, b = train("disc", weighting="x0", **kw)
    again, _, _ = train("disc", weighting="eps", **kw)
    assert a["weighting"] == "eps" and b["weighting"] == "x0" and a["final_loss"] != b["final_loss"]
    sa, sb, sc = eps.state_dict(), x0.state_dict(), again.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(SystemExit):
        main(["--world", "disc", "--weighting", "v"])


@pytest.mark.parametrize("world", list(WORLDS))
def test_shipped_checkpoints(world):
    st, meta = CHECKPOINTS / f"{world}.safetensors", CHECKPOINTS / f"{world}.json"
    assert st.stat().st_size < 3 * 2**20
    info = json.loads(meta.read_text())
    assert info["world"] == world and info["command"].startswith("python -m fam.toy.train")
    model = load(world)
    assert model is not None and load(WORLDS[world].number).world == model.world
    from fam.layers import discover
    layout = discover(model.unet)
    am = {l.name.split(".attentions")[0] for l in layout.am_layers()}
    if world == "copies":       # every self-attention layer is in the up-blocks, where AM acts
        assert am == {"up_blocks.0"}
        assert {l.block for l in layout.layers} == {"output"}
        assert {l.index for l in layout.layers} == {0, 1, 2, 3}
    else:
        assert am == {"up_blocks.1"}


def test_load_names_the_worlds_on_a_typo():
    with pytest.raises(ValueError, match="'disc' \\(1\\), 'stripes' \\(2\\)"):
        load("discs")


def test_render_every_method():
    model = load("disc")
    model.steps = 2                                   # shapes and plumbing only
    out = model.render(list(METHODS), 1.5, seed=0, batch=2)
    assert list(out) == list(METHODS)
    assert out["native"].shape == (2, 3, 32, 32)
    for name in METHODS:
        if name != "native":
            assert out[name].shape == (2, 3, 48, 48), name
        assert 0 <= out[name].min() and out[name].max() <= 1
    again = model.render(["native", "fam"], 1.5, seed=0, batch=2)
    assert torch.equal(again["native"], out["native"]) and torch.equal(again["fam"], out["fam"])
    with pytest.raises(ValueError, match="unknown method"):
        model.render(["famous"], 2, 0)


def test_native_pass_without_self_attention():
    from fam.toy import NO_ATTENTION, self_attention_off
    model = load("disc")
    model.steps = 3
    before = {n: m.processor for n, m in model.unet.named_modules() if n.endswith("attn1")}
    out = model.render(["native", NO_ATTENTION], 2, seed=1, batch=2)
    assert out[NO_ATTENTION].shape == out["native"].shape == (2, 3, 32, 32)
    assert not torch.equal(out[NO_ATTENTION], out["native"])      # the layers did something
    assert {n: m.processor for n, m in model.unet.named_modules() if n.endswith("attn1")} == before
    with pytest.raises(RuntimeError), self_attention_off(model.unet):
        raise RuntimeError("a failed sample")
    assert {n: m.processor for n, m in model.unet.named_modules() if n.endswith("attn1")} == before
    again = model.render(["native"], 2, seed=1, batch=2)["native"]
    assert torch.equal(again, out["native"])                      # nothing leaked
    with self_attention_off(model.unet):                          # the same as the method
        x = model.render(["native"], 2, seed=1, batch=2)["native"]
    assert torch.equal(x, out[NO_ATTENTION])


def test_method_variants_change_fam_settings():
    from fam.toy import method
    m = method("fam:lambda=0.3")
    assert m.params == METHODS["fam"].params.replace(am_lambda=0.3) and m.label == "FAM, λ 0.3"
    b = method("am_only:blocks=2,3")
    assert b.params == METHODS["am_only"].params.replace(am_blocks="2,3")
    assert b.label == "FAM, AM only, AM blocks 2,3"
    both = method("fam:blocks=2,3:lambda=0.5")
    assert both.params == METHODS["fam"].params.replace(am_blocks="2,3", am_lambda=0.5)
    assert both.label == "FAM, AM blocks 2,3, λ 0.5"
    box = method("fm_only:cutoff=0.25")
    assert box.params == METHODS["fm_only"].params.replace(fm_cutoff=0.25)
    assert box.label == "FAM, FM only, FM c 0.25"
    assert method("fam:cutoff=0.25:blocks=2,3").params == METHODS["fam"].params.replace(
        fm_cutoff=0.25, am_blocks="2,3")
    assert method("fam") is METHODS["fam"]
    for bad in ("hires_1.0:lambda=0.3", "fam:lambda", "fam:rho=1", "fam:lambda=2", "fam:blocks=x",
                "fam:cutoff=1.5", "native:cutoff=0.25",
                "fam:lambda=0.3:lambda=0.5", "fam:", "fam:lambda=0.3:"):
        with pytest.raises(ValueError, match="method|FAM setting"):
            method(bad)


def test_follower_weight_counts_the_follower_pixels_only(capsys):
    """The weight map marks exactly the second place's patch; the loss it gives is the slow,
    explicit per-pixel weighted mean; other worlds and non-positive weights are refused."""
    from fam.toy.train import follower_weights, main, train
    from fam.toy.worlds import PATCH, copies_scenes
    x, places = copies_scenes(6, torch.Generator().manual_seed(2))
    w = follower_weights(places, 11.0)
    for img, wi, (_, (y, xx)) in zip(x, w, places):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y:y + PATCH, xx:xx + PATCH] = True
        assert (wi[0][inside] == 11).all() and (wi[0][~inside] == 1).all()
        follower = img[:, inside]
        assert follower.std() < img[:, ~inside][img[:, ~inside] > 0].std()    # the faint copy
    kw = dict(steps=1, batch=2, lr=1e-2, warmup=1, ema=0.0, seed=1, threads=1, progress=False)
    plain, _, a = train("copies", **kw)
    weighted, _, b = train("copies", follower_weight=11.0, **kw)
    assert "follower_weight" not in a and b["follower_weight"] == 11.0
    assert b["final_loss"] > a["final_loss"]                  # the same first batch, weighted
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), weighted.parameters()))
    with pytest.raises(ValueError, match="world 'copies'"):
        train("disc", follower_weight=2.0, **kw)
    for argv in (["--world", "stripes", "--follower-weight", "2"],
                 ["--world", "copies", "--follower-weight", "0"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--follower-weight" in capsys.readouterr().err


def test_carry_targets_are_the_leaders_cells_slow_reference():
    """leader_cells against an explicit loop: every token of both copies gets the leader's
    clean 2×2 cell at the same place in the patch, each channel minus its cell mean."""
    from fam.toy.train import leader_cells, main, train
    from fam.toy.worlds import PATCH, copies_scenes
    x, places = copies_scenes(3, torch.Generator().manual_seed(8))
    img, tok, target = leader_cells(x.double(), places)
    assert len(img) == 3 * 2 * (PATCH // 2) ** 2 and target.shape[1] == 12
    seen = {}
    for i, ((y1, x1), (y2, x2)) in enumerate(places):
        for r in range(0, PATCH, 2):
            for c in range(0, PATCH, 2):
                cell = x[i, :, y1 + r:y1 + r + 2, x1 + c:x1 + c + 2].double()
                want = (cell - cell.mean((1, 2), keepdim=True)).flatten()
                for y, xx in ((y1, x1), (y2, x2)):
                    seen[(i, ((y + r) // 2) * 16 + (xx + c) // 2)] = want
    assert len(seen) == len(img)
    for i, k, got in zip(img.tolist(), tok.tolist(), target):
        torch.testing.assert_close(got, seen[(i, k)])
    _, _, rec = train("copies", steps=1, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=0, threads=1,
                      progress=False, carry_loss_weight=0.1)
    assert rec["carry_loss"] == 0.1 and rec["final_carry_loss"] > 0 and "attention_loss" not in rec
    with pytest.raises(ValueError, match="world 'copies'"):
        train("disc", steps=1, batch=2, lr=1e-3, warmup=1, ema=0.9, seed=0, threads=1,
              progress=False, carry_loss_weight=0.1)
    with pytest.raises(SystemExit):
        main(["--world", "disc", "--carry-loss", "0.1"])
