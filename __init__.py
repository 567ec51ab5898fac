"""Video-P2P for ComfyUI — entry point.

ComfyUI imports this package from ``custom_nodes/`` and calls ``comfy_entrypoint``.
Importing it anywhere else must not fail, so the ComfyUI-facing modules are imported
only when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import VideoP2PExtension

    return VideoP2PExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
