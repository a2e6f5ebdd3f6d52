#!/usr/bin/env bash
# Multi-GPU check of ia3 training, for a machine with 2 or more CUDA GPUs (CI has none; neither had the machine
# this was written on, so nothing here has been run on a GPU yet: please report what it prints).
#
#   scripts/gpu_check.sh        # from anywhere; uses .venv/bin/python when present (PYTHON=... to override)
#
# 1. `ia3 train` on a tiny BERT classifier (dropout off, 100 rows, fp32): one GPU, then configs/accelerate/ddp.yaml
#    on 2 GPUs. The adapters must agree within 1e-4 and every output file must be written once.
# 2. If deepspeed is installed: `ia3 train` under deepspeed_zero2.yaml refuses with a clear message, and
#    scripts/gpu_check_loop.py (ia3's library in a plain accelerate loop, saved from a gathered state dict) gives the
#    same adapter under deepspeed_zero2.yaml (and deepspeed_zero3.yaml) as under ddp.yaml.
# 3. FSDP (fsdp.yaml, version 2): `ia3 train` on 2 GPUs against the one-GPU run (adapters within 1e-4, the same
#    files, each process holding about half the model), and the same loop as in 2.
# 4. If bitsandbytes is installed: `ia3 train` with --model.quantization int8 and nf4 on one GPU (the vectors
#    train; accuracy printed next to the fp32 run's).
# 5. With MT0_LARGE (a local mt0-large folder) and the PhraseBank file: the seed recipe's epoch in bf16 on one GPU.
# Takes a minute or two (plus the mt0-large run). Exit status 0 when every check passed; the last line says which failed otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ACC=("$PY" -m accelerate.commands.launch)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
WORK=$(mktemp -d -t ia3-gpu-check-XXXXXX)
FAILED=()
say() { printf '\n== %s\n' "$*"; }

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 2 ] && [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
  # GPU_CHECK_ON_CPU=1 runs it on CPU processes (gloo) to check the script itself; FSDP cannot run there
  echo "needs at least 2 CUDA GPUs (found $NGPU)"; exit 2
fi
say "$NGPU GPUs; work folder $WORK"

# a tiny classifier without dropout (each process draws its own dropout masks), 100 rows of the demo data, a config
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_dirs import DEMO, make_model_dir
work = Path(sys.argv[1])
model = make_model_dir(work, "cls")
config = json.loads((model / "config.json").read_text())
config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
(model / "config.json").write_text(json.dumps(config))
lines = DEMO.read_text(encoding="utf-8").splitlines(keepends=True)
(work / "data.csv").write_text("".join(lines[:101]), encoding="utf-8")
(work / "run.yaml").write_text(
    f"model:\n  name: {model}\n  task: cls\ndata:\n  dataset: {work / 'data.csv'}\n  subset: null\n  text_column: text\n"
    "train:\n  epochs: 2\n  batch_size: 16\n  lr: 0.05\n  precision: fp32\n  checkpoint_every: 2\n  plots: false\n"
)
EOF

compare() {  # compare DIR_A DIR_B LABEL: adapters within 1e-4, same files
  "$PY" - "$1" "$2" "$3" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
a, b, label = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
assert x.keys() == y.keys(), f"{label}: different keys"
diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
print(f"{label}: max |difference| = {diff:.3g} over {len(x)} tensors")
assert diff < 1e-4, f"{label}: adapters differ by {diff}"
files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
if (a / "metrics.jsonl").exists():
    assert files(a) == files(b), f"{label}: different files: {set(files(a)) ^ set(files(b))}"
    lines = (b / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, f"{label}: metrics.jsonl has {len(lines)} lines for 2 epochs"
EOF
}

say "1. ia3 train: one GPU vs DDP on 2 GPUs"
if CUDA_VISIBLE_DEVICES=0 "$PY" -m ia3 -q train --config "$WORK/run.yaml" --output-dir "$WORK/one" \
   && "${ACC[@]}" --config_file configs/accelerate/ddp.yaml --num_processes 2 -m ia3 -q train \
        --config "$WORK/run.yaml" --output-dir "$WORK/ddp" \
   && compare "$WORK/one" "$WORK/ddp" "ia3 train, 1 GPU vs DDP x2"; then :; else FAILED+=("ia3 train DDP"); fi

LOOP=(scripts/gpu_check_loop.py --model "$WORK/cls" --steps 8 --batch-size 16)
loop() {  # loop CONFIG OUT
  "${ACC[@]}" --config_file "configs/accelerate/$1.yaml" --num_processes 2 "${LOOP[@]}" --out "$WORK/$2"
}
say "library loop under DDP (the reference for the sharded launches)"
loop ddp loop_ddp || FAILED+=("loop DDP")

if "$PY" -c "import deepspeed" 2>/dev/null; then
  say "2. DeepSpeed"
  out=$("${ACC[@]}" --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 -m ia3 -q train \
        --config "$WORK/run.yaml" --output-dir "$WORK/ds_recipe" 2>&1)
  if grep -q "not under DEEPSPEED" <<<"$out"; then echo "ia3 train refuses ZeRO-2 as it should";
  else echo "$out" | tail -20; FAILED+=("ia3 train under ZeRO-2 did not refuse"); fi
  for stage in 2 3; do
    if loop "deepspeed_zero$stage" "loop_zero$stage" && compare "$WORK/loop_ddp" "$WORK/loop_zero$stage" "loop, DDP vs ZeRO-$stage"
    then :; else FAILED+=("loop ZeRO-$stage"); fi
  done
else
  say "2. DeepSpeed: not installed, skipped (pip install deepspeed to run it)"
fi

say "3. FSDP: ia3 train on 2 GPUs vs one GPU, then the library loop"
if "${ACC[@]}" --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m ia3 -q train \
     --config "$WORK/run.yaml" --output-dir "$WORK/fsdp" \
   && compare "$WORK/one" "$WORK/fsdp" "ia3 train, 1 GPU vs FSDP x2" \
   && "$PY" -c "import json,sys; h=json.load(open(sys.argv[1]))['fsdp']; print('FSDP:', h); assert h['held_fraction'] < 0.6" \
        "$WORK/fsdp/metrics.json"; then :; else FAILED+=("ia3 train FSDP"); fi
if loop fsdp loop_fsdp && compare "$WORK/loop_ddp" "$WORK/loop_fsdp" "loop, DDP vs FSDP"; then :; else FAILED+=("loop FSDP"); fi

if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  say "4. quantised bases: ia3 train with --model.quantization int8 and nf4 on one GPU (bitsandbytes)"
  for q in int8 nf4; do
    if CUDA_VISIBLE_DEVICES=0 "$PY" -m ia3 -q train --config "$WORK/run.yaml" --output-dir "$WORK/q_$q" \
         --model.quantization "$q" \
       && "$PY" - "$WORK/one" "$WORK/q_$q" "$q" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
full, quantised, q = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
x, y = load_file(full / "adapter_model.safetensors"), load_file(quantised / "adapter_model.safetensors")
assert x.keys() == y.keys(), f"{q}: different adapter keys from the full-precision run"
moved = [k for k, v in y.items() if k.endswith("ia3_l") and not torch.equal(v, torch.ones_like(v))]
assert moved, f"{q}: the vectors did not train"
diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
acc = lambda d: json.loads((d / "metrics.json").read_text())["accuracy"]
print(f"{q}: trained; accuracy {acc(quantised):.3f} (fp32 base: {acc(full):.3f}); max |vector - fp32 run's| = {diff:.3g}")
EOF
    then :; else FAILED+=("ia3 train --model.quantization $q"); fi
  done
else
  say "4. quantised bases: bitsandbytes not installed, skipped (pip install bitsandbytes to run it)"
fi

# 5. the seed recipe's epoch on mt0-large in bf16 (target: <= 15 s per epoch on an H200; the seed's guide: ~50 s).
#    Needs the model (MT0_LARGE: a local folder, or a Hub id where the Hub is reachable) and the PhraseBank file.
PHRASEBANK=${PHRASEBANK:-../shared/data/financial_phrasebank/Sentences_AllAgree.txt}
if [ -n "${MT0_LARGE:-}" ] && [ -f "$PHRASEBANK" ]; then
  say "5. the seed recipe on mt0-large, bf16, one GPU: seconds per epoch"
  if CUDA_VISIBLE_DEVICES=0 "$PY" -m ia3 -q train --output-dir "$WORK/mt0" --model.name "$MT0_LARGE" \
       --model.task seq2seq --data.dataset "$PHRASEBANK" --data.subset null --data.val_split 0.1 \
       --train.precision bf16 --train.epochs 3 --train.batch_size 8 --train.lr 8e-3 --train.plots false \
     && "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"mt0-large bf16: {m['seconds_per_epoch']:.1f} s/epoch, accuracy {m['accuracy']:.4f}, generation {m['generation_accuracy']:.4f}\")" \
          "$WORK/mt0/metrics.json"; then :; else FAILED+=("mt0-large epoch"); fi
else
  say "5. mt0-large epoch: skipped (set MT0_LARGE to the model and PHRASEBANK to the data file)"
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then echo "gpu_check: all passed ($WORK)"; exit 0; fi
echo "gpu_check: FAILED: ${FAILED[*]} ($WORK)"; exit 1
