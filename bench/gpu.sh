#!/usr/bin/env bash
# The GPU train-step table in one command: WRN-50-2 at 224 and WRN-28-10 at 32, batch 128, each
# against torchvision's reference step (fp32, and for WRN-50-2 also the reference's --amp fp16),
# plus the project's step with torch.compile, to settle whether compile pays on this GPU.
#
#   bash bench/gpu.sh            # results: bench/results/gpu-<date>/*.json and the table
#
# Needs one CUDA GPU and a Python with torch, torchvision, pydantic and pyyaml (no network, no
# install: the repository is put on PYTHONPATH). Under 8 minutes on one H100: each run has its
# own time limit, and a run that fails or times out leaves the others and the table standing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
OUT="${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if ! "$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "pydantic", "yaml") if not importlib.util.find_spec(m)]
if missing:
    sys.exit(f"bench/gpu.sh: {sys.executable} lacks {', '.join(missing)}; set PYTHON to one that has them")
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch")
print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
PY
then
  exit 1
fi

# name, time limit (s), then train-step arguments
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >&2
  timeout --signal=INT --kill-after=5 "$limit" "$PYTHON" - "$OUT/$name.json" "$@" <<'PY'
import argparse, json, sys
from wrn_cluster.bench import train_step

parser = argparse.ArgumentParser()
parser.add_argument("json")
parser.add_argument("--model")
parser.add_argument("--image-size", type=int)
parser.add_argument("--batch", type=int)
parser.add_argument("--baseline", default="fp32")
parser.add_argument("--compile", action="store_true")
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--warmup", type=int, default=3)
args = parser.parse_args()
result = train_step.run(
    args.model, args.image_size, args.batch, "cuda", args.baseline,
    {"compile": True} if args.compile else {}, args.rounds, args.steps, args.warmup,
    say=lambda line: print(line, file=sys.stderr, flush=True),
)
print("\n".join(result.lines()), flush=True)
result.write_json(args.json)
PY
  local code=$?
  [[ $code -ne 0 ]] && echo "== $name: failed or timed out (exit $code)" >&2
  return 0
}

start=$SECONDS
run wrn50_2-vs-fp32 100 --model wrn-50-2 --image-size 224 --batch 128
run wrn50_2-vs-amp 100 --model wrn-50-2 --image-size 224 --batch 128 --baseline fp16
run wrn28_10-vs-fp32 80 --model wrn-28-10 --image-size 32 --batch 128
run wrn50_2-compiled-vs-fp32 180 --model wrn-50-2 --image-size 224 --batch 128 --compile --warmup 4

echo
echo "## bench/gpu.sh: $(( SECONDS - start ))s, results in $OUT"
shopt -s nullglob
results=("$OUT"/*.json)
if (( ${#results[@]} )); then
  "$PYTHON" - "${results[@]}" <<'PY'
import json, sys
from wrn_cluster.bench.common import markdown_table
print(markdown_table([json.loads(open(p).read()) for p in sys.argv[1:]]))
PY
fi
