#!/usr/bin/env bash
# The GPU check, in one script, for a machine without network (torch, triton, transformers, peft, accelerate
# preinstalled; no fla). Run from anywhere; results go to $OUT (default ./out):
#
#   env.txt             versions, kernel availability, nvidia-smi
#   install.txt         what was installed from .whl/ and how our package imported
#   pytest.txt          tests/gpu (or a line saying there are none)
#   compare.txt         benchmarks/compare_native.py output (tables + JSON lines), 0.8B then 9B
#   compare_0.8B.json   full results (rewritten after every phase, so a cut-short run keeps what it measured)
#   compare_9B.json     the 9B decode comparison (STEPS with compare9b)
#   profile.txt         profile_steps.py (the kernels that take the time in decode and training, device-busy vs wall,
#                       host syncs), then decode_breakdown.py (a static decoding step taken apart)
#   triton-cache.tgz    Triton's autotuning results (*.autotune.json: commit them as benchmarks/triton-autotune.tgz)
#                       and compiled kernels with their launchers (the rest: commit as benchmarks/triton-kernels.tgz if
#                       small enough; the next run then skips compiling, most of the tests step's time, wherever the
#                       image, GPU, Triton, fla and our kernels are unchanged; elsewhere Triton just compiles again)
#
# Wheels carried in .whl/ (git-ignored; the device tool must be told to carry ".whl"):
#   .whl/*.whl                        always installed (--no-deps): fla-core
#   .whl/if-missing/*.whl             installed only if the module is not importable: einops (fla-core's one need)
#   .whl/transformers-fallback/*.whl  installed only if our package fails to import with the machine's
#                                     transformers (our pyproject asks for >= 5.23; 5.17 is what the image has)
#
# Every step runs under `timeout` with what is left of BUDGET_S, most wanted first. Measured on the H100
# (2026-11-27): start ~30 s, installs + probe ~45 s; with benchmarks/triton-autotune.tgz restored, tests/gpu ~90 s on
# four workers (without the two at the real head size) and the 0.8B comparison's setup, decode and train ~200 s
# (without it the tests alone ran past 170 s: Triton compiles and autotunes fla's kernels per shape and process).
# Later the same day, after new fused kernels: the tests' first part ran past 150 s (two unfinished), the real-head-size
# part 130 s, the comparison's decode + train 210 s (with --decode-sampling) and prefill 16k + 64k 64 s.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-355}"  # the issue asks for under 6 minutes: most wanted steps first, the rest cut
BENCH_ARGS="${BENCH_ARGS:-}"
COMPARE_WHAT="${COMPARE_WHAT:-decode,train,prefill}" # most wanted first: a run cut short keeps those
COMPARE_MTP="${COMPARE_MTP:-}"                         # e.g. 2: MTP rows (random head and always-right drafts)
PROFILE_WHAT="${PROFILE_WHAT:-train,train-graphed,decode}" # profile_steps.py phases; empty: skip
STEPS="${STEPS:-tests compare profile}"                # which steps run, in this order (also: compare9b)
TESTS_S="${TESTS_S:-150}"                              # cap of each part of the tests step
REAL_HEAD_TESTS="${REAL_HEAD_TESTS:-1}"                # 0: skip the tests at fla's real head size (~130 s)
TESTS_K="${TESTS_K:-}"                                 # a pytest -k expression: only those tests (e.g. "graphed")
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
STARTED=$SECONDS

# Seconds a step may take: at most $1, and no more than what is left of the budget (at least 5).
allow() {
    local left=$((BUDGET_S - (SECONDS - STARTED))) cap=$1
    if ((left < cap)); then cap=$left; fi
    if ((cap < 5)); then cap=5; fi
    echo "$cap"
}

log() { echo "[device_check +$((SECONDS - STARTED))s] $*" | tee -a "$OUT/install.txt"; }

pip_install() { # wheels...
    timeout "$(allow 90)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$@" \
        >>"$OUT/install.txt" 2>&1
}

: >"$OUT/install.txt"

# 1. Wheels carried from the development machine.
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    log "installing ${wheels[*]}"
    pip_install "${wheels[@]}" || log "WARNING: installing ${wheels[*]} failed (rc $?)"
else
    log "no wheels in .whl/ (fla-core will be missing: the built-in baseline then runs on its torch fallback)"
