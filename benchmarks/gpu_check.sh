#!/usr/bin/env bash
# One prepared check for a machine with a GPU (about 10 minutes): which devices JAX
# sees, then the throughput suite up to N=10,000 (vmap vs the per-node jitted loop,
# loops up to N=1000), the rooflines, and the issue's GPU goals, as tables and JSON.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default runs/gpu)
#
# Run it from the repository root with the project's Python on PATH (or PYTHON=...).
# It needs a CUDA jaxlib (pip install -U "jax[cuda12]"); torch is optional.
set -u
PY=${PYTHON:-python}
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so the allocator's peak is what a run used
export TF_CPP_MIN_LOG_LEVEL=2

echo "== devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'PY' || { echo "JAX cannot start"; exit 1; }
import jax
print('jax', jax.__version__, 'backend', jax.default_backend(), 'devices', jax.devices())
if jax.default_backend() != 'gpu':
  print('WARNING: JAX sees no GPU; the figures below are not GPU figures')
PY

echo "== throughput: D-PSGD and FedAvg, logistic/mlp/lenet, N=100..10000 (loops up to N=1000)"
timeout 420 "$PY" -m benchmarks.throughput --models=logistic,mlp,lenet \
  --nodes=100,1000,4000,10000 --protocols=dpsgd,fedavg --modes=vmap,loop_jax \
  --loop_max_nodes=1000 --rounds=5 --repeats=3 --memory_fraction=0.7 \
  --json="$OUT/throughput.json" 2>&1 | grep -v -E '^(I|W)[0-9]{4} ' \
  || echo "throughput: stopped (timeout or error); partial table above"

echo "== roofline"
timeout 120 "$PY" -m benchmarks.roofline --models=logistic,mlp --nodes=1000,10000 \
  --from_json="$OUT/throughput.json" --json="$OUT/roofline.json" 2>&1 | grep -v -E '^(I|W)[0-9]{4} ' \
  || echo "roofline: stopped (timeout or error)"

echo "== goals (GPU): vmap >= 100x loop_jax at N=1000 (MLP); LeNet N=10000 D-PSGD round < 100 ms"
"$PY" - "$OUT/throughput.json" <<'PY'
import json, sys
try:
  recs = json.load(open(sys.argv[1]))['records']
except (OSError, ValueError) as e:
  sys.exit(f'no throughput JSON: {e}')
get = lambda **k: next((r for r in recs if all(r.get(a) == b for a, b in k.items())), None)
mlp = get(protocol='dpsgd', model='mlp', nodes=1000, mode='vmap')
if mlp and 'speedup_vs_loop_jax' in mlp:
  s = mlp['speedup_vs_loop_jax']
  print(f'MLP N=1000 D-PSGD vmap / loop_jax: {s:.1f}x  (goal >= 100x: {"met" if s >= 100 else "NOT met"})')
lenet = get(protocol='dpsgd', model='lenet', nodes=10000, mode='vmap')
if lenet and not lenet.get('skipped'):
  ms = 1000 * lenet['round_seconds']
  print(f'LeNet N=10000 D-PSGD round: {ms:.1f} ms  (goal < 100 ms: {"met" if ms < 100 else "NOT met"})')
else:
  print('LeNet N=10000 D-PSGD: not measured', (lenet or {}).get('skipped', ''))
PY
echo "== done: $OUT"
