"""The generation cache of the hybrid stack, and how the model uses a transformers cache a user built.

Linear-attention (Gated DeltaNet) layers keep a conv state ``(B, conv_dim, K)`` in the activation dtype and a
recurrent state ``(B, H_v, d_k, d_v)`` in fp32; full-attention layers keep growing keys and values
``(B, n_kv, T, head_dim)``. The layouts match built-in transformers and fla, so states can be handed between them.

``Qwen3_5HybridCache`` is a transformers ``Cache``: ``cache.layers`` holds one linear-attention or attention layer
per decoder layer with transformers' layer API (``conv_states[0]``, ``recurrent_states[0]``, ``has_previous_state``;
``keys``, ``values``, ``get_mask_sizes``), and the cache answers ``get_seq_length``, ``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices`` and ``copy.deepcopy``. The tensors themselves live in four
per-layer lists (``conv_states``, ``recurrent_states``, ``key_cache``, ``value_cache``) that the layers read and
write: the decode paths (static decoding, CUDA graphs, speculative rollback) index those lists directly, and
transformers' own layer classes changed their storage several times across 5.x. The linear state cannot be rolled
back to an earlier position, so ``crop`` refuses (the model is ``_is_stateful``).

A transformers cache the user built (``DynamicCache(config=model.config)``, as the prompt-reuse docs teach) is used
in place through ``TransformersCacheAdapter``: the model reads and writes that object's layers, so the caller's
object holds the states afterwards and is what the model returns.

Speculative decoding (``generation/speculative.py``) needs what a plain cache cannot do: after a forward over several
proposed tokens, keep the states as they were after only the first ``n`` of them, ``n`` differing per row. While
``speculating`` is set, every Gated DeltaNet layer records its starting states and the inputs of its conv and
recurrence (a few tokens' worth); ``keep_speculated`` then recomputes each row's states over its kept tokens only
(a recurrence over at most those few tokens, never the model) and trims the attention layers' keys. Positions
that a row did not keep but a longer row did stay in the attention cache as holes the caller masks out.

The multimodal model also keeps each row's rope offset here (``rope_deltas``, ``(B, 1)``): after an image, a token's
rotary position is its index plus that offset. Keeping it with the cache, not on the model, makes it follow beams
and survive two generations that share a model.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin

from ..kernels import dispatch
from .configuration import FULL_ATTENTION

CROP_REFUSAL = (
    "The Qwen3.5 cache cannot be cropped: Gated DeltaNet states cannot be rolled back to an earlier position. "
    "Re-run the prompt instead, or keep a copy of the cache (copy.deepcopy) at that position."
)


class Qwen3_5HybridCache(Cache):
    is_compileable = False
    is_croppable = False

    def __init__(self, config):
        self.layer_types = list(config.layer_types)
        count = len(self.layer_types)
        self.conv_states: list[torch.Tensor | None] = [None] * count
        self.recurrent_states: list[torch.Tensor | None] = [None] * count
        self.key_cache: list[torch.Tensor | None] = [None] * count
        self.value_cache: list[torch.Tensor | None] = [None] * count
        self.seen_tokens = 0
        self.rope_deltas: torch.Tensor | None = None
        self.speculating = False
        self._linear_steps: dict[int, tuple] = {}
        layers = [
            AttentionLayer(self, i) if layer_type == FULL_ATTENTION else LinearAttentionLayer(self, i)
            for i, layer_type in enumerate(self.layer_types)
        ]
        super().__init__(layers=layers)

    def __len__(self) -> int:
        return len(self.layer_types)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self)}, seen_tokens={self.seen_tokens})"

    @property
    def is_linear(self) -> list[bool]:
        return [layer_type != FULL_ATTENTION for layer_type in self.layer_types]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's keys and values of a full-attention layer; return all of them."""
        if self.key_cache[layer_idx] is None:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = key, value
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(key length, key offset) a mask for ``query_length`` new tokens spans, as transformers' masks ask."""
        return self.seen_tokens + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without bound (StaticHybridCache has a capacity, but also masks for itself)

    @property
    def batch_size(self) -> int:
        state = next((s for s in self.recurrent_states + self.key_cache if s is not None), None)
        return 0 if state is None else state.shape[0]

    def _apply_per_row(self, select) -> None:
        """Apply a batch-row operation (beam reorder, repeat, select) to every state and the rope offsets."""
        for states in (self.conv_states, self.recurrent_states, self.key_cache, self.value_cache):
            for i, state in enumerate(states):
                if state is not None:
                    states[i] = select(state)
        if self.rope_deltas is not None:
            self.rope_deltas = select(self.rope_deltas)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows named by ``beam_idx``."""
        self._apply_per_row(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_per_row(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_per_row(lambda state: state[indices])

    def record_linear_step(
        self, layer_idx, conv_state, recurrent_state, conv_input, q, k, v, a, b, A_log, dt_bias
    ) -> None:
        """Called by a Gated DeltaNet layer during a speculative forward: its states before the forward and the
        inputs of its conv ``(B, T, D)`` and recurrence (as given to ``dispatch.gated_delta_rule``:
        the gates by their projections, so that the recomputation makes them as the forward did)."""
        self._linear_steps[layer_idx] = (conv_state, recurrent_state, conv_input, q, k, v, a, b, A_log, dt_bias)

    def keep_speculated(self, kept: torch.Tensor, longest: int | None = None) -> None:
        """After a speculative forward of ``T`` tokens, keep only the first ``kept[b]`` (1..T) of them for row ``b``;
        ``longest``, ``kept``'s maximum, if the caller has read it from the device already.

        Gated DeltaNet states are recomputed from the recorded starting states: the recurrence runs again over the
        ``T`` recorded tokens with the update of every dropped token switched off (gate projections of -inf give
        ``beta = sigmoid(-inf) = 0`` and no decay, ``softplus(-inf) = 0``, which leave the state as it was), so one
        call serves rows that keep different counts. The conv state is the window of its last ``K`` inputs ending at
        the last kept token. Attention keys are trimmed to the longest kept prefix.
        """
        if not self._linear_steps:
            raise RuntimeError("keep_speculated() needs a forward run with cache.speculating = True first.")
        length = next(iter(self._linear_steps.values()))[2].shape[1]
        kept = kept.to(torch.long)
        longest = int(kept.max()) if longest is None else longest
        # Every row keeping the whole block (possible only when the longest kept prefix is the whole block): the
        # forward's states stand.
        if not (longest == length and bool((kept == length).all())):
            for layer_idx, step in self._linear_steps.items():
                self.conv_states[layer_idx], self.recurrent_states[layer_idx] = _states_after(step, kept, longest)
        self._linear_steps.clear()
        self._keep_attention(kept, length, longest)

    def _keep_attention(self, kept: torch.Tensor, length: int, longest: int) -> None:
        """The attention side of ``keep_speculated``: the block's ``length`` keys were appended; keep the longest
        kept prefix (the caller masks each row's shorter one)."""
        drop = length - longest
        if drop:
            self._truncate_attention(self.seen_tokens - drop)

    def _truncate_attention(self, length: int) -> None:
        for layer_idx, keys in enumerate(self.key_cache):
            if keys is not None:
                self.key_cache[layer_idx] = keys[:, :, :length]
                self.value_cache[layer_idx] = self.value_cache[layer_idx][:, :, :length]
        self.seen_tokens = min(self.seen_tokens, length)

    def trim_attention(self, length: int) -> None:
        """Drop attention keys and values past ``length`` positions (no Gated DeltaNet layers may be present: their
        states cannot be rolled back this way). The MTP head's own cache uses this to forget its draft steps."""
        if not all(layer_type == FULL_ATTENTION for layer_type in self.layer_types):
            raise ValueError("trim_attention() is for attention-only caches; use keep_speculated() on the model's.")
        self._truncate_attention(length)

    def reset(self) -> None:
        for states in (self.conv_states, self.recurrent_states, self.key_cache, self.value_cache):
            states[:] = [None] * len(states)
        self.seen_tokens = 0
        self.rope_deltas = None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.seen_tokens + max_length
        if max_length != self.seen_tokens:
            raise ValueError(CROP_REFUSAL)

    def activate_past_recording(self, *args, **kwargs) -> None:
        raise ValueError(
            "The Qwen3.5 cache does not record past states for crop(); assisted generation with a draft model is not "
            "supported. Use mtp_draft_tokens=... (docs/mtp.md) for speculative decoding."
        )

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        raise NotImplementedError("The Qwen3.5 cache is not offloaded layer by layer (its states are small).")

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        raise NotImplementedError("The Qwen3.5 cache is not offloaded layer by layer (its states are small).")


def _states_after(step: tuple, kept: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gated DeltaNet layer's (conv state, recurrent state) after the first ``kept[b]`` recorded tokens;
    ``length`` is the longest kept prefix (no row needs the tokens after it)."""
    conv_state, recurrent_state, conv_input, q, k, v, a, b, A_log, dt_bias = step
    q, k, v, a, b = (x[:, :length] for x in (q, k, v, a, b))
    dropped = torch.arange(length, device=kept.device)[None, :] >= kept[:, None]  # (B, T)
    dropped = dropped.to(a.device)[..., None]
    a, b = a.masked_fill(dropped, -torch.inf), b.masked_fill(dropped, -torch.inf)
    _, recurrent = dispatch.gated_delta_rule(q, k, v, a, b, A_log, dt_bias, recurrent_state, output_final_state=True)
    width = conv_state.shape[-1]
    window = torch.cat([conv_state, conv_input.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # (B, D, K + T)
    columns = kept.to(window.device)[:, None] + torch.arange(width, device=window.device)[None, :]  # (B, K)
    conv = window.gather(-1, columns[:, None, :].expand(-1, window.shape[1], -1))
    return conv.contiguous(), recurrent


# --- transformers' layer API over our per-layer lists ---------------------------------------------------------------


class _StateSlot:
    """``layer.conv_states`` / ``layer.recurrent_states`` as transformers' layers hold them (a dict keyed by state
    index; Qwen3.5 has one state of each kind per layer), reading and writing one entry of the cache's list."""

    def __init__(self, states: list, layer_idx: int):
        self._states, self._layer_idx = states, layer_idx

    def __getitem__(self, state_idx: int):
        if state_idx != 0:
            raise KeyError(f"Qwen3.5 layers hold one state of each kind (state_idx 0), not state_idx {state_idx}.")
        return self._states[self._layer_idx]

    def __setitem__(self, state_idx: int, value) -> None:
        self[state_idx]  # the same check
        self._states[self._layer_idx] = value

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter((0,))

    def keys(self):
        return (0,)

    def values(self):
        return (self[0],)

    def items(self):
        return ((0, self[0]),)


class _LayerView:
    """What both layer kinds share: they hold no state (the cache's lists do), count the cache's tokens, grow without
    bound, and refuse cropping and offloading as the cache does."""

    is_sliding = False

    def __init__(self, cache: Qwen3_5HybridCache, layer_idx: int):  # no super().__init__: the cache holds the state
        self._cache, self._layer_idx = cache, layer_idx

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self._layer_idx})"

    def get_seq_length(self) -> int:
        return self._cache.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(CROP_REFUSAL)

    def offload(self) -> None:
        raise NotImplementedError("The Qwen3.5 cache is not offloaded layer by layer (its states are small).")

    prefetch = offload


