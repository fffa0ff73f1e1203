#!/bin/bash
# One device call: the kernels' GPU tests (every config at N = 1, 16, 1000; dependent-launch chain), then where a
# Llama-7B decode step's time goes, dense vs BLAST, with and without chaining layers by dependent launch.
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 300 python -m pytest -m gpu -x -q tests/test_kernels.py > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
cd bench && timeout 420 python decode_profile.py --model llama-7b --chain-ab --json $OUT/profile.json > $OUT/profile.log 2>&1
tail -8 $OUT/profile.log
