"""Run by the WebUI's extension installer. FAM Diffusion needs only what the WebUI already
ships (torch, numpy, gradio), so this checks and installs nothing else."""

import launch

for package in ("torch", "numpy", "gradio"):
    if not launch.is_installed(package):
        print(f"sd-webui-fam: '{package}' is missing from the WebUI's Python; "
              "FAM Diffusion cannot load without it")
