"""Decoding with fixed-shape state: a preallocated hybrid cache, a lean block forward, and (on CUDA) one CUDA graph
replayed per decoding step.

Why: a decode step of the 0.8B model is ~24 layers of small kernels. Launched one by one from Python, as built-in
transformers does, a step takes ~35 ms on an H100 whose memory could read every weight in ~0.5 ms. Replaying the whole
step as one captured CUDA graph removes the launch and Python overhead; that needs every tensor the step touches to
keep its address and shape from one step to the next:

* ``StaticHybridCache``: Gated DeltaNet conv / recurrent states updated in place; attention keys and values written
  into ``(B, n_kv, capacity, d)`` buffers at the current slot; which slots hold real keys is a ``(B, capacity)`` mask
  (left padding, and the holes rejected MTP drafts leave), so attention always spans the whole buffer;
* ``forward_block``: the text model's layers over a block of ``T`` new tokens per row (1 for plain decoding, K + 1
  for MTP verification) with the mask built on the device, no host synchronisation and no data-dependent Python;
* ``GraphedBlock``: captures ``forward_block`` for one block length and replays it (CUDA only).

Used by ``speculative.py``'s loop for ``generate(..., cache_implementation="static")`` (plain decoding) and for
``mtp_draft_tokens``; the prompt itself runs through the ordinary forward, whose cache is then copied in.

The static cache and its captured graphs outlive one ``generate()`` call (``static_cache_for``): capturing costs a few
hundred milliseconds, as much as a hundred decoding steps, so the next call with the same batch size and a prompt that
fits reuses them. One call at a time holds it (``static_cache_for`` leases it, ``return_static_cache`` gives it back):
a call made while another thread decodes on the same model gets a private cache of its own, decoded without graphs,
so threads sharing a model never share decoding state.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch

from ..core.cache import Qwen3_5HybridCache
from ..kernels.graph_key import graph_key

CUDA_GRAPHS_ENV = "TRANSFORMERS_QWEN35_CUDA_GRAPHS"
# Capacities are rounded up to a multiple of this, so that the next call with a slightly longer prompt (a chat turn)
# still fits the cache and its graphs. Attention reads the whole buffer: at 0.8B a 256-slot step costs ~3 MB per row.
CAPACITY_STEP = 256
# One static cache per model, kept beside it rather than on it: deep copies and state dicts never see it.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LEASE = threading.Lock()  # guards _CACHES and every cache's `leased`


def cuda_graphs_enabled() -> bool:
    """Static decoding on CUDA replays CUDA graphs unless ``TRANSFORMERS_QWEN35_CUDA_GRAPHS=0``."""
    return os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _InPlaceList(list):
    """Assigning to an entry copies into the existing buffer, so a captured graph keeps reading the same memory."""

    def __setitem__(self, index, value):
        buffer = list.__getitem__(self, index)
        if buffer is not value:
            buffer.copy_(value)


class StaticHybridCache(Qwen3_5HybridCache):
    """Fixed-shape version of :class:`Qwen3_5HybridCache` for ``batch`` rows and ``capacity`` positions."""

    is_compileable = True

    def __init__(self, config, batch: int, capacity: int, dtype: torch.dtype, device):
        super().__init__(config)
        self.capacity = capacity
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim
        conv_dim += config.linear_num_value_heads * config.linear_value_head_dim
        for i, is_linear in enumerate(self.is_linear):
            if is_linear:
                self.conv_states[i] = torch.zeros(
                    batch, conv_dim, config.linear_conv_kernel_dim, dtype=dtype, device=device
                )
                self.recurrent_states[i] = torch.zeros(
                    batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim,
                    dtype=torch.float32, device=device,
                )  # fmt: skip
            else:
                shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
                self.key_cache[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.value_cache[i] = torch.zeros(shape, dtype=dtype, device=device)
        if torch.device(device).type == "cuda":
            # A captured graph reads these buffers: new states are copied into them. Elsewhere a layer's new states
            # replace the old ones (on the CPU a compiled step returns them; copying them in would cost ~18 MB of
            # copies per token at 0.8B).
            self.conv_states = _InPlaceList(self.conv_states)
            self.recurrent_states = _InPlaceList(self.recurrent_states)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # first slot the next block writes
        self.graphs: dict[int, GraphedBlock] = {}  # block length -> captured forward over these buffers
        self.captured_for: tuple = ()  # graph_key() of the model the graphs were captured from
        self.leased = False  # a generate() call is decoding on it
        self.shared = False  # the model's kept cache (else a private one of a concurrent call)

    @classmethod
    def from_prefill(cls, cache: Qwen3_5HybridCache, key_valid: torch.Tensor, capacity: int, config):
        """A new cache holding a prompt's dynamic cache; ``key_valid`` ``(B, P)`` marks its real (unpadded) tokens."""
        reference = next(state for state in cache.key_cache if state is not None)
        static = cls(config, key_valid.shape[0], capacity, reference.dtype, reference.device)
        static.load_prefill(cache, key_valid)
        return static

    def load_prefill(self, cache: Qwen3_5HybridCache, key_valid: torch.Tensor) -> None:
        """Copy a prompt's dynamic cache into these buffers (in place: captured graphs stay valid)."""
        batch, length = key_valid.shape
        if self.capacity < length or self.key_valid.shape[0] != batch:
            raise ValueError(
                f"a static cache for {self.key_valid.shape[0]} rows x {self.capacity} positions cannot hold a prompt "
                f"of {batch} rows x {length} positions."
            )
        for i, is_linear in enumerate(self.is_linear):
            if is_linear:
                self.conv_states[i] = cache.conv_states[i]
                self.recurrent_states[i] = cache.recurrent_states[i]
            else:
                self.key_cache[i][:, :, :length] = cache.key_cache[i]
                self.value_cache[i][:, :, :length] = cache.value_cache[i]
        self.key_valid.zero_()
        self.key_valid[:, :length] = key_valid
        self.slot.fill_(length)
        self.seen_tokens = length
        self.rope_deltas = cache.rope_deltas
        self.speculating = False
        self._linear_steps.clear()

    def fits(self, batch: int, needed: int, dtype: torch.dtype, device: torch.device, key: tuple) -> bool:
        state = self.key_valid
        return (
            state.shape[0] == batch and self.capacity >= needed and state.device == device
            and self.dtype == dtype and self.captured_for == key
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return next(state for state in self.key_cache if state is not None).dtype

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Write this block's keys and values at the current slots; return the whole buffers."""
        slots = self.slot + torch.arange(key.shape[2], device=key.device)
        self.key_cache[layer_idx].index_copy_(2, slots, key)
        self.value_cache[layer_idx].index_copy_(2, slots, value)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def block_mask(self, length: int) -> torch.Tensor:
        """Boolean ``(B, 1, length, capacity)``: query ``t`` of the block sees the real keys up to its own slot."""
        # The buffer's length rather than self.capacity: a compiled block (compiled_step.py) keeps it symbolic.
        slots = torch.arange(self.key_valid.shape[1], device=self.slot.device)
        reach = self.slot + torch.arange(length, device=self.slot.device)  # (T,)
        causal = slots[None, :] <= reach[:, None]  # (T, capacity)
        block = (slots >= self.slot) & (slots < self.slot + length)  # the block's own keys, not yet marked valid
        return (causal[None] & (self.key_valid | block[None, :])[:, None, :])[:, None]

    def record_linear_step(self, layer_idx, conv_state, recurrent_state, *inputs) -> None:
        if isinstance(self.conv_states, _InPlaceList):
            # The buffers are about to be overwritten in place: keep copies of the states the block started from.
            conv_state, recurrent_state = conv_state.clone(), recurrent_state.clone()
        super().record_linear_step(layer_idx, conv_state, recurrent_state, *inputs)

    def advance(self, length: int) -> None:
        """Mark a block of ``length`` new slots as written by every row (plain decoding)."""
        slots = self.slot + torch.arange(length, device=self.slot.device)
        self.key_valid.index_fill_(1, slots, True)
        self.slot += length
        self.seen_tokens += length

    def _keep_attention(self, kept: torch.Tensor, length: int, longest: int) -> None:
        """Slots instead of a growing tensor: the block's dropped slots become holes (invalid keys) and the next
        block writes after the longest kept prefix."""
        steps = torch.arange(length, device=self.slot.device)
        self.key_valid.index_copy_(1, self.slot + steps, steps[None, :] < kept[:, None].to(self.slot.device))
        self.slot += longest
        self.seen_tokens += longest


def static_cache_for(model, prefill: Qwen3_5HybridCache, key_valid: torch.Tensor, needed: int, config):
    """The static cache for decoding ``needed`` positions after this prompt, holding the prompt's state, leased to
    the calling ``generate()`` until ``return_static_cache``: the model's cache of the previous call (with its
    graphs) when it fits and the model is as it was at capture (``graph_key``), else a new one replacing it. While
    another call holds the model's cache, a private one (no graphs kept)."""
    reference = next(state for state in prefill.key_cache if state is not None)
    shape = (key_valid.shape[0], -(-needed // CAPACITY_STEP) * CAPACITY_STEP, reference.dtype, reference.device)
    key = graph_key(model)
    with _LEASE:
        cached = _CACHES.get(model)
        if cached is not None and cached.leased:
            cached = None  # another thread decodes on it: this call gets its own
            shared = False
        else:
            shared = True
            if cached is None or not cached.fits(key_valid.shape[0], needed, reference.dtype, reference.device, key):
                _CACHES.pop(model, None)  # free the old buffers and graph memory before allocating the new ones
                cached = None
        if cached is None:
            cached = StaticHybridCache(config, *shape)
            cached.captured_for, cached.shared = key, shared
            if shared:
                _CACHES[model] = cached
        cached.leased = True
    cached.load_prefill(prefill, key_valid)
    return cached


def return_static_cache(cache: StaticHybridCache) -> None:
    """End of a ``generate()`` call's lease (``static_cache_for``)."""
    with _LEASE:
        cache.leased = False


def release_static_cache(model) -> None:
    """Free the static cache and CUDA graphs kept for ``model`` since its last static ``generate()``."""
    with _LEASE:
        _CACHES.pop(model, None)


def forward_block(model, cache: StaticHybridCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``(B, T, h)`` of a block ``ids`` ``(B, T)`` at rope positions ``positions`` ``(3, B, T)``,
    reading and writing ``cache`` at its current slot. Does not move the slot (the caller does: ``advance`` or
    ``keep_speculated``)."""
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    hidden = text.embed_tokens(ids)
    position_embeddings = text.rotary_emb(hidden, positions)
    mask = cache.block_mask(ids.shape[1])
    return text.decoder_stack(hidden, position_embeddings, attention_mask=mask, cache=cache)


class GraphedBlock:
    """``forward_block`` for one block length, captured once as a CUDA graph and replayed.

    Inputs are copied into static tensors before each replay; the returned hidden states are the graph's own output
    tensor (overwritten by the next replay: use or copy them first). What Gated DeltaNet layers record for MTP
    rollback is captured too: the recorded tensors are graph outputs, refreshed by every replay.
    """

    def __init__(self, model, cache: StaticHybridCache, length: int, warmup: int = 2):
        if cache.slot.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device.")
        batch = cache.key_valid.shape[0]
        device = cache.slot.device
        self.cache, self.length = cache, length
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, batch, length, dtype=torch.long, device=device)
        # Warm-up runs execute for real (Triton compiles, autotunes): run them on a copy of the state and restore it,
        # also when the capture fails (the caller then runs the block eagerly on the untouched state).
        saved = _snapshot(cache)
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    forward_block(model, cache, self.ids, self.positions)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.hidden = forward_block(model, cache, self.ids, self.positions)
            self.recorded = dict(cache._linear_steps)
        finally:
            _restore(cache, saved)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        if self.cache.speculating:
            self.cache._linear_steps.update(self.recorded)
        return self.hidden


def _snapshot(cache: StaticHybridCache) -> list[torch.Tensor]:
    return [t.clone() for t in _buffers(cache)]


def _restore(cache: StaticHybridCache, saved: list[torch.Tensor]) -> None:
    for buffer, value in zip(_buffers(cache), saved):
        buffer.copy_(value)
    cache._linear_steps.clear()


def _buffers(cache: StaticHybridCache) -> list[torch.Tensor]:
    states = [list.__getitem__(cache.conv_states, i) for i in range(len(cache.conv_states))]
    states += [list.__getitem__(cache.recurrent_states, i) for i in range(len(cache.recurrent_states))]
    states += cache.key_cache + cache.value_cache + [cache.key_valid, cache.slot]
    return [t for t in states if t is not None]
