#!/usr/bin/env bash
# Offsite-tuning benchmark (issue 16) on configs/fedot-gsm8k.yaml: FedOT with drop 0.2 and 0.5,
# with and without alignment, against LoRA FedAvg and Local on the full model. One line per row:
# held-out loss of the emulator and of the plug-in (full model), the clients' test loss, MB
# down once (the emulator file) and up per client per round, seconds per round. Then a client's
# peak RSS in a distributed round: on the Q8_0 emulator file (edge layers trained in full, or
# LoRA on them) vs on the full model (LoRA).
# Usage: scripts/bench-offsite.sh [fedllm binary] [runs folder] [only these rows, comma-separated]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$here/target/release/fedllm}"
out="${2:-$here/runs/fedot-bench}"
only=",${3:-},"
cfg="$here/configs/fedot-gsm8k.yaml"
mkdir -p "$out"
declare -a rows=(
  "fedot_d0.2|offsite.drop_ratio=0.2"
  "fedot_d0.2_aligned|offsite.drop_ratio=0.2 offsite.align_steps=40"
  "fedot_d0.5|offsite.drop_ratio=0.5"
  "fedot_d0.5_aligned|offsite.drop_ratio=0.5 offsite.align_steps=40"
  "lora_fedavg|offsite.enabled=false adapter.type=lora adapter.r=8 adapter.alpha=16"
  "lora_local|offsite.enabled=false adapter.type=lora adapter.r=8 adapter.alpha=16 federate.baseline=local"
)
for m in "${rows[@]}"; do
  name="${m%%|*}"
  extra="${m#*|}"
  if [ "$only" != ",," ] && [[ "$only" != *",$name,"* ]]; then continue; fi
  # shellcheck disable=SC2086
  "$bin" run --config "$cfg" --no-progress --overwrite "outdir=$out/$name" $extra >"$out/$name.log" 2>&1 \
    || { echo "$name: failed, see $out/$name.log"; continue; }
  python3 - "$out/$name" "$name" <<'PY'
import json, os, sys
d, name = sys.argv[1], sys.argv[2]
recs = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
last = recs[-1]
rounds = [r for r in recs if r["round"] > 0]
n = max(len(rounds[-1]["clients"]), 1)
up = sum(r["bytes_up"] for r in rounds) / len(rounds) / n / 1e6
emu = json.load(open(os.path.join(d, "offsite.json"))) if os.path.exists(os.path.join(d, "offsite.json")) else {}
align = emu.get("align") or {}
kd = f"  KD held-out {align['kd_before']:.4f} -> {align['kd_after']:.4f}" if align.get("kd_before") is not None else ""
f = lambda x: "-" if x is None else f"{x:.4f}"
secs = sum(r["seconds"] for r in rounds) / len(rounds)
print(f"{name:<20} emulator/server test {f(last['server_test_loss'])}  plug-in test {f(last.get('plugin_test_loss'))}"
      f"  client test {f(last['client_test_loss'])}  MB up/client/round {up:.2f}  {secs:.1f} s/round{kd}")
PY
done
# A client's peak RSS in one distributed round: on the emulator file (middle in Q8_0) vs on the
# full model with LoRA.
if [ "$only" = ",," ] || [[ "$only" == *",rss,"* ]]; then
  rss() {  # $1 = name, rest = overrides for server and clients
    local name="$1"; shift
    local port=$((20000 + RANDOM % 20000))
    local o="$out/rss-$name"
    rm -rf "$o"
    local common=(federate.mode=distributed federate.total_round_num=1 eval.freq=0 "outdir=$o"
      "distributed.listen=127.0.0.1:$port" "distributed.server=http://127.0.0.1:$port" "$@")
    "$bin" server --config "$cfg" "${common[@]}" >"$out/rss-$name-server.log" 2>&1 &
    local spid=$!
    local model_arg=()
    if [[ "$name" == emulator* ]]; then
      for _ in $(seq 600); do [ -f "$o/emulator.gguf" ] && grep -q "emulator written" "$out/rss-$name-server.log" && break; sleep 1; done
      model_arg=("model.path=$o/emulator.gguf")
    fi
    for i in 1 2; do
      "$bin" client --config "$cfg" --data-idx "$i" "${common[@]}" "${model_arg[@]}" >"$out/rss-$name-c$i.log" 2>&1 &
    done
    /usr/bin/time -v "$bin" client --config "$cfg" --data-idx 0 "${common[@]}" "${model_arg[@]}" >"$out/rss-$name-c0.log" 2>&1
    wait "$spid"
    local kb
    kb=$(grep "Maximum resident" "$out/rss-$name-c0.log" | awk '{print $NF}')
    echo "client peak RSS on the $name: $((kb / 1024)) MiB"
    if [ -f "$o/offsite.json" ]; then
      python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(f\"emulator file (down once per client): {j['emulator_bytes']/1e6:.1f} MB\")" "$o/offsite.json"
    fi
  }
  rss emulator offsite.emulator_quant=q8_0
  rss emulator_lora offsite.emulator_quant=q8_0 adapter.type=lora adapter.r=8 adapter.alpha=16
  rss full offsite.enabled=false adapter.type=lora adapter.r=8 adapter.alpha=16
fi
