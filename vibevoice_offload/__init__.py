"""VibeVoice on small GPUs: checkpoint loading, our CFG frame loop over transformers'
VibeVoice modules, the layer offloader and the VRAM planner. Imports without ComfyUI."""

from .errors import CheckpointError, ScriptError, TokenizerNotFoundError, VibeVoiceError
from .frame_loop import GenerationResult, GenerationSettings
from .pipeline import VibeVoice

__all__ = [
    "CheckpointError",
    "GenerationResult",
    "GenerationSettings",
    "ScriptError",
    "TokenizerNotFoundError",
    "VibeVoice",
    "VibeVoiceError",
]
