"""The generation cache of the hybrid stack.

Linear-attention (Gated DeltaNet) layers keep a conv state ``(B, conv_dim, K)`` in the activation dtype and a
recurrent state ``(B, H_v, d_k, d_v)`` in fp32; full-attention layers keep growing keys and values
``(B, n_kv, T, head_dim)``. The layouts match built-in transformers and fla, so states can be handed between them.

We own this class instead of configuring transformers' ``DynamicCache`` because the latter's linear-attention API
changed several times across 5.x; ``generate()`` only needs ``get_seq_length`` and ``reorder_cache`` from it.
The linear state cannot be rolled back to an earlier position, so ``crop`` refuses (the model is ``_is_stateful``).

Speculative decoding (``speculative.py``) needs what a plain cache cannot do: after a forward over several
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

from . import kernels
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
        self.speculating = False
        self._linear_steps: dict[int, tuple] = {}

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

    def record_linear_step(
        self, layer_idx, conv_state, recurrent_state, conv_input, q, k, v, a, b, A_log, dt_bias
    ) -> None:
        """Called by a Gated DeltaNet layer during a speculative forward: its states before the forward and the
        inputs of its conv ``(B, T, D)`` and recurrence (as given to ``kernels.gated_delta_rule``:
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
            raise ValueError(
                "The Qwen3.5 cache cannot be cropped: Gated DeltaNet states cannot be rolled back to an earlier "
                "position. Re-run the prompt instead, or keep a copy of the cache (copy.deepcopy) at that position."
            )


def _states_after(step: tuple, kept: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gated DeltaNet layer's (conv state, recurrent state) after the first ``kept[b]`` recorded tokens;
    ``length`` is the longest kept prefix (no row needs the tokens after it)."""
    conv_state, recurrent_state, conv_input, q, k, v, a, b, A_log, dt_bias = step
    q, k, v, a, b = (x[:, :length] for x in (q, k, v, a, b))
    dropped = torch.arange(length, device=kept.device)[None, :] >= kept[:, None]  # (B, T)
    dropped = dropped.to(a.device)[..., None]
    a, b = a.masked_fill(dropped, -torch.inf), b.masked_fill(dropped, -torch.inf)
    _, recurrent = kernels.gated_delta_rule(q, k, v, a, b, A_log, dt_bias, recurrent_state, output_final_state=True)
    width = conv_state.shape[-1]
    window = torch.cat([conv_state, conv_input.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # (B, D, K + T)
    columns = kept.to(window.device)[:, None] + torch.arange(width, device=window.device)[None, :]  # (B, K)
    conv = window.gather(-1, columns[:, None, :].expand(-1, window.shape[1], -1))
    return conv.contiguous(), recurrent
