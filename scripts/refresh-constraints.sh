#!/usr/bin/env bash
# Rewrite constraints.txt: install the newest releases that pyproject.toml's ranges allow (the test extra, and a
# CPU torch, see scripts/install-torch.sh) into a throwaway virtualenv, then pin exactly what got installed.
# Run it, then `bash scripts/test.sh` to test the new pins, and commit constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
bash scripts/install-torch.sh latest
python -m pip install -q -e ".[test]"
python scripts/pin_installed.py > "$work/constraints.txt"
mv "$work/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
