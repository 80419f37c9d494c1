// FAM Diffusion: show the txt2img hint while FAM is on and Hires. fix is off.
// Only toggles a class on the hint that the extension rendered; it writes no markup.
(function() {
    function checked(id) {
        var box = gradioApp().querySelector("#" + id + " input[type=checkbox]");
        return Boolean(box && box.checked);
    }

    function update() {
        // Gradio gives an HTML component's elem_id to its block AND to the inner container,
        // and style.css hides both: toggle every element with that id.
        var hints = gradioApp().querySelectorAll("[id='script_txt2img_fam_diffusion_hint']");
        if (!hints.length) return;
        var show = checked("script_txt2img_fam_diffusion_enabled-checkbox") && !checked("txt2img_hr-checkbox");
        hints.forEach(function(hint) {
            hint.classList.toggle("fam-hint-show", show);
        });
    }

    // Ticking FAM or Hires. fix sets a hidden Gradio checkbox and fires "input" on it (A1111's
    // updateInput); onUiUpdate alone sees only added or removed nodes, not a ticked box.
    onUiLoaded(function() {
        update();
        gradioApp().addEventListener("input", update, true);
        gradioApp().addEventListener("change", update, true);
    });
    onUiUpdate(update);
})();
