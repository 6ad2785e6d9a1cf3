"""transformers-blip: BLIP models, pretraining, CapFilt and fine-tuning on Hugging Face transformers.

Importing the package registers its configs and models with transformers' Auto classes, so that a saved model
directory loads with `AutoModel...from_pretrained(path)` without `trust_remote_code`.
"""

from transformers import (
    IMAGE_PROCESSOR_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_blip import BlipConfig, BlipTextConfig, BlipVisionConfig
from .image_processing_blip import BlipImageProcessorAnyMode
from .installed_pipelines import serve_installed_pipelines
from .modeling_blip import (
    BlipAnswerRanking,
    BlipCaptionOutput,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipModel,
    BlipOutput,
    BlipPreTrainedModel,
    BlipQuestionAnsweringOutput,
    BlipRetrievalOutput,
)
from .modeling_med import BlipTextLMHeadModel, BlipTextModel, ImageKeyValues
from .modeling_nlvr import BlipForVisualReasoning, BlipVisualReasoningOutput
from .modeling_pretraining import BlipContrastiveMatchingModel, BlipForPreTraining, BlipForPreTrainingOutput
from .modeling_retrieval_training import BlipForRetrievalTraining, BlipForRetrievalTrainingOutput
from .modeling_vision import BlipVisionModel
from .processing_blip import (
    BlipImageTextProcessor,
    build_processor,
    build_tokenizer,
    decode_captions,
    text_config_token_kwargs,
)

__version__ = "0.1.0"


def _register_with_auto_classes() -> None:
    for config_class in (BlipConfig, BlipTextConfig, BlipVisionConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(BlipConfig, BlipModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(BlipConfig, BlipModel, exist_ok=True)
    AutoModel.register(BlipVisionConfig, BlipVisionModel, exist_ok=True)
    AutoModel.register(BlipTextConfig, BlipTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(BlipConfig, BlipForConditionalGeneration, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(BlipConfig, BlipForQuestionAnswering, exist_ok=True)
    AutoModelForPreTraining.register(BlipConfig, BlipForPreTraining, exist_ok=True)
    # AutoImageProcessor.register would look transformers' own "BlipConfig" up by name and keep its class for the
    # torchvision backend, so ours goes into the mapping directly, for both backends.
    any_mode = {"pil": BlipImageProcessorAnyMode, "torchvision": BlipImageProcessorAnyMode}
    IMAGE_PROCESSOR_MAPPING.register(BlipConfig, any_mode, exist_ok=True)
    AutoProcessor.register(BlipConfig, BlipImageTextProcessor, exist_ok=True)
    # Saved directories carry an `auto_map` and our source files, for loading with trust_remote_code=True where
    # this package is not installed.
    BlipConfig.register_for_auto_class()
    BlipModel.register_for_auto_class("AutoModel")
    BlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    BlipForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
    BlipForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    # pipeline("image-to-text" / "visual-question-answering") on our models, served by this package's classes.
    serve_installed_pipelines()


_register_with_auto_classes()

__all__ = [
    "BlipAnswerRanking",
    "BlipCaptionOutput",
    "BlipConfig",
    "BlipContrastiveMatchingModel",
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForPreTraining",
    "BlipForPreTrainingOutput",
    "BlipForQuestionAnswering",
    "BlipForRetrievalTraining",
    "BlipForRetrievalTrainingOutput",
    "BlipForVisualReasoning",
    "BlipImageProcessorAnyMode",
    "BlipImageTextProcessor",
    "BlipModel",
    "BlipOutput",
    "BlipPreTrainedModel",
    "BlipQuestionAnsweringOutput",
    "BlipRetrievalOutput",
    "BlipTextConfig",
    "BlipTextLMHeadModel",
    "BlipTextModel",
    "BlipVisionConfig",
    "BlipVisionModel",
    "BlipVisualReasoningOutput",
    "ImageKeyValues",
    "build_processor",
    "build_tokenizer",
    "decode_captions",
    "text_config_token_kwargs",
]
