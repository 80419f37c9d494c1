"""FAM beside the built-in Lora, live, on every WebUI whose URL is set that lists a LoRA of
the family (its name says sd1/sd15 or sdxl)."""

import json

import pytest

from client import infotext, same_pixels
from combos import FIRST, PROMPT, check, family, plain_unchanged, webui  # noqa: F401

TXT = "/sdapi/v1/txt2img"


def prompt(lora, weight=0.8):
    return f"{PROMPT} <lora:{lora}:{weight}>"


def test_lora_in_the_prompt(webui, family):
    (a,) = webui.loras(family)
    r = plain_unchanged(webui, TXT, webui.body(family, prompt=prompt(a)),
                        webui.body(family, fam_args={}, prompt=prompt(a)))
    check(r, 2 * FIRST)
    assert f"{a}: " in infotext(r).split("Lora hashes: ", 1)[1]


@pytest.mark.parametrize("budget", [None, 0], ids=["record", "recompute"])
def test_another_lora_in_the_hires_prompt(webui, family, budget):
    a, b = webui.loras(family, 2)
    fam_args = {} if budget is None else {"record_budget_mb": budget}
    r = webui.generate(**webui.body(family, fam_args=fam_args, prompt=prompt(a),
                                    hr_prompt=prompt(b), hr_negative_prompt="blurry",
                                    hr_sampler_name="Euler"))
    info = check(r, 2 * FIRST)
    assert info.get("FAM AM path") == (None if budget is None else "recompute")   # only the recompute path is named
    assert prompt(b) in infotext(r).split("Hires prompt: ", 1)[1]


def test_record_and_recompute_paths_differ_only_by_the_hires_prompts_lora(webui, family):
    """The recompute path rebuilds the native attention with the Hires prompt's networks,
    the record path keeps the first pass's: the same image when both prompts load the same
    LoRA, different ones when the Hires prompt loads another."""
    a, b = webui.loras(family, 2)

    def run(hires_lora, budget):
        return webui.generate(**webui.body(
            family, fam_args={"record_budget_mb": budget}, prompt=prompt(a),
            hr_prompt=prompt(hires_lora), hr_negative_prompt="blurry", hr_sampler_name="Euler"))

    assert same_pixels(run(a, 8192), run(a, 0))
    assert not same_pixels(run(b, 8192), run(b, 0))


def test_xyz_plot_over_the_lora_weight(webui, family):
    webui.need_script("x/y/z plot")
    (a,) = webui.loras(family)
    _, info = webui.call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    # the script's own defaults, by label (forks add arguments: reForge's script takes 21)
    args = [arg["choices"].index(arg["value"]) if arg["label"].endswith(" type")  # by index
            else arg["value"] for arg in xyz["args"]]
    labels = [arg["label"] for arg in xyz["args"]]
    args[0] = xyz["args"][0]["choices"].index("Prompt S/R")
    args[1] = "0.8, 0.3"
    args[labels.index("Include Sub Images")] = True        # the cells, after the grid
    grid = webui.generate(**webui.body(family, fam_args={}, prompt=prompt(a),
                                       script_name="x/y/z plot", script_args=args))
    texts = json.loads(grid["info"])["infotexts"]
    assert len(grid["images"]) == 3 and f"{a}:0.3>" in texts[2]    # the grid, then the cells
    for i in (1, 2):
        check(grid, 2 * FIRST, index=i, images=slice(1, None))
    cells = [{"images": [c]} for c in grid["images"][1:]]
    assert not same_pixels(*cells)
    alone = webui.generate(**webui.body(family, fam_args={}, prompt=prompt(a, 0.3)))
    assert same_pixels(cells[1], alone)
