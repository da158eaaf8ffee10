"""PS3: scaling vision pre-training to 4K resolution — a drop-in for the reference ``ps3`` package.

``from vila_hd.ps3 import PS3VisionModel, PS3TextModel, PS3ImageProcessor, PS3Tokenizer, PS3Config``
"""

from .configuration import PS3Config, PS3TextConfig, PS3VisionConfig, preset_config
from .image_processing import PS3ImageProcessor
from .modeling import PS3Model, PS3PreTrainedModel, PS3TextModel, PS3VisionModel
from .tokenization import PS3Tokenizer
from .vision import LowResOutput, PS3VisionEncoder, PS3VisionModelOutput

__all__ = [
    "LowResOutput",
    "PS3Config",
    "PS3ImageProcessor",
    "PS3Model",
    "PS3PreTrainedModel",
    "PS3TextConfig",
    "PS3TextModel",
    "PS3Tokenizer",
    "PS3VisionConfig",
    "PS3VisionEncoder",
    "PS3VisionModel",
    "PS3VisionModelOutput",
    "preset_config",
]
