#!/usr/bin/env bash
# GPU check of the large-model paths -- PREPARED, NOT YET RUN ON A GPU (the session that wrote it had none).
# Run on a CUDA machine with torch/transformers/peft/accelerate and lorasens (`pip install -e .`); no network needed
# (the model is a random-init SmolLM2-135M-shaped Llama written below; bitsandbytes comes from .whl/ if missing,
# see benchmarks/gpu_wheels.sh). Each check is independent, prints PASS/FAIL/SKIP and its figures, and the summary
# goes to OUT/gpu_check_large.txt. Meant to finish in about 3 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check_large.sh [OUT_DIR]
#
# 1. QLoRA: `lorasens train --quantize 4bit` (bf16 compute): all run files, tracked norms finite and nonzero,
#    step time and peak memory vs the same run unquantized.
# 2. FSDP2: `torchrun --nproc_per_node N -m lorasens train --fsdp full_shard --lora_r 8` (N = GPUs, at most 2) vs
#    one process without FSDP on the same global batch: max relative difference of every module's gradient norm.
# 3. DeepSpeed ZeRO-3 (examples/deepspeed_zero3.json) when deepspeed imports: the run completes (no gradient tracking).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SUMMARY="$OUT/gpu_check_large.txt"
WORK="$(mktemp -d)"
log() { echo "$*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
log "devices: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd';') ($NGPU CUDA devices)"
log "versions: $("$PY" -c 'import torch, transformers, accelerate, peft; print(torch.__version__, transformers.__version__, accelerate.__version__, peft.__version__)' 2>&1 | tail -1)"
[ "$NGPU" -ge 1 ] || { log "FAIL: no CUDA device"; exit 1; }

# A SmolLM2-135M-shaped Llama with random weights (throughput and exactness do not depend on the weights).
timeout 120 "$PY" - "$WORK/model" <<'PYEOF' 2>&1 | tail -2
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lorasens.model.loading import byte_level_tokenizer
tok = byte_level_tokenizer()
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print("model written")
PYEOF
COMMON=(--model "$WORK/model" --dataset synthetic --max_steps 20 --train_samples 320 --eval_samples 16
        --analysis_samples 16 --eval_steps 10 --max_length 256 --evaluate false --lora_dropout 0 --seed 0
        --output_dir "$WORK/runs" --overwrite true)

# Reads a run's files: peak memory is not in them, so step time comes from train_log.jsonl and the run's wall time.
check_run() {  # check_run NAME -> prints "steps, s/step, norms ok"
  "$PY" - "$WORK/runs/$1" <<'PYEOF'
import csv, json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
rows = list(csv.DictReader((run / "gradient_analysis.module_norms.csv").open()))
later = [float(r["grad_norm"]) for r in rows if r["step"] != "1" or r["matrix"] == "B"]
ok = bool(later) and all(math.isfinite(v) and v > 0 for v in later)
print(f"steps {summary['steps']}, train {summary['train_runtime_s']} s, loss {summary['final_train_loss']:.4f}, "
      f"{len(rows)} module-norm rows, all finite and > 0: {ok}")
sys.exit(0 if ok else 1)
PYEOF
}

# 1. QLoRA
if ! "$PY" -c "import bitsandbytes" 2>/dev/null && ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps .whl/bitsandbytes-*.whl 2>&1 | tail -1
fi
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  for q in none 4bit; do
    started=$(date +%s)
    if timeout 150 "$PY" -m lorasens train "${COMMON[@]}" --experiment_name "q_$q" --quantize "$q" --precision bf16 \
         --batch_size 8 > "$OUT/qlora_$q.log" 2>&1 && res=$(check_run "q_$q"); then
      log "PASS qlora --quantize $q: $res; $(( $(date +%s) - started )) s end to end"
    else
      log "FAIL qlora --quantize $q (see $OUT/qlora_$q.log): $(tail -3 "$OUT/qlora_$q.log" | tr '\n' ' ')"
    fi
  done
else
  log "SKIP qlora: bitsandbytes not importable and no .whl/bitsandbytes-*.whl (run benchmarks/gpu_wheels.sh)"
fi

# 2. FSDP2, N = min(GPUs, 2) processes vs one process on the same global batch
N=$(( NGPU >= 2 ? 2 : 1 ))
if timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" -m lorasens train "${COMMON[@]}" \
     --experiment_name fsdp --fsdp full_shard --lora_r 8 --precision fp32 --batch_size 4 > "$OUT/fsdp.log" 2>&1 \
   && timeout 120 "$PY" -m lorasens train "${COMMON[@]}" --experiment_name single --lora_r 8 --precision fp32 \
     --batch_size $(( 4 * N )) > "$OUT/fsdp_single.log" 2>&1; then
  res=$("$PY" - "$WORK/runs" <<'PYEOF'
import csv, sys
from pathlib import Path
runs = Path(sys.argv[1])
def norms(name):
    return {(r["step"], r["layer"], r["module"], r["matrix"]): float(r["grad_norm"])
            for r in csv.DictReader((runs / name / "gradient_analysis.module_norms.csv").open()) if r["grad_norm"]}
a, b = norms("single"), norms("fsdp")
common = [k for k in a if k in b and a[k] > 0]
step1 = [k for k in common if k[0] == "1"]
rel = lambda keys: max(abs(a[k] - b[k]) / a[k] for k in keys) if keys else float("nan")
print(f"{len(common)} module norms compared (of {len(a)}); max relative difference at step 1 {rel(step1):.2e}, "
      f"over all 20 steps {rel(common):.2e}; sensitivity.json written: {(runs / 'fsdp' / 'sensitivity.json').exists()}")
PYEOF
)
  log "PASS fsdp full_shard with $N process(es): $res"
else
  log "FAIL fsdp with $N process(es) (see $OUT/fsdp.log): $(grep -m3 -i 'error' "$OUT/fsdp.log" "$OUT/fsdp_single.log" 2>/dev/null | tr '\n' ' ')"
fi

# 3. DeepSpeed ZeRO-3
if "$PY" -c "import deepspeed" 2>/dev/null; then
  if timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" -m lorasens train "${COMMON[@]}" \
       --experiment_name zero3 --deepspeed examples/deepspeed_zero3.json --lora_r 8 --precision bf16 --batch_size 4 \
       > "$OUT/zero3.log" 2>&1; then
    log "PASS deepspeed zero3 with $N process(es): run completed ($(ls "$WORK/runs/zero3" | wc -l) files)"
  else
    log "FAIL deepspeed zero3 (see $OUT/zero3.log): $(grep -m3 -i 'error' "$OUT/zero3.log" | tr '\n' ' ')"
  fi
else
  log "SKIP deepspeed zero3: deepspeed is not installed"
fi
rm -rf "$WORK"
log "summary: $SUMMARY"
