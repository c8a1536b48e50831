"""Registration with transformers' Auto* factories: the one table of what maps to what.

Official ``config.json`` files carry no ``auto_map``, so the only route to our classes is to register them under the
official ``model_type`` strings, overriding the built-in entries for this process. ``exist_ok=True`` makes that an
override on every transformers 5.x and makes ``register()`` idempotent.
"""

from __future__ import annotations

import functools
import os
import sys
import types

from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.models.auto import modeling_auto
from transformers.utils import logging

from .chat.processing import Qwen3_5Processor
from .chat.template import get_chat_template, thinking_default_for
from .core.configuration import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig
from .model.checkpoint import read_checkpoint_json
from .model.classification import (
    Qwen3_5ForSequenceClassification,
    Qwen3_5ForTokenClassification,
    Qwen3_5TextForSequenceClassification,
)
from .model.modeling import Qwen3_5ForCausalLM, Qwen3_5PreTrainedModel, Qwen3_5TextModel
from .model.multimodal import Qwen3_5ForConditionalGeneration, Qwen3_5Model
from .model.vision import Qwen3_5VisionModel
from .training.lora import register_peft_defaults

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
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, Qwen3_5Config, Qwen3_5ForSequenceClassification),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, Qwen3_5TextConfig, Qwen3_5TextForSequenceClassification),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING, Qwen3_5Config, Qwen3_5ForTokenClassification),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING, Qwen3_5TextConfig, Qwen3_5ForTokenClassification),
]
if hasattr(modeling_auto, "MODEL_FOR_MULTIMODAL_LM_MAPPING"):
    MODELS.append((modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING, Qwen3_5Config, Qwen3_5ForConditionalGeneration))

# The names tools look up on the `transformers` module itself: TRL and `transformers serve` build a model with
# `getattr(transformers, config.architectures[0])`, which the Auto* registrations never reach.
TOP_LEVEL_NAMES = {
    cls.__name__: cls
    for cls in (
        Qwen3_5Config,
        Qwen3_5TextConfig,
        Qwen3_5VisionConfig,
        Qwen3_5PreTrainedModel,
        Qwen3_5TextModel,
        Qwen3_5Model,
        Qwen3_5VisionModel,
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5ForSequenceClassification,
        Qwen3_5TextForSequenceClassification,
        Qwen3_5ForTokenClassification,
        Qwen3_5Processor,
    )
}

_done = False


def _transformers_modules() -> list[types.ModuleType]:
    """Every `transformers` top-level module object in the process.

    There can be two: importing ``transformers.processing_utils`` executes ``transformers/__init__.py`` again, and
    the new object replaces the first in ``sys.modules``, while modules imported earlier (a user's script, TRL) keep
    the first under their ``transformers`` name (or another). Both are found: the one in ``sys.modules``, those the
    activation hook saw (``transformers_qwen35_autoload.seen_modules``), and any bound to the name ``transformers``
    in a loaded module.
    """
    found = {}
    autoload = sys.modules.get("transformers_qwen35_autoload")
    for module in [sys.modules.get("transformers"), *getattr(autoload, "seen_modules", ())]:
        if module is not None:
            found[id(module)] = module
    for module in list(sys.modules.values()):
        try:
            bound = vars(module).get("transformers")
        except Exception:  # entries that are not modules (None markers, odd objects)
            continue
        if isinstance(bound, types.ModuleType) and bound.__name__ == "transformers":
            found.setdefault(id(bound), bound)
    return list(found.values())


def _publish_top_level_names() -> None:
    """``transformers.Qwen3_5ForConditionalGeneration`` and the other names of TOP_LEVEL_NAMES: ours.

    Set as plain attributes of each `transformers` module object, so the lazy lookup that would import built-in's
    class never runs for them; ``transformers.models.qwen3_5`` keeps built-in's classes under the same names.
    """
    for module in _transformers_modules():
        for name, value in TOP_LEVEL_NAMES.items():
            setattr(module, name, value)


def _use_the_qwen35_tokenizer_class() -> None:
    """Official files name ``Qwen2Tokenizer``, whose pre-tokenizer differs from Qwen3.5's (combining marks split
    differently). transformers >= 5.2x loads ``Qwen3_5Tokenizer`` for ``qwen3_5`` checkpoints whatever the files say;
    older 5.x releases (5.16-5.22, the range vLLM accepts) take the files' word. Give those the newer rule."""
    from transformers.models.auto import tokenization_auto

    corrected = getattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", None)
    if isinstance(corrected, set) and "qwen3_5" in tokenization_auto.TOKENIZER_MAPPING_NAMES:
        corrected.add("qwen3_5")


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


