#!/bin/bash
# One device call: one-token retune of GPT-2 S's BLAST layers (its table printed), then the bench and bundle GPU
# tests. Prints only: few files come back.
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python bench/layers.py --models gpt2-s --structures blast --n 1 --no-compile --retune \
  --configs /tmp/gpt2_n1_table.json > /tmp/gpt2_layers.log 2>&1
tail -4 /tmp/gpt2_layers.log
python -c "
import json; t = json.load(open('/tmp/gpt2_n1_table.json'))
print('TABLE', json.dumps({k: v for k, v in t['entries'].items() if k.endswith('|N1')}))"
timeout 420 python -m pytest -m gpu -q -x tests/test_bench.py tests/test_bundle.py > /tmp/gpu_tests.log 2>&1
tail -4 /tmp/gpu_tests.log
