#!/usr/bin/env bash
# W3 prefill, interleaved: N rounds of one fedllm process per path (int8, int16) and one
# transformers process per dtype (bf16, fp32), back to back, so each round's four readings
# share the machine's state of the moment (on a shared VM its speed drifts by 20-30% over
# tens of seconds). fedllm: best of 6 warm 256-token prefills (`bench generate`);
# transformers: best of 5, last position's logits only. Prints each round's readings and the
# ratio of each fedllm path to the faster transformers reading of the same round, then per
# column the minimum, median and maximum over the rounds.
# Usage: scripts/w3/prefill-pairs.sh MODEL.gguf PYTHON [N] [fedllm binary]
# PYTHON: an interpreter with torch and transformers (and gguf) installed.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
model="$1"; py="$2"; n="${3:-8}"; bin="${4:-$here/target/release/fedllm}"
# Prints the prefill's tok/s, then the core-to-core round trip the bench measured (ns).
fedllm() {
  FEDLLM_DECODE="$1" "$bin" bench generate --model "$model" --decode-ctx 256 \
    --decode-tokens 1 --batch 1 --reps 6 2>&1 \
    | awk '/^cores:/ {ns = $(NF-1)} /prefill/ {tps = $4} END {print tps, ns + 0}'
}
hf() {
  "$py" "$here/scripts/w3/transformers_w3.py" "$model" "$1" prefill 2>&1 \
    | awk '/last only/ {print $(NF-1)}'
}
rows=$(mktemp); trap 'rm -f "$rows"' EXIT
# ns8, ns16: the cache line's round trip between the fedllm process's two threads (~60 ns
# when the host put the vCPUs near each other, ~350 when not).
printf '%-8s %8s %8s %8s %8s %7s %7s %5s %5s\n' time int8 int16 hf-bf16 hf-fp32 int8/hf int16/hf \
  ns8 ns16
for _ in $(seq "$n"); do
  t=$(date -u +%H:%M:%S)
  read -r a na < <(fedllm int8); read -r c nc < <(fedllm int16); b=$(hf bf16); f=$(hf fp32)
  awk -v t="$t" -v a="$a" -v c="$c" -v b="$b" -v f="$f" -v na="$na" -v nc="$nc" 'BEGIN {
    h = (b > f) ? b : f
    printf "%-8s %8.1f %8.1f %8.1f %8.1f %6.2fx %6.2fx %5d %5d\n", t, a, c, b, f, a / h, c / h, na, nc }' \
    | tee -a "$rows"
done
for i in 2 3 4 5 6 7; do
  name=$(echo "time int8 int16 hf-bf16 hf-fp32 int8/hf int16/hf" | cut -d' ' -f"$i")
  awk -v i="$i" '{print $i + 0}' "$rows" | sort -g | awk -v name="$name" '
    { x[NR] = $1 }
    END { m = NR % 2 ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2
          printf "%-8s min %8.2f  median %8.2f  max %8.2f\n", name, x[1], m, x[NR] }'
done
