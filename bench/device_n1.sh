#!/bin/bash
# One device call: retune the one-token tier on the Llama layers, merge into the shipped table, end-to-end decode.
set -x
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python bench/layers.py --models llama-7b,llama-3.2-1b --structures blast,monarch --n 1 --no-compile --retune \
  --profile --json $OUT/n1.json --configs $OUT/n1_table.json > $OUT/layers.log 2>&1
tail -25 $OUT/layers.log
python - <<'PY'
import json, os
shipped = "kernels/tables/sm_90.json"
t = json.load(open(shipped)); new = json.load(open(os.environ["OUT"] + "/n1_table.json"))
n = {k: v for k, v in new["entries"].items() if k.endswith("|N1")}
t["entries"].update(n); json.dump(t, open(shipped, "w"), indent=1)
print("merged", len(n), "N1 entries")
PY
cp kernels/tables/sm_90.json $OUT/sm_90.json
for s in blast monarch; do
timeout 200 python -m blrdeploy bench llama-7b --structure $s --modes graph --seq 64 --json -o $OUT/e2e-7b-$s.json > $OUT/e2e-7b-$s.log 2>&1
python -c "import json;d=json.load(open('$OUT/e2e-7b-$s.json'));print('$s', json.dumps(d.get('speedup')))"
done
