"""The Qwen3.5 language model built from ``layers.py``: ``Qwen3_5PreTrainedModel`` (loading, saving, weight
init), ``Qwen3_5TextModel`` (embedding, decoder stack, final norm) and ``Qwen3_5ForCausalLM``.

The text model's forward, top-down: check the inputs, find packed samples (``packing.py``), build the attention mask
(``core/masks.py``) and rotary embeddings, then run the decoder stack: eagerly (``decoder_stack``), or, for the
opt-in graphed training step, replayed from CUDA graphs (``training/graphs.py``; one call, ``graphed_stack``, decides).
``generate()`` comes from ``generation/mixin.py``, which asks the model for what it needs and never imports this
module back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from ..core.cache import Qwen3_5HybridCache, model_state, returned_cache
from ..core.configuration import FULL_ATTENTION, Qwen3_5Config, Qwen3_5TextConfig
from ..core.masks import CACHE_FIELD, build_attention_mask
from ..generation.mixin import Qwen3_5GenerationMixin
from ..generation.sampling import recommended_generation_config
from ..kernels import dispatch
from ..training import graphs as training_graphs
from ..training.chunked_loss import causal_lm_loss
from . import presets
from .checkpoint import CarriedTensors, check_checkpoint_tensors, local_checkpoint_directory
from .layers import (
    Qwen3_5DecoderLayer,
    Qwen3_5GatedDeltaNet,
    Qwen3_5RMSNorm,
    Qwen3_5RMSNormGated,
    Qwen3_5TextRotaryEmbedding,
)
from .mtp import Qwen3_5MultiTokenPredictor, mtp_head
from .packing import find_segments

try:  # transformers >= 5.x keeps the initialisers that respect already-loaded weights here
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init

# Inputs of at most this many tokens (batch x length) run the decoder stack with deferred residual adds.
DEFER_RESIDUAL_TOKENS = 64


class Qwen3_5PreTrainedModel(PreTrainedModel):
    config: Qwen3_5Config
    config_class = Qwen3_5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"^mtp\.", r"^model\.visual\."]
    # The official files store these two in fp32; keeping them so also saves them unchanged.
    _keep_in_fp32_modules_strict = ["A_log", "linear_attn.norm"]
    _is_stateful = True

    carried_tensors: CarriedTensors | None = None
    # Whether from_pretrained keeps the checkpoint tensors this class does not use (vision tower, MTP head) to write
    # them back on save: yes for the language models, no for the classification heads.
    carries_checkpoint_extras: bool = True
    # Positions per chunk of the chunked training loss (training/chunked_loss.py); None: as many as keep a chunk's
    # fp32 logits within chunked_loss.CHUNK_ELEMENTS.
    loss_chunk_size: int | None = None
    # What forward's skip_logits=None means in training with labels. Set False for a trainer that reads
    # outputs.logits in training. (TRL 1.16's SFTTrainer computes its loss from the hidden states itself.)
    skip_logits_in_training: bool = True
    # The format cpu_weights.pack_for_cpu packed the language model's linear layers in (bf16, int8, int4), or None.
    cpu_weights: str | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if pretrained_model_name_or_path is not None:
            cls._check_weights_fit_config(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        if not cls.carries_checkpoint_extras:
            return loaded
        # With no path (weights given as state_dict=) there are no checkpoint files to carry.
        if pretrained_model_name_or_path is not None:
            if model.config.model_type == "qwen3_5_text":
                # Vision tower, MTP head and composite config are not used here, but saving writes them back.
                model.carried_tensors = CarriedTensors.from_checkpoint(pretrained_model_name_or_path, kwargs)
            else:
                model.carried_tensors = CarriedTensors.from_checkpoint(
                    pretrained_model_name_or_path, kwargs, prefixes=("mtp.",), text_only=False
                )
        if getattr(model, "generation_config", None) is not None and model.generation_config._from_model_config:
            _use_recommended_sampling(model)
        return loaded

    @classmethod
    def _check_weights_fit_config(cls, name_or_path, kwargs: dict) -> None:
        """Before anything is allocated: the local checkpoint's tensor shapes and dtypes (file headers only) against
        the config the model will be built from. A config.json that does not describe the weights (a composite one
        without text_config builds the 9B) is refused here, not after a model of the wrong size was allocated.
        Missing tensors are transformers' to report; ``ignore_mismatched_sizes=True`` skips the shape check."""
        directory = local_checkpoint_directory(name_or_path, kwargs)
        if directory is None:
            return
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            try:
                config = cls.config_class.from_pretrained(directory)
            except Exception:
                return  # transformers reports an unreadable config itself
        with_vision = not isinstance(config, Qwen3_5TextConfig)
        check_checkpoint_tensors(
            directory, config, with_vision, check_shapes=not kwargs.get("ignore_mismatched_sizes", False)
        )

    @classmethod
    def _from_config(cls, config, **kwargs):
        # from_pretrained keeps the fp32-strict parameters in fp32 under any dtype; transformers' _from_config
        # (AutoModel*.from_config(..., dtype=...)) casts everything, so widen them back here.
        model = super()._from_config(config, **kwargs)
        for name, parameter in model.named_parameters():
            if parameter.dtype != torch.float32 and any(key in name for key in cls._keep_in_fp32_modules_strict):
                parameter.data = parameter.data.float()
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self.cpu_weights is not None:
            raise ValueError(
                f"this model's weights are packed for CPU decoding ({self.cpu_weights}) and cannot be saved: save "
                "the checkpoint it was loaded from, before pack_for_cpu"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        is_main = kwargs.get("is_main_process", True)
        if self.carried_tensors is not None and is_main and kwargs.get("safe_serialization", True):
            self.carried_tensors.write(save_directory, self.config)

    def get_mtp_head(self) -> Qwen3_5MultiTokenPredictor:
        """The checkpoint's multi-token-prediction head (``mtp.py``), built on first use: what ``generate(...,
        mtp_draft_tokens=K)`` drafts with. A ``ValueError`` says so when the model has none."""
        return mtp_head(self)

    def _head_output(
        self, outputs, labels, logits_to_keep, vocab_size, kwargs, skip_logits=None
    ) -> CausalLMOutputWithPast:
        """``lm_head`` on the kept positions, and the loss when labels are given (for the two generating heads).

        ``skip_logits`` (the forward keyword): True computes the loss chunk by chunk (training/chunked_loss.py) and
        returns ``logits=None``, so full-vocabulary fp32 logits never exist for the whole sequence; False materialises the
        logits; None (default) skips them exactly when ``self.training and labels is not None`` (a training step
        reads only the loss; eval, ``Trainer.prediction_step`` and generation get logits), unless the model's
        ``skip_logits_in_training`` is False. A custom ``loss_function`` gets the logits it is written for, so the
        default then keeps them, and True is refused."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = outputs.last_hidden_state[:, keep, :]
        standard_loss = self.loss_function is ForCausalLMLoss
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns only the loss, so it needs labels")
        if skip_logits and not standard_loss:
            raise ValueError("skip_logits=True computes ForCausalLMLoss chunk by chunk; this model has a custom loss")
        if skip_logits is None:
            skip_logits = self.training and labels is not None and standard_loss and self.skip_logits_in_training
        loss = logits = None
        if skip_logits:
            loss = causal_lm_loss(hidden, self.lm_head, labels, vocab_size, chunk_size=self.loss_chunk_size, **kwargs)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own Qwen3_5HybridCache

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Qwen3_5GatedDeltaNet):
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(0.01, 16).log_())
        elif isinstance(module, Qwen3_5RMSNormGated):
            init.ones_(module.weight)
        elif isinstance(module, Qwen3_5RMSNorm):
            init.zeros_(module.weight)


# The official vocabulary's end-of-turn and end-of-text ids: chat generation must stop at either.
OFFICIAL_VOCAB_SIZE, IM_END_ID, ENDOFTEXT_ID = 248320, 248046, 248044


def _use_recommended_sampling(model) -> None:
    """A checkpoint without ``generation_config.json`` samples as its model card recommends for its size's default
    mode, and stops at end of turn, instead of greedy decoding that runs past ``<|im_end|>``
    (see generation/sampling.py)."""
    size = presets.size_of(model.config)
    if size is None:
        return
    extra = {}
    if model.config.get_text_config().vocab_size == OFFICIAL_VOCAB_SIZE:
        extra = dict(eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID)
    model.generation_config = recommended_generation_config(size, **extra)
    model.recommended_sampling_size = size  # qwen35 chat switches the setting with the mode


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, continuing: bool = False) -> None:
    """Refuse ids the embedding cannot look up, before it does (on CUDA that would be a device-side assert that
    ruins the process's CUDA context). One-token steps of a running generation are the model's own samples and skip
    the device sync on GPU."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, tokens) with at least one token, got shape {tuple(input_ids.shape)}: "
            "tokenize a non-empty prompt (a 1-D tensor needs [None] for a batch of one)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}.")
    if torch.compiler.is_compiling() or (continuing and input_ids.shape[1] == 1 and input_ids.device.type != "cpu"):
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds the id {bad}, outside this model's vocabulary of {vocab_size} ids (0 to {vocab_size - 1})"
            ": encode the text with this checkpoint's tokenizer, and pad with its pad_token_id."
        )


