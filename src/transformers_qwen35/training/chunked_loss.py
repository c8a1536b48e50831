"""The causal-LM loss computed chunk by chunk over positions, so that the whole sequence's logits never exist at once.

Qwen3.5's vocabulary has 248,320 entries: at 4k tokens the fp32 logits of a sequence take ~4 GB, and their gradient
as much again. Here the kept hidden states are cut into chunks of rows, and one chunk's logits exist at a time, in
one of two ways:

* **fused** (``FusedLinearCrossEntropy``), when ``lm_head`` is a plain ``nn.Linear`` and gradients are enabled (the
  usual training step): the forward computes, chunk by chunk, the logits (widened to fp32), the summed cross-entropy
  and right away its gradients: the chunk's rows of d loss / d hidden (stored, the size of the hidden states) and
  its share of d loss / d weight (and bias), accumulated in fp32. Backward only scales the stored gradients by the
  incoming one, so the head's matmuls run three times per step (logits, d hidden, d weight), as without chunking.
* **checkpointed**, otherwise (a PEFT-wrapped or quantised ``lm_head``, hooks, FSDP/DTensor parameters, ...): each
  chunk goes through ``lm_head`` called as a module and is reduced to a summed cross-entropy inside
  ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only the chunk's hidden states and targets and
  backward recomputes the chunk's logits: one more head matmul per step, but whatever wraps the head takes part.
  Under ``torch.no_grad()`` the same loop runs without the checkpoint (nothing to recompute).

The result is exactly transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``):

* labels are shifted by one (position ``t`` predicts ``labels[t + 1]``; the last position predicts ``ignore_index``),
  unless ``shift_labels`` is given, which is then used as is;
* positions whose target is ``ignore_index`` (default -100) count for nothing;
* with ``num_items_in_batch`` the summed loss is divided by it (moved to the loss's device when it is a tensor), else
  the loss is the mean over the counted positions (NaN when none counts, as ``cross_entropy`` gives);
* the hidden states are those of the kept positions (``logits_to_keep``), and the labels must line up with them, as
  the logits must for ``ForCausalLMLoss``.

Either way a tied ``lm_head`` passes its gradient to the embedding: the fused path hands the gradient to the shared
weight ``Parameter`` itself.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..kernels.module_hooks import runs_hooks

# At most this many fp32 logits per chunk (2^26 elements = 256 MiB). A chunk's working set is a few buffers of that
# size (the logits in the model's dtype, their fp32 copy, the softmax or log-softmax and, in the checkpointed
# backward, its gradient), so ~1 GiB whatever the sequence length, against ~4 GB per buffer for 4k tokens of the
# 248,320-entry vocabulary. With that vocabulary a chunk still has 270 rows: its matmul (270 x hidden x 248,320) is
# large enough to run at full speed, and the number of chunks (16 at 4k tokens) keeps the per-chunk overhead
# negligible. The fused path also uses it to bound the blocks of its fp32 weight-gradient accumulator (below).
CHUNK_ELEMENTS = 2**26
# With a lower-precision compute dtype (bf16 weights, or autocast) the weight gradient is accumulated in fp32 once per
# group of chunks whose logits' gradients, in the compute dtype, fill at most this many elements (2^28: 512 MiB in bf16,
# 1,080 rows of the official vocabulary): four times fewer passes over the 1 GB fp32 accumulator at 0.8B than per chunk.
GROUP_ELEMENTS = 2**28


def chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """Rows (positions) per chunk for a vocabulary of ``vocab_size``: as many as keep the chunk's fp32 logits within
    ``elements`` (default ``CHUNK_ELEMENTS``), at least one."""
    return max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(1, vocab_size))


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """One chunk: logits through ``head``, widened to fp32 like ``ForCausalLMLoss`` does, summed over counted rows."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


# --- the fused path -------------------------------------------------------------------------------------------------


def _plain_tensor(tensor: torch.Tensor | None) -> bool:
    """A dense floating-point tensor with real storage: no DTensor (FSDP2 / tensor parallel shards), no quantised or
    other tensor subclass (torchao), nothing on the meta device (offloaded by accelerate's hooks)."""
    if tensor is None:
        return True
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return False
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point() and not tensor.is_meta


