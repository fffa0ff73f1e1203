#!/usr/bin/env bash
# bench/quality.py on the lent GPU machine (issue #21): the real LM of bench/realdata/README.md, rebuilt there from
# its GGUF, and the real text, carried in two calls because one call carries at most 64 MiB:
#   call 1 carries .data/p1 (gguf.part00, the gguf package, text/{calib,eval}.jsonl) and runs
#     `cp -r .data/p1 /tmp/p1` (a path not named in the next call's carry does not stay in the checkout; /tmp does),
#   call 2 carries .data/p2 (gguf.part01, convert_gguf.py with /tmp paths) and runs this script, which takes p1 back.
# (bench/realdata/make_carry.sh builds .data/p1, p2 and p3 from /work/data; .data/ is in .git/info/exclude.)
# A later call on the still-warm machine finds /tmp/lm and the results made so far, and resumes: quality.py skips
# the cells already in its JSON.
# Usage: bench/realdata/device_quality.sh SECONDS GROUP... ; a GROUP is structures:ratios:methods[:steps[:heal_lr]],
# one quality.py process each, all at once on the one GPU (the fits are small kernels: one process leaves it mostly
# idle). Environment: MODEL (default /tmp/lm, the LM built from the GGUF; another model skips that build), PREFIX (of
# the result files' names), THREADS (each process's --threads, default 4), QUALITY_ARGS (more quality.py arguments,
# split on spaces: --heal-steps 300 --eval-before).
set -u
budget=$1; shift
repo=$(pwd)
out=${OUT:-/tmp/out}
[ -d .data/p1 ] || cp -r /tmp/p1 .data/p1 || { echo "no .data/p1: carry it in an earlier call and copy it to /tmp/p1"; exit 1; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
mkdir -p "$out" /tmp/q
python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/q/pip.log 2>&1 || { tail /tmp/q/pip.log; exit 1; }
model=${MODEL:-/tmp/lm}
read -r -a more <<<"${QUALITY_ARGS:-}"
if [ "$model" = /tmp/lm ] && [ ! -f /tmp/lm/model.safetensors ]; then
  mkdir -p /tmp/gg
  cat .data/p1/gguf.part00 .data/p2/gguf.part01 >/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "bcc81830 is the wheel's sha256; the GGUF's:" && sha256sum /tmp/gg/*.gguf
  (cd /tmp && PYTHONPATH=$repo/.data/p1:$repo/.data/p2/py python -P "$repo/.data/p2/convert_gguf.py") >/tmp/q/gguf.log 2>&1 || { tail /tmp/q/gguf.log; exit 1; }
fi
text=$repo/.data/p1/text
pids=()
for group in "$@"; do
  IFS=: read -r structures ratios methods steps lr <<<"$group"
  name=${PREFIX:-}${structures//,/-}_${ratios//,/-}_${methods//[,+]/-}${lr:+_lr$lr}
  extra=()
  [ -n "${steps:-}" ] && extra=(--steps "$steps")
  [ -n "${lr:-}" ] && extra+=(--heal-lr "$lr")
  (cd /tmp && timeout "$budget" python -P "$repo/bench/quality.py" --model "$model" --calibration "$text/calib.jsonl" \
    --eval-data "$text/eval.jsonl" --structures "$structures" --ratios "$ratios" --methods "$methods" \
    --device cuda --threads "${THREADS:-4}" --work "/tmp/q/work_$name" --out "/tmp/q/quality_$name.json" "${extra[@]}" "${more[@]}" \
    --note "$gpu, one of $# quality.py processes sharing the GPU" >"/tmp/q/log_$name.txt" 2>&1) &
  pids+=($!)
done
wait "${pids[@]}"
# one file back (a call returns at most 8): every result JSON, every process's log and every step's log
(cd /tmp/q && tar czf "$out/quality_results.tgz" quality_*.json log_*.txt work_*/logs 2>/dev/null)
tail -n 3 /tmp/q/log_*.txt
for f in /tmp/q/quality_*.json; do python -P "$repo/bench/quality.py" --table-only --out "$f"; done
