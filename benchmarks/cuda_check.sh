#!/usr/bin/env bash
# The GPU check, one prepared run on a lent CUDA host (benchmarks/results/device-h200/ holds its last results):
#   benchmarks/cuda_check.sh CORPUS OUT_DIR [OLD_TREE]      (STEPS=800 by default)
# trains char-1m with train.device = "cuda", exports it (int8 too), benches the PyTorch row with --device cuda
# at batch 1 and 16, measures DDP on CUDA (benchmarks/train_ddp.py) and tinygrad on CUDA
# (benchmarks/tinygrad_decode.py), and, given OLD_TREE (another checkout's edgecraft/, e.g.
# `git archive REV edgecraft | tar -x -C old`), decode speed before/after on the host's CPU.
# Each step has its own time limit so the whole run fits one 10-minute device call. Packages the host
# lacks (pydantic, tinygrad) travel as wheels: see the device tool's notes.
set -uo pipefail
corpus=$1 out=$2 old=${3:-}
steps=${STEPS:-800}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# tinygrad's CUDA device loads NVRTC, which PyTorch's wheels ship outside the loader's path
nvrtc=$(python3 -c "import glob,sys; print(':'.join(sorted({p.rsplit('/',1)[0] for p in glob.glob(sys.prefix+'/lib/python3*/site-packages/nvidia/**/libnvrtc.so*', recursive=True)})))")
export LD_LIBRARY_PATH=${nvrtc}:${LD_LIBRARY_PATH:-}
python3 -c "import torch, onnxruntime, platform, os; print('torch', torch.__version__, torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__, 'python', platform.python_version(), 'cpus', os.cpu_count())"
ec() { python3 -m edgecraft "$@"; }
start=$SECONDS
timeout 170 python3 -m edgecraft train recipes/char-1m.toml --runs-dir "$work/runs" --set train.device=cuda \
  --set "data.source=\"$corpus\"" --set "data.cache_dir=\"$work/cache\"" --set "train.max_steps=$steps" \
  --set train.sample_every=100000 > "$work/train.log" 2>&1
echo "== train char-1m on cuda: exit $? in $((SECONDS - start)) s"; tail -n 2 "$work/train.log"
timeout 90 python3 -m edgecraft export "$work/runs/char-1m" --out "$work/export/char-1m" --int8 2>&1 | tail -n 3
for b in 1 16; do
  timeout 60 python3 -m edgecraft bench "$work/runs/char-1m" --device cuda --batch $b --runs 5 --markdown "$out/bench_cuda_b$b.md" > /dev/null 2>&1
  echo "== bench --device cuda batch $b: exit $?"; grep -E "^\| char-1m" "$out/bench_cuda_b$b.md" | head -3
done
timeout 130 python3 benchmarks/train_ddp.py --corpus "$corpus" --device cuda --steps 30 --rounds 2 --out "$out/train_ddp_cuda" > "$work/ddp.log" 2>&1
echo "== train_ddp --device cuda: exit $?"; tail -n 6 "$work/ddp.log"
timeout 200 python3 benchmarks/tinygrad_decode.py --bundle "$work/export/char-1m" --device CUDA --rounds 1 > "$work/tg.log" 2>&1
echo "== tinygrad_decode --device CUDA: exit $?"; tail -n 14 "$work/tg.log"
if [ -n "$old" ]; then
  timeout 200 python3 benchmarks/decode_speed.py --runs 3 --threads 1 --tree "$old" --out "$out/decode_speed_device.md" > "$work/ds.log" 2>&1
  echo "== decode_speed --tree $old: exit $?"; grep -A8 "## 1 thread" "$out/decode_speed_device.md"
fi