def fusable(head: nn.Module) -> bool:
    """Whether the fused path may stand in for calling ``head``: only for a plain ``nn.Linear`` used as it is.

    The fused path reads ``head.weight`` / ``head.bias`` and never calls the module, so anything that works by being
    called would be skipped silently: a subclass or a wrapper (PEFT's LoRA layers, bitsandbytes / quantised linears,
    FSDP2's ``FSDPLinear``, ``torch.compile``'s module), hooks on it or on every module (forward pre-hooks that gather
    FSDP / DeepSpeed ZeRO-3 parameters or move offloaded ones, tensor-parallel hooks, backward hooks), a ``forward``
    replaced on the instance (accelerate's ``add_hook_to_module``), or parameters that are not dense tensors (DTensor
    shards, quantised tensor subclasses, meta tensors). All of those keep the checkpointed path, which calls the
    module once per chunk as the unchunked model does."""
    if type(head) is not nn.Linear or "forward" in vars(head) or runs_hooks([head]):
        return False
    return _plain_tensor(head.weight) and _plain_tensor(head.bias)


def _autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``F.linear`` in (it casts both operands to it), None when it is off. Without
    autocast the operands are used as they are: mismatched dtypes fail as they would in ``nn.Linear``."""
    device_type = hidden.device.type
    if (
        weight.dtype != torch.float64
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return None


def _without_autocast(device_type: str):
    """The fused forward casts explicitly (``_autocast_dtype``); autocast must not recast its matmuls' operands."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _vocab_spans(vocab: int, hidden: int, in_place: bool) -> list[tuple[int, int]]:
    """Row ranges of the weight gradient accumulated one at a time. When the matmuls run in the accumulator's dtype
    (fp32) a chunk's product is added in place (``addmm_``), so one range; from a lower precision each range's
    product (in that precision) is added to its fp32 block, so the ranges bound that temporary to
    ``CHUNK_ELEMENTS``."""
    if in_place:
        return [(0, vocab)]
    rows = max(1, CHUNK_ELEMENTS // max(1, hidden))
    return [(start, min(start + rows, vocab)) for start in range(0, vocab, rows)]


class _Rows:
    """What every chunk needs of its rows, made once for the whole sequence and sliced per chunk (views): fewer small
    kernels per chunk, each a launch from Python. Chunks start at multiples of ``rows``."""

    def __init__(self, targets: torch.Tensor, ignore_index: int, rows: int, vocab: int):
        self.counted = targets != ignore_index
        self.ignored = ~self.counted
        # Any valid index on ignored rows: what is picked or subtracted there is masked out (_fused_chunk).
        indices = targets.masked_fill(self.ignored, 0)
        self.gather_index = indices.unsqueeze(1)
        # Each row's target as an index into its chunk's flattened logits, for one scatter per chunk.
        self.flat_target = torch.arange(len(targets), device=targets.device).remainder_(rows).mul_(vocab).add_(indices)
        self.minus_ones = torch.full((min(rows, len(targets)),), -1.0, device=targets.device)
        self.picked = torch.empty(len(targets), 1, dtype=torch.float32, device=targets.device)  # log p(target)

    def chunk(self, start: int, end: int):
        return (self.ignored[start:end], self.gather_index[start:end], self.flat_target[start:end],
                self.minus_ones[: end - start], self.picked[start:end])  # fmt: skip

    def summed_loss(self) -> torch.Tensor:
        """The summed cross-entropy over counted rows (ignored rows' entries are whatever their chunk left)."""
        return torch.where(self.counted, self.picked.squeeze(1), 0.0).sum().neg()


def _fused_chunk(
    hidden, weight, bias, rows, compute, grad_hidden, weight_blocks, spans, grad_bias, kept=None
):  # fmt: skip
    """One chunk of the fused forward: writes its rows' log-probabilities of their targets into ``rows``' slice
    (``rows`` is ``_Rows.chunk``'s tuple) and writes or accumulates its gradients (for a loss of 1) into
    ``grad_hidden`` (the chunk's rows), ``weight_blocks`` and ``grad_bias``. Its own buffers (the chunk's logits and
    their gradient) die when it returns. With ``kept`` (the chunk's rows of a group buffer, in the compute dtype) the
    gradient of the logits is written there instead of being accumulated into ``weight_blocks``: the caller
    accumulates a whole group at once.

    Ignored rows are not masked here: their hidden states are zero when the weight gradient is wanted (no share of
    it), the caller zeroes their rows of ``grad_hidden`` once for the sequence, and ``_Rows.summed_loss`` skips
    them; only a bias gradient (a sum over rows) needs them zeroed per chunk."""
    ignored, gather_index, flat_target, minus_ones, picked = rows
    logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else torch.mm(hidden, weight.t())
    logits = logits.float()  # as ForCausalLMLoss widens the logits (a new buffer unless they are fp32 already)
    log_probs = torch.log_softmax(logits, 1)  # one kernel, as cross_entropy's
    del logits
    torch.gather(log_probs, 1, gather_index, out=picked)  # the loss is minus these: nll_loss's values exactly
    if grad_hidden is None and weight_blocks is None and grad_bias is None:
        return
    # d (-log_softmax[target]) / d logits = softmax - one_hot(target), as autograd through log_softmax makes it
    grad_logits = log_probs.exp_()
    del log_probs
    grad_logits.view(-1).scatter_add_(0, flat_target, minus_ones)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.masked_fill_(ignored.unsqueeze(1), 0.0).sum(0))
    # The matmuls run in the compute dtype, as autograd's through F.linear and .float() would (fp32 accumulation
    # inside the matmul).
    if kept is not None:
        grad_logits_c = kept.copy_(grad_logits)
        del grad_logits
    else:
        grad_logits_c = grad_logits.to(compute)
        if grad_logits_c is not grad_logits:
            del grad_logits
    if grad_hidden is not None:
        if grad_hidden.dtype == grad_logits_c.dtype:
            torch.mm(grad_logits_c, weight, out=grad_hidden)
        else:  # autocast: fp32 hidden states, products in its lower precision
            grad_hidden.copy_(torch.mm(grad_logits_c, weight))
    if weight_blocks is not None and kept is None:
        _accumulate_weight_gradient(weight_blocks, spans, grad_logits_c, hidden, compute)


