"""Hosts: the thin adapters that put FAM on a UNet someone else drives.

`diffusers` (the reference engine), `a1111` and `forge` (the WebUIs, on the shared `webui`
layer), `patcher` (the model-patcher dialect of the Forge family and ComfyUI), `unet_hooks`
(what every hooking host shares) and `sdxl` (size conditioning of native-size calls)."""
