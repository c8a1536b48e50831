"""The static decoding block compiled with ``torch.compile``, for decoding on the CPU.

Why: on a CPU one decoding step of the 0.8B model is ~190 matrix-vector products (every weight read once: ~70 ms at
the ~21 GB/s two cores of our test machine stream) and ~2,600 small ATen ops with Python between them (~45 ms:
norms, gates, the DeltaNet recurrence, ~900 copies and dtype conversions). Inductor fuses the small ops into C++
loops, which leaves mostly the matrix products (0.8B, 2 cores, tokens/s eager -> compiled: packed bf16 8.5 -> 10.1,
int8 10.0 -> 12.2, int4 15.3 -> 21.4; llama.cpp at the same bytes per weight 10.4 / 14.1 / 18.8;
docs/performance.md). On CUDA the same block is replayed as a CUDA graph instead (``static_decode.GraphedBlock``).

Asked for with transformers' own switch, ``generate(..., compile_config=CompileConfig())`` (or once for all calls,
``model.generation_config.compile_config = CompileConfig()``); ``disable_compile=True`` turns it off for a call. A
CPU model asked for it takes our static decoding loop by default (as CUDA models and models packed by
``pack_for_cpu`` do), for the requests that loop serves exactly. ``CompileConfig``'s ``backend``, ``dynamic`` and
``options`` (or ``mode``) are passed on; ``fullgraph`` is always on: the block is one graph, so a failed compilation
fails before any state was touched, and decoding then goes on eagerly after one warning (no C++ compiler, a PyTorch
without inductor).

Cost: the first step compiles (0.8B on 2 cores: ~30 s; inductor keeps its work in its on-disk cache, ~15 s in a
later process). The static cache's capacity (the prompt and reply rounded up to 256 positions, so it grows with a
conversation) is a dynamic dimension of the graph: a longer chat does not recompile. A new batch size or block length
(MTP verification) does, once each.
"""

from __future__ import annotations

import json
import threading
import types
import weakref

import torch
from transformers.utils import logging

from .static_decode import forward_block

logger = logging.get_logger(__name__)

# model -> {torch.compile arguments -> its compiled block}; kept beside the model, as static_decode keeps its cache.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def compile_arguments(generation_config, device: torch.device) -> dict | None:
    """``torch.compile``'s keyword arguments for the static block of a ``generate()`` call, or None: only on the
    CPU, only when ``generation_config`` has a ``compile_config`` and no ``disable_compile``."""
    config = getattr(generation_config, "compile_config", None)
    if device.type != "cpu" or config is None or getattr(generation_config, "disable_compile", False):
        return None
    arguments = {"backend": config.backend, "dynamic": config.dynamic, "fullgraph": True}
    if config.options:
        arguments["options"] = config.options
    elif config.mode and config.mode != "reduce-overhead":  # transformers' default, CUDA graphs: not for the CPU
        arguments["mode"] = config.mode
    return arguments


def compiled_forward_block(model, arguments: dict):
    """``forward_block`` for ``model``, compiled with ``arguments`` (``compile_arguments``) on first use and kept for
    the model's later calls and threads.

    Each model compiles its own copy of ``forward_block`` (a new code object): dynamo keeps compiled graphs, and counts
    recompilations (a new batch size, block length or cache capacity; 8 at most by default), per code object, so
    models loaded one after another in a process do not use up each other's."""
    # The backend as the object itself (a callable backend held here, so its id cannot be reused by another).
    key = (arguments["backend"], json.dumps({k: v for k, v in arguments.items() if k != "backend"}, sort_keys=True))
    with _LOCK:
        per_model = _COMPILED.setdefault(model, {})
        if key not in per_model:
            per_model[key] = _CompiledBlock(arguments)
        return per_model[key]


def compilation_failed(model) -> bool:
    """Whether a compilation of ``model``'s decoding block failed (its calls then decode eagerly)."""
    with _LOCK:
        return any(block.failed for block in _COMPILED.get(model, {}).values())


class _CompiledBlock:
    def __init__(self, arguments: dict):
        block = types.FunctionType(forward_block.__code__.replace(), forward_block.__globals__, "forward_block")
        self.compiled = torch.compile(block, **arguments)
        self.failed = False  # compilation failed once: decode eagerly from then on

    def __call__(self, model, cache, ids, positions):
        if self.failed:
            return forward_block(model, cache, ids, positions)
        for buffer in [*cache.key_cache, *cache.value_cache]:
            if buffer is not None:  # (B, n_kv, capacity, d)
                torch._dynamo.maybe_mark_dynamic(buffer, 2)
        torch._dynamo.maybe_mark_dynamic(cache.key_valid, 1)  # (B, capacity)
        try:
            return self.compiled(model, cache, ids, positions)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Raised while tracing or compiling the one graph, before it ran: the cache is as it was.
            with _LOCK:
                first, self.failed = not self.failed, True
            if first:
                cause = getattr(error, "inner_exception", None) or error  # a backend's own error, where it has one
                message = (str(cause).strip().splitlines() or [""])[0]
                logger.warning(
                    f"torch.compile could not compile the decoding step ({type(cause).__name__}: {message}); "
                    "decoding eagerly instead (pass disable_compile=True to skip the attempt)."
                )
            return forward_block(model, cache, ids, positions)
