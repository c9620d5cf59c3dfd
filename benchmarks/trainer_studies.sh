#!/usr/bin/env bash
# The bundled trainer's studies on its built-in task (issue 19), on the CPU:
#   bash benchmarks/trainer_studies.sh OUT_DIR [THREADS] [PART]
# PART: all (the default, one after another), group-size, ref-sync or single (parts may run at the same time in
# separate shells: they write different directories). An interrupted part continues where it stopped when run
# again (the sweeps resume; a finished single run is skipped, an interrupted one resumes from its checkpoint).
# Each single run goes through /usr/bin/time -v (peak resident memory, wall and CPU time in NAME.time).
# Summarise afterwards with: python -m benchmarks.trainer_studies OUT_DIR
set -euo pipefail
out=${1:?usage: trainer_studies.sh OUT_DIR [THREADS] [PART]}
threads=${2:-1}
part=${3:-all}
mkdir -p "$out"
{ date -u +%FT%TZ; uname -m; grep -m1 'model name' /proc/cpuinfo; echo "cores: $(nproc --all)"; uptime
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null || true; echo "OMP_NUM_THREADS=$threads part=$part"; } >> "$out/machine.txt"
export OMP_NUM_THREADS=$threads

single() {  # NAME, then grpo-train flags
  local name=$1; shift
  [ -e "$out/$name/final" ] && return 0
  local resume=()  # as the sweep does: --resume from a checkpoint, --overwrite of anything else left
  if compgen -G "$out/$name/checkpoints/*" > /dev/null; then resume=(--resume)
  elif [ -d "$out/$name" ]; then resume=(--overwrite); fi
  /usr/bin/time -v -o "$out/$name.time" grpo-train --output-dir "$out/$name" --no-progress "${resume[@]}" "$@" \
    > "$out/$name.log" 2>&1
}

if [ "$part" = all ] || [ "$part" = group-size ]; then
  # 1. group size: at a fixed number of completions per step, and at a fixed number of prompts per step
  grpo-train sweep --num-generations 2,4,8,16 --seeds 0,1,2 --budget completions --completions-per-step 128 \
    --sweep-dir "$out/g-completions" --no-progress >> "$out/g-completions.log" 2>&1
  grpo-train sweep --num-generations 2,4,8,16 --seeds 0,1,2 --budget prompts --batch-prompts 16 \
    --sweep-dir "$out/g-prompts" --no-progress >> "$out/g-prompts.log" 2>&1
fi
if [ "$part" = all ] || [ "$part" = ref-sync ]; then
  # 2. a reference that follows the policy, beta > 0
  grpo-train sweep --ref-sync-every 0,10 --beta 0.04 --seeds 0,1,2 --sweep-dir "$out/ref-sync" --no-progress \
    >> "$out/ref-sync.log" 2>&1
fi
if [ "$part" = all ] || [ "$part" = single ]; then
  # 3. full fine-tuning, LoRA (two learning rates), the learned reward (the rule accuracy logged, weight 0)
  for s in 0 1 2; do
    single "full-$s" --seed "$s"
    single "lora16-lr1e-4-$s" --seed "$s" --lora-r 16 --lora-alpha 32
    single "lora16-lr1e-3-$s" --seed "$s" --lora-r 16 --lora-alpha 32 --lr 1e-3
    single "learned-$s" --seed "$s" --reward learned --reward accuracy=0
  done
fi
date -u +%FT%TZ >> "$out/done-$part.txt"
