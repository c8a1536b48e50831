"""Qwen3.5 (0.8B / 2B / 4B / 9B) for Hugging Face transformers.

``import transformers_qwen35`` registers this package's classes for the official model types, so
``AutoModelForCausalLM.from_pretrained("Qwen/Qwen3.5-0.8B")`` builds them. Installed, the package is also activated
without that import, in any process that looks up a transformers factory (``transformers_qwen35_autoload``;
``TRANSFORMERS_QWEN35_AUTOLOAD=0`` turns that off; docs/ecosystem.md).
"""

from .chat.parsing import StreamingResponseParser, parse_response
from .chat.processing import Qwen3_5Processor
from .chat.template import get_chat_template, thinking_default_for
from .core.cache import Qwen3_5HybridCache
from .core.configuration import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig
from .generation.sampling import PresencePenaltyLogitsProcessor, recommended_sampling
from .generation.thinking_budget import ThinkingBudgetProcessor
from .model.classification import (
    Qwen3_5ForSequenceClassification,
    Qwen3_5ForTokenClassification,
    Qwen3_5TextForSequenceClassification,
)
from .model.cpu_weights import pack_for_cpu
from .model.modeling import Qwen3_5ForCausalLM, Qwen3_5PreTrainedModel, Qwen3_5TextModel
from .model.multimodal import Qwen3_5ForConditionalGeneration, Qwen3_5Model
from .model.vision import Qwen3_5VisionModel
from .registration import register
from .training.data import PaddingCollator, load_chat_dataset, tokenize_chat
from .training.lora import check_lora_targets, lora_target_modules, register_peft_defaults

__version__ = "0.1.0"

register()

__all__ = [
    "Qwen3_5Config",
    "Qwen3_5TextConfig",
    "Qwen3_5VisionConfig",
    "Qwen3_5ForCausalLM",
    "Qwen3_5TextModel",
    "Qwen3_5Model",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5ForSequenceClassification",
    "Qwen3_5TextForSequenceClassification",
    "Qwen3_5ForTokenClassification",
    "Qwen3_5VisionModel",
    "Qwen3_5PreTrainedModel",
    "Qwen3_5HybridCache",
    "Qwen3_5Processor",
    "get_chat_template",
    "thinking_default_for",
    "recommended_sampling",
    "PresencePenaltyLogitsProcessor",
    "ThinkingBudgetProcessor",
    "parse_response",
    "StreamingResponseParser",
    "lora_target_modules",
    "register_peft_defaults",
    "check_lora_targets",
    "tokenize_chat",
    "load_chat_dataset",
    "PaddingCollator",
    "pack_for_cpu",
    "register",
    "__version__",
]
