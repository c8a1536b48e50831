"""Vision + language: image and video features replace their placeholder tokens, then the text stack runs.

``Qwen3_5Model`` holds ``visual`` (``vision.py``) and ``language_model`` (``modeling.Qwen3_5TextModel``), the
official checkpoint's ``model.visual.*`` and ``model.language_model.*``; ``Qwen3_5ForConditionalGeneration`` adds
``lm_head``. Inputs are checked against each other (pixel rows vs grids vs placeholder counts vs the position limit)
before the vision tower runs, so a wrong input costs nothing and says how to fix it.

Rotary positions come from ``positions.py``; each row's offset after its images is kept in the cache
(``Qwen3_5HybridCache.rope_deltas``), so cached decoding, beams and continued generations pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import modeling_outputs
from transformers.utils.generic import can_return_tuple

from ..core.cache import Qwen3_5HybridCache, model_state
from ..core.configuration import Qwen3_5Config
from ..generation.mixin import Qwen3_5GenerationMixin
from .modeling import (
    LM_HEAD_TP_PLAN,
    Qwen3_5PreTrainedModel,
    Qwen3_5TextModel,
    check_position_ids,
    check_token_ids,
)
from .positions import IMAGE, TEXT, VIDEO, rope_positions, token_types
from .vision import Qwen3_5VisionModel, validate_grids

VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

if hasattr(modeling_outputs, "MultimodalBaseModelOutputWithPast"):
    # transformers >= 5.2x: the shared multimodal outputs (their to_tuple() flattens the vision outputs too).
    Qwen3_5ModelOutputWithPast = modeling_outputs.MultimodalBaseModelOutputWithPast
    Qwen3_5CausalLMOutputWithPast = modeling_outputs.MultimodalCausalLMOutputWithPast
else:

    @dataclass
    class Qwen3_5ModelOutputWithPast(modeling_outputs.BaseModelOutputWithPast):
        """The text stack's output and what the vision tower returned for this call's images and videos."""

        image_outputs: modeling_outputs.BaseModelOutputWithPooling | None = None
        video_outputs: modeling_outputs.BaseModelOutputWithPooling | None = None

    @dataclass
    class Qwen3_5CausalLMOutputWithPast(modeling_outputs.CausalLMOutputWithPast):
        """Logits (and loss) with what the vision tower returned for this call's images and videos."""

        image_outputs: modeling_outputs.BaseModelOutputWithPooling | None = None
        video_outputs: modeling_outputs.BaseModelOutputWithPooling | None = None