class LinearAttentionLayer(_LayerView, LinearAttentionCacheLayerMixin):
    """One Gated DeltaNet layer of a ``Qwen3_5HybridCache`` with transformers' linear-attention layer API."""

    number_of_states = 1
    record_past = False

    @property
    def conv_states(self) -> _StateSlot:
        return _StateSlot(self._cache.conv_states, self._layer_idx)

    @property
    def recurrent_states(self) -> _StateSlot:
        return _StateSlot(self._cache.recurrent_states, self._layer_idx)

    @property
    def is_conv_states_initialized(self) -> dict[int, bool]:
        return {0: self._cache.conv_states[self._layer_idx] is not None}

    @property
    def is_recurrent_states_initialized(self) -> dict[int, bool]:
        return {0: self._cache.recurrent_states[self._layer_idx] is not None}

    has_previous_state = is_recurrent_states_initialized
    is_initialized = property(lambda self: self.is_recurrent_states_initialized[0])

    @property
    def conv_kernel_size(self) -> dict[int, int | None]:
        state = self._cache.conv_states[self._layer_idx]
        return {0: None if state is None else state.shape[-1]}

    @property
    def device(self):
        state = self._cache.recurrent_states[self._layer_idx]
        return None if state is None else state.device

    @property
    def dtype(self):
        state = self._cache.conv_states[self._layer_idx]
        return None if state is None else state.dtype

    def lazy_initialization(self, *args, **kwargs) -> None:
        """Nothing to prepare: the first update stores the states."""

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size=None, **kwargs):
        """transformers' contract: take this step's conv inputs ``(B, D, T)``, keep the last ``K`` columns of the
        window, return the window (previous state, then the inputs; left-padded to ``K`` on the first call)."""
        previous = self.conv_states[state_idx]
        if previous is None:
            width = conv_kernel_size or conv_states.shape[-1]
            window = torch.nn.functional.pad(conv_states, (max(0, width - conv_states.shape[-1]), 0))
        else:
            width = previous.shape[-1]
            window = torch.cat([previous, conv_states.to(previous.dtype)], dim=-1)
        self.conv_states[state_idx] = window[..., -width:]
        return window

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs) -> torch.Tensor:
        state = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1]
        self.recurrent_states[state_idx] = state
        return state

    def reset(self) -> None:
        self.conv_states[0] = self.recurrent_states[0] = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for slot in (self.conv_states, self.recurrent_states):
            if slot[0] is not None:
                slot[0] = slot[0].index_select(0, beam_idx.to(slot[0].device))

    def activate_past_recording(self, *args, **kwargs) -> None:
        self._cache.activate_past_recording()


