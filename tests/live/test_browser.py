"""The FAM UI in a real browser: AUTOMATIC1111 1.10 with its full Gradio UI and this
extension installed (any SD1 checkpoint; a tiny random one on CPU is enough), driven by
Selenium with the system Chromium (Debian `chromium` and `chromium-driver`; nothing is
downloaded). Skipped unless FAM_A1111_UI_URL is set:

    FAM_A1111_UI_URL=http://127.0.0.1:7861 python -m pytest -q tests/live/test_browser.py

FAM_CHROMIUM / FAM_CHROMEDRIVER override /usr/bin/chromium and /usr/bin/chromedriver;
with FAM_SCREENSHOTS=DIR the test also saves the README's screenshots there.
The tests run in file order on one page: each builds on the state the previous one left."""

import os
import tempfile
import time

import pytest

URL = os.environ.get("FAM_A1111_UI_URL", "").rstrip("/")
CHROMIUM = os.environ.get("FAM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FAM_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = os.environ.get("FAM_SCREENSHOTS")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_A1111_UI_URL is not set")

TXT2IMG_HINT = "FAM works inside Hires. fix"
NO_HIRES_ERROR = "FAM Diffusion runs in the Hires. fix pass"


def fam_id(tab, name):
    return f"script_{tab}_fam_diffusion_{name}"


@pytest.fixture(scope="module")
def fields():
    """FamParams' fields: the labels, defaults and tooltips the UI must show. Imported here,
    not at collection: tests/live is collected in the WebUI's Python with only pytest."""
    from fam.params import FamParams
    return {f.name: f for f in FamParams.__dataclass_fields__.values()}


@pytest.fixture(scope="module")
def page():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.skip(f"{path} not found (apt install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1600,2400",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='fam-chromium-')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(f"{URL}/?__theme=light")
        Page(driver).wait(lambda: Page(driver).js(
            "return typeof gradioApp === 'function' && !!gradioApp().getElementById(arguments[0])"
            " && !!gradioApp().getElementById(arguments[0]).visibleCheckbox",
            fam_id("txt2img", "enabled")), 300, "the FAM accordion to be set up")
        yield Page(driver)
    finally:
        driver.quit()


