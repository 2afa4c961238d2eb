# Independent references from Hugging Face transformers (PyTorch), for tests that must not trust selfscope's own code:
#   1. the MLP down-projection output (selfscope's blocks.{i}.mlp.hook_down: before any post-MLP norm) and the MLP's
#      contribution to the residual stream (hook_mlp_out), read with torch forward hooks in float64 on the synthetic
#      family fixtures of scripts/make-fixtures.ts, plus the logits after adding a vector at the down-projection output;
#   2. how `generate` merges a checkpoint's generation_config.json with the arguments the paper's code passes (issue 12
#      §2): the effective sampling config and logits processors HF builds, or the error it raises.
# Run where torch + transformers exist (no network needed):
#   node dist/scripts/make-fixtures.js FX gemma2 gemma3 olmo2 qwen3 llama
#   python3 scripts/hf-reference.py FX test/fixtures/models/tiny-random-gpt2 OUT
# Writes OUT/hf-<family>.f32, OUT/hf-families.json (their index) and OUT/hf-generate-config.json; tests read them from test/fixtures/hf-reference.
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

fx_dir, gpt2_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out_dir, exist_ok=True)
IDS = [5, 17, 33, 101, 7, 250, 64, 12, 3, 199]
ADD_FROM, ADD_SCALE = 3, 4.0
# Post-MLP norms by family: hook_mlp_out is their output; hook_down the down projection's.
POST_MLP_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3": "post_feedforward_layernorm", "olmo2": "post_feedforward_layernorm"}


def vector(d):
    # Reproducible in TypeScript: v[j] = 0.5 * sin(j + 1).
    return torch.tensor([0.5 * math.sin(j + 1) for j in range(d)], dtype=torch.float64)


def family_reference(family):
    path = tempfile.mkdtemp()
    shutil.copytree(os.path.join(fx_dir, family, "hf"), path, dirs_exist_ok=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    # transformers 5 types these as float and rejects the fixture's integer 3.
    for k in ("final_logit_softcapping", "attn_logit_softcapping"):
        if isinstance(cfg.get(k), int):
            cfg[k] = float(cfg[k])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    layers = model.model.layers
    n, d = len(layers), model.config.hidden_size
    reads, handles = {}, []

    def keep(name):
        def hook(_mod, _inp, out):
            reads[name] = (out[0] if isinstance(out, tuple) else out).detach()[0].clone()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_hook(keep(f"blocks.{i}.mlp.hook_down")))
        post = POST_MLP_NORM.get(family)
        src = getattr(layer, post) if post else layer.mlp
        handles.append(src.register_forward_hook(keep(f"blocks.{i}.hook_mlp_out")))
    ids = torch.tensor([IDS])
    with torch.no_grad():
        clean = model(ids).logits[0]
    for h in handles:
        h.remove()
    layer = n // 2
    v = vector(d)

    def add(_mod, _inp, out):
        out = out.clone()
        out[0, ADD_FROM:] += ADD_SCALE * v
        return out

    h = layers[layer].mlp.down_proj.register_forward_hook(add)
    with torch.no_grad():
        steered = model(ids).logits[0]
    h.remove()
    names = sorted(reads, key=lambda s: (int(s.split(".")[1]), s))
    blobs, index, off = [], {}, 0
    for name, arr in [*((k, reads[k]) for k in names), ("logits", clean), ("logits_steered", steered)]:
        a = arr.numpy().astype(np.float32)
        index[name] = {"offset": off, "shape": list(a.shape)}
        blobs.append(a.tobytes())
        off += a.size
    with open(os.path.join(out_dir, f"hf-{family}.f32"), "wb") as f:
        f.write(b"".join(blobs))
    meta = {
        "source": f"scripts/hf-reference.py, transformers {transformers.__version__}, torch {torch.__version__}, float64 compute, stored as float32 LE",
        "family": family,
        "ids": IDS,
        "add": {"at": f"blocks.{layer}.mlp.hook_down", "from": ADD_FROM, "scale": ADD_SCALE, "vector": "0.5*sin(j+1)"},
        "tensors": index,
    }
    print(family, "layers", n, "tensors", len(index))
    return meta


