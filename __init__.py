"""ComfyUI's entry point: ComfyUI loads a folder in `custom_nodes/` by executing its
`__init__.py` as a package, and reads the node tables below. The WebUIs load `scripts/`
instead and never import this file. Nothing heavy is imported here: the nodes import the FAM
engine when they run, and ComfyUI may execute this file twice (once per thread)."""

if __package__:   # ComfyUI executes the folder as a package
    from .fam.hosts.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:   # a plain module: pytest sets up a checkout's root this way when the folder's name
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}   # is no package name

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
