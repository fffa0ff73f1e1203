#!/usr/bin/env bash
# The first device call of a session (no carry: random weights only), in priority order, each step under its own
# timeout so one hang loses only its step; the whole stays under the 600 s a call may run. Full logs and JSON under
# $OUT; a short table last. Usage, from the repository root on the device:
#   BLRDEPLOY_COMMIT=<sha> bash bench/device_first.sh
# 1. install; 2. the GPU tests of the ops, their backward and heal (#22); 3. heal's step time and peak memory on
# Llama-3.2-1B (#22); 4. host time of one eager layer call (#23); 5. the layer table, eager beside graph (#23).
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || { tail "$out/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
(cd tests && timeout 150 pytest -q -m gpu -p no:cacheprovider structures/test_ops.py structures/test_gradients.py \
  conversion/test_heal.py >"$out/gpu_tests.log" 2>&1)
echo "gpu tests: $(tail -n 1 "$out/gpu_tests.log")"
(cd bench && timeout 150 python heal_step.py --model llama-3.2-1b --structure blast --steps 3 \
  --json "$out/heal_step_blast.json" >"$out/heal_step.log" 2>&1)
echo "heal_step: $(grep -c . "$out/heal_step.log") lines"
(cd bench && timeout 60 python host_time.py --json "$out/host_time.json" >"$out/host_time.log" 2>&1)
(cd bench && timeout 170 python layers.py --models llama-7b,llama-3.2-1b --eager --json "$out/layers.json" \
  >"$out/layers.log" 2>&1)
tail -n 25 "$out/heal_step.log"
tail -n 12 "$out/host_time.log"
tail -n 30 "$out/layers.log"
