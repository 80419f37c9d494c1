"""Run by an installer: the WebUI's extension installer (with its `launch` module), or
ComfyUI-Manager, with ComfyUI's own Python and no `launch`. FAM Diffusion needs only what its
host already ships (torch; numpy and gradio in the WebUIs), so this checks and installs
nothing else, and has nothing to do in ComfyUI."""

try:
    import launch
except ImportError:   # not a WebUI installer (ComfyUI-Manager): nothing to check
    launch = None

if launch is not None:
    for package in ("torch", "numpy", "gradio"):
        if not launch.is_installed(package):
            print(f"sd-webui-fam: '{package}' is missing from the WebUI's Python; "
                  "FAM Diffusion cannot load without it")
