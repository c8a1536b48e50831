"""Classification heads on our Qwen3.5 backbones: the rest of the Auto family built-in transformers registers.

- ``Qwen3_5ForSequenceClassification`` (composite ``qwen3_5`` config: text, images, video) and
  ``Qwen3_5TextForSequenceClassification`` (``qwen3_5_text``): one score per sequence, read at the last token that is
  not padding. ``AutoModelForSequenceClassification`` builds them: TRL's ``RewardTrainer`` loads reward models so.
- ``Qwen3_5ForTokenClassification``: one score per token, for both configs (built-in registers it for the composite
  config only; a text-only config gets the same head on the text model here).

The forward passes, losses and output types are transformers' own (``GenericForSequenceClassification`` /
``GenericForTokenClassification``), as in built-in transformers, so the numbers are built-in's for identical
weights; what differs is the backbone under them, which is ours, built directly rather than through ``AutoModel``
so that it is ours even where the Auto factories point elsewhere. Parameter names match built-in's (``model.*``,
``score.*``), so checkpoints load either way.

Loaded from a causal-LM checkpoint (the usual way to start a reward model), ``lm_head`` and the MTP head are not
used; they are dropped quietly and not written back on save (a classifier's checkpoint holds a classifier).
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification

from ..core.configuration import Qwen3_5Config, Qwen3_5TextConfig
from .modeling import Qwen3_5PreTrainedModel, Qwen3_5TextModel
from .multimodal import Qwen3_5Model

__all__ = [
    "Qwen3_5ForSequenceClassification",
    "Qwen3_5ForTokenClassification",
    "Qwen3_5TextForSequenceClassification",
]


class _Qwen3_5Classifier(Qwen3_5PreTrainedModel):
    """What the heads share: our backbone, built directly; loaded from a causal-LM checkpoint, the tensors a
    classifier does not use (``lm_head``, the MTP head; the vision tower under a text config) are dropped quietly and
    nothing is carried to be written back on save."""

    carries_checkpoint_extras = False
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^mtp\.", r"^model\.visual\."]

    def _build_backbone(self, config) -> None:
        # Instead of transformers' Generic*.__init__, which builds the backbone through AutoModel.
        Qwen3_5PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = Qwen3_5Model(config) if isinstance(config, Qwen3_5Config) else Qwen3_5TextModel(config)


class Qwen3_5TextForSequenceClassification(GenericForSequenceClassification, _Qwen3_5Classifier):
    config: Qwen3_5TextConfig
    config_class = Qwen3_5TextConfig
    input_modalities = ("text",)

    def __init__(self, config: Qwen3_5TextConfig):
        self._build_backbone(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class Qwen3_5ForSequenceClassification(GenericForSequenceClassification, _Qwen3_5Classifier):
    config: Qwen3_5Config
    config_class = Qwen3_5Config

    def __init__(self, config: Qwen3_5Config):
        self._build_backbone(config)
        self.score = nn.Linear(config.get_text_config().hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        **kwargs,
    ):
        # Spelled out (built-in's order, the cache fourth) so that Trainer's column filter, which reads this
        # signature, keeps the image and video inputs; transformers' forward hands them to the backbone.
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        )


class Qwen3_5ForTokenClassification(GenericForTokenClassification, _Qwen3_5Classifier):
    config: Qwen3_5Config
    config_class = Qwen3_5Config

    def __init__(self, config: Qwen3_5Config | Qwen3_5TextConfig):
        self._build_backbone(config)
        if getattr(config, "classifier_dropout", None) is not None:
            dropout = config.classifier_dropout
        elif getattr(config, "hidden_dropout", None) is not None:
            dropout = config.hidden_dropout
        else:
            dropout = 0.1  # transformers' default for these heads
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(
            config.get_text_config().hidden_size,
            config.num_labels,
            bias=getattr(config, "token_classification_bias", True),
        )
        self.post_init()