class AttentionLayer(_LayerView, CacheLayerMixin):
    """One full-attention layer of a ``Qwen3_5HybridCache`` with transformers' attention layer API."""

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache.key_cache[self._layer_idx]

    @keys.setter
    def keys(self, value) -> None:
        self._cache.key_cache[self._layer_idx] = value

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache.value_cache[self._layer_idx]

    @values.setter
    def values(self, value) -> None:
        self._cache.value_cache[self._layer_idx] = value

    is_initialized = property(lambda self: self.keys is not None)
    device = property(lambda self: None if self.keys is None else self.keys.device)
    dtype = property(lambda self: None if self.keys is None else self.keys.dtype)

    def lazy_initialization(self, *args, **kwargs) -> None:
        """Nothing to prepare: the first update stores the keys."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self._layer_idx)

    def reset(self) -> None:
        self.keys = self.values = None


# --- a transformers cache the user built ----------------------------------------------------------------------------


class _LinearStates:
    """``adapter.conv_states[i]`` / ``adapter.recurrent_states[i]`` over a transformers cache's linear-attention
    layers: reading gives the layer's state once it has one (None before), writing stores it with the flags
    transformers' layer classes keep beside it (the same fields from 5.16 to 5.25)."""

    def __init__(self, layers: list, kind: str):
        self._layers, self._kind = layers, kind

    def __getitem__(self, layer_idx: int):
        layer = self._layers[layer_idx]
        if not layer.has_previous_state[0]:
            return None
        return getattr(layer, f"{self._kind}_states")[0]

    def __setitem__(self, layer_idx: int, state: torch.Tensor) -> None:
        layer = self._layers[layer_idx]
        getattr(layer, f"{self._kind}_states")[0] = state
        getattr(layer, f"is_{self._kind}_states_initialized")[0] = True
        if self._kind == "conv":
            layer.conv_kernel_size[0] = state.shape[-1]
            layer.dtype = state.dtype
        else:
            layer.has_previous_state[0] = True  # our layers write the conv state, then this
        if layer.device is None:
            layer.device = state.device


