// FAM Diffusion: show the txt2img hint while FAM is on and Hires. fix is off.
// Only toggles a class on the hint that the extension rendered; it writes no markup.
(function() {
    function checked(id) {
        var box = gradioApp().querySelector("#" + id + " input[type=checkbox]");
        return Boolean(box && box.checked);
    }

    function update() {
        var hint = gradioApp().getElementById("script_txt2img_fam_diffusion_hint");
        if (!hint) return;
        var show = checked("script_txt2img_fam_diffusion_enabled-checkbox") && !checked("txt2img_hr-checkbox");
        hint.classList.toggle("fam-hint-show", show);
    }

    onUiUpdate(update);
    onUiLoaded(update);
})();
