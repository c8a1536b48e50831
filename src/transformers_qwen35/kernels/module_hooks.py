"""Whether PyTorch module hooks run Python around a module's forward or backward.

Three fast paths work without calling modules one by one: the fused training loss reads ``lm_head``'s weight
(training/chunked_loss.py), the norms' ``1 + w`` is made for all of them at once before they run (dispatch.py), and
CUDA graphs replay recorded kernels (training/graphs.py). Each would skip a hook (FSDP / ZeRO-3 gathering parameters, offload
moving them, PEFT or user hooks), so each stands aside wherever one is registered.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules import module as module_globals


def runs_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward, forward-pre, backward or backward-pre hook is registered globally or on any of ``modules``
    or their submodules."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    if module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for module in modules
        for m in module.modules()
    )