class TransformersCacheAdapter:
    """What the model needs of a cache, over a transformers ``Cache`` the caller built: ``DynamicCache()`` or
    ``DynamicCache(config=model.config)`` (its layers: transformers' ``LinearAttentionLayer`` where the model has
    Gated DeltaNet, an attention layer elsewhere). States go into that object's layers, so it can be reused,
    deep-copied or handed to built-in transformers afterwards."""

    speculating = False

    def __init__(self, cache: Cache, config):
        layer_types = list(config.layer_types)
        if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is not None:
            # DynamicCache() without a config grows plain attention layers on demand; give it the model's layers.
            cache.layers = DynamicCache(config=config).layers
            cache.layer_class_to_replicate = None
        self.cache = cache
        self.layer_types = layer_types
        self._check_layers()
        self.conv_states = _LinearStates(cache.layers, "conv")
        self.recurrent_states = _LinearStates(cache.layers, "recurrent")
        self._seen = self._length_held()

    def _check_layers(self) -> None:
        layers = self.cache.layers
        fits = len(layers) == len(self.layer_types) and all(
            isinstance(layer, LinearAttentionCacheLayerMixin) == (layer_type != FULL_ATTENTION)
            for layer, layer_type in zip(layers, self.layer_types)
        )
        if not fits or not isinstance(self.cache, DynamicCache):
            kinds = [type(layer).__name__ for layer in layers]
            raise ValueError(
                f"This {type(self.cache).__name__} does not fit Qwen3.5's {len(self.layer_types)} layers "
                f"({self.layer_types}); its layers are {kinds}. Pass DynamicCache(config=model.config), a cache a "
                "previous call returned, or none (generate(cache_implementation='static') for a static cache)."
            )

    def _length_held(self) -> int:
        for layer, layer_type in zip(self.cache.layers, self.layer_types):
            if layer_type == FULL_ATTENTION:
                return int(layer.get_seq_length())
        return 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._seen

    @property
    def seen_tokens(self) -> int:
        return self._seen

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        added, self._seen = value - self._seen, value
        for layer in self.cache.layers:
            # transformers >= 5.2x counts tokens on linear-attention layers too (their get_seq_length reads it).
            counter = getattr(layer, "cumulative_length_linear", None)
            if isinstance(counter, torch.Tensor):
                counter.add_(added)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(key, value, layer_idx)

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        return getattr(self.cache, "qwen3_5_rope_deltas", None)

    @rope_deltas.setter
    def rope_deltas(self, deltas: torch.Tensor | None) -> None:
        self.cache.qwen3_5_rope_deltas = deltas


def model_state(cache, config):
    """The cache object the model's layers use for ``cache`` (ours, or an adapter over a transformers cache).

    Raises TypeError for anything else, with what to pass instead."""
    if cache is None or isinstance(cache, (Qwen3_5HybridCache, TransformersCacheAdapter)):
        return cache
    if isinstance(cache, Cache):
        return TransformersCacheAdapter(cache, config)
    raise TypeError(
        f"Qwen3.5 takes a transformers Cache as past_key_values, got {type(cache).__name__}. Pass the cache a "
        "previous call returned, DynamicCache(config=model.config), or none."
    )


def returned_cache(state):
    """What the model returns for the cache it used: the caller's own object when it was adapted."""
    return state.cache if isinstance(state, TransformersCacheAdapter) else state
