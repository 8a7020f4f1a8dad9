"""ComfyUI entry point of the VibeVoice Offload node pack.

ComfyUI imports this folder (custom_nodes/ComfyUI-VibeVoice-Offload) as a package and
calls `comfy_entrypoint()` (V3 node schema). ComfyUI is imported only inside the `nodes`
package, and only when this function runs, so this file and `import vibevoice_offload`
never need ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()
