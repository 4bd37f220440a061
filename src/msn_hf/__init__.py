"""msn_hf: Masked Siamese Networks pretraining as a Hugging Face Transformers model."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoVideoProcessor,
)

from .configuration_msn import MSNConfig
from .image_processing_msn import MSNImageProcessor
from .loss_msn import MSNLoss, sinkhorn_knopp
from .modeling_msn import MSNForImageClassification, MSNModel, MSNModelOutput, MSNPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(MSNConfig.model_type, MSNConfig, exist_ok=True)
AutoModel.register(MSNConfig, MSNModel, exist_ok=True)
AutoModelForImageClassification.register(MSNConfig, MSNForImageClassification, exist_ok=True)
AutoImageProcessor.register(MSNConfig, image_processor_classes={"torchvision": MSNImageProcessor}, exist_ok=True)
# No video processor. Registered as such because pipelines probe for one, and AutoVideoProcessor takes the image
# processor's `auto_map` for custom video code and asks, interactively, whether to run it.
AutoVideoProcessor.register(MSNConfig, video_processor_classes={}, exist_ok=True)
# Saved folders carry the modeling code and an `auto_map`, so they load with `trust_remote_code=True` anywhere.
MSNConfig.register_for_auto_class()
MSNModel.register_for_auto_class("AutoModel")
MSNForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MSNImageProcessor.register_for_auto_class("AutoImageProcessor")

# The Trainer classes are exported lazily: importing them imports `transformers.trainer`, which is slow and which
# users of the model alone (inference, pipelines, `from_pretrained`) do not need.
_LAZY_EXPORTS = {"MSNTrainer": "trainer_msn", "MSNTrainingArguments": "trainer_msn"}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_EXPORTS])


__all__ = [
    "MSNConfig",
    "MSNForImageClassification",
    "MSNImageProcessor",
    "MSNLoss",
    "MSNModel",
    "MSNModelOutput",
    "MSNPreTrainedModel",
    "MSNTrainer",
    "MSNTrainingArguments",
    "sinkhorn_knopp",
]
