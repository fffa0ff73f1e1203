#!/bin/bash
# One device call: one-token retune of GPT-2 S's BLAST layers (merged into the shipped table), end-to-end decode
# for the three LLMs, then the kernels' and ops' GPU tests.
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python bench/layers.py --models gpt2-s --structures blast --n 1 --no-compile --retune \
  --json $OUT/gpt2_n1.json --configs $OUT/gpt2_n1_table.json > $OUT/gpt2_layers.log 2>&1
tail -5 $OUT/gpt2_layers.log
python - <<'PY'
import json, os
shipped = "kernels/tables/sm_90.json"
t = json.load(open(shipped)); new = json.load(open(os.environ["OUT"] + "/gpt2_n1_table.json"))
n = {k: v for k, v in new["entries"].items() if k.endswith("|N1")}
t["entries"].update(n); json.dump(t, open(shipped, "w"), indent=1)
cp = os.environ["OUT"] + "/sm_90.json"; json.dump(t, open(cp, "w"), indent=1)
print("merged", len(n))
PY
for m in llama-7b llama-3.2-1b gpt2-s; do
timeout 240 python -m blrdeploy bench $m --modes graph,compile --seq 64 --json -o $OUT/e2e-$m.json > $OUT/e2e-$m.log 2>&1
python -c "
import json;d=json.load(open('$OUT/e2e-$m.json'))
for v in d['variants']:
    print('$m', v['name'], [(x['mode'], round(x['tokens_per_s'],1), x.get('tokens_match_unreplayed')) for x in v['decode']])
print(json.dumps(d['speedup']['decode']))"
done
timeout 300 python -m pytest -m gpu -q tests/test_kernels.py tests/test_ops.py > $OUT/gpu_tests.log 2>&1; tail -4 $OUT/gpu_tests.log