# Set to "builtin" to let AutoProcessor return transformers' own Qwen3VLProcessor for official checkpoints.
PROCESSOR_ENV = "TRANSFORMERS_QWEN35_PROCESSOR"
# Processor class names that mean "the standard Qwen3.5 processor" in a checkpoint's files.
STANDARD_PROCESSOR_NAMES = (None, "Qwen3VLProcessor", "Qwen3_5Processor")


def _named_processor_and_model_type(name_or_path, kwargs) -> tuple[str | None, str | None]:
    """(processor class named in the files, config model_type)."""
    named = None
    for filename in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        named = read_checkpoint_json(name_or_path, filename, kwargs).get("processor_class")
        if named:
            break
    return named, read_checkpoint_json(name_or_path, "config.json", kwargs).get("model_type")


def _give_templateless_tokenizers_our_template() -> None:
    """Base models and many fine-tunes ship no chat template; a Qwen3.5 tokenizer without one gets ours.

    ``AutoTokenizer.from_pretrained`` is wrapped once: after transformers has loaded the tokenizer, if the folder's
    ``config.json`` says Qwen3.5 and the tokenizer has no template, it gets ``get_chat_template`` with the default
    mode of the checkpoint's size (thinking for 4B/9B, not for 0.8B/2B). A template the checkpoint ships is never
    replaced.
    """
    builtin = AutoTokenizer.from_pretrained
    if getattr(builtin, "_transformers_qwen35", False):
        return

    @functools.wraps(builtin)
    def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
        tokenizer = builtin(pretrained_model_name_or_path, *args, **kwargs)
        if getattr(tokenizer, "chat_template", None) is None:
            config = read_checkpoint_json(pretrained_model_name_or_path, "config.json", kwargs)
            if config.get("model_type") in CONFIGS:
                tokenizer.chat_template = get_chat_template(thinking_default_for(config))
                logger.info("transformers_qwen35: the checkpoint has no chat template; using the Qwen3.5 one.")
        return tokenizer

    from_pretrained._transformers_qwen35 = True
    AutoTokenizer.from_pretrained = staticmethod(from_pretrained)


def _route_official_processors() -> None:
    """Make ``AutoProcessor.from_pretrained`` return ``Qwen3_5Processor`` for Qwen3.5 checkpoints.

    The official repos name ``Qwen3VLProcessor`` in their files, and AutoProcessor resolves that name to the built-in
    class before it looks at the class registered for the config (``AutoProcessor.register`` alone is not enough),
    and that class cannot be built without torchvision. So we wrap the factory: when the folder's ``config.json`` says
    ``qwen3_5`` and its files name the standard processor (or none), our processor is returned; everything else goes
    to transformers unchanged. ``TRANSFORMERS_QWEN35_PROCESSOR=builtin`` switches the routing off.
    """
    builtin = AutoProcessor.from_pretrained
    if getattr(builtin, "_transformers_qwen35", False):
        return

    @functools.wraps(builtin)
    def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
        if os.environ.get(PROCESSOR_ENV, "").lower() != "builtin" and not args:
            named, model_type = _named_processor_and_model_type(pretrained_model_name_or_path, kwargs)
            if model_type in CONFIGS and named in STANDARD_PROCESSOR_NAMES:
                return Qwen3_5Processor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return builtin(pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._transformers_qwen35 = True
    AutoProcessor.from_pretrained = staticmethod(from_pretrained)


def register() -> None:
    """Make the Auto* factories resolve Qwen3.5 to this package (idempotent)."""
    global _done
    for model_type, config_class in CONFIGS.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    for mapping, config_class, model_class in MODELS:
        mapping.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(Qwen3_5Config, Qwen3_5Processor, exist_ok=True)
    _publish_top_level_names()
    _route_official_processors()
    _give_templateless_tokenizers_our_template()
    _use_the_qwen35_tokenizer_class()
    _register_checkpoint_renaming()
    register_peft_defaults()  # PEFT's default LoRA targets for qwen3_5 / qwen3_5_text (no-op without peft)
    if not _done:
        logger.info(
            "transformers_qwen35: model types qwen3_5 and qwen3_5_text now load this package's classes (AutoConfig, "
            "AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification, "
            "AutoModelForTokenClassification, AutoProcessor, and transformers.Qwen3_5* names)."
        )
    _done = True


__all__ = ["register"]