fi
for wheel in .whl/if-missing/*.whl; do
    module=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    if "$PY" -c "import $module" 2>/dev/null; then
        log "$module already importable: not installing $wheel"
    else
        log "installing $wheel"
        pip_install "$wheel" || log "WARNING: installing $wheel failed (rc $?)"
    fi
done

# 2. Our package from src/ (an editable install took 22 s of the budget and adds nothing here; pyproject asks for
#    transformers >= 5.23, the image has 5.17: checked below).
log "using transformers_qwen35 from src/ (PYTHONPATH)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

regex_recent_enough() { # transformers 5.24 checks regex >= 2025.10.22 at import
    "$PY" -c 'import importlib.metadata as m; from packaging.version import Version as V
raise SystemExit(0 if V(m.version("regex")) >= V("2025.10.22") else 1)' 2>/dev/null
}

import_ours() {
    timeout "$(allow 120)" "$PY" -c "import transformers, transformers_qwen35; print('imported transformers_qwen35 '
        + transformers_qwen35.__version__ + ' with transformers ' + transformers.__version__)" >>"$OUT/install.txt" 2>&1
}
if [[ -z ${DEVICE_CHECK_FORCE_FALLBACK:-} ]] && import_ours; then # the variable exercises the fallback in a dry run
    log "our package imports with the machine's transformers (see the line above)"
else
    log "our package does not import with the machine's transformers (traceback above, or DEVICE_CHECK_FORCE_FALLBACK set)"
    fallback=(.whl/transformers-fallback/*.whl)
    if ((${#fallback[@]})); then
        # regex is only needed if the machine's is older than transformers 5.24 asks for.
        keep=()
        for wheel in "${fallback[@]}"; do
            if [[ $(basename "$wheel") == regex-* ]] && regex_recent_enough; then
                log "regex is recent enough: not installing $wheel"
                continue
            fi
            keep+=("$wheel")
        done
        log "installing ${keep[*]}"
        pip_install "${keep[@]}" || log "WARNING: installing the transformers fallback failed (rc $?)"
        import_ours || {
            log "FATAL: our package does not import even with the carried transformers"
            exit 1
        }
        log "our package imports with the carried transformers"
    else
        log "FATAL: no .whl/transformers-fallback/*.whl to fall back on"
        exit 1
    fi
fi

# Triton's autotuning results from an earlier session (benchmarks/triton-autotune.tgz, if committed): with them Triton
# compiles each fla kernel once, for its best configuration, instead of once per candidate configuration.
TRITON_CACHE="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
if [[ -f benchmarks/triton-autotune.tgz ]]; then
    mkdir -p "$TRITON_CACHE"
    tar xzf benchmarks/triton-autotune.tgz -C "$TRITON_CACHE" && log "restored Triton autotuning results" ||
        log "WARNING: could not restore benchmarks/triton-autotune.tgz"
fi
# Compiled kernels: Triton finds them by a hash of the kernel's source, Triton, the GPU and the options, through index
# files that name them by absolute path, so they serve only when restored to the same cache path as they were made in.
if [[ -f benchmarks/triton-kernels.tgz ]]; then
    mkdir -p "$TRITON_CACHE"
    tar xzf benchmarks/triton-kernels.tgz -C "$TRITON_CACHE" && log "restored Triton's compiled kernels" ||
        log "WARNING: could not restore benchmarks/triton-kernels.tgz"
fi

# 3. Versions, kernels, GPU.
log "writing $OUT/env.txt"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "triton cache: $TRITON_CACHE"
    timeout "$(allow 60)" "$PY" - <<'EOF' || echo "version probe failed (rc $?)"
import importlib, importlib.metadata as m, platform, sys
print("python", platform.python_version(), sys.executable)
for dist in ("torch", "triton", "transformers", "fla-core", "einops", "huggingface-hub", "tokenizers", "safetensors",
             "accelerate", "peft", "regex", "transformers-qwen35"):
    try:
        print(f"{dist} {m.version(dist)}")
    except m.PackageNotFoundError:
        print(f"{dist} (not installed)")
import torch
print("cuda available", torch.cuda.is_available(), "| torch.version.cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for module in ("fla.ops.gated_delta_rule", "fla.modules.causal_conv1d", "fla.modules.norm.fused_norm_gate"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as error:
        print(f"import {module}: FAILED {type(error).__name__}: {error}")
try:
    from transformers.models.qwen3_5 import modeling_qwen3_5  # binds fla (or not) at import
    sys.path.insert(0, "benchmarks")
    from compare_native import builtin_kernel_paths
    print("built-in transformers Gated DeltaNet kernels:", builtin_kernel_paths())
except Exception as error:
    print(f"built-in kernel probe failed: {type(error).__name__}: {error}")
EOF
    echo
    command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi || echo "nvidia-smi not available"
} 2>&1 | tee "$OUT/env.txt"

# 4. GPU tests: fla vs PyTorch path vs built-in (forward, backward, packed, cached decode) and MTP lossless.
run_tests() {
    if [[ ! -d tests/gpu ]]; then
        echo "tests/gpu does not exist: no GPU tests to run (skipped)" | tee "$OUT/pytest.txt"
        return
    fi
    # -v writes each result as it comes and report_failures_now each traceback, so a run cut short keeps them.
    # Triton compiles fla's kernels on the CPU, once per process and shape: four pytest-xdist workers (in the image)
    # compile side by side. The tests at fla's real head size compile the most (the whole chunk backward): last.
    local options=(-v --durations=12 -p no:cacheprovider -p report_failures_now) rc=0
    if "$PY" -c "import xdist" 2>/dev/null; then options+=(-n 4); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then options+=(--timeout=120); fi
    local chosen="not real_head_size"
    if [[ -n $TESTS_K ]]; then chosen="($TESTS_K) and not real_head_size"; fi
    log "running pytest tests/gpu -k '$chosen'"
    PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" timeout "$(allow "$TESTS_S")" "$PY" -m pytest "${options[@]}" \
        -k "$chosen" tests/gpu >"$OUT/pytest.txt" 2>&1 || rc=$?
    log "pytest rc $rc"
    if [[ $REAL_HEAD_TESTS == 0 ]]; then
        grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|skipped" "$OUT/pytest.txt" | tail -n 20 || true
        log "pytest (real head size) skipped: REAL_HEAD_TESTS=0"
        return
    fi
    rc=0
    chosen="real_head_size"
    if [[ -n $TESTS_K ]]; then chosen="($TESTS_K) and real_head_size"; fi
    PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" timeout "$(allow "$TESTS_S")" "$PY" -m pytest "${options[@]}" \
        -k "$chosen" tests/gpu >>"$OUT/pytest.txt" 2>&1 || rc=$?
    grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|skipped" "$OUT/pytest.txt" | tail -n 20 || true
    log "pytest (real head size) rc $rc"
}

# 5. The benchmark: ours vs built-in transformers, 0.8B shape, bf16.
COMPARE_RC=0
run_compare() {
    log "running compare_native.py --device cuda --size 0.8B"
    # MTP rows only when asked (COMPARE_MTP=K): K drafts with the random head (the cost of rejected drafts) and with
    # always-right drafts (the ceiling).
    mtp=(--mtp 0)
    if [[ -n $COMPARE_MTP ]]; then mtp=(--mtp "$COMPARE_MTP" --mtp-oracle); fi
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of extra options
    timeout "$(allow "${COMPARE_S:-330}")" "$PY" benchmarks/compare_native.py --device cuda --size 0.8B --what "$COMPARE_WHAT" \
        "${mtp[@]}" --json-out "$OUT/compare_0.8B.json" $BENCH_ARGS 2>&1 | tee -a "$OUT/compare.txt" || COMPARE_RC=$?
    log "compare_native rc $COMPARE_RC (124: cut short by the time budget; the JSON keeps the finished phases)"
}

# 5b. 9B decoding at batch 1 (the issue's third decode target): two 9B models (~18 GB each) on the GPU.
run_compare9b() {
    log "running compare_native.py --device cuda --size 9B --what decode --decode-batch 1"
    timeout "$(allow "${COMPARE9B_S:-200}")" "$PY" benchmarks/compare_native.py --device cuda --size 9B --what decode \
        --decode-batch 1 --mtp 0 --json-out "$OUT/compare_9B.json" 2>&1 | tee -a "$OUT/compare.txt" ||
        log "compare_native 9B rc $?"
}

# 6. Which kernels take the time (decode, training step), then a static decoding step taken apart.
run_profile() {
    if [[ -n $PROFILE_WHAT ]]; then
        log "running profile_steps.py --size 0.8B --what $PROFILE_WHAT"
        # Each section is printed as it is done: a run cut short keeps the finished ones.
        timeout "$(allow "${PROFILE_S:-120}")" "$PY" benchmarks/profile_steps.py --size 0.8B --what "$PROFILE_WHAT" \
            2>&1 | grep -v "^USDT:" >"$OUT/profile.txt" || log "profile_steps rc $?"
    fi
    log "running decode_breakdown.py --size 0.8B"
    timeout "$(allow 90)" "$PY" benchmarks/decode_breakdown.py --size 0.8B --batch 1,8 2>&1 | tee -a "$OUT/profile.txt" ||
        log "decode_breakdown rc $?"
}

for step in $STEPS; do
    case $step in
    tests) run_tests ;;
    compare) run_compare ;;
    compare9b) run_compare9b ;;
    profile) run_profile ;;
    *) log "unknown step '$step' in STEPS (known: tests compare compare9b profile)" ;;
    esac
done

# This session's Triton cache, for the next run: the autotuning results (commit them as benchmarks/triton-autotune.tgz)
# and what Triton needs to load a kernel without compiling it (the binary, its metadata and index files, the
# launchers; commit those as benchmarks/triton-kernels.tgz if small enough). One file: at most 8 come back.
if [[ -d $TRITON_CACHE ]]; then
    (cd "$TRITON_CACHE" && find . -name '*.autotune.json' -o -name '*.cubin' -o -name '*.so' -o -name '*.json' |
        tar czf "$OUT/triton-cache.tgz" -T -) || log "WARNING: could not save the Triton cache"
    size=$(stat -c %s "$OUT/triton-cache.tgz" 2>/dev/null || echo 0)
    log "Triton cache with compiled kernels: $((size / 1024)) KiB ($TRITON_CACHE)"
    if ((size > 15 * 1024 * 1024)); then # a returned file may have 16 MiB
        (cd "$TRITON_CACHE" && find . -name '*.autotune.json' | tar czf "$OUT/triton-cache.tgz" -T -) &&
            log "  over 15 MiB: returning the autotuning results alone" ||
            log "WARNING: could not save the Triton autotuning results"
    fi
fi
log "done in $((SECONDS - STARTED)) s"
exit "$COMPARE_RC"
