"""Training steps with a handful of launches: the text decoder's forward and backward, each captured once per input
shape as a CUDA graph and replayed inside autograd.

Why: a 4k-token training step of the 0.8B model on an H100 took 213 ms, of which the GPU's arithmetic is a fraction
(matmuls ~30 ms at its rate, fla's kernels ~13 ms). The rest is the host launching a few thousand kernels from Python
(docs/performance.md): the same cost CUDA graphs remove from decoding (``generation/static_decode.py``). Here the
decoder layers and the final norm run as one graph forward and one graph backward; the embedding lookup, the output head with its
chunked loss, and the optimizer stay eager (a few dozen launches).

A graph replays fixed kernels on fixed memory, so it serves only batches it can replay exactly: CUDA, training mode
with gradients on, one shape (batch, length, hidden) and dtype, with or without a padding mask (its values are graph
inputs, so batches padded to one length share a capture), no cache, no packing, no activation checkpointing, no
per-layer outputs, no module hooks, SDPA or eager attention (flash attention unpads on the host), and a model as it
was at capture (``kernels/graph_key.py``: parameter storage, kernel choice, adapter state; in-place optimizer
updates need no new capture). Anything else runs the ordinary eager forward, as does a forward while an earlier
replay still waits for its backward (a second replay would overwrite the activations that backward needs).

A shape is captured the second time it is seen (a shape seen once is not worth two warm-up steps and a capture); at
most ``MAX_SHAPES`` are kept, each holding its activations' memory between steps; after ``MAX_CAPTURES`` captures for
one model (shapes that keep changing: pad every batch to one length) the model goes back to eager steps, with one
warning. Opt-in until measured on more GPUs: ``TRANSFORMERS_QWEN35_TRAINING_GRAPHS=1``.

Gradients: the backward graph writes parameter gradients into its own buffers, which stay referenced by the capture,
so autograd copies them into ``param.grad`` (or adds them to it) as it does any gradient it cannot take over:
accumulation over several steps and gradients kept across ``zero_grad()`` behave as in an eager step. The price is one
copy of the decoder's gradients (~1.4 GiB at 0.8B in bf16) held by the capture.
"""

from __future__ import annotations

import os
import weakref

import torch
from transformers.utils import logging

from ..kernels.graph_key import graph_key, moved_by_hooks
from ..kernels.module_hooks import runs_hooks

logger = logging.get_logger(__name__)