class Page:
    """Small helpers over Selenium, working inside A1111's gradio-app root."""

    def __init__(self, driver):
        self.driver = driver

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            value = condition()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def el(self, elem_id):
        return self.js("return gradioApp().getElementById(arguments[0])", elem_id)

    def text(self, elem_id):
        return self.js("var e = gradioApp().getElementById(arguments[0]); "
                       "return e ? e.textContent : null", elem_id)

    def shown(self, elem_id):
        return self.js("var e = gradioApp().getElementById(arguments[0]); "
                       "return !!e && e.offsetParent !== null && getComputedStyle(e).display !== 'none'",
                       elem_id)

    def set_input(self, selector, value):
        """Type into an input the way A1111's own scripts do (value + an input event)."""
        self.js("var e = gradioApp().querySelector(arguments[0]); e.value = arguments[1]; "
                "updateInput(e); e.dispatchEvent(new Event('change', {bubbles: true}));",
                selector, str(value))

    def tick(self, accordion_id, on):
        """An InputAccordion's visible checkbox in its header, as a user clicks it."""
        box = self.js("return gradioApp().getElementById(arguments[0] + '-visible-checkbox')",
                      accordion_id)
        if box.is_selected() != on:
            self.js("arguments[0].scrollIntoView({block: 'center'})", box)
            box.click()
        self.wait(lambda: self.js(
            "return gradioApp().querySelector('#' + arguments[0] + '-checkbox input').checked"
            " === arguments[1]", accordion_id, on), 10, f"{accordion_id} = {on}")
        if on and not self.js("return gradioApp().querySelector('#' + arguments[0] + "
                              "' .label-wrap').classList.contains('open')", accordion_id):
            # open it to show its controls (after a click on the box, opening no longer ticks)
            self.js("gradioApp().querySelector('#' + arguments[0] + ' .label-wrap').click()",
                    accordion_id)

    def screenshot(self, elem_id, name):
        if not SHOTS:
            return
        os.makedirs(SHOTS, exist_ok=True)
        element = self.el(elem_id)
        self.js("arguments[0].scrollIntoView({block: 'start'})", element)
        time.sleep(0.5)
        element.screenshot(os.path.join(SHOTS, name))


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_accordion_controls_labels_defaults_and_tooltips(page, fields, tab):
    accordion = fam_id(tab, "enabled")
    assert page.js("return gradioApp().getElementById(arguments[0]).closest('.accordions')"
                   ".id", accordion) == f"{tab}_accordions"          # beside Hires. fix & co.
    assert page.text(accordion).strip().startswith("FAM Diffusion")
    assert page.el(accordion).get_attribute("title") == fields["enabled"].metadata["doc"]
    for name, f in fields.items():
        if name == "enabled":
            continue
        elem_id = fam_id(tab, name)
        element = page.el(elem_id)
        assert element is not None, f"{elem_id} missing"
        assert f.metadata["label"] in page.text(elem_id), name
        assert element.get_attribute("title") == f.metadata["doc"], name
        if f.type in ("bool", bool):
            checked = page.js("return gradioApp().querySelector('#' + arguments[0] + "
                              "' input[type=checkbox]').checked", elem_id)
            assert checked is f.default, name
        elif f.type in ("str", str):
            assert page.js("return gradioApp().querySelector('#' + arguments[0] + ' textarea, #'"
                           " + arguments[0] + ' input').value", elem_id) == f.default
        else:
            number = page.js("var e = gradioApp().querySelector('#' + arguments[0] + "
                             "' input[type=number]'); return [e.value, e.min, e.max, e.step]", elem_id)
            assert [float(v) for v in number] == [f.default, f.metadata["minimum"],
                                                  f.metadata["maximum"], f.metadata["step"]], name


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_engine_settings_sit_in_a_collapsed_advanced_group(page, fields, tab):
    group = fam_id(tab, "advanced")
    inside = ("return !!gradioApp().getElementById(arguments[0]) && gradioApp()"
              ".getElementById(arguments[0]).closest('#' + arguments[1]) !== null")
    assert page.js(inside, group, fam_id(tab, "enabled")), "no Advanced group in the accordion"
    assert page.text(group).strip().startswith("Advanced")
    for name, f in fields.items():
        if name != "enabled":
            assert page.js(inside, fam_id(tab, name), group) is f.metadata["advanced"], name
    opened = ("return gradioApp().querySelector('#' + arguments[0] + ' .label-wrap')"
              ".classList.contains('open')")
    assert not page.js(opened, group)
    if tab == "img2img":   # opening img2img's FAM accordion would tick FAM there
        return
    page.tick(fam_id(tab, "enabled"), True)
    budget = fam_id(tab, "record_budget_mb")
    assert page.shown(fam_id(tab, "am_lambda")) and not page.shown(budget)
    page.js("gradioApp().querySelector('#' + arguments[0] + ' .label-wrap').click()", group)
    page.wait(lambda: page.shown(budget), 10, "the Advanced group to open")
    page.js("gradioApp().querySelector('#' + arguments[0] + ' .label-wrap').click()", group)
    page.wait(lambda: not page.shown(budget), 10, "the Advanced group to close")


def test_hint_shows_while_fam_is_on_and_hires_fix_off(page):
    hint = fam_id("txt2img", "hint")
    page.tick("txt2img_hr", False)
    page.tick(fam_id("txt2img", "enabled"), False)
    assert not page.shown(hint)
    page.tick(fam_id("txt2img", "enabled"), True)
    page.wait(lambda: page.shown(hint), 10, "the hint to appear")
    assert TXT2IMG_HINT in page.text(hint)
    page.screenshot("txt2img_settings", "txt2img-hint.png")
    page.tick("txt2img_hr", True)
    page.wait(lambda: not page.shown(hint), 10, "the hint to go")
    page.tick("txt2img_hr", False)
    page.wait(lambda: page.shown(hint), 10, "the hint to come back")


