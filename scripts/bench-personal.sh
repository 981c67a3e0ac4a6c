#!/usr/bin/env bash
# Runs every personalised method of issue 15 on configs/pfl-mmlu.yaml with equal local compute
# (6 optimizer steps per client per round) and prints one line per method: mean, worst and
# best per-client test loss (with each client's own parameters), the same with the global
# parameters, MB per client per round (down/up) and seconds per round.
# `fedavg_sgd` is the control for pFedMe: FedAvg with pFedMe's SGD step size.
# Usage: scripts/bench-personal.sh [fedllm binary] [runs folder] [only these methods, comma-separated]
set -euo pipefail
set -f  # the head patterns carry `*`
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$here/target/release/fedllm}"
out="${2:-$here/runs/pfl-bench}"
only=",${3:-},"
cfg="$here/configs/pfl-mmlu.yaml"
mkdir -p "$out"
declare -a methods=(
  "local|federate.baseline=local"
  "fedavg|"
  "ditto|personal.method=ditto train.local_update_steps=3 personal.personal_steps=3 personal.lambda=0.5"
  "fedrep|personal.method=fedrep train.local_update_steps=4 personal.personal_steps=2 personal.head=[\"*layers.29.*\"]"
  "pfedme|personal.method=pfedme train.local_update_steps=3 personal.inner_steps=2 personal.lambda=15 personal.personal_lr=0.05 train.lr=0.05"
  "fedsa_lora|personal.method=fedsa_lora"
  "ffa_lora|personal.method=ffa_lora"
  "fedavg_sgd|train.optimizer=sgd train.lr=0.05"
)
for m in "${methods[@]}"; do
  name="${m%%|*}"
  extra="${m#*|}"
  if [ "$only" != ",," ] && [[ "$only" != *",$name,"* ]]; then continue; fi
  # shellcheck disable=SC2086
  "$bin" run --config "$cfg" --no-progress --overwrite "outdir=$out/$name" $extra >"$out/$name.log" 2>&1 \
    || { echo "$name: failed, see $out/$name.log"; continue; }
  python3 - "$out/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
last = recs[-1]
# The run's own spread of the clients' test losses; the global-parameter one (same values
# where a client has nothing of its own) from the per-client losses.
own = (last["client_test_mean"], last["client_test_worst"][1], last["client_test_best"][1])
glob = {c: v.get("global_test", v["test"]) for c, v in last["client_losses"].items()}
rounds = [r for r in recs if r["round"] > 0]
n = max(len(last["client_losses"]), 1)
down = sum(r["bytes_down"] for r in rounds) / len(rounds) / n / 1e6
up = sum(r["bytes_up"] for r in rounds) / len(rounds) / n / 1e6
secs = sum(r["seconds"] for r in rounds) / len(rounds)
f = lambda m, w, b: f"{m:.4f} / {w:.4f} / {b:.4f}"
g = f(sum(glob.values()) / len(glob), max(glob.values()), min(glob.values()))
print(f"{sys.argv[2]:<11} own {f(*own)}  global {g}  MB/client/round {down:.3f} down {up:.3f} up  {secs:.1f} s/round")
PY
done
