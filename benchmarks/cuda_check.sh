#!/usr/bin/env bash
# The GPU check: train recipes with train.device = "cuda", export, and bench with --device cuda.
#   benchmarks/cuda_check.sh CORPUS OUT_DIR        (DEVICE=cpu STEPS=50 for a dry run)
# Prints each run's final metrics and writes the bench JSON/markdown into OUT_DIR.
set -uo pipefail
corpus=$1 out=$2 device=${DEVICE:-cuda} steps=${STEPS:-2000}
work=$(mktemp -d)
ec() { python3 -m edgecraft.cli "$@"; }
mkdir -p "$out"
python3 - <<'PY'
import platform, torch, onnxruntime as ort
print("torch", torch.__version__, "cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("onnxruntime", ort.__version__, ort.get_available_providers(), "python", platform.python_version())
PY
for recipe in ${RECIPES:-shakespeare-baby char-1m char-1m-llama}; do
  start=$(date +%s.%N)
  ec train "recipes/$recipe.toml" --runs-dir "$work/runs" \
    --set "train.device=$device" --set "data.source=\"$corpus\"" --set "data.cache_dir=\"$work/cache\"" \
    --set "train.max_steps=$steps" --set train.threads=0 --set train.sample_every=100000 > "$work/$recipe.log" 2>&1
  echo "== $recipe on $device: exit $? in $(echo "$(date +%s.%N) - $start" | bc) s"
  tail -n 2 "$work/$recipe.log"
  grep '"event": "eval"' "$work/runs/$recipe/metrics.jsonl" | tail -n 1
  grep '"event": "train"' "$work/runs/$recipe/metrics.jsonl" | tail -n 1
done
ec export "$work/runs/char-1m" --out "$work/export/char-1m" --int8 || echo "export failed"
ec bench "$work/runs/char-1m" "$work/export/char-1m" --device "$device" --runs 3 \
  --json "$out/bench_$device.json" --markdown "$out/bench_$device.md"
echo "bench exit $?"
ec generate "$work/runs/char-1m" "ROMEO:" -n 120 --device "$device" --seed 1
