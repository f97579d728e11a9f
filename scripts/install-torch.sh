#!/usr/bin/env bash
# Give the running Python a torch without ever pulling a CUDA build onto a machine that has no NVIDIA GPU.
#
#   bash scripts/install-torch.sh           # the version pinned in constraints.txt
#   bash scripts/install-torch.sh latest    # the newest release
#
# In this order:
#   1. a torch that is already installed is kept, whatever its build (install your GPU build first to use it);
#   2. the wheel your package index (pip's configuration) offers, if it is a CPU build (macOS, Windows, a local
#      CPU wheel) or the machine has an NVIDIA GPU (nvidia-smi lists one);
#   3. PyTorch's CPU wheel index, $TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu), which is how
#      PyTorch documents getting a CPU build on Linux: a plain `pip install torch` there is the CUDA build;
#   4. with `latest`, when neither offers the newest release as a CPU build: the pinned version, the same way.
# Set PYTHON to choose the interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
torch_version() { "$PY" -c 'from importlib.metadata import version; print(version("torch"))'; }

if "$PY" -c "import torch" 2>/dev/null; then
    echo "install-torch: keeping the installed torch $(torch_version)"
    exit 0
fi

pinned="torch==$(sed -n 's/^torch==//p' constraints.txt)"
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

# Whether the pip report $1 installs a torch wheel that needs no CUDA libraries (a CUDA wheel requires nvidia-*).
is_cpu_build() {
    "$PY" - "$1" <<'EOF'
import json, sys
torch, = [d for d in json.load(open(sys.argv[1]))["install"] if d["metadata"]["name"].lower() == "torch"]
sys.exit(any(r.lower().startswith("nvidia-") for r in torch["metadata"].get("requires_dist") or []))
EOF
}

# install_from_index SPEC: from the configured index, if what it offers is a CPU build or there is a GPU.
install_from_index() {
    local report found=0 cpu=0
    report=$(mktemp)
    if "$PY" -m pip install -q --dry-run --no-deps --ignore-installed --report "$report" "$1" 2>/dev/null; then
        found=1
        if is_cpu_build "$report"; then cpu=1; fi
    fi
    rm -f "$report"
    if [ "$found" = 0 ]; then
        echo "install-torch: the package index has no $1"
        return 1
    fi
    if [ "$gpu" = 0 ] && [ "$cpu" = 0 ]; then
        echo "install-torch: the package index offers $1 as a CUDA build and this machine has no NVIDIA GPU"
        return 1
    fi
    "$PY" -m pip install -q ${constraints[@]+"${constraints[@]}"} "$1"
}

# install_from_cpu_index SPEC: torch alone from PyTorch's CPU index, then its dependencies from the configured index
# (the CPU index mirrors only some of their versions).
install_from_cpu_index() {
    echo "install-torch: trying PyTorch's CPU wheel index $cpu_index"
    "$PY" -m pip install -q --retries 1 --timeout 30 --no-deps --index-url "$cpu_index" "$1" || return 1
    "$PY" -m pip install -q ${constraints[@]+"${constraints[@]}"} "torch==$(torch_version)"
}

# (${constraints[@]+...} keeps an empty array from failing under set -u in bash 3, macOS's)
if [ "${1:-}" = latest ]; then
    specs=(torch "$pinned"); constraints=()
else
    specs=("$pinned"); constraints=(-c constraints.txt)
fi
for spec in "${specs[@]}"; do
    if install_from_index "$spec" || install_from_cpu_index "$spec"; then
        echo "install-torch: installed torch $(torch_version)"
        exit 0
    fi
done
echo "install-torch: found no CPU build of torch (${specs[*]}). Install one yourself, e.g." >&2
echo "    pip install torch --index-url https://download.pytorch.org/whl/cpu" >&2
echo "or your GPU build, then run this again (an installed torch is kept)." >&2
exit 1
