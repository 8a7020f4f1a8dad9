"""Errors the library raises for bad input; each message names the file, tensor, speaker or line."""


class VibeVoiceError(ValueError):
    """Base class: bad input that the user can fix."""


class CheckpointError(VibeVoiceError):
    """A model folder that cannot be loaded: missing, corrupt, misshapen or of an unknown layout."""


class TokenizerNotFoundError(VibeVoiceError):
    """No local Qwen2.5 tokenizer was found; the message lists every place searched."""


class ScriptError(VibeVoiceError):
    """A dialog script or voice clip that cannot be turned into a prompt."""
