"""ComfyUI's entry point: ComfyUI loads a folder in `custom_nodes/` by executing its
`__init__.py` as a package, and reads the node tables below. The WebUIs load `scripts/`
instead and never import this file. Nothing heavy is imported here: the nodes import the FAM
engine when they run, and ComfyUI may execute this file twice (once per thread)."""

from .fam.hosts.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
