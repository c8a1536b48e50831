"""The generation cache of the hybrid stack.

Linear-attention (Gated DeltaNet) layers keep a conv state ``(B, conv_dim, K)`` in the activation dtype and a
recurrent state ``(B, H_v, d_k, d_v)`` in fp32; full-attention layers keep growing keys and values
``(B, n_kv, T, head_dim)``. The layouts match built-in transformers and fla, so states can be handed between them.

We own this class instead of configuring transformers' ``DynamicCache`` because the latter's linear-attention API
changed several times across 5.x; ``generate()`` only needs ``get_seq_length`` and ``reorder_cache`` from it.
The linear state cannot be rolled back to an earlier position, so ``crop`` refuses (the model is ``_is_stateful``).

The multimodal model also keeps each row's rope offset here (``rope_deltas``, ``(B, 1)``): after an image, a token's
rotary position is its index plus that offset. Keeping it with the cache, not on the model, makes it follow beams
and survive two generations that share a model.
"""

from __future__ import annotations

import torch

from .configuration import FULL_ATTENTION


class Qwen3_5HybridCache:
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

    def has_previous_state(self, layer_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

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

    def reset(self) -> None:
        for states in (self.conv_states, self.recurrent_states, self.key_cache, self.value_cache):
            states[:] = [None] * len(states)
        self.seen_tokens = 0
        self.rope_deltas = None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.seen_tokens + max_length
        if max_length != self.seen_tokens:
            raise ValueError(
                "The Qwen3.5 cache cannot be cropped: Gated DeltaNet states cannot be rolled back to an earlier "
                "position. Re-run the prompt instead, or keep a copy of the cache (copy.deepcopy) at that position."
            )
