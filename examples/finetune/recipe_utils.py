"""What the three fine-tuning recipes share: command-line arguments, the demo checkpoint, the loss report.

Not a library: a few helpers kept out of the recipes so that each recipe shows only its own training setup.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from transformers import TrainingArguments

import transformers_qwen35  # noqa: F401  (registers the Qwen3.5 classes with the Auto* factories)
from transformers_qwen35.cli.demo import build_demo_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent
# transformers 5.24 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
SPARK = "▁▂▃▄▅▆▇█"


def parser(description: str, data: Path, learning_rate: float, demo_learning_rate: float) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument(
        "--model",
        help="checkpoint folder or Hub id; default: build the tiny demo checkpoint in a temporary folder "
        "(RANDOM weights: it shows the mechanics, it learns nothing useful)",
    )
    arguments.add_argument("--data", default=str(data), help="JSONL chat rows (default: %(default)s)")
    arguments.add_argument(
        "--output-dir", default=None, help="where the result is saved (default: ./finetune-output/<recipe>)"
    )
    arguments.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    arguments.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=f"default: {learning_rate:g} for a real checkpoint, {demo_learning_rate:g} for the demo checkpoint "
        "(random weights need a large step to show a falling loss within a few steps)",
    )
    arguments.add_argument("--batch-size", type=int, default=8, help="samples per step (default: %(default)s)")
    arguments.add_argument("--max-length", type=int, default=2048, help="longer samples are skipped, never cut")
    arguments.add_argument("--logging-steps", type=int, default=None, help="default: max_steps / 10")
    arguments.add_argument("--no-activation-checkpointing", action="store_true", help="keep activations (faster)")
    arguments.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    arguments.add_argument("--seed", type=int, default=0)
    arguments.set_defaults(default_learning_rate=learning_rate, demo_learning_rate=demo_learning_rate)
    return arguments


def resolve(args: argparse.Namespace, recipe: str, scratch: str) -> tuple[str, bool]:
    """The checkpoint to train (building the demo one when none is given); fills the defaults that depend on it."""
    demo = args.model is None
    if demo:
        model = str(build_demo_checkpoint(Path(scratch) / "demo-checkpoint"))
        print(f"No --model given: built the tiny demo checkpoint in {model}. Its weights are RANDOM: this run shows")
        print("the mechanics (data, labels, packing, LoRA, saving), not a useful model.\n")
    else:
        model = args.model
    if demo and use_cpu(args):
        # A 64-wide model: CPU threads would only add synchronisation (and stall on shared cores).
        torch.set_num_threads(1)
    if args.learning_rate is None:
        args.learning_rate = args.demo_learning_rate if demo else args.default_learning_rate
    if args.output_dir is None:
        args.output_dir = str(Path("finetune-output") / recipe)
    if args.logging_steps is None:
        args.logging_steps = max(1, args.max_steps // 10)
    return model, demo


def use_cpu(args: argparse.Namespace) -> bool:
    return args.cpu or not torch.cuda.is_available()


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    """Plain ``TrainingArguments`` (transformers 5.24 names), saving once at the end by hand."""
    cpu = use_cpu(args)
    values = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=args.logging_steps,
        save_strategy="no",  # the recipe saves the final adapter / model itself
        report_to="none",
        use_cpu=cpu,
        # fp32 master weights; bf16 autocast on GPUs that have it.
        bf16=not cpu and torch.cuda.is_bf16_supported(),
        **{CHECKPOINTING_ARGUMENT: not args.no_activation_checkpointing},
        label_names=["labels"],  # PEFT wraps the model's forward, so the Trainer cannot find the name itself
        remove_unused_columns=False,  # keep image tensors and mm_token_type_ids
        dataloader_pin_memory=not cpu,
        seed=args.seed,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((value - low) / span * len(SPARK)))] for value in values)


def report(trainer, eval_before: float, eval_after: float, output_dir: str, extra: dict | None = None) -> bool:
    """Print the loss curve and whether the loss went down; write it to ``training_summary.json``. True if it did."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    went_down = math.isfinite(eval_after) and eval_after < eval_before
    print()
    if losses:
        print(f"training loss (logged every {trainer.args.logging_steps} steps, {len(losses)} points):")
        print(f"  first {losses[0]:.4f} (step {steps[0]})  ->  last {losses[-1]:.4f} (step {steps[-1]})")
        print(f"  {sparkline(losses)}  ({min(losses):.3f} .. {max(losses):.3f})")
    verdict = "went down" if went_down else "DID NOT go down"
    print(f"eval loss on the same fixed rows: {eval_before:.4f} before -> {eval_after:.4f} after: {verdict}")
    summary = {
        "logged_steps": steps,
        "logged_losses": losses,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "loss_went_down": went_down,
        **(extra or {}),
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return went_down


def scratch_dir():
    """A temporary folder for the demo checkpoint, removed at the end of the run."""
    return tempfile.TemporaryDirectory(prefix="qwen35-finetune-")