def test_generate_without_hires_fix_stops_with_the_message(page):
    page.set_input("#txt2img_prompt textarea", "a lighthouse on a cliff, storm")
    page.set_input("#txt2img_steps input[type=number]", 2)
    for side in ("width", "height"):
        page.set_input(f"#txt2img_{side} input[type=number]", 256)
    page.js("gradioApp().getElementById('txt2img_generate').click()")
    page.wait(lambda: NO_HIRES_ERROR in (page.text("html_log_txt2img") or ""), 300,
              "the 'enable Hires. fix' error")


def test_hires_fix_with_fam_generates_and_writes_the_infotext(page):
    page.tick("txt2img_hr", True)
    page.tick(fam_id("txt2img", "enabled"), True)
    page.set_input("#txt2img_steps input[type=number]", 4)
    page.set_input("#txt2img_seed input[type=number]", 7)
    page.set_input("#txt2img_hr_scale input[type=number]", 2)
    page.screenshot("txt2img_settings", "txt2img-accordion.png")
    page.set_input(f"#{fam_id('txt2img', 'am_lambda')} input[type=number]", 0.6)
    page.set_input(f"#{fam_id('txt2img', 'am_blocks')} textarea, "
                   f"#{fam_id('txt2img', 'am_blocks')} input", "3, 4,5")
    page.js("gradioApp().getElementById('txt2img_generate').click()")
    info = page.wait(lambda: (page.text("html_info_txt2img") or "") if "FAM:" in (
        page.text("html_info_txt2img") or "") else None, 600, "a FAM image's infotext")
    assert page.js("return gradioApp().querySelectorAll('#txt2img_gallery img').length") >= 1
    for entry in ("Hires upscale: 2", "Denoising strength: 1.0", "FAM: True", "FAM FM: True",
                  "FAM FM cutoff: 0.5", "FAM AM: True", "FAM AM lambda: 0.6",
                  'FAM AM blocks: "3,4,5"', "FAM full re-noise: True", "FAM record budget: 8192"):
        assert entry in info, (entry, info)
    page.js("arguments[0].scrollIntoView({block: 'start'})", page.el("txt2img_results"))
    page.screenshot("txt2img_results", "txt2img-infotext.png")


def test_pasted_infotext_restores_fam_in_img2img(page):
    """*Send to img2img* moves the image; pasting the infotext (the ↙ button, as PNG Info's
    *Send to* does) restores every FAM setting, here into img2img's accordion."""
    info = page.js("return JSON.parse(gradioApp().querySelector('#generation_info_txt2img "
                   "textarea').value).infotexts[0]")
    page.js("gradioApp().getElementById('txt2img_send_to_img2img').click()")
    page.wait(lambda: page.shown("tab_img2img"), 60, "the img2img tab")
    page.wait(lambda: page.js("return gradioApp().querySelectorAll('#img2img_image img').length"),
              60, "the image in img2img")
    accordion = fam_id("img2img", "enabled")
    assert not page.js("return gradioApp().querySelector('#' + arguments[0] + '-checkbox input')"
                       ".checked", accordion)
    page.set_input("#img2img_prompt textarea", info)
    page.js("gradioApp().querySelector('#img2img_toprow #paste').click()")
    page.wait(lambda: page.js("return gradioApp().querySelector('#' + arguments[0] + "
                              "'-checkbox input').checked", accordion), 60, "FAM on in img2img")
    lam = f"#{fam_id('img2img', 'am_lambda')} input[type=number]"
    blocks = f"#{fam_id('img2img', 'am_blocks')} textarea, #{fam_id('img2img', 'am_blocks')} input"
    page.wait(lambda: page.js("return gradioApp().querySelector(arguments[0]).value", lam) == "0.6",
              30, "AM lambda pasted")
    assert page.js("return gradioApp().querySelector(arguments[0]).value", blocks) == "3,4,5"
    page.tick(accordion, True)
    assert "FAM upscales in img2img" in page.text(fam_id("img2img", "hint"))
    for side in ("width", "height"):
        page.set_input(f"#img2img_{side} input[type=number]", 768)
    page.screenshot("img2img_settings", "img2img-fam.png")
