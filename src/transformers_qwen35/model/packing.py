"""Packed sequences: several samples in one row, kept apart in every layer.

A batch is packed when ``cu_seq_lens_q`` or ``seq_idx`` arrive (``DataCollatorWithFlattening``, TRL padding-free),
or when ``position_ids`` restart inside a row with no padding and no cache (``DataCollatorWithFlattening`` without
kernel kwargs). Built-in transformers runs the last case as one long sequence through its DeltaNet layers and leaks
the conv window and the recurrent state from one sample into the next; we pass the boundaries to every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    """Boundaries of packed samples over the flattened ``(1, B*T)`` token stream."""

    cu_seqlens: torch.Tensor  # (N + 1,) int32 offsets, fla / FlashAttention style
    segment_ids: torch.Tensor  # (B, T) sample index per token, unique over the whole batch
    position_in_segment: torch.Tensor  # (B, T) 0 at every sample's first token
    max_length: int


def _from_starts(starts: torch.Tensor) -> Segments:
    """``starts`` (B, T) bool: True where a sample begins. Each row also begins a sample."""
    starts = starts.clone()
    starts[:, 0] = True
    flat = starts.reshape(-1)
    segment_ids = flat.long().cumsum(0) - 1
    offsets = torch.nonzero(flat).flatten()
    total = flat.numel()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([total])]).to(torch.int32)
    index = torch.arange(total, device=flat.device)
    position = index - offsets[segment_ids]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return Segments(
        cu_seqlens=cu_seqlens,
        segment_ids=segment_ids.view_as(starts),
        position_in_segment=position.view_as(starts),
        max_length=int(lengths.max()),
    )


def find_segments(
    text_position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int,
    shape: tuple[int, int],
    cu_seq_lens_q: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> Segments | None:
    """The packed samples of this batch, or None when every row is one sequence."""
    batch, length = shape
    if cu_seq_lens_q is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes a packed batch of one row, but the batch has {batch} rows.")
        cu = cu_seq_lens_q.to(torch.long).flatten()
        if cu.numel() < 2 or int(cu[-1]) != length or int(cu[0]) != 0:
            raise ValueError(
                f"cu_seq_lens_q must run from 0 to the sequence length {length}, got {cu.tolist()[:3]}...{int(cu[-1])}."
            )
        if not bool((cu[1:] > cu[:-1]).all()):
            raise ValueError(
                f"cu_seq_lens_q must increase strictly (each packed sample at least one token), got {cu.tolist()[:8]}"
                f"{'...' if cu.numel() > 8 else ''}: build it with DataCollatorWithFlattening."
            )
        starts = torch.zeros(1, length, dtype=torch.bool, device=cu.device)
        starts[0, cu[:-1][cu[:-1] < length]] = True
        return _from_starts(starts)
    if seq_idx is not None:
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        return _from_starts(starts) if bool(starts[:, 1:].any()) else None
    if text_position_ids is None or past_length > 0 or length < 2:
        return None
    if attention_mask is not None and not bool(attention_mask.all()):
        return None  # padded batches carry their own (non-contiguous) positions
    restarts = text_position_ids[:, 1:] != text_position_ids[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    starts = torch.ones(batch, length, dtype=torch.bool, device=text_position_ids.device)
    starts[:, 1:] = restarts
    return _from_starts(starts)
