"""Quality of CPU decoding at each bit width on a trained checkpoint, ours next to llama.cpp's (issue 21).

Random weights say little about quantisation: their logits are nearly flat and chaotic. This script judges every
setting on a checkpoint with learned structure, against our float32 forward on the same tokens:

* the checkpoint: ``--checkpoint DIR`` (any Qwen3.5 checkpoint, e.g. a downloaded Qwen/Qwen3.5-0.8B), or by default
  a small model of the official layout (0.8B's, narrowed to 512 wide and 4 layers, real 248,320-token vocabulary and
  tokenizer) trained from random by the full fine-tuning recipe (``examples/finetune/full.py``) on its chat data, then
  saved in bf16 as the official checkpoints are;
* the text: the recipe's first ``--rows`` chat rows, rendered with the chat template (the rows it evaluates on);
* per setting: logits relative error ``|l - l_fp32| / |l_fp32|`` and mean KL(fp32 || setting) over every position,
  teacher-forced top-1 agreement with fp32, and the greedy continuation of each row's prompt (``--greedy`` tokens)
  compared with fp32's (tokens equal position by position, and the mean length of the identical prefix);
* ours: bf16 as loaded, and bf16 / int8 / int4 packed (``pack_for_cpu``), each also decoded compiled;
* llama.cpp (``--llama-cpp DIR``, optional): the checkpoint converted to f16 and quantised to q8_0 and Q4_K_M, run
  through the llama-cpp-python bindings (``import llama_cpp`` must work; see compare_cpu.py for the build), weights
  in their plain layout (no repacking).

Prints one JSON object (machine, versions, date, rows); ``--json-out`` writes it too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # real_tokenizer
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_cpu import LLAMA_TYPES, convert_to_f16, emit, llama_file, load, machine, versions  # noqa: E402

DATA = ROOT / "examples" / "data" / "chat.jsonl"
OURS = ["bf16", "bf16 packed", "int8", "int4", "bf16 packed compiled", "int8 compiled", "int4 compiled"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="judge this checkpoint (default: train the small one)")
    parser.add_argument("--train-steps", type=int, default=60, help="recipe steps for the small model (default: 60)")
    parser.add_argument("--rows", type=int, default=8, help="chat rows judged (default: 8)")
    parser.add_argument("--greedy", type=int, default=32, help="greedy tokens per row (default: 32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--settings", default=",".join(OURS), help="ours, comma-separated (fp32 is the reference)")
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree with build/bin/llama-quantize")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints and GGUF files go (default: temporary)")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def small_config():
    """0.8B's layout narrowed: every matrix row a multiple of 256, as llama.cpp's k-quants need."""
    from transformers_qwen35.core.configuration import Qwen3_5Config
    from transformers_qwen35.model.presets import official_config_dict

    config = official_config_dict("0.8B")
    config["text_config"].update(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=1, linear_num_key_heads=4, linear_num_value_heads=4,
    )  # fmt: skip
    config["vision_config"].update(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=512)
    return Qwen3_5Config(**config)


def train_small_model(workdir: Path, steps: int) -> Path:
    from real_tokenizer import build_qwen35_tokenizer

    from transformers_qwen35.model.checkpoint import write_random_checkpoint

    start, trained = workdir / "random", workdir / "trained"
    build_qwen35_tokenizer(start)
    write_random_checkpoint(start, small_config(), seed=0)
    command = [
        sys.executable, str(ROOT / "examples" / "finetune" / "full.py"), "--model", str(start),
        "--output-dir", str(trained), "--max-steps", str(steps), "--learning-rate", "1e-3", "--batch-size", "4",
        "--no-activation-checkpointing", "--cpu",
    ]  # fmt: skip
    print("training:", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)
    # Saved in bf16, as the official checkpoints are: bf16 then loads the checkpoint's own weights, and llama.cpp's
    # f16 holds them exactly too; only the arithmetic differs from the fp32 reference.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = workdir / "trained-bf16"
    AutoModelForCausalLM.from_pretrained(trained, dtype=torch.bfloat16).save_pretrained(final)
    AutoTokenizer.from_pretrained(trained).save_pretrained(final)
    return final


def texts(tokenizer, rows: int) -> tuple[list[list[int]], list[list[int]]]:
    """(whole conversations, prompts up to the last assistant turn) as token ids, for the first ``rows`` rows."""
    conversations, prompts = [], []
    with open(DATA) as lines:
        for line in list(lines)[:rows]:
            messages = json.loads(line)["messages"]
            conversations.append(list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)))
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(
                messages[:last], tokenize=True, add_generation_prompt=True, return_dict=False
            )
            prompts.append(list(prompt))
    return conversations, prompts


def run_ours(model, conversations, prompts, greedy: int):
    with torch.inference_mode():
        logits = [model(torch.tensor([ids])).logits[0].float() for ids in conversations]
        continuations = []
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=greedy, min_new_tokens=greedy, do_sample=False, eos_token_id=None
            )
            continuations.append(out[0, len(ids) :].tolist())
    return logits, continuations


def run_llama(llama: Path, checkpoint: Path, workdir: Path, conversations, prompts, greedy: int, threads: int):
    import llama_cpp
    import numpy

    # As compare_cpu.py's `--repack 0`: the repacked (AMX) q8_0 / Q4_K_M layouts of llama-cpp-python 0.3.36's
    # llama.cpp crash on this model; the bindings have no switch for it, so their default parameters get one.
    default_parameters = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        parameters = default_parameters()
        parameters.use_extra_bufts = False
        return parameters

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking

    f16 = convert_to_f16(llama, checkpoint, workdir)
    for name in LLAMA_TYPES:
        path = llama_file(llama, f16, name)
        longest = max(len(ids) for ids in conversations + prompts) + greedy + 8
        engine = llama_cpp.Llama(
            model_path=str(path), n_ctx=longest, n_batch=longest, logits_all=True, n_threads=threads, verbose=False
        )
        logits, continuations = [], []
        for ids in conversations:
            engine.reset()
            engine.eval(ids)
            logits.append(torch.from_numpy(numpy.array(engine.scores[: len(ids)], dtype=numpy.float32)))
        for ids in prompts:
            engine.reset()
            engine.eval(ids)
            tokens = []
            for _ in range(greedy):
                tokens.append(int(numpy.argmax(engine.scores[engine.n_tokens - 1])))
                engine.eval(tokens[-1:])
            continuations.append(tokens)
        del engine
        yield name, logits, continuations, path.stat().st_size


def judge(logits, continuations, reference_logits, reference_continuations) -> dict:
    errors, kls, agree, positions = [], [], 0, 0
    for ours, ref in zip(logits, reference_logits):
        errors.append(((ours - ref).norm() / ref.norm()).item())
        log_p, log_q = ref.double().log_softmax(-1), ours.double().log_softmax(-1)  # fp32 rounding: KL below 0
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1).mean().item())
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        positions += ref.shape[0]
    equal, prefixes, total = 0, [], 0
    for ours, ref in zip(continuations, reference_continuations):
        same = [a == b for a, b in zip(ours, ref)]
        equal += sum(same)
        total += len(ref)
        prefixes.append(same.index(False) if False in same else len(same))
    return {
        "logits_rel_error_vs_fp32": sum(errors) / len(errors),
        "kl_vs_fp32": sum(kls) / len(kls),
        "top1_agreement_vs_fp32": agree / positions,
        "greedy_tokens_equal_fp32": equal / total,
        "greedy_identical_prefix": sum(prefixes) / len(prefixes),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip() and s.strip() != "fp32"]
    from transformers import AutoTokenizer

    from transformers_qwen35.kernels.cpu_linear import bf16_packing_supported

    if not bf16_packing_supported():
        settings = [s for s in settings if not s.startswith("bf16 packed")]
    with tempfile.TemporaryDirectory(prefix="qwen35-quality-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or train_small_model(workdir, args.train_steps)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        conversations, prompts = texts(tokenizer, args.rows)
        model = load(checkpoint, "fp32")
        reference = run_ours(model, conversations, prompts, args.greedy)
        del model
        rows = []
        for setting in settings:
            model = load(checkpoint, setting)
            row = {"engine": "ours", "setting": setting, **judge(*run_ours(model, conversations, prompts, args.greedy),
                                                                  *reference)}  # fmt: skip
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            del model
            gc.collect()
        if args.llama_cpp is not None:
            found = run_llama(args.llama_cpp.resolve(), checkpoint, workdir, conversations, prompts, args.greedy,
                              args.threads)  # fmt: skip
            for name, logits, continuations, size in found:
                row = {"engine": "llama.cpp", "setting": name, **judge(logits, continuations, *reference),
                       "file_bytes": size}  # fmt: skip
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    result = {
        "what": f"{args.rows} chat rows ({sum(map(len, conversations))} tokens) teacher-forced and {args.greedy} "
        f"greedy tokens per row; checkpoint: {args.checkpoint or f'small layout trained {args.train_steps} steps'}",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": versions(),
        "rows": rows,
    }
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