TRAINING_GRAPHS_ENV = "TRANSFORMERS_QWEN35_TRAINING_GRAPHS"
MAX_SHAPES = 2
MAX_CAPTURES = 8
WARMUP_STEPS = 2
# Per model, kept beside it rather than on it: deep copies and state dicts never see it.
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def training_graphs_enabled() -> bool:
    """Whether ``TRANSFORMERS_QWEN35_TRAINING_GRAPHS`` asks for graphed training steps (default: no)."""
    return os.environ.get(TRAINING_GRAPHS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def can_graph(text_model, hidden: torch.Tensor, *, cache, segments, output_hidden_states, output_attentions) -> bool:
    """Whether this forward of ``text_model`` (a ``Qwen3_5TextModel``) is one the graphs replay exactly."""
    if not (_graphable(hidden) and text_model.training and torch.is_grad_enabled() and training_graphs_enabled()):
        return False
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if cache is not None or segments is not None:
        return False
    if "flash" in (text_model.config._attn_implementation or ""):
        return False
    if output_hidden_states or output_attentions or text_model.layers_checkpointed():
        return False
    state = _STATES.get(text_model)
    if state is not None and state.disabled:
        return False
    if not hidden.requires_grad and not any(p.requires_grad for p in stack_parameters(text_model)):
        return False  # nothing to train in the stack: no backward to graph
    # Hooks on the embedding (PEFT's enable_input_require_grads) run eagerly before the graph: only the stack counts.
    stack = (*text_model.layers, text_model.norm)
    return not runs_hooks(stack) and not moved_by_hooks(text_model)


def graphed_stack(
    text_model,
    hidden,
    position_embeddings,
    attention_mask,
    padding_mask,
    *,
    cache,
    segments,
    output_hidden_states,
    output_attentions,
) -> torch.Tensor | None:
    """The one seam between the text model's forward and this module: the decoder stack's output, replayed from (or
    captured into) CUDA graphs, when this forward is one they replay exactly (``can_graph``); None otherwise, and the
    forward runs its layers itself."""
    if not can_graph(
        text_model, hidden, cache=cache, segments=segments,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
    ):  # fmt: skip
        return None
    return run(text_model, hidden, *position_embeddings, attention_mask, padding_mask)


def _graphable(tensor: torch.Tensor) -> bool:
    """CUDA graphs exist for CUDA tensors only (the tests replace this, and the capture, to run the logic on CPU)."""
    return tensor.is_cuda


def decoder_stack(text_model, hidden, cos, sin, attention_mask=None, padding_mask=None) -> torch.Tensor:
    """``text_model.decoder_stack`` without a cache, its inputs in the order the graphs take them (``attention_mask``:
    the ``(B, 1, T, T)`` boolean mask or None; ``padding_mask``: ``(B, T)``, True at real tokens, or None)."""
    return text_model.decoder_stack(hidden, (cos, sin), attention_mask=attention_mask, padding_mask=padding_mask)


class _ModelState:
    def __init__(self):
        self.graphs: dict[tuple, GraphedDecoderStack] = {}  # most recently used last
        self.seen: set[tuple] = set()
        self.captures = 0
        self.disabled = False


def run(text_model, *inputs) -> torch.Tensor:
    """``decoder_stack(text_model, *inputs)``, replayed from CUDA graphs when this shape has a capture (made now if
    the shape was seen before), else eager. Call only where ``can_graph`` said yes."""
    state = _STATES.get(text_model)
    if state is None:
        state = _STATES[text_model] = _ModelState()
    key = _shape_key(text_model, inputs)
    graphed = state.graphs.pop(key, None)
    if graphed is not None:
        state.graphs[key] = graphed  # most recently used last
        if graphed.busy():
            return decoder_stack(text_model, *inputs)
        return graphed(*inputs)
    if key not in state.seen:
        state.seen.add(key)
        return decoder_stack(text_model, *inputs)
    while len(state.graphs) >= MAX_SHAPES:
        state.graphs.pop(next(iter(state.graphs)))  # frees that capture's memory before the next is made
    if state.captures >= MAX_CAPTURES:
        state.disabled = True
        state.graphs.clear()
        logger.warning(
            f"Graphed training steps: {MAX_CAPTURES} captures for changing batch shapes; training on without graphs. "
            'Pad every batch to one length (padding="max_length") to keep the graphs.'
        )
        return decoder_stack(text_model, *inputs)
    state.captures += 1
    try:
        graphed = GraphedDecoderStack(text_model, *inputs)
    except Exception as error:  # a capture that fails leaves the model and its gradients untouched
        state.disabled = True
        logger.warning(
            f"Graphed training steps: capturing the decoder failed ({type(error).__name__}: {error}); training on "
            "without graphs."
        )
        return decoder_stack(text_model, *inputs)
    state.graphs[key] = graphed
    return graphed(*inputs)


def release_training_graphs(model) -> None:
    """Free the graphs (and the activation memory they hold) captured for ``model``'s training steps."""
    for module in model.modules():
        _STATES.pop(module, None)


def _shape_key(text_model, inputs) -> tuple:
    shapes = tuple(None if t is None else (t.shape, t.dtype, t.device, t.requires_grad) for t in inputs)
    autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    grads = tuple(p.requires_grad for p in stack_parameters(text_model))
    return shapes, autocast, grads, graph_key(text_model)


def stack_parameters(text_model) -> list[torch.nn.Parameter]:
    """The parameters ``decoder_stack`` reads (the embedding is not among them)."""
    return [p for module in (*text_model.layers, text_model.norm) for p in module.parameters()]


class _Pending:
    """Lives exactly as long as the autograd node of one replay: while it does, that replay's backward may still
    come, and its saved activations must not be overwritten."""

    backward_done = False


class GraphedDecoderStack:
    """``decoder_stack`` for one input shape: a forward graph and a backward graph sharing one memory pool."""

    def __init__(self, text_model, hidden: torch.Tensor, *constants):
        """``constants``: the other inputs of ``decoder_stack`` (rotary tables, masks or None), which take no
        gradient."""
        # Nothing here may hold text_model itself: _STATES is keyed by it weakly, and a value holding its key
        # would keep the model alive for good.
        device = hidden.device
        self.params = tuple(p for p in stack_parameters(text_model) if p.requires_grad)
        self.replays = 0
        self.hidden = hidden.detach().clone().requires_grad_(hidden.requires_grad)
        self.constants = tuple(None if t is None else t.detach().clone() for t in constants)
        inputs = ((self.hidden,) if hidden.requires_grad else ()) + self.params
        autocast = torch.is_autocast_enabled("cuda")
        autocast_dtype = torch.get_autocast_dtype("cuda")

        def forward():
            # Autocast's cache of cast weights would be captured as constants: off inside graphs.
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast, cache_enabled=False):
                return decoder_stack(text_model, self.hidden, *self.constants)

        # Warm-up steps run for real (Triton compiles and autotunes) on a side stream; torch.autograd.grad leaves
        # every param.grad as it was.
        def warm_up():
            for _ in range(WARMUP_STEPS):
                output = forward()
                torch.autograd.grad(output, inputs, torch.ones_like(output), allow_unused=True)

        def forward_into_self():
            self.output = forward()

        def backward():
            return torch.autograd.grad(self.output, inputs, self.output_grad, allow_unused=True)

        _on_side_stream(device, warm_up)
        self.forward_graph, _ = _capture(forward_into_self)
        self.output_grad = torch.empty_like(self.output)
        self.backward_graph, grads = _capture(backward, pool=self.forward_graph.pool())
        self.output = self.output.detach()  # the memory replays write; the captured autograd graph is not needed
        grads = list(grads)
        self.hidden_grad = grads.pop(0) if hidden.requires_grad else None
        self.param_grads = tuple(grads)
        self._pending = lambda: None

    def busy(self) -> bool:
        """Whether the last replay's backward may still come (its autograd node is alive and has not run)."""
        pending = self._pending()
        return pending is not None and not pending.backward_done

    def __call__(self, hidden: torch.Tensor, *constants) -> torch.Tensor:
        return _Replay.apply(self, hidden, constants, *self.params)


