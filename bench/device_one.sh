#!/bin/bash
# One device call: joint one-token tuning of BLAST's pair, merged into the shipped table, then end-to-end decode.
for d in kernels exporters validators; do ln -sfn ../$d blrdeploy/$d; done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cd bench && python tune_one.py --json $OUT/tune_one.json --configs $OUT/tune_one_table.json > $OUT/tune_one.log 2>&1; cd ..
tail -12 $OUT/tune_one.log
python - <<'PY'
import json, os
shipped = "kernels/tables/sm_90.json"
t = json.load(open(shipped)); new = json.load(open(os.environ["OUT"] + "/tune_one_table.json"))
t["entries"].update(new["entries"]); json.dump(t, open(shipped, "w"), indent=1)
print("merged", len(new["entries"]))
PY
for m in llama-7b llama-3.2-1b; do
timeout 240 python -m blrdeploy bench $m --modes graph,compile --seq 64 --json -o $OUT/e2e-$m.json > $OUT/e2e-$m.log 2>&1
python -c "
import json;d=json.load(open('$OUT/e2e-$m.json'))
for v in d['variants']:
    print('$m', v['name'], [(x['mode'], round(x['tokens_per_s'],1)) for x in v['decode']])
print(json.dumps(d['speedup']['decode']))"
done
