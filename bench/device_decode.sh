#!/bin/bash
# One device call (see the device tool's README): retune the one-token layers of MODELS, merge them into the shipped
# sm_90 table, then end-to-end decode of each model against dense. Usage: bash bench/device_decode.sh llama-7b gpt2-s
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
models=$(IFS=,; echo "$*")
timeout 300 python bench/layers.py --models "$models" --structures blast --n 1 --no-compile --retune \
  --configs /tmp/n1_table.json > /tmp/n1_layers.log 2>&1
tail -n $(( $# * 4 + 3 )) /tmp/n1_layers.log
python bench/merge_table.py /tmp/n1_table.json --bucket N1
for m in "$@"; do
  timeout 240 python -m blrdeploy bench "$m" --modes graph,compile --seq 64 --json -o "$OUT/e2e-$m.json" > /dev/null 2>&1
  python -c "
import json; d = json.load(open('$OUT/e2e-$m.json'))
for v in d['variants']:
    print('$m', v['name'], [(x['mode'], round(x['tokens_per_s'], 1), x.get('tokens_match_unreplayed')) for x in v['decode']])"
done