def _on_side_stream(device: torch.device, function) -> None:
    """Run ``function`` on a fresh stream that waits for the current one, and make the current one wait for it (work
    before a capture must not run on the stream being captured)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream(device).wait_stream(stream)


def _capture(function, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """``function()`` captured as a CUDA graph (sharing ``pool`` if given): the graph and what the capture returned,
    whose tensors every replay overwrites."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = function()
    return graph, result


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed: GraphedDecoderStack, hidden, constants, *params):
        graphed.hidden.detach().copy_(hidden)
        for static, value in zip(graphed.constants, constants):
            if static is not None:
                static.copy_(value)
        graphed.forward_graph.replay()
        graphed.replays += 1
        ctx.graphed, ctx.replay, ctx.pending = graphed, graphed.replays, _Pending()
        graphed._pending = weakref.ref(ctx.pending)
        # A copy: the graph's own output is overwritten by the next replay, and callers may keep hidden states.
        return graphed.output.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, output_grad):
        graphed = ctx.graphed
        if graphed.replays != ctx.replay:  # only after a first backward with retain_graph=True
            raise RuntimeError(
                "This graphed training step was replayed again after its first backward, which overwrote the "
                "activations a second backward needs. Run the second backward before the next forward, or set "
                f"{TRAINING_GRAPHS_ENV}=0."
            )
        ctx.pending.backward_done = True
        graphed.output_grad.copy_(output_grad)
        graphed.backward_graph.replay()
        hidden_grad = graphed.hidden_grad.clone() if graphed.hidden_grad is not None else None
        # The parameter gradients as the capture's buffers themselves: autograd copies them (see the module's notes).
        return (None, hidden_grad, None, *graphed.param_grads)
