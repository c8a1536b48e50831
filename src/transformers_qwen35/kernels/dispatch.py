"""The one place that chooses between fla's Triton kernels and the exact PyTorch ops.

The choice is made per call from the tensors' device, never from whether ``fla`` imports: with triton installed on a
CPU-only machine ``import fla`` succeeds and every kernel then fails ("0 active drivers"), which is how built-in
transformers crashes there. fla is imported lazily, only once a CUDA tensor asks for it.

``TRANSFORMERS_QWEN35_KERNELS`` overrides the choice: ``auto`` (default), ``torch`` (always the PyTorch ops) or
``fla`` (always fla; an error if it cannot be imported). Each path taken is logged once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from types import SimpleNamespace

import torch
from torch.nn import functional as F
from transformers.utils import logging

from . import hopper_backward
from .module_hooks import runs_hooks
from .reference.causal_conv import causal_conv1d as torch_causal_conv1d
from .reference.gated_delta_rule import chunk_gated_delta_rule as torch_chunk_gated_delta_rule
from .reference.gated_delta_rule import recurrent_gated_delta_rule as torch_recurrent_gated_delta_rule
from .reference.gated_norm import gated_rms_norm as torch_gated_rms_norm
from .reference.rms_norm import zero_centred_rms_norm as torch_rms_norm

logger = logging.get_logger(__name__)

KERNELS_ENV = "TRANSFORMERS_QWEN35_KERNELS"
MODES = ("auto", "torch", "fla")
# "0": the RMSNorms and the MLP's SwiGLU run on PyTorch ops even where the Gated DeltaNet layers run on fla. Each fla
# call costs more host time than a few ATen ops: where a step waits on the host (training) that may be the faster
# choice; benchmarks/compare_native.py measures both.
SMALL_OPS_ENV = "TRANSFORMERS_QWEN35_FLA_SMALL_OPS"
_logged: set[str] = set()
FEW_TOKENS = 8


def kernel_mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not understood; use one of {', '.join(MODES)}.")
    return mode


@functools.cache
def _load_fla() -> SimpleNamespace | None:
    """fla's kernels, or None if they cannot be imported (no fla-core, no triton, or an incompatible version)."""
    try:
        gdn = importlib.import_module("fla.ops.gated_delta_rule")
        conv = importlib.import_module("fla.modules.causal_conv1d")
        norm = importlib.import_module("fla.modules.norm.fused_norm_gate")
    except Exception as error:  # ImportError, or triton raising at import on an unsupported platform
        logger.info(f"fla kernels unavailable ({type(error).__name__}: {error}); using the PyTorch ops.")
        return None
    try:  # one fused kernel per norm instead of ~7 small ones: ~60 norms in a decoding step of 0.8B
        rms_norm = importlib.import_module("fla.modules.norm.layernorm").rms_norm
    except Exception:
        rms_norm = None
    try:  # the MLP's silu(gate) * up in one kernel (and one for its backward)
        swiglu = importlib.import_module("fla.modules.activations").swiglu
    except Exception:
        swiglu = None
    return SimpleNamespace(
        hopper_backward=hopper_backward.register_with_fla(),
        rms_norm=rms_norm,
        swiglu=swiglu,
        chunk=gdn.chunk_gated_delta_rule,
        fused_recurrent=gdn.fused_recurrent_gated_delta_rule,
        conv=conv.causal_conv1d,
        conv_update=conv.causal_conv1d_update,
        rms_norm_gated=norm.rms_norm_gated,
    )


def _log_once(path: str, message: str) -> None:
    if torch.compiler.is_compiling():
        return  # logging breaks a torch.compile graph; the eager calls log it
    if path not in _logged:
        _logged.add(path)
        logger.info(message)


