#!/bin/bash
# One device call: GPU kernel tests (fused one-token kernel included), the one-token layer bench with the fused
# kernel tuned, merged into the shipped table, then end-to-end decode for Llama-7B and Llama-3.2-1B.
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 300 python -m pytest -m gpu -x -q tests/test_kernels.py > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
timeout 240 python bench/layers.py --models llama-7b,llama-3.2-1b --structures blast --n 1 --no-compile --retune \
  --profile --json $OUT/n1.json --configs $OUT/n1_table.json > $OUT/layers.log 2>&1
tail -10 $OUT/layers.log
python - <<'PY'
import json, os
shipped = "kernels/tables/sm_90.json"
t = json.load(open(shipped)); new = json.load(open(os.environ["OUT"] + "/n1_table.json"))
n = {k: v for k, v in new["entries"].items() if k.startswith("blast_one|")}
t["entries"].update(n); json.dump(t, open(shipped, "w"), indent=1)
print("merged", n)
PY
for m in llama-7b llama-3.2-1b; do
timeout 240 python -m blrdeploy bench $m --modes graph,compile --seq 64 --json -o $OUT/e2e-$m.json > $OUT/e2e-$m.log 2>&1
python -c "
import json;d=json.load(open('$OUT/e2e-$m.json'))
for v in d['variants']:
    print('$m', v['name'], [(x['mode'], round(x['tokens_per_s'],1), x.get('tokens_match_unreplayed')) for x in v['decode']])
print(json.dumps(d['speedup']['decode']))"
done
