"""Trains the tiny Qwen3.5 text model for a few steps and writes the per-step losses and the final weights.

Launched by ``tests/test_fsdp.py``; three modes, same model (seed 0), same data, same global batches, plain SGD:

* ``--mode reference``: one process, no ``torch.distributed``, the whole global batch per step (the oracle);
* ``--mode fsdp``: under ``torchrun``, FSDP2 (``fully_shard``) on gloo, wrapped as accelerate's FSDP2 plugin does
  with ``transformer_layer_cls_to_wrap=["Qwen3_5DecoderLayer"]`` (one unit per decoder layer, the embedding, the
  final norm with lm_head, the root); each rank takes its slice of the global batch;
* ``--mode trainer``: under ``torchrun``, ``transformers.Trainer`` with ``fsdp=True`` and an ``fsdp_config``, as a user
  would write it. On CPU accelerate (<= 1.15 at least) never selects FSDP: its CPU multi-process type (MULTI_CPU) is
  not one of those it turns into FSDP, so the model is wrapped in DDP. The result records what was used.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py --mode fsdp --out r.json

``--models untied tied`` trains the untied model (as 9B) and the tied one (as 0.8B, 2B, 4B) one after the other in
the same launch. Rank 0 writes ``--out`` (JSON: per model the per-step losses, what wrapped it, checksums) and the
full (unsharded) initial and final state dicts next to it (same name, ``.pt``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

START = time.perf_counter()

os.environ.setdefault("TRANSFORMERS_QWEN35_KERNELS", "auto")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_text_kwargs  # noqa: E402  (the tiny config every test uses)

import transformers_qwen35  # noqa: E402

DECODER_LAYER = "Qwen3_5DecoderLayer"
SEQUENCES, LENGTH = 8, 32


def build_model(tied: bool) -> transformers_qwen35.Qwen3_5ForCausalLM:
    torch.manual_seed(0)
    config = transformers_qwen35.Qwen3_5TextConfig(**tiny_text_kwargs(tie_word_embeddings=tied))
    model = transformers_qwen35.Qwen3_5ForCausalLM(config).float()
    assert DECODER_LAYER in model._no_split_modules
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model.train()


def dataset(vocab_size: int) -> torch.Tensor:
    """SEQUENCES random sequences of LENGTH tokens (no pad id 0, so every label counts)."""
    return torch.randint(1, vocab_size, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))


def global_batch(data: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """The samples of one optimizer step, in order, wrapping around epochs (as a sequential sampler does)."""
    return data[[(step * size + i) % len(data) for i in range(size)]]


def checksum(state: dict) -> dict:
    return {name: float(value.double().abs().sum()) for name, value in sorted(state.items())}


def full_state(model) -> dict:
    return {name: value.detach().clone().cpu() for name, value in model.state_dict().items()}


def run_reference(args, tied: bool) -> dict:
    model = build_model(tied)
    initial = full_state(model)
    data = dataset(model.config.vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        batch = global_batch(data, step, args.global_batch)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, initial=initial, state=full_state(model), wrapper=None)


def init_distributed() -> tuple[int, int]:
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return dist.get_rank(), dist.get_world_size()


def run_fsdp(args, tied: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = init_distributed()
    assert args.global_batch % world == 0, (args.global_batch, world)
    local = args.global_batch // world
    model = build_model(tied)
    initial = full_state(model)
    every_initial = [None] * world
    dist.all_gather_object(every_initial, checksum(initial))
    assert all(other == checksum(initial) for other in every_initial), "ranks built different initial weights"
    total_numel = sum(p.numel() for p in model.parameters())  # a tied weight counts once

    # The layout accelerate's FSDP2 plugin (fsdp_utils.fsdp2_prepare_model) builds for transformer_layer_cls_to_wrap:
    # one unit per decoder layer, the embedding its own unit when untied, the tail [final norm, (embedding if
    # tied,) lm_head] one unit kept gathered after forward, and the root last.
    for module in model.modules():
        if type(module).__name__ == DECODER_LAYER:
            fully_shard(module)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not tied:
        fully_shard(embedding)
    fully_shard([model.model.norm, embedding, head] if tied else [model.model.norm, head], reshard_after_forward=False)
    fully_shard(model)
    fsdp_modules = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    every_local_numel = [None] * world
    dist.all_gather_object(every_local_numel, local_numel)

    data = dataset(model.config.vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)  # after fully_shard: it steps the local shards
    losses = []
    for step in range(args.steps):
        batch = global_batch(data, step, args.global_batch)[rank * local : (rank + 1) * local]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Every rank has as many label tokens, so the mean of the rank means is the global batch's mean.
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        losses.append((mean / world).item())

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(
        losses=losses,
        initial=initial,
        state={name: value.detach().clone() for name, value in state.items()},
        wrapper=type(model).__name__,
        fsdp_enabled=True,
        fsdp_modules=fsdp_modules,
        sharded=sharded,
        still_tied=model.lm_head.weight is model.model.embed_tokens.weight,
        total_numel=total_numel,
        local_numel_per_rank=every_local_numel,
    )


def run_trainer(args, tied: bool) -> dict:
    from torch.distributed.tensor import DTensor
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Sequences(Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            return {"input_ids": self.data[index], "labels": self.data[index]}

    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert args.global_batch % world == 0, (args.global_batch, world)
    model = build_model(tied)
    initial = full_state(model)
    training_args = TrainingArguments(
        output_dir=f"{args.output_dir}-{'tied' if tied else 'untied'}",
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [DECODER_LAYER], "reshard_after_forward": True},
        per_device_train_batch_size=args.global_batch // world,
        max_steps=args.steps,
        train_sampling_strategy="sequential",
        optim="sgd",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Sequences(dataset(model.config.vocab_size)))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {name: value.detach().clone() for name, value in state.items()}
    else:
        state = full_state(unwrapped)
    return dict(
        losses=losses,
        initial=initial,
        state=state,
        wrapper=type(trainer.model_wrapped).__name__,
        fsdp_enabled=bool(trainer.is_fsdp_enabled),
        distributed_type=str(trainer.accelerator.distributed_type.value),
        sharded=any(isinstance(p, DTensor) for p in unwrapped.parameters()),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["reference", "fsdp", "trainer"], default="fsdp")
    parser.add_argument("--out", required=True, help="JSON written by rank 0; the final state dicts go next to it")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["untied", "tied"],
        default=["untied"],
        help="lm_head untied (as 9B) and/or tied to the embedding (as 0.8B, 2B and 4B), trained one after the other",
    )
    parser.add_argument("--output-dir", default=None, help="Trainer's output_dir prefix (default: next to --out)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    args.output_dir = args.output_dir or str(out.with_name(out.stem + "-output"))
    torch.use_deterministic_algorithms(True)

    run = {"reference": run_reference, "fsdp": run_fsdp, "trainer": run_trainer}[args.mode]
    results = {name: run(args, tied=name == "tied") for name in args.models}
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        states = {}
        for name, result in results.items():
            states[name] = {"initial": result.pop("initial"), "final": result.pop("state")}
            result.update(
                tied=name == "tied",
                initial_checksum=checksum(states[name]["initial"]),
                final_checksum=checksum(states[name]["final"]),
            )
        torch.save(states, out.with_suffix(".pt"))
        summary = dict(
            mode=args.mode,
            steps=args.steps,
            global_batch=args.global_batch,
            lr=args.lr,
            backend=dist.get_backend() if dist.is_initialized() else None,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            torch=torch.__version__,
            state_file=str(out.with_suffix(".pt")),
            runtime_s=time.perf_counter() - START,
            models=results,
        )
        out.write_text(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
