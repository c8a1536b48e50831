"""Registration with transformers' Auto* factories: the one table of what maps to what.

Official ``config.json`` files carry no ``auto_map``, so the only route to our classes is to register them under the
official ``model_type`` strings, overriding the built-in entries for this process. ``exist_ok=True`` makes that an
override on every transformers 5.x and makes ``register()`` idempotent.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.auto import modeling_auto
from transformers.utils import logging

from .configuration import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig
from .modeling import Qwen3_5ForCausalLM, Qwen3_5TextModel
from .multimodal import Qwen3_5ForConditionalGeneration, Qwen3_5Model

logger = logging.get_logger(__name__)

CONFIGS = {"qwen3_5": Qwen3_5Config, "qwen3_5_text": Qwen3_5TextConfig, "qwen3_5_vision": Qwen3_5VisionConfig}
# (auto mapping, config class, model class). For AutoModelForCausalLM a composite `qwen3_5` checkpoint gives the
# text-only model, as in built-in transformers: auto_factory hands it `config.text_config` because our model's config
# class is that one.
MODELS = [
    (modeling_auto.MODEL_MAPPING, Qwen3_5TextConfig, Qwen3_5TextModel),
    (modeling_auto.MODEL_MAPPING, Qwen3_5Config, Qwen3_5Model),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, Qwen3_5TextConfig, Qwen3_5ForCausalLM),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, Qwen3_5Config, Qwen3_5ForCausalLM),
    (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, Qwen3_5Config, Qwen3_5ForConditionalGeneration),
]
if hasattr(modeling_auto, "MODEL_FOR_MULTIMODAL_LM_MAPPING"):
    MODELS.append((modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING, Qwen3_5Config, Qwen3_5ForConditionalGeneration))

_done = False


def _register_checkpoint_renaming() -> None:
    """Give our classes the built-in rule that reads `model.language_model.*` into a text-only model.

    transformers applies its own conversion rules only to classes that live inside the `transformers` package unless
    the rule was registered by the user, so we re-register the built-in rule (unchanged) under our model type.
    """
    try:
        from transformers import conversion_mapping
    except ImportError:  # pragma: no cover - older 5.x without the module
        return
    rule = conversion_mapping.get_checkpoint_conversion_mapping("qwen3_5_text")
    if rule is not None:
        conversion_mapping.register_checkpoint_conversion_mapping("qwen3_5_text", rule, overwrite=True)


def register() -> None:
    """Make the Auto* factories resolve Qwen3.5 to this package (idempotent)."""
    global _done
    for model_type, config_class in CONFIGS.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    for mapping, config_class, model_class in MODELS:
        mapping.register(config_class, model_class, exist_ok=True)
    _register_checkpoint_renaming()
    if not _done:
        logger.info(
            "transformers_qwen35: model types qwen3_5 and qwen3_5_text now load this package's classes "
            "(AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText)."
        )
    _done = True


__all__ = ["register"]
