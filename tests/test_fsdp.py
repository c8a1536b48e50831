"""FSDP on CPU: two gloo processes train the tiny model to the same losses and weights as one process.

``tests/fsdp_worker.py`` does the training, in subprocesses (``torchrun --standalone``, which takes a free port
itself): a one-process reference without ``torch.distributed``; FSDP2 (``fully_shard``, laid out as accelerate's
FSDP2 plugin does for ``transformer_layer_cls_to_wrap=["Qwen3_5DecoderLayer"]``) over two ranks, with lm_head untied
(as 9B) and tied to the embedding (as 0.8B, 2B, 4B); and ``transformers.Trainer`` with ``fsdp=True`` over two ranks.
Same seed, same 8 x 32 token data, the same 4 sequences per optimizer step (2 per rank), plain SGD at lr 0.5.

Tolerance: everything is fp32, and the only legitimate differences are the order of floating-point sums (a batch
of 2 against a batch of 4 in the matmuls, two rank gradients averaged by the reduce-scatter against one mean over 4
sequences). That is rounding at fp32's 6e-8 relative half-ulp, summed over a few steps: the observed differences are
< 2e-7 for the losses and < 1e-6 relative for the weights. 1e-5 relative leaves a >10x margin, and stays far below
what a real fault gives: gradients summed instead of averaged over ranks, or both ranks on the same half of the
batch, move the step-2 loss by 3e-4 and the step-3 loss by 3e-2 relative, and some weights by over 100% (training
itself moves the loss from 4.60 to 4.34 between steps 1 and 3, which see the same sequences). Different initial
weights on the ranks are caught by the worker before training.

Accelerate (1.15 at least) has no FSDP on CPU: ``AcceleratorState`` turns an ``fsdp_plugin`` into
``DistributedType.FSDP`` only for accelerator devices; a CPU multi-process run is ``MULTI_CPU`` and the Trainer
wraps the model in DDP, silently. The Trainer test checks the results either way and records which it was.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_text_kwargs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_worker.py"
STEPS, GLOBAL_BATCH, WORLD = 3, 4, 2
TIMEOUT_S = 240
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5
# What each run trains: the reference and FSDP both models in one launch each, the Trainer the untied one.
MODELS = {"reference": ["untied", "tied"], "fsdp": ["untied", "tied"], "trainer": ["untied"]}


def _unsupported() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is unavailable: {error}"
    return None


pytestmark = pytest.mark.skipif(_unsupported() is not None, reason=str(_unsupported()))


class Runs:
    """Worker subprocesses, started on demand (so two can overlap) and awaited with a deadline."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.processes: dict[str, tuple[subprocess.Popen, float]] = {}
        self.results: dict[str, tuple[dict, dict]] = {}

    @staticmethod
    def env() -> dict:
        # A pytest itself started by torchrun must not hand its rank to the runs.
        inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in inherited}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        env.setdefault("TRANSFORMERS_QWEN35_KERNELS", "auto")
        return env

    def command(self, mode: str) -> list[str]:
        worker = [str(WORKER), "--mode", mode, "--out", str(self.directory / f"{mode}.json"), "--steps", str(STEPS)]
        worker += ["--global-batch", str(GLOBAL_BATCH), "--models", *MODELS[mode]]
        if mode == "reference":
            return [sys.executable, *worker]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *worker]

    def start(self, mode: str) -> None:
        if mode in self.processes:
            return
        with open(self.directory / f"{mode}.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                self.command(mode), cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        self.processes[mode] = (process, time.monotonic())

    def failure(self, mode: str, what: str) -> str:
        log = (self.directory / f"{mode}.log").read_text(errors="replace")[-6000:]
        return f"{mode} run {what}:\n{' '.join(self.command(mode))}\n{log}"

    def result(self, mode: str) -> tuple[dict, dict]:
        """(the JSON rank 0 wrote, {model: {"initial": state dict, "final": state dict}})."""
        if mode not in self.results:
            self.start(mode)
            process, started = self.processes[mode]
            try:
                process.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                self.stop(process)
                pytest.fail(self.failure(mode, f"took over {TIMEOUT_S} s"))
            out = self.directory / f"{mode}.json"
            assert process.returncode == 0 and out.exists(), self.failure(mode, f"failed (exit {process.returncode})")
            summary = json.loads(out.read_text())
            self.results[mode] = summary, torch.load(summary["state_file"], weights_only=True)
        return self.results[mode]

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        for process, _ in self.processes.values():
            self.stop(process)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = Runs(tmp_path_factory.mktemp("fsdp"))
    yield runs
    runs.close()


def max_relative_difference(ours: dict, reference: dict) -> dict:
    """Per tensor: max |ours - reference| / max |reference|."""
    assert sorted(ours) == sorted(reference)
    return {
        name: float(
            (ours[name].double() - reference[name].double()).abs().max()
            / reference[name].double().abs().max().clamp_min(1e-30)
        )
        for name in reference
    }


def check_against_reference(result: dict, states: dict, reference: dict, reference_states: dict) -> None:
    losses, expected = result["losses"], reference["losses"]
    assert len(losses) == len(expected) == STEPS, (losses, expected)
    assert all(math.isfinite(loss) for loss in losses + expected), (losses, expected)
    for step, (loss, want) in enumerate(zip(losses, expected), start=1):
        assert abs(loss - want) <= LOSS_RTOL * abs(want), f"step {step}: loss {loss} != one-process {want}"

    for name, value in reference_states["initial"].items():
        assert torch.equal(states["initial"][name], value), f"{name}: different initial weights"
    differences = max_relative_difference(states["final"], reference_states["final"])
    worst = max(differences, key=differences.get)
    assert differences[worst] <= PARAM_RTOL, f"{worst}: final weights differ by {differences[worst]:.3g} (relative)"


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_two_gloo_processes_match_one_process(runs, model):
    runs.start("reference")  # overlaps with the two-process run
    summary, states = runs.result("fsdp")
    reference, reference_states = runs.result("reference")
    assert summary["backend"] == "gloo" and summary["world_size"] == WORLD, summary
    result = summary["models"][model]
    assert result["tied"] == (model == "tied") == result["still_tied"], result
    # Really sharded: the units accelerate builds, every parameter a DTensor, each rank holding about half of them.
    layers = ["FSDPQwen3_5DecoderLayer"] * tiny_text_kwargs()["num_hidden_layers"]
    units = ["FSDPQwen3_5ForCausalLM", "FSDPEmbedding", *layers, "FSDPQwen3_5RMSNorm", "FSDPLinear"]
    assert sorted(result["fsdp_modules"]) == sorted(units), result["fsdp_modules"]
    assert result["sharded"], result
    per_rank, total = result["local_numel_per_rank"], result["total_numel"]
    assert sum(per_rank) == total and max(per_rank) < total, (per_rank, total)
    if result["tied"]:
        final = states[model]["final"]
        assert torch.equal(final["lm_head.weight"], final["model.embed_tokens.weight"])
    check_against_reference(result, states[model], reference["models"][model], reference_states[model])


def test_trainer_with_fsdp_config_on_two_cpu_processes_matches_one_process(runs):
    runs.start("reference")
    summary, states = runs.result("trainer")
    reference, reference_states = runs.result("reference")
    assert summary["backend"] == "gloo" and summary["world_size"] == WORLD, summary
    result = summary["models"]["untied"]
    if result["fsdp_enabled"]:  # an accelerate that supports FSDP on CPU
        assert result["sharded"], result
    else:  # accelerate <= 1.15 on CPU: DistributedType.MULTI_CPU, the model is wrapped in DDP instead
        assert result["distributed_type"] == "MULTI_CPU" and result["wrapper"] == "DistributedDataParallel", result
    check_against_reference(result, states["untied"], reference["models"]["untied"], reference_states["untied"])


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_reference_training_is_not_trivial(runs, model):
    """The parity checks mean something only if training moves the loss and the weights far beyond the tolerance."""
    reference, states = runs.result("reference")
    losses = reference["models"][model]["losses"]
    assert all(math.isfinite(loss) for loss in losses), losses
    # Steps 1 and 3 see the same 4 sequences (8 sequences, 4 per step): the difference is the two updates.
    assert losses[0] - losses[2] > 1000 * LOSS_RTOL * losses[0], losses
    moved = max_relative_difference(states[model]["final"], states[model]["initial"])
    assert moved["lm_head.weight"] > 1000 * PARAM_RTOL, moved["lm_head.weight"]
