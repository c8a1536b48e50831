"""The causal-LM loss computed chunk by chunk over positions, so that the whole sequence's logits never exist at once.

Qwen3.5's vocabulary has 248,320 entries: at 4k tokens the fp32 logits of a sequence take ~4 GB, and their gradient
as much again. Here the kept hidden states are cut into chunks of rows; each chunk goes through ``lm_head``, is widened
to fp32 and reduced to a summed cross-entropy inside ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps
only the chunk's hidden states and targets and recomputes the chunk's logits during backward. At any moment one
chunk's logits (and, in backward, their gradient) are alive.

The result is exactly transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``):

* labels are shifted by one (position ``t`` predicts ``labels[t + 1]``; the last position predicts ``ignore_index``),
  unless ``shift_labels`` is given, which is then used as is;
* positions whose target is ``ignore_index`` (default -100) count for nothing;
* with ``num_items_in_batch`` the summed loss is divided by it (moved to the loss's device when it is a tensor), else
  the loss is the mean over the counted positions (NaN when none counts, as ``cross_entropy`` gives);
* the hidden states are those of the kept positions (``logits_to_keep``), and the labels must line up with them, as
  the logits must for ``ForCausalLMLoss``.

``lm_head`` is called as a module once per chunk, so whatever wraps it (a PEFT adapter, hooks, a quantised linear)
takes part; a tied ``lm_head`` passes its gradient to the embedding as usual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# At most this many fp32 logits per chunk (2^26 elements = 256 MiB). A chunk's working set is a few buffers of that
# size (the logits in the model's dtype, their fp32 copy, the log-softmax and, in backward, its gradient), so ~1 GiB
# whatever the sequence length, against ~4 GB per buffer for 4k tokens of the 248,320-entry vocabulary. With that
# vocabulary a chunk still has 270 rows: its matmul (270 x hidden x 248,320) is large enough to run at full speed,
# and the number of chunks (16 at 4k tokens) keeps the per-chunk overhead negligible.
CHUNK_ELEMENTS = 2**26


def chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """Rows (positions) per chunk for a vocabulary of ``vocab_size``: as many as keep the chunk's fp32 logits within
    ``elements`` (default ``CHUNK_ELEMENTS``), at least one."""
    return max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(1, vocab_size))


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """One chunk: logits through ``head``, widened to fp32 like ``ForCausalLMLoss`` does, summed over counted rows."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def causal_lm_loss(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """``ForCausalLMLoss(logits=head(hidden_states), labels=labels, ...)`` without holding all the logits.

    ``hidden_states``: (..., positions, hidden), the kept positions; ``head``: the output projection (``lm_head``);
    ``chunk_size``: rows per chunk, by default ``chunk_rows(vocab_size)``. Other keyword arguments are accepted and
    ignored, as ``ForCausalLMLoss`` does with the model's forward keywords it is handed."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        # Position t learns the token at t + 1; the last one has nothing to learn.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({hidden.shape[0]}) to match target batch_size ({targets.shape[0]}): the "
            "labels must cover the kept positions (logits_to_keep) exactly, as for transformers' ForCausalLMLoss."
        )
    out_features = getattr(head, "out_features", vocab_size)
    if out_features != vocab_size:
        raise ValueError(f"lm_head gives {out_features} logits per position but vocab_size is {vocab_size}")

    rows = chunk_size or chunk_rows(vocab_size)
    recompute = torch.is_grad_enabled()
    total = None
    # An empty input still runs one (empty) chunk, so that the loss is tied to the graph as ForCausalLMLoss's is.
    for start in range(0, max(hidden.shape[0], 1), rows):
        part_hidden, part_targets = hidden[start : start + rows], targets[start : start + rows]
        if recompute:
            # Backward reruns the chunk instead of keeping its logits: that is the memory saving.
            part = checkpoint(_summed_cross_entropy, head, part_hidden, part_targets, ignore_index, use_reentrant=False)
        else:
            part = _summed_cross_entropy(head, part_hidden, part_targets, ignore_index)
        total = part if total is None else total + part

    if num_items_in_batch is None:
        # cross_entropy's "mean": the sum over counted positions divided by their number (0 / 0 = NaN when none).
        return total / (targets != ignore_index).sum().to(total.dtype)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
