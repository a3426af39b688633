"""nativevl: the InternVL3 system in plain PyTorch."""

from nativevl.config import ModelConfig, TextConfig, VisionConfig, preset
from nativevl.model.vlm import VisionLanguageModel, VLMOutput

__all__ = ["ModelConfig", "TextConfig", "VLMOutput", "VisionConfig", "VisionLanguageModel", "preset"]
__version__ = "0.1.0"