def generate_config_table():
    # The generation_config.json a checkpoint might ship, and the kwargs a caller passes to generate().
    configs = {
        "gemma3_it": {"do_sample": True, "top_k": 64, "top_p": 0.95},
        "top_k_1": {"do_sample": True, "top_k": 1},
        "sampling_t07": {"do_sample": True, "temperature": 0.7, "top_p": 0.9},
        "plain": {},
    }
    calls = {
        "paper_T1": {"do_sample": True, "temperature": 1.0},
        "paper_T05": {"do_sample": True, "temperature": 0.5},
        "paper_T0": {},
        "temperature_1_only": {"temperature": 1.0},
        "temperature_0_only": {"temperature": 0.0},
        "do_sample_false": {"do_sample": False},
        "greedy_explicit_T0": {"do_sample": False, "temperature": 0.0},
    }
    rows = []
    for cname, cfg in configs.items():
        tmp = tempfile.mkdtemp()
        shutil.copytree(gpt2_dir, tmp, dirs_exist_ok=True)
        with open(os.path.join(gpt2_dir, "generation_config.json")) as f:
            base = json.load(f)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({**base, **cfg}, f)
        model = AutoModelForCausalLM.from_pretrained(tmp).eval()
        for kname, kw in calls.items():
            seen = {}
            orig = model._get_logits_processor

            def spy(*a, _orig=orig, _seen=seen, **k):
                lp = _orig(*a, **k)
                gc = k.get("generation_config", a[0] if a else None)
                _seen["do_sample"] = bool(getattr(gc, "do_sample", None))
                _seen["config_temperature"] = getattr(gc, "temperature", None)
                _seen["processors"] = [
                    {"name": type(p).__name__, **{x: float(getattr(p, x)) for x in ("temperature", "top_k", "top_p", "min_p") if hasattr(p, x)}}
                    for p in lp
                ]
                return lp

            model._get_logits_processor = spy
            row = {"generation_config": cfg, "generate_kwargs": kw}
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    tokens = set()
                    for seed in range(20):
                        torch.manual_seed(seed)
                        r = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, pad_token_id=98, output_scores=True,
                                           output_logits=True, return_dict_in_generate=True, **kw)
                        tokens.add(int(r.sequences[0, -1]))
                    scores, logits = r.scores[0][0], r.logits[0][0]
                    fin = torch.isfinite(scores)
                    row.update(seen)
                    row["behaviour"] = {
                        "finite_scores": int(fin.sum()),
                        "score_over_logit": float((scores[fin] / logits[fin]).median()),
                        "distinct_tokens_20_seeds": len(tokens),
                        "argmax_token": int(logits.argmax()),
                    }
                except Exception as e:  # the table records HF's refusal as the reference
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["warnings"] = [str(x.message)[:200] for x in w]
            model._get_logits_processor = orig
            rows.append({"config": cname, "call": kname, **row})
        shutil.rmtree(tmp)
    with open(os.path.join(out_dir, "hf-generate-config.json"), "w") as f:
        json.dump({"source": f"scripts/hf-reference.py, transformers {transformers.__version__}", "rows": rows}, f, indent=1)
    print("generate table rows", len(rows))


print("transformers", transformers.__version__, "torch", torch.__version__)
metas = {}
for fam in ["llama", "qwen3", "gemma2", "gemma3", "olmo2"]:
    try:
        metas[fam] = family_reference(fam)
    except Exception as e:  # keep going: one family's failure must not lose the others
        print("FAILED", fam, type(e).__name__, e)
with open(os.path.join(out_dir, "hf-families.json"), "w") as f:
    json.dump(metas, f, indent=1)
generate_config_table()
