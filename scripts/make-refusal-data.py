#!/usr/bin/env python3
# Writes the refusal recipe's shipped prompt data from the paper's lists (experiments/refusal_prompts.py of
# safety-research/introspection-mechanisms, extracted to refusal_prompts.json):
#   data/protocol/refusal_harmful.json       all 520 harmful prompts (AdvBench harmful_behaviors, MIT)
#   data/protocol/refusal_harmless_512.json  the paper's 512-prompt harmless draw only (Alpaca-derived, CC BY-NC 4.0)
# The draw is the paper's (03d): random.seed(42); random.sample(HARMFUL, 512); random.sample(HARMLESS, 512).
# Run from the repository root:
#   python3 scripts/make-refusal-data.py PATH/refusal_prompts.json
import hashlib
import json
import random
import sys

src = sys.argv[1]
raw = open(src, "rb").read()
doc = json.loads(raw)
H, HL = doc["harmful"], doc["harmless"]
sha = hashlib.sha256(raw).hexdigest()
N = 512
random.seed(42)
h_idx = random.sample(range(len(H)), N)
hl_idx = random.sample(range(len(HL)), N)
# random.sample(xs, n) picks the same positions as random.sample(range(len(xs)), n).
random.seed(42)
assert random.sample(H, N) == [H[i] for i in h_idx]
assert random.sample(HL, N) == [HL[i] for i in hl_idx]

origin = "safety-research/introspection-mechanisms@5d5d9b4:experiments/refusal_prompts.py"
generated_by = "python3 scripts/make-refusal-data.py PATH/refusal_prompts.json (the paper's lists with the sha256 in source)"
harmful = {
    "description": "The paper's harmful instructions, all 520, in the paper's order (HARMFUL_PROMPTS). The refusal recipe draws from them with Python's random.seed(42); random.sample(list, n) (src/core/pyrandom.ts).",
    "source": f"{origin} HARMFUL_PROMPTS (extracted copy: refusal_prompts.json, sha256 {sha})",
    "origin": "AdvBench harmful_behaviors.csv, column 'goal' (Zou et al. 2023, https://github.com/llm-attacks/llm-attacks/blob/main/data/advbench/harmful_behaviors.csv); the paper's repo does not name it, but its 520 rows match AdvBench's count and its first rows match AdvBench's first rows",
    "licence": "MIT",
    "licence_notice": "MIT License. Copyright (c) 2023 Andy Zou (https://github.com/llm-attacks/llm-attacks/blob/main/LICENSE). Full text in data/protocol/REFUSAL_PROMPTS.md.",
    "generated_by": generated_by,
    "count": len(H),
    "prompts": H,
}
harmless = {
    "description": "The paper's 512-prompt harmless draw (03d, n_instructions = 512), in drawn order: the second call of random.seed(42); random.sample(HARMFUL, 512); random.sample(HARMLESS, 512). Only this draw is shipped, not the 31,811-prompt list.",
    "source": f"{origin} HARMLESS_PROMPTS (extracted copy: refusal_prompts.json, sha256 {sha})",
    "origin": "Stanford Alpaca instructions (Taori et al. 2023, https://github.com/tatsu-lab/stanford_alpaca), as far as can be told: the paper's repo does not name it, and its list begins with Alpaca's first instructions",
    "licence": "CC BY-NC 4.0",
    "licence_notice": "NOT covered by selfscope's MIT licence. Stanford Alpaca's data is released under CC BY-NC 4.0 (https://creativecommons.org/licenses/by-nc/4.0/): non-commercial use only, with attribution. This file is an unmodified excerpt (512 of the paper's 31,811 instructions). For other uses pass your own file with --harmless FILE. See data/protocol/REFUSAL_PROMPTS.md.",
    "generated_by": generated_by,
    "draw": {
        "python": "random.seed(42); harmful = random.sample(HARMFUL, 512); harmless = random.sample(HARMLESS, 512)",
        "seed": 42,
        "n": N,
        "population": len(HL),
        "population_unique": len(set(HL)),
    },
    "indices": hl_idx,
    "prompts": [HL[i] for i in hl_idx],
}
for path, d in [("data/protocol/refusal_harmful.json", harmful), ("data/protocol/refusal_harmless_512.json", harmless)]:
    with open(path, "w") as f:
        json.dump(d, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}")
# For the tests: the paper's draws' first and last items (committed in test/fixtures/pyrandom/refusal-draw.json).
with open("test/fixtures/pyrandom/refusal-draw.json", "w") as f:
    json.dump({
        "generated_by": generated_by,
        "source_sha256": sha,
        "harmful_indices": h_idx,
        "harmful_first": H[h_idx[0]], "harmful_last": H[h_idx[-1]],
        "harmless_first": HL[hl_idx[0]], "harmless_last": HL[hl_idx[-1]],
    }, f, indent=1, ensure_ascii=False)
    f.write("\n")
print("wrote test/fixtures/pyrandom/refusal-draw.json")