def _accumulate_weight_gradient(weight_blocks, spans, grad_logits, hidden, compute) -> None:
    """``weight_blocks`` += ``grad_logits.T @ hidden``, span by span (in place when the blocks are in the compute
    dtype, else through one product of the span in the compute dtype)."""
    for (start, end), block in zip(spans, weight_blocks):
        if block.dtype == compute:
            block.addmm_(grad_logits[:, start:end].t(), hidden)
        else:
            block.add_(torch.mm(grad_logits[:, start:end].t(), hidden))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(float(hidden @ weight.T + bias), targets))`` over chunks of ``rows`` rows, with the
    gradients computed in the forward.

    Forward: per chunk, the logits in the compute dtype (the weight's, or autocast's), widened to fp32; the summed
    cross-entropy over counted rows; d loss / d logits in fp32, then in the compute dtype d loss / d hidden (stored
    in the chunk's rows of a tensor shaped like ``hidden``) and d loss / d weight, accumulated over the chunks in
    fp32 (for a lower-precision weight in fp32 blocks of rows, each cast to the weight's dtype and freed in turn at
    the end, so at most one fp32-sized copy of the weight gradient exists at a time; from a lower-precision compute
    dtype once per group of chunks, ``GROUP_ELEMENTS``); d loss / d bias likewise. No
    chunk's logits outlive its iteration and none is saved. Only the gradients whose inputs require them are
    computed: with a frozen head (LoRA on the layers) no weight-sized buffer is made.

    Backward: the stored gradients times ``grad_output``, in the dtypes of the inputs. The scaling is in place when
    autograd frees the graph after this backward (the usual case), so the weight gradient never exists twice here;
    with ``retain_graph=True`` it is out of place and the stored gradients stay for the next backward. Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, rows):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        autocast_dtype = _autocast_dtype(hidden, weight)
        compute = autocast_dtype or weight.dtype
        vocab, positions = weight.shape[0], hidden.shape[0]
        with _without_autocast(hidden.device.type):
            # Under autocast, the operands in its dtype, as F.linear would have them (no copy when they already are)
            hidden_c = hidden.to(compute) if autocast_dtype else hidden
            weight_c = weight.to(compute)
            bias_c = bias.to(compute) if bias is not None else None
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            accumulate = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for an fp64 weight
            spans = _vocab_spans(vocab, weight.shape[1], in_place=compute == accumulate)
            weight_blocks = grad_weight = None
            if need_weight:
                if weight.dtype == accumulate:  # the gradient itself, its spans as views
                    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                    weight_blocks = [grad_weight[start:end] for start, end in spans]
                else:
                    weight_blocks = [weight.new_zeros((end - start, weight.shape[1]), dtype=accumulate)
                                     for start, end in spans]  # fmt: skip
            grad_bias = bias.new_zeros(bias.shape, dtype=accumulate) if need_bias else None
            row_data = _Rows(targets, ignore_index, rows, vocab)
            if need_weight:  # ignored rows then add nothing to the weight gradient (see _fused_chunk)
                hidden_c = hidden_c.masked_fill(row_data.ignored.unsqueeze(1), 0.0)
            # Accumulating into an fp32 copy of the weight gradient from a lower precision reads and writes all of it
            # once per accumulation (1 GB at 0.8B): do it once per group of chunks, from their logits' gradients kept
            # in one buffer in the compute dtype, rather than once per chunk.
            group = rows
            if need_weight and compute != accumulate:
                group = max(rows, GROUP_ELEMENTS // max(1, vocab) // rows * rows)
            kept = (
                torch.empty(min(group, positions), vocab, dtype=compute, device=hidden.device) if group > rows else None
            )
            for group_start in range(0, positions, group):
                group_end = min(group_start + group, positions)
                for start in range(group_start, group_end, rows):
                    end = min(start + rows, group_end)
                    _fused_chunk(
                        hidden_c[start:end], weight_c, bias_c, row_data.chunk(start, end), compute,
                        grad_hidden[start:end] if need_hidden else None, weight_blocks, spans, grad_bias,
                        kept[start - group_start : end - group_start] if kept is not None else None,
                    )  # fmt: skip
                if kept is not None:
                    size = group_end - group_start
                    _accumulate_weight_gradient(
                        weight_blocks, spans, kept[:size], hidden_c[group_start:group_end], compute
                    )
            del hidden_c, weight_c, bias_c, kept
            if need_hidden:
                grad_hidden.masked_fill_(row_data.ignored.unsqueeze(1), 0.0)
            if need_weight and grad_weight is None:
                # Cast block by block, dropping each fp32 block as it goes.
                cast = []
                while weight_blocks:
                    cast.append(weight_blocks.pop(0).to(weight.dtype))
                grad_weight = torch.cat(cast) if len(cast) > 1 else cast[0]
                del cast
            weight_blocks = None
            if grad_bias is not None:
                grad_bias = grad_bias.to(bias.dtype)
        # With no counted position the gradients are exactly 0 whatever comes back (the mean of nothing is 0 / 0,
        # so backward brings an inf), as cross_entropy's are for ignored rows; a 0-dim flag, not a host sync.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, row_data.counted.any())
        return row_data.summed_loss()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
        *saved, any_counted = ctx.saved_tensors
        grad_output = torch.where(any_counted, grad_output, torch.zeros_like(grad_output))
        grads = []
        for grad in saved:
            if grad is not None:
                # In place: the stored gradient is this node's alone and autograd frees it after this call (and
                # AccumulateGrad can then take the tensor as .grad). With a retained graph it must stay intact.
                grad = grad * grad_output if keep_graph else grad.mul_(grad_output)
            grads.append(grad)
        return (*grads, None, None, None)


# --- the loss -------------------------------------------------------------------------------------------------------


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
    if recompute and fusable(head):
        # Gradients computed in the forward, chunk by chunk: no recomputation (see FusedLinearCrossEntropy).
        total = FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, ignore_index, rows)
    else:
        total = None
        # An empty input still runs one (empty) chunk, so that the loss is tied to the graph as ForCausalLMLoss's is.
        for start in range(0, max(hidden.shape[0], 1), rows):
            part_hidden, part_targets = hidden[start : start + rows], targets[start : start + rows]
            if recompute:
                # Backward reruns the chunk instead of keeping its logits: that is the memory saving.
                part = checkpoint(
                    _summed_cross_entropy, head, part_hidden, part_targets, ignore_index, use_reentrant=False
                )
            else:
                part = _summed_cross_entropy(head, part_hidden, part_targets, ignore_index)
            total = part if total is None else total + part

    if num_items_in_batch is None:
        # cross_entropy's "mean": the sum over counted positions divided by their number (0 / 0 = NaN when none).
        return total / (targets != ignore_index).sum().to(total.dtype)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