class Qwen3_5Model(Qwen3_5PreTrainedModel):
    config: Qwen3_5Config
    config_class = Qwen3_5Config
    base_model_prefix = "model"
    _keys_to_ignore_on_load_unexpected = [r"^mtp\."]

    def __init__(self, config: Qwen3_5Config):
        super().__init__(config)
        self.visual = Qwen3_5VisionModel(config.vision_config)
        self.language_model = Qwen3_5TextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs):
        """The vision tower's output for these images (``BaseModelOutputWithPooling``): ``pooler_output`` holds one
        ``(t*h*w/4, hidden)`` feature tensor per image; ``output_hidden_states=True`` adds the tower's hidden states,
        ``return_dict=False`` gives a tuple."""
        return self._vision_outputs(pixel_values, image_grid_thw, "pixel_values", **kwargs)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None, **kwargs
    ):
        """As ``get_image_features``, one feature tensor per video."""
        return self._vision_outputs(pixel_values_videos, video_grid_thw, "pixel_values_videos", **kwargs)

    def _vision_outputs(self, pixels, grid_thw, what, checked=False, output_hidden_states=None, **kwargs):
        """``output_attentions`` is accepted and gives no vision attentions (see docs/compatibility.md)."""
        if grid_thw is None:
            grids = "image_grid_thw" if what == "pixel_values" else "video_grid_thw"
            raise ValueError(f"{what} need their {grids} (one (t, h, w) row per item, from the processor).")
        if not checked:  # forward() checks all inputs up front, before any compute
            _check_pixels(pixels, grid_thw, self.config.vision_config, what)
        if output_hidden_states is None:
            output_hidden_states = self.config.vision_config.output_hidden_states
        outputs = self.visual(pixels.to(self.visual.dtype), grid_thw, output_hidden_states=bool(output_hidden_states))
        sizes = (grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        outputs.pooler_output = tuple(outputs.pooler_output.split(sizes))
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        cache=None,
        cache_position=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = model_state(cache if cache is not None else past_key_values, self.config.text_config)
        use_cache = self.language_model.resolve_use_cache(use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        if input_ids is not None:
            check_token_ids(input_ids, self.config.text_config.vocab_size, continuing=past > 0)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if position_ids is not None:
            check_position_ids(position_ids, batch, length)
        types = self._token_types(input_ids, mm_token_type_ids, batch, length, past)
        self._check_inputs(types, past, length, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        encoded = {}
        for pixels, grids, modality, what in (
            (pixel_values, image_grid_thw, IMAGE, "pixel_values"),
            (pixel_values_videos, video_grid_thw, VIDEO, "pixel_values_videos"),
        ):
            if pixels is not None:
                encoded[modality] = self._vision_outputs(pixels, grids, what, checked=True)
                features = torch.cat(encoded[modality].pooler_output)
                slots = (types == modality).unsqueeze(-1).to(inputs_embeds.device)
                inputs_embeds = inputs_embeds.masked_scatter(slots, features.to(inputs_embeds))

        if use_cache and cache is None:
            cache = Qwen3_5HybridCache(self.config.text_config)
        if position_ids is None or position_ids.dim() == 2:
            position_ids = self._positions(
                position_ids, types, attention_mask, cache, past, image_grid_thw, video_grid_thw, inputs_embeds.device
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        return Qwen3_5ModelOutputWithPast(**outputs, image_outputs=encoded.get(IMAGE), video_outputs=encoded.get(VIDEO))

    def _token_types(self, input_ids, mm_token_type_ids, batch, length, past=0):
        if mm_token_type_ids is not None:
            if tuple(mm_token_type_ids.shape) != (batch, length):
                raise ValueError(
                    f"mm_token_type_ids has shape {tuple(mm_token_type_ids.shape)} but the input is {(batch, length)}: "
                    "pass the processor's mm_token_type_ids with its input_ids, or leave them out."
                )
            # Checked on a prompt (processor output); a placeholder id the model itself generated later is text.
            if input_ids is not None and past == 0:
                derived = token_types(input_ids, self.config.image_token_id, self.config.video_token_id)
                if not torch.equal(derived.to(mm_token_type_ids.device), mm_token_type_ids.to(derived.dtype)):
                    raise ValueError(
                        "mm_token_type_ids does not mark the image and video placeholder tokens of input_ids (1 on "
                        "each <|image_pad|>, 2 on each <|video_pad|>, 0 elsewhere): pass the processor's "
                        "mm_token_type_ids with its own input_ids, or leave them out (they are derived then)."
                    )
            return mm_token_type_ids
        if input_ids is None:
            return torch.full((batch, length), TEXT, dtype=torch.int32)
        return token_types(input_ids, self.config.image_token_id, self.config.video_token_id)

    def _check_inputs(self, types, past, length, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Everything that can be checked from shapes, before any vision or text compute."""
        limit = self.config.text_config.max_position_embeddings
        scaled = self.config.text_config.rope_parameters.get("rope_type", "default") != "default"
        if past + length > limit and not scaled:
            raise ValueError(
                f"The input holds {past + length} tokens ({past} cached + {length} new) but the model was trained on at "
                f"most max_position_embeddings={limit}. Shorten the prompt, use fewer or smaller images, cap "
                "max_new_tokens, or set RoPE scaling in text_config.rope_parameters (rope_type 'yarn', 'dynamic', ...)."
            )
        merge = self.config.vision_config.spatial_merge_size**2
        for pixels, grids, modality, what in (
            (pixel_values, image_grid_thw, IMAGE, "pixel_values"),
            (pixel_values_videos, video_grid_thw, VIDEO, "pixel_values_videos"),
        ):
            name = "image" if modality == IMAGE else "video"
            placeholders = int((types == modality).sum())
            if pixels is None:
                if placeholders and past == 0:
                    raise ValueError(
                        f"The prompt has {placeholders} {name} placeholder tokens but no {what} were given: pass the "
                        f"processor's {what} and {name}_grid_thw, or remove the placeholders."
                    )
                continue
            _check_pixels(pixels, grids, self.config.vision_config, what)
            features = int(grids.prod(-1).sum()) // merge
            if placeholders != features:
                raise ValueError(
                    f"The prompt has {placeholders} {name} placeholder tokens but the {name}s give {features} features "
                    f"({name}_grid_thw {grids.tolist()}). Build text and {what} with one processor call, which expands "
                    f"each <|{name}_pad|> to the right count."
                )

    def _positions(self, text_positions, types, attention_mask, cache, past, image_grid_thw, video_grid_thw, device):
        """``(4, B, T)``: text positions (used to find packed samples), then the three rotary rows."""
        batch, length = types.shape
        valid = attention_mask[:, -length:].bool() if attention_mask is not None else None
        if text_positions is None:
            if attention_mask is not None:
                text_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                text_positions = torch.arange(past, past + length, device=device).expand(batch, -1)
        text_positions = text_positions.to(device)
        previous = cache.rope_deltas if cache is not None and past > 0 else None
        previous = previous if previous is not None else torch.zeros(batch, 1, dtype=torch.long, device=device)
        has_vision = image_grid_thw is not None or video_grid_thw is not None
        if has_vision and bool((types != TEXT).any()):
            seen = attention_mask[:, :past].sum(-1) if attention_mask is not None else torch.full((batch,), past)
            seen = seen.to(device)
            rope, real = rope_positions(
                types, image_grid_thw, video_grid_thw, self.config.vision_config.spatial_merge_size, valid,
                start=seen + previous[:, 0].to(device),
            )  # fmt: skip
            rope = rope.to(device)
            deltas = (rope.amax(dim=(0, 2)) + 1 - (seen + real)).unsqueeze(-1)
        else:
            rope = (text_positions + previous.to(device)).unsqueeze(0).expand(3, -1, -1)
            deltas = previous
        if cache is not None:
            cache.rope_deltas = deltas.to(device)
        return torch.cat([text_positions.unsqueeze(0), rope], dim=0)


def _check_pixels(pixels, grids, vision_config, what):
    width = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    if pixels.dim() != 2 or pixels.shape[-1] != width:
        raise ValueError(
            f"{what} must be patch rows of shape (patches, {width}) = {vision_config.in_channels} channels x "
            f"{vision_config.temporal_patch_size} frames x {vision_config.patch_size}x{vision_config.patch_size}; got "
            f"{tuple(pixels.shape)}. Images must be RGB (convert grayscale or RGBA with PIL's .convert('RGB')) and go "
            "through the processor."
        )
    validate_grids(grids, pixels.shape[0], vision_config, what)


class Qwen3_5ForConditionalGeneration(Qwen3_5PreTrainedModel, Qwen3_5GenerationMixin):
    config: Qwen3_5Config
    config_class = Qwen3_5Config
    _tp_plan = LM_HEAD_TP_PLAN
    _keys_to_ignore_on_load_unexpected = [r"^mtp\."]
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Qwen3_5Config):
        super().__init__(config)
        self.model = Qwen3_5Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        logits_to_keep=0,
        cache=None,
        cache_position=None,
        skip_logits=None,
        **kwargs,
    ):
        outputs: Qwen3_5ModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            cache=cache,
            return_dict=True,
            **kwargs,
        )
        head = self._head_output(
            outputs, labels, logits_to_keep, self.config.text_config.vocab_size, kwargs, skip_logits
        )
        return Qwen3_5CausalLMOutputWithPast(
            **head, image_outputs=outputs.image_outputs, video_outputs=outputs.video_outputs
        )

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        step_ids = inputs.get("input_ids")
        if cache is not None and cache.get_seq_length() > 0 and step_ids is not None:
            # Decoding steps carry no placeholders: the images were encoded at the prefill.
            types = token_types(step_ids, self.config.image_token_id, self.config.video_token_id)
            for modality, keys in ((IMAGE, VISION_INPUTS[:2]), (VIDEO, VISION_INPUTS[2:])):
                if not bool((types == modality).any()):
                    for key in keys:
                        inputs.pop(key, None)
            if "mm_token_type_ids" in inputs and inputs["mm_token_type_ids"].shape != step_ids.shape:
                inputs.pop("mm_token_type_ids")
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and ``num_return_sequences``: repeat each row's own images and videos with the row."""
        if expand_size == 1:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        vision = {key: model_kwargs.pop(key) for key in VISION_INPUTS if model_kwargs.get(key) is not None}
        if vision:
            if input_ids is None:
                raise ValueError("Generating several sequences per prompt with images needs input_ids.")
            vision = _repeat_vision_per_row(input_ids, vision, expand_size, self.config)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(vision)
        return input_ids, model_kwargs


def _repeat_vision_per_row(input_ids, vision, repeats, config):
    """Split pixel rows and grids by the batch row whose placeholders they fill, and repeat each row's share."""
    merge = config.vision_config.spatial_merge_size**2
    types = token_types(input_ids, config.image_token_id, config.video_token_id)
    result = {}
    for modality, pixels_key, grid_key in ((IMAGE, *VISION_INPUTS[:2]), (VIDEO, *VISION_INPUTS[2:])):
        if grid_key not in vision:
            continue
        grids, pixels = vision[grid_key], vision[pixels_key]
        tokens_per_item = (grids.prod(-1) // merge).tolist()
        patches_per_item = grids.prod(-1).tolist()
        tokens_per_row = (types == modality).sum(-1).tolist()
        grid_rows, pixel_rows, item, offset = [], [], 0, 0
        for row_tokens in tokens_per_row:
            first_item, first_patch, taken = item, offset, 0
            while taken < row_tokens:
                taken += tokens_per_item[item]
                offset += patches_per_item[item]
                item += 1
            grid_rows += [grids[first_item:item]] * repeats
            pixel_rows += [pixels[first_patch:offset]] * repeats
        result[grid_key], result[pixels_key] = torch.cat(grid_rows), torch.cat(pixel_rows)
    return result
