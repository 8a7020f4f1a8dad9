"""ComfyUI entry point of the VibeVoice Offload node pack.

ComfyUI imports this folder (custom_nodes/ComfyUI-VibeVoice-Offload) as a package
and calls `comfy_entrypoint()` (V3 node schema). `comfy_api` is imported inside the
function so that this file, and `import vibevoice_offload`, never need ComfyUI.

Minimal placeholder: registers no nodes yet; the nodes/ package fills the list.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class VibeVoiceOffloadExtension(ComfyExtension):
        async def get_node_list(self):
            return []

    return VibeVoiceOffloadExtension()
