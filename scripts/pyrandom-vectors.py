#!/usr/bin/env python3
# Reference vectors for src/core/pyrandom.ts (Python's Mersenne Twister: random.seed(int), getrandbits,
# random, randrange/_randbelow, sample, shuffle), written by the CPython that runs this script.
# Plain python3, no numpy. Regenerate with:
#   python3 scripts/pyrandom-vectors.py > test/fixtures/pyrandom/vectors.json
import json
import random
import sys

cases = []

def case(name, seed, fn):
    random.seed(seed)
    cases.append({"name": name, "seed": seed, "result": fn(random)})

for s in [0, 1, 42, 123456789, 2**32 - 1, 2**32 + 5, 2**40 - 1, 2**53 - 1, -42]:
    case(f"getrandbits32 seed {s}", s, lambda r: [r.getrandbits(32) for _ in range(8)])
case("getrandbits 1..32 seed 42", 42, lambda r: [r.getrandbits(k) for k in range(1, 33)])
case("random seed 42", 42, lambda r: [r.random() for _ in range(8)])
case("random seed 2**40-1", 2**40 - 1, lambda r: [r.random() for _ in range(4)])
case("randrange seed 42", 42, lambda r: [r.randrange(n) for n in [1, 2, 3, 7, 8, 1000, 31811, 2**31, 2**32 - 1] * 3])
# sample: pool path (n <= setsize) and set path (n > setsize), k <= 5 and k > 5.
for (n, k) in [(10, 10), (21, 3), (22, 3), (100, 5), (100, 6), (520, 128), (520, 512), (31811, 128), (31811, 512), (5000, 1000)]:
    case(f"sample range({n}) k={k} seed 42", 42, lambda r, n=n, k=k: r.sample(range(n), k))
case("shuffle 20 seed 7", 7, lambda r: (lambda x: (r.shuffle(x), x)[1])(list(range(20))))
# The refusal recipe's draws: two consecutive samples on one stream (harmful, then harmless).
for (nh, nhl, k) in [(520, 31811, 512), (520, 31811, 128), (520, 31811, 12), (20, 30, 12)]:
    case(f"paired draw range({nh}),{k} then range({nhl}),{k} seed 42", 42, lambda r, nh=nh, nhl=nhl, k=k: [r.sample(range(nh), k), r.sample(range(nhl), k)])

print(json.dumps({
    "generated_by": "python3 scripts/pyrandom-vectors.py > test/fixtures/pyrandom/vectors.json",
    "python": sys.version.split()[0],
    "cases": cases,
}, separators=(",", ":")))
