#!/usr/bin/env bash
# One process per GPU, started by a launcher: the output must equal one process driving both GPUs
# and transformers' greedy tokens. Skips (exit 77) without torchrun/mpirun or without 2 GPUs.
# usage: multiprocess.sh TPENGINE FIXTURES_DIR torchrun|mpirun
set -uo pipefail
tpengine=$1 fixtures=$2 launcher=$3
command -v "$launcher" >/dev/null || { echo "SKIP: $launcher not found"; exit 77; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 2 ] || { echo "SKIP: needs 2 GPUs, found $gpus"; exit 77; }
model=$fixtures/neox_parallel
prompts=$(python3 -c "import json; r=json.load(open('$model/reference.json')); print(' '.join('--prompt-ids ' + ','.join(map(str, p)) for p in r['prompts']))")
expected=$(python3 -c "import json; r=json.load(open('$model/reference.json')); print('\n'.join(' '.join(map(str, g)) for g in r['greedy']))")
args=(generate --model "$model" --device cuda --dtype float32 -n 16 --ignore-eos $prompts)
port=$((29400 + RANDOM % 500))
launch() {  # one process per GPU; extra arguments go to tpengine
  case $launcher in
    torchrun) torchrun --nproc-per-node 2 --master-port $port --no-python "$tpengine" "${args[@]}" "$@";;
    mpirun) MASTER_ADDR=127.0.0.1 MASTER_PORT=$port mpirun --allow-run-as-root -np 2 \
              -x MASTER_ADDR -x MASTER_PORT -x NCCL_NVLS_ENABLE "$tpengine" "${args[@]}" "$@";;
  esac
}
log=$(mktemp); trap 'rm -f "$log"' EXIT
# NCCL, then the one-shot all-reduce over peer memory (CUDA IPC between the processes).
for all_reduce in nccl auto; do
  single=$("$tpengine" "${args[@]}" --tp 2 --all-reduce $all_reduce 2>"$log") || { cat "$log"; exit 1; }
  multi=$(launch --all-reduce $all_reduce 2>>"$log")
  status=$?
  echo "all_reduce = $all_reduce; single process:"; echo "$single"
  echo "$launcher, 2 processes:"; echo "$multi"
  [ $status -eq 0 ] || { cat "$log"; echo "FAIL: $launcher exited $status"; exit 1; }
  [ "$single" = "$expected" ] || { echo "FAIL: one process differs from transformers"; exit 1; }
  [ "$multi" = "$expected" ] || { echo "FAIL: two processes differ from transformers"; exit 1; }
  if [ $all_reduce = auto ]; then
    ran=$(grep -c "all-reduce: one-shot over peer memory" "$log")
    [ "$ran" -ge 2 ] || { cat "$log"; echo "FAIL: the one-shot all-reduce ran in $ran of 2 runs"; exit 1; }
  fi
  port=$((port + 1))
done
echo PASS
