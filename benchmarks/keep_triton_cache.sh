#!/usr/bin/env bash
# Keep what a device run returned of Triton's cache for the next run (see device_check.sh):
#
#   bash benchmarks/keep_triton_cache.sh path/to/triton-cache.tgz [folder, default benchmarks/]
#
# writes benchmarks/triton-autotune.tgz: the autotuning results already committed, updated with the returned ones
# (the newest result for a kernel and shape wins), and benchmarks/triton-kernels.tgz: the returned compiled kernels
# alone (kernels compiled for older sources are of no use). Prints both sizes; commit them if they look reasonable.
set -euo pipefail
returned=$(realpath "${1:?"usage: $0 path/to/triton-cache.tgz [folder]"}")
cd "${2:-$(dirname "$0")}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/autotune" "$work/returned"
if [[ -f triton-autotune.tgz ]]; then
    tar xzf triton-autotune.tgz -C "$work/autotune"
fi
tar xzf "$returned" -C "$work/returned"
(cd "$work/returned" && find . -name '*.autotune.json' -print0 | xargs -0 -r cp --parents -t "$work/autotune")
(cd "$work/autotune" && find . -name '*.autotune.json' | sort | tar czf "$work/triton-autotune.tgz" -T -)
mv "$work/triton-autotune.tgz" triton-autotune.tgz
echo "$PWD/triton-autotune.tgz: $(tar tzf triton-autotune.tgz | grep -c autotune.json) results, $(du -k triton-autotune.tgz | cut -f1) KiB"
kernels=$(cd "$work/returned" && find . -type f ! -name '*.autotune.json' | sort)
if [[ -n $kernels ]]; then
    (cd "$work/returned" && echo "$kernels" | tar czf "$work/triton-kernels.tgz" -T -)
    mv "$work/triton-kernels.tgz" triton-kernels.tgz
    echo "$PWD/triton-kernels.tgz: $(echo "$kernels" | grep -c '\.cubin$') kernels, $(du -k triton-kernels.tgz | cut -f1) KiB"
else
    echo "no compiled kernels in $returned (returned over the size limit?): $PWD/triton-kernels.tgz left as it was"
fi
