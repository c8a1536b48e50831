"""What a CUDA graph captured over our modules depends on, and what rules one out.

A graph replays the kernels, weight addresses and Python branches of the forward it recorded. Both graph users, the
static decoding loop (``generation/static_decode.py``) and the graphed training step (``training/graphs.py``), key
their captures on ``graph_key`` and refuse models that accelerate's hooks move around (``moved_by_hooks``); they live
here, below both, so neither imports the other.
"""

from __future__ import annotations

from . import dispatch


def moved_by_hooks(model) -> bool:
    """Whether accelerate's hooks move weights or activations in Python around the forward (a ``device_map`` over
    several devices, CPU or disk offload): a graph would replay one call's transient copies, so no graphs then."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def adapter_layers(model) -> list:
    """The PEFT adapter layers injected into ``model`` (none without peft installed)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft not installed (or broken): no adapter layers can exist
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def graph_key(model) -> tuple:
    """What a captured graph depends on beyond its buffers' shapes. It replays the kernels, weight addresses and Python
    branches of the forward it recorded: new parameter storage (a moved or reloaded model, added adapters), train/eval
    mode, the kernel choice (small ops included), and PEFT adapter state (enabled, active, merged, scaling; switched
    without touching the weights' memory) each need a new capture. In-place weight updates need none: the graph reads
    the memory."""
    adapters = tuple(
        (
            tuple(layer.active_adapters),
            bool(layer.disable_adapters),
            tuple(layer.merged_adapters),
            tuple(sorted(getattr(layer, "scaling", {}).items())),
        )
        for layer in adapter_layers(model)
    )
    weights = tuple(parameter.data_ptr() for parameter in model.parameters())
    return weights, model.training, dispatch.kernel_mode(), dispatch.small_ops_on_fla(), adapters
