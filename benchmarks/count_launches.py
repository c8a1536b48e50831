"""How many operations one training step asks of the device, ours against built-in transformers, counted on CPU.

On a GPU each ATen operation is (about) one kernel launch from the host, and each fla kernel call a few Triton
launches with more Python around them. Where a step waits on its host, these counts are what it waits for. Here
both models get the official layer layout of ``--size`` with small widths (counts do not depend on widths), the
official vocabulary (the loss's chunks do), and fla's kernels are stand-ins that count their calls (forward and
backward) instead of running Triton, for our norms, SwiGLU, conv, gated norm and Gated DeltaNet, and for built-in's
Gated DeltaNet (its other layers run their PyTorch ops, as on a GPU without its optional kernels).

    python benchmarks/count_launches.py --size 0.8B --tokens 4096

Prints, per model, the ATen operations (views and allocations not counted) and fla calls of the forward (with the
loss) and of the backward, and the commonest operations. The optimizer step (the same for both) is left out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import compare_native  # noqa: E402
from conftest import install_fake_fla  # noqa: E402

# Operations that launch nothing on a GPU (views, metadata) or only allocate.
FREE = {
    "aten.alias", "aten.as_strided", "aten.detach", "aten.empty", "aten.empty_like", "aten.expand", "aten.is_same_size",
    "aten.lift_fresh", "aten.new_empty", "aten.permute", "aten.reshape", "aten.select", "aten.slice", "aten.split",
    "aten.split_with_sizes", "aten.squeeze", "aten.t", "aten.transpose", "aten.unbind", "aten.unsqueeze",
    "aten.view", "aten._unsafe_view", "aten.promote_types",
}  # fmt: skip


class Counter(TorchDispatchMode):
    """ATen operations dispatched while active, except inside ``quiet()`` (the stand-ins' own arithmetic)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.muted and name.rsplit(".", 1)[0] not in FREE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def quiet(self):
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1


COUNTER = Counter()


def stand_in(name: str):
    """An fla kernel as an autograd function that counts one call forward and one backward; its output is shaped
    like its first input, its gradients are zeros (the counts do not depend on values)."""

    class Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            with COUNTER.quiet():
                ctx.inputs = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None for t in tensors]
                out = tensors[0].clone()
            COUNTER.counts[f"fla {name}"] += 1
            return out

        @staticmethod
        def backward(ctx, grad):
            COUNTER.counts[f"fla {name} backward"] += 1
            with COUNTER.quiet():
                return tuple(None if spec is None else torch.zeros(spec[0], dtype=spec[1]) for spec in ctx.inputs)

    return Kernel.apply


def fla_stand_ins() -> dict:
    chunk, conv, gated_norm, norm, add_norm, swiglu = map(
        stand_in, ("chunk_gated_delta_rule", "causal_conv1d", "rms_norm_gated", "rms_norm", "add_rms_norm", "swiglu")
    )

    def chunk_call(q, k, v, g=None, beta=None, *args, A_log=None, dt_bias=None, **kwargs):
        inputs = [t for t in (q, k, g, beta, A_log, dt_bias) if isinstance(t, torch.Tensor)]
        return chunk(v, *inputs), None

    def norm_call(x, weight, bias, residual=None, **kwargs):
        if residual is None:
            return norm(x, weight)
        out = add_norm(x, residual, weight)
        return out, out

    return dict(
        chunk=chunk_call,
        recurrent=None,
        conv=lambda x, weight, *args, **kwargs: (conv(x, weight), None),
        conv_update=None,
        norm=lambda x, gate, weight, *args, **kwargs: gated_norm(x, gate, weight),
        rms_norm=norm_call,
        swiglu=lambda x, y: swiglu(x, y),
    )


def small_widths(size: str):
    """``compare_native``'s config for ``size`` with its layers and vocabulary, at small widths."""
    official = compare_native.text_config_dict

    def config(_):
        values = official(size)
        values.update(
            hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
            linear_num_key_heads=2, linear_num_value_heads=4 if values["linear_num_value_heads"] > values[
                "linear_num_key_heads"] else 2, linear_key_head_dim=32, linear_value_head_dim=32, eos_token_id=None,
        )  # fmt: skip
        return values

    return config


def count_step(model, ids) -> tuple[collections.Counter, collections.Counter]:
    model.train()
    with COUNTER:
        COUNTER.counts.clear()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        forward = collections.Counter(COUNTER.counts)
        COUNTER.counts.clear()
        loss.backward()
        backward = collections.Counter(COUNTER.counts)
    model.zero_grad(set_to_none=True)
    return forward, backward


def describe(label: str, forward: collections.Counter, backward: collections.Counter, top: int) -> str:
    def split(counts):
        fla = sum(v for k, v in counts.items() if k.startswith("fla "))
        return sum(counts.values()) - fla, fla

    (fa, ff), (ba, bf) = split(forward), split(backward)
    lines = [
        f"{label}: forward {fa} ATen + {ff} fla calls, backward {ba} ATen + {bf} fla calls; "
        f"total {fa + ba} ATen + {ff + bf} fla calls"
    ]
    for title, counts in (("forward", forward), ("backward", backward)):
        common = ", ".join(f"{name} {count}" for name, count in counts.most_common(top))
        lines.append(f"  {title}: {common}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[s for s in compare_native.SIZES if s not in ("tiny", "small")],
                        default="0.8B")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=4096, help="one sequence of this many tokens (default 4096)")
    parser.add_argument("--top", type=int, default=12, help="commonest operations listed per pass")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFORMERS_QWEN35_KERNELS", "fla")  # our fla path, on the stand-ins
        install_fake_fla(patch, fla_stand_ins())
        patch.setattr(compare_native, "text_config_dict", small_widths(args.size))
        ours, builtin = compare_native.build_models(args.size, torch.device("cpu"), torch.bfloat16, 0, "sdpa")
        _, modeling = compare_native._builtin_modules()
        chunk = fla_stand_ins()["chunk"]
        patch.setattr(modeling, "torch_chunk_gated_delta_rule", chunk)
        for module in builtin.modules():  # the kernel may also be bound per layer instance
            if hasattr(module, "chunk_gated_delta_rule"):
                patch.setattr(module, "chunk_gated_delta_rule", chunk)
        ids = torch.randint(0, ours.config.vocab_size, (1, args.tokens))
        print(f"one training step, {args.size} layers ({ours.config.num_hidden_layers}), vocabulary "
              f"{ours.config.vocab_size:,}, 1 x {args.tokens} tokens, bf16")  # fmt: skip
        for label, model in (("ours", ours), ("built-in", builtin)):
            print(describe(label, *count_step(model, ids), args.top))


if __name__ == "__main__":
    main()
