"""vkood: VK-OOD vision-language models with knowledge gated by an implicit differentiable OOD layer.

Importing the package registers every class with the transformers Auto classes, so `AutoModel...from_pretrained`
works on a VK-OOD folder with or without `trust_remote_code` (remote code is for users without this package).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_blip_vkood import VKOODBlipConfig
from .configuration_vkood import ImplicitOODConfig, VKOODConfig
from .generation_vkood import VKOODForConditionalGeneration, VKOODGenerationMemory, VKOODGenerationOutput
from .modeling_blip_vkood import VKOODBlipForQuestionAnswering, VKOODBlipOutput
from .modeling_vkood import (
    VKOODForImagesAndTextClassification,
    VKOODForQuestionAnswering,
    VKOODModel,
    VKOODPreTrainedModel,
)
from .ood_vkood import GaussianMixtureOutput, ImplicitOODLayer, ImplicitOODOutput, gem_score
from .outputs_vkood import VKOODClassificationOutput, VKOODModelOutput, VKOODRetrievalOutput
from .processing_blip_vkood import VKOODBlipProcessor
from .processing_vkood import VKOODProcessor
from .retrieval_vkood import VKOODForImageTextRetrieval

_TASK_AUTO_CLASSES = (
    (AutoModel, VKOODModel),
    (AutoModelForVisualQuestionAnswering, VKOODForQuestionAnswering),
    (AutoModelForSequenceClassification, VKOODForImagesAndTextClassification),
    (AutoModelForZeroShotImageClassification, VKOODForImageTextRetrieval),
    (AutoModelForImageTextToText, VKOODForConditionalGeneration),
)

AutoConfig.register(VKOODConfig.model_type, VKOODConfig, exist_ok=True)
VKOODConfig.register_for_auto_class("AutoConfig")
for _auto_class, _model_class in _TASK_AUTO_CLASSES:
    _auto_class.register(VKOODConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoProcessor.register(VKOODConfig, VKOODProcessor, exist_ok=True)
# VK-OOD-BLIP: its own config type, one Auto class (VQA), its processor.
AutoConfig.register(VKOODBlipConfig.model_type, VKOODBlipConfig, exist_ok=True)
VKOODBlipConfig.register_for_auto_class("AutoConfig")
AutoModelForVisualQuestionAnswering.register(VKOODBlipConfig, VKOODBlipForQuestionAnswering, exist_ok=True)
AutoProcessor.register(VKOODBlipConfig, VKOODBlipProcessor, exist_ok=True)

__all__ = [
    "VKOODConfig",
    "ImplicitOODConfig",
    "VKOODPreTrainedModel",
    "VKOODModel",
    "VKOODForQuestionAnswering",
    "VKOODForImagesAndTextClassification",
    "VKOODForImageTextRetrieval",
    "VKOODForConditionalGeneration",
    "VKOODModelOutput",
    "VKOODClassificationOutput",
    "VKOODRetrievalOutput",
    "VKOODGenerationMemory",
    "VKOODGenerationOutput",
    "ImplicitOODLayer",
    "ImplicitOODOutput",
    "GaussianMixtureOutput",
    "gem_score",
    "VKOODProcessor",
    "VKOODBlipConfig",
    "VKOODBlipForQuestionAnswering",
    "VKOODBlipOutput",
    "VKOODBlipProcessor",
]