def _hopper_backward_refused(tensor: torch.Tensor, fla: SimpleNamespace) -> bool:
    """fla-core 0.6 refuses the gated chunk backward on Hopper with Triton in [3.4.0, 3.7.1) (fla issue #640),
    unless our replacement for the refused piece is registered with fla (``hopper_backward.py``)."""
    if not (torch.is_grad_enabled() and tensor.requires_grad and tensor.is_cuda) or fla.hopper_backward:
        return False
    return hopper_backward.refused_by_fla(tensor)


def fla_kernels(tensor: torch.Tensor) -> SimpleNamespace | None:
    """fla's kernels if this tensor should run on them, else None (the PyTorch ops)."""
    mode = kernel_mode()
    if mode == "torch":
        _log_once("torch-forced", f"{KERNELS_ENV}=torch: Gated DeltaNet layers run on the PyTorch ops.")
        return None
    if mode == "fla":
        fla = _load_fla()
        if fla is None:
            raise RuntimeError(
                f"{KERNELS_ENV}=fla but fla's kernels cannot be imported. Install them with "
                "`pip install 'fla-core>=0.6,<0.7' triton` on a machine with a supported GPU, or unset the variable."
            )
        _log_once("fla-forced", f"{KERNELS_ENV}=fla: Gated DeltaNet layers run on fla's kernels.")
        return fla
    if tensor.device.type != "cuda" or torch.compiler.is_exporting():
        _log_once("torch-auto", f"Gated DeltaNet layers on {tensor.device.type} tensors run on the PyTorch ops.")
        return None
    fla = _load_fla()
    if fla is None:
        _log_once(
            "torch-nofla",
            "fla kernels are not installed: Gated DeltaNet layers run on the exact but slower PyTorch ops. "
            "Install `fla-core` and `triton` for the fast path.",
        )
        return None
    if _hopper_backward_refused(tensor, fla):
        if "hopper" not in _logged:
            _logged.add("hopper")
            logger.warning(
                "Training on a Hopper GPU with Triton < 3.7.1: fla refuses this backward (fla issue #640), so "
                "Gated DeltaNet layers train on the PyTorch ops (correct, slower). Upgrade to torch >= 2.12.1 "
                "(Triton >= 3.7.1) for the fast path."
            )
        return None
    _log_once("fla-auto", "Gated DeltaNet layers on CUDA tensors run on fla's kernels.")
    return fla