def check_position_ids(position_ids: torch.Tensor, batch: int, length: int) -> None:
    """Shapes ``(B or 1, T)``, ``(3 or 4, B or 1, T)``, integer values; else a ValueError that says what fits."""
    if position_ids.dim() in (2, 3) and (position_ids.shape[-1] != length or position_ids.shape[-2] not in (1, batch)):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)} but the input is {batch} row(s) of {length} token(s): "
            f"give (batch or 1, {length}), or (3 or 4, batch or 1, {length}) for multimodal positions."
        )
    if position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must hold integer positions, got {position_ids.dtype}.")


def _text_positions(position_ids, batch, length, past, device):
    """Split any accepted position layout into (text positions (B, T) or None, rope rows (3, B, T))."""
    if position_ids is None:
        text = torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, -1)
        return None, text.unsqueeze(0).expand(3, -1, -1)
    check_position_ids(position_ids, batch, length)
    if position_ids.dim() == 2:
        return position_ids, position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[0], position_ids[1:]
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return None, position_ids
    raise ValueError(
        f"position_ids must have shape (batch, seq), (3, batch, seq) or (4, batch, seq); got {tuple(position_ids.shape)}."
    )


def hidden_state_selection(output_hidden_states, count: int) -> set[int] | None:
    """The hidden states ``output_hidden_states`` selects, as transformers 5.2x reads it: a flag (bool or None) selects
    all (None here); an int or a list of ints selects those indices of the ``count`` states (embeddings, then each
    layer), negative ones counted from the end, out-of-range ones selecting nothing. Unselected states are returned as
    None in their places."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return None
    chosen = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {index % count for index in chosen if -count <= index < count}


class Qwen3_5TextModel(Qwen3_5PreTrainedModel):
    config: Qwen3_5TextConfig
    config_class = Qwen3_5TextConfig

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3_5TextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def norm_modules(self) -> list[Qwen3_5RMSNorm]:
        """The zero-centred RMSNorms of the layers and the final norm, for ``dispatch.norm_weights_prepared`` (found
        afresh each time: modules can be swapped)."""
        return [module for module in self.modules() if isinstance(module, Qwen3_5RMSNorm)]

    def layers_checkpointed(self) -> bool:
        """Whether this training forward recomputes its layers in backward (activation checkpointing)."""
        return self.training and any(layer.gradient_checkpointing for layer in self.layers)

    def decoder_stack(self, hidden_states, position_embeddings, on_layer=None, **layer_kwargs) -> torch.Tensor:
        """The decoder layers and the final norm over ``hidden_states``; ``layer_kwargs`` go to every layer (masks,
        segments, cache, ...) and ``on_layer(layer, hidden_states, attention_weights)`` is called after each. The one
        loop behind the forward, the static decoding block (``generation/static_decode.py``) and the graphed training
        step (``training/graphs.py``).

        For a few tokens (decoding, speculative blocks), where a step is mostly kernel launches, each layer's last
        residual add is left to the next layer's first norm (see the decoder layer). Not for long inputs: the unadded
        pair stays referenced here through the next layer, one more hidden-size tensor at the peak (134 MB at a 64k
        prefill of 0.8B); nor when each layer's output is watched, or layers are checkpointed (reentrant
        checkpointing only sees positional tensors)."""
        batch, length = hidden_states.shape[:2]
        defer = batch * length <= DEFER_RESIDUAL_TOKENS and on_layer is None and not self.layers_checkpointed()
        pending = None
        with dispatch.norm_weights_prepared(self, hidden_states):
            for layer in self.layers:
                hidden_states, weights = layer(
                    hidden_states, position_embeddings=position_embeddings, mlp_output=pending,
                    defer_mlp_output=defer, **layer_kwargs,
                )  # fmt: skip
                if defer:
                    hidden_states, pending = hidden_states
                if on_layer is not None:
                    on_layer(layer, hidden_states, weights)
            return self.norm(pending, residual=hidden_states)[0] if defer else self.norm(hidden_states)

    def resolve_use_cache(self, use_cache: bool | None) -> bool:
        """Training keeps no cache unless asked; with activation checkpointing never: the recomputed forward would
        append the same keys to it a second time."""
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and self.layers_checkpointed():
            return False
        return use_cache

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
        cache=None,
        cache_position=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        selected_layers = hidden_state_selection(output_hidden_states, self.config.num_hidden_layers + 1)
        output_hidden_states = bool(output_hidden_states)
        use_cache = self.resolve_use_cache(use_cache)
        cache = model_state(cache if cache is not None else past_key_values, self.config)
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size, continuing=cache is not None and cache.seen_tokens > 0)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds must be (batch, tokens, hidden) with at least one token, got {tuple(inputs_embeds.shape)}."
            )
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D (batch, past + seq) padding mask, got shape {tuple(attention_mask.shape)}."
            )
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.bool()
            if key_valid.shape[-1] != past + length:
                raise ValueError(
                    f"attention_mask covers {key_valid.shape[-1]} positions but the cache holds {past} and the input "
                    f"adds {length}: it must cover both."
                )
        text_positions, rope_positions = _text_positions(position_ids, batch, length, past, device)
        segments = find_segments(
            text_positions,
            attention_mask,
            past,
            (batch, length),
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            seq_idx=kwargs.pop("seq_idx", None),
        )
        if segments is not None and cache is not None and past > 0:
            raise ValueError("A packed batch cannot continue a cache: pack only fresh sequences.")
        if use_cache and cache is None and segments is None:
            cache = Qwen3_5HybridCache(self.config)

        implementation = self.config._attn_implementation or "eager"
        if implementation.startswith("flash") or "flash" in implementation:
            attention_mask_4d = attention_mask if key_valid is not None else None
            if segments is not None:
                kwargs.setdefault("cu_seq_lens_q", segments.cu_seqlens)
                kwargs.setdefault("cu_seq_lens_k", segments.cu_seqlens)
                kwargs.setdefault("max_length_q", segments.max_length)
                kwargs.setdefault("max_length_k", segments.max_length)
        else:
            attention_mask_4d = build_attention_mask(
                key_valid, segments, batch, length, past, device, needs_causal_mask=implementation == "eager"
            )
        padding_mask = key_valid[:, -length:] if key_valid is not None and length > 1 else None

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, rope_positions)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None

        def collect(layer, hidden, weights):
            if output_hidden_states:
                all_hidden_states.append(hidden)
            if output_attentions and layer.layer_type == FULL_ATTENTION:
                all_attentions.append(weights)

        # The opt-in graphed training step (training/graphs.py) replays the layers from CUDA graphs; None: not this
        # forward, and the layers run here.
        stack_output = training_graphs.graphed_stack(
            self, hidden_states, position_embeddings, attention_mask_4d, padding_mask,
            cache=cache if use_cache else None, segments=segments,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip
        if stack_output is None:
            stack_output = self.decoder_stack(
                hidden_states,
                position_embeddings,
                on_layer=collect if output_hidden_states or output_attentions else None,
                attention_mask=attention_mask_4d,
                padding_mask=padding_mask,
                segments=segments,
                cache=cache if use_cache else None,
                position_ids=text_positions,
                **kwargs,
            )
        hidden_states = stack_output
        if output_hidden_states:
            all_hidden_states = (*all_hidden_states[:-1], hidden_states)
            if selected_layers is not None:
                all_hidden_states = tuple(
                    state if index in selected_layers else None for index, state in enumerate(all_hidden_states)
                )
        if use_cache and cache is not None:
            cache.seen_tokens += length

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: returned_cache(cache) if use_cache else None},
        )


# Tensor / pipeline parallel plans of the LM heads, as built-in's (the decoder's are in the config classes).
LM_HEAD_TP_PLAN = {"lm_head": "colwise_gather_output"}
LM_HEAD_PP_PLAN = {"lm_head": (["hidden_states"], ["logits"])}


class Qwen3_5ForCausalLM(Qwen3_5PreTrainedModel, Qwen3_5GenerationMixin):
    config: Qwen3_5TextConfig
    config_class = Qwen3_5TextConfig
    _tp_plan = LM_HEAD_TP_PLAN
    _pp_plan = LM_HEAD_PP_PLAN
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__(config)
        self.model = Qwen3_5TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

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
        logits_to_keep=0,
        cache=None,
        cache_position=None,
        skip_logits=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache=cache,
            return_dict=True,
            **kwargs,
        )
        return self._head_output(outputs, labels, logits_to_keep, self.config.vocab_size, kwargs, skip_logits)
