#!/usr/bin/env bash
# The test command (README, CI): install rlhf_rewards with its test extra at the versions pinned in constraints.txt,
# then run the test suite (CPU, offline, tiny checkpoints). Arguments go to pytest.
#
#   bash scripts/test.sh                          # the pinned versions: same result on any day
#   RLHF_REWARDS_LATEST=1 bash scripts/test.sh    # the newest releases pyproject.toml's ranges allow
#
# torch comes first, from scripts/install-torch.sh: an installed torch is kept, otherwise a CPU build is installed
# (never a CUDA build on a machine without an NVIDIA GPU). The other pins are applied around that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
torch_version() { "$PY" -c 'from importlib.metadata import version; print(version("torch"))'; }
export PYTHON=$PY

pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
if [ "${RLHF_REWARDS_LATEST:-0}" = 1 ]; then
    bash scripts/install-torch.sh latest
    echo "torch==$(torch_version)" > "$pins"
    "$PY" -m pip install -q --upgrade --upgrade-strategy eager -c "$pins" -e ".[test]"
else
    bash scripts/install-torch.sh
    grep -v '^torch==' constraints.txt > "$pins"
    echo "torch==$(torch_version)" >> "$pins"
    "$PY" -m pip install -q -c "$pins" -e ".[test]"
fi
HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 "$PY" -m pytest -q "$@"