def decay_and_beta(a, b, A_log, dt_bias):
    """The Gated DeltaNet gates from their projections ``a``, ``b`` ``(B, T, H_v)``, as built-in transformers makes
    them: the log-decay ``g = -exp(A_log) * softplus(a + dt_bias)`` in fp32 (``exp(A_log)`` overflows in half
    precision) and ``beta = sigmoid(b)`` in ``b``'s dtype."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid()


def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The Gated DeltaNet recurrence. Shapes: q, k ``(B, T, H_k, d_k)``; v ``(B, T, H_v, d_v)``; the gates by their
    projections ``a``, ``b`` ``(B, T, H_v)`` with ``A_log``, ``dt_bias`` ``(H_v)`` (``decay_and_beta``); states
    ``(B or N, H_v, d_k, d_v)`` fp32. Returns ``(o, final_state | None)``. fla makes the gates inside its kernels
    (the decay fused with its chunk-wise cumulative sum, or in the recurrent step), which saves ~7 small kernels per
    layer and step: a decoding step is mostly such launches."""
    fla = fla_kernels(v)
    # A few tokens without autograd (decoding, speculative verification): stepping beats padding to a 64-token chunk.
    few = cu_seqlens is None and q.shape[1] <= FEW_TOKENS and not torch.is_grad_enabled()
    if fla is None:
        g, beta = decay_and_beta(a, b, A_log, dt_bias)
        if few:
            return torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state)
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)
    common = dict(initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
    gates = dict(g=a, beta=b, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
    if few:
        # The fused recurrent kernel has no backward: inference only.
        return fla.fused_recurrent(q, k, v, **gates, **common)
    return fla.chunk(q, k, v, cu_seqlens=cu_seqlens, **gates, **common)


def causal_conv1d(x, weight, conv_state=None, cu_seqlens=None, position_in_segment=None, need_state=False):
    """Causal depthwise conv + SiLU. ``x`` ``(B, T, D)``, ``weight`` ``(D, K)``, state ``(B, D, K)``.

    Returns ``(y, new_state)``; ``new_state`` is None on the fla path unless ``need_state``.
    """
    fla = fla_kernels(x)
    if fla is None:
        return torch_causal_conv1d(x, weight, conv_state, position_in_segment)
    if x.shape[1] == 1 and conv_state is not None and cu_seqlens is None and not torch.is_grad_enabled():
        y, _ = fla.conv_update(x, conv_state, weight=weight, activation="silu")  # updates conv_state in place
        return y, conv_state
    return fla.conv(
        x,
        weight=weight,
        initial_state=conv_state,
        output_final_state=need_state,
        activation="silu",
        cu_seqlens=cu_seqlens,
    )


def rms_norm(x, weight, eps):
    """Qwen3.5's zero-centred RMSNorm, ``x_hat * (1 + weight)`` in fp32, cast to ``x``'s dtype."""
    return _rms_norm(x, None, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """``(rms_norm(residual + x), residual + x)``: a decoder layer's residual add and the norm after it, one kernel
    on fla (which normalises the fp32 sum before rounding it to the residual's dtype)."""
    return _rms_norm(x, residual, weight, eps)


def small_ops_on_fla() -> bool:
    """Whether the norms and SwiGLU may run on fla (``SMALL_OPS_ENV``), where the Gated DeltaNet layers do."""
    return os.environ.get(SMALL_OPS_ENV, "1").strip() != "0"


def _small_ops(x) -> SimpleNamespace | None:
    """fla's kernels for the small ops (norms, SwiGLU) of a layer whose activations are ``x``, or None."""
    return fla_kernels(x) if small_ops_on_fla() else None


def _rms_norm(x, residual, weight, eps):
    fla = _small_ops(x)
    if fla is not None and fla.rms_norm is not None:
        try:
            # fla multiplies by the weight it is given, in fp32: hand it 1 + w in fp32 (gradients flow back to w).
            if residual is None:
                return fla.rms_norm(x, _plus_one(weight), None, eps=eps)
            if x.dtype != residual.dtype:  # under autocast (an fp32 residual stream): outputs as the sum's dtype
                x = x.to(torch.promote_types(x.dtype, residual.dtype))
                residual = residual.to(x.dtype)
            return fla.rms_norm(x, _plus_one(weight), None, residual=residual, prenorm=True, eps=eps)
        except (RuntimeError, ValueError, TypeError, AssertionError) as error:
            # One fused kernel among several paths: should it refuse an input, the exact PyTorch norm serves.
            if "rms_norm-failed" not in _logged:
                _logged.add("rms_norm-failed")
                logger.warning(f"fla's rms_norm failed ({type(error).__name__}: {error}); using the PyTorch RMSNorm.")
            fla.rms_norm = None
    if residual is None:
        return torch_rms_norm(x, weight, eps)
    summed = residual + x
    return torch_rms_norm(summed, weight, eps), summed


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}
# id(weight) -> its 1 + weight in fp32, while norm_weights_prepared() is in force.
_PREPARED: contextvars.ContextVar[dict[int, torch.Tensor] | None] = contextvars.ContextVar("norms", default=None)


def _plus_one(weight: torch.Tensor) -> torch.Tensor:
    """``1 + weight`` in fp32: prepared with the others (``norm_weights_prepared``), else one kernel (a mixed-dtype
    add into fp32, where ``1.0 + weight.float()`` takes two): a decoding step has ~60 norms and is mostly such
    launches."""
    prepared = _PREPARED.get()
    if prepared is not None and id(weight) in prepared:
        return prepared[id(weight)]
    ones = _ones(weight.numel(), weight.device)
    return 1.0 + weight.float() if ones is None else torch.add(ones.view_as(weight), weight)


def _ones(size: int, device: torch.device) -> torch.Tensor | None:
    """fp32 ones, kept per size and device; None during a CUDA graph capture when not made yet (a capture's
    allocations belong to its graph)."""
    ones = _ONES.get((size, device))
    if ones is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ones = _ONES[(size, device)] = torch.ones(size, dtype=torch.float32, device=device)
    return ones


def norm_weights_prepared(model: torch.nn.Module, x: torch.Tensor):
    """Within the block, ``model``'s zero-centred RMSNorms (``model.norm_modules()``) read ``1 + w`` made for all of
    them at once (a concatenation and one add, ~2 kernels instead of one per norm). Without autograd and on fla's
    norm only (as chosen for the activations ``x``): the values are made afresh on entry, so a CUDA graph captured
    inside reads the weights as they are at each replay. Not where something manages the weights per module at call
    time (hooks: accelerate's offload, FSDP; sharded, partitioned or meta weights): read on entry they would not be
    the ones the norms run with. Nor inside a ``torch.compile`` graph (compiled CPU decoding): fla is not there, and
    the tracer cannot follow this generator."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    fla = None if torch.is_grad_enabled() else _small_ops(x)
    norms = model.norm_modules() if fla is not None and fla.rms_norm is not None else []
    weights = [norm.weight for norm in norms]
    if not norms or not _preparable(norms, weights):
        return contextlib.nullcontext()
    return _prepared(norms, weights)


@contextlib.contextmanager
def _prepared(norms, weights):
    flat = torch.cat([weight.reshape(-1) for weight in weights])
    ones = _ones(flat.numel(), flat.device)
    plus_one = 1.0 + flat.float() if ones is None else torch.add(ones, flat)
    pieces = plus_one.split([weight.numel() for weight in weights])
    token = _PREPARED.set({id(weight): piece.view_as(weight) for weight, piece in zip(weights, pieces)})
    try:
        yield
    finally:
        _PREPARED.reset(token)


def _preparable(norms, weights) -> bool:
    if runs_hooks(norms):
        return False
    device = weights[0].device
    for norm, weight in zip(norms, weights):
        if hasattr(norm, "_hf_hook"):  # accelerate's, which moves the weight in Python at call time
            return False
        # plain dense tensors only: a DTensor (FSDP2) is a subclass; ZeRO-3 leaves partitioned weights empty
        if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.is_meta or weight.device != device:
            return False
        if weight.numel() == 0:
            return False
    return True


# Without autograd, from this many elements on the MLP's activation is made in place (two kernels) rather than by
# fla's kernel, which allocates its output: at a 64k-token prefill of 0.8B that is 470 MB more at the peak.
IN_PLACE_SWIGLU_ELEMENTS = 2**20


def swiglu(gate, up):
    """``silu(gate) * up``: fla's kernel (in fp32, rounded once) for training and decoding, else in place on
    ``gate`` (a fresh projection output: autograd keeps what it needs)."""
    fla = _small_ops(gate)
    small = gate.numel() < IN_PLACE_SWIGLU_ELEMENTS
    if fla is not None and fla.swiglu is not None and (small or torch.is_grad_enabled()):
        return fla.swiglu(gate, up)
    return F.silu(gate, inplace=True).mul_(up)


def gated_rms_norm(x, gate, weight, eps):
    fla = fla_kernels(x)
    if fla is None:
        return torch_gated_rms_norm(x, gate, weight, eps)
    # The weight as it is (fp32 in the official checkpoints): fla reads it in fp32, as built-in's norm multiplies by
    # it, and returns its gradient in its dtype; no cast kernel per call.
    return fla.rms_norm_gated(x, gate, weight, None, activation="silu", eps=eps)
