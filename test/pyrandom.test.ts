// src/core/pyrandom.ts against CPython: every vector in test/fixtures/pyrandom/vectors.json was
// written by python3 (the command and version are in the file), none by this code.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { PyRandom } from "../src/core/pyrandom.js";
import { repoDir } from "./support/paths.js";

interface Case {
  name: string;
  seed: number;
  result: unknown;
}
const file = path.join(repoDir(), "test", "fixtures", "pyrandom", "vectors.json");
const vectors = JSON.parse(fs.readFileSync(file, "utf8")) as { generated_by: string; python: string; cases: Case[] };
const byName = (name: string): Case => {
  const c = vectors.cases.find((x) => x.name === name);
  assert.ok(c, `no vector "${name}" in ${file}`);
  return c;
};
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

describe("PyRandom reproduces CPython's random module", () => {
  test("the vectors come from python3", () => {
    assert.match(vectors.generated_by, /^python3 scripts\/pyrandom-vectors\.py/);
    assert.match(vectors.python, /^3\./);
    assert.ok(vectors.cases.length >= 25);
  });

  for (const c of vectors.cases.filter((x) => x.name.startsWith("getrandbits32 seed"))) {
    test(`random.seed(${c.seed}); getrandbits(32) × 8`, () => {
      const r = new PyRandom(c.seed);
      assert.deepEqual(range(8).map(() => r.getrandbits(32)), c.result);
    });
  }

  test("getrandbits(k) for k = 1..32 (the top k bits of each output)", () => {
    const r = new PyRandom(42);
    assert.deepEqual(range(32).map((i) => r.getrandbits(i + 1)), byName("getrandbits 1..32 seed 42").result);
  });

  test("random() (53-bit floats, exact)", () => {
    for (const [name, seed, n] of [["random seed 42", 42, 8], ["random seed 2**40-1", 2 ** 40 - 1, 4]] as const) {
      const r = new PyRandom(seed);
      assert.deepEqual(range(n).map(() => r.random()), byName(name).result, name);
    }
  });

  test("randrange(n) / _randbelow, including n = 1, powers of two and 2^32 − 1", () => {
    const r = new PyRandom(42);
    const ns = [1, 2, 3, 7, 8, 1000, 31811, 2 ** 31, 2 ** 32 - 1];
    assert.deepEqual([...ns, ...ns, ...ns].map((n) => r.randrange(n)), byName("randrange seed 42").result);
  });

  for (const [n, k] of [[10, 10], [21, 3], [22, 3], [100, 5], [100, 6], [520, 128], [520, 512], [31811, 128], [31811, 512], [5000, 1000]] as const) {
    test(`sample(range(${n}), ${k}) (${n <= 21 + (k > 5 ? 4 ** Math.ceil(Math.log(3 * k) / Math.log(4)) : 0) ? "pool" : "set"} selection)`, () => {
      assert.deepEqual(new PyRandom(42).sample(range(n), k), byName(`sample range(${n}) k=${k} seed 42`).result);
    });
  }

  test("shuffle", () => {
    assert.deepEqual(new PyRandom(7).shuffle(range(20)), byName("shuffle 20 seed 7").result);
  });

  test("two samples on one stream (the refusal recipe's harmful-then-harmless draw)", () => {
    for (const [nh, nhl, k] of [[520, 31811, 512], [520, 31811, 128], [520, 31811, 12], [20, 30, 12]] as const) {
      const r = new PyRandom(42);
      const got = [r.sample(range(nh), k), r.sample(range(nhl), k)];
      assert.deepEqual(got, byName(`paired draw range(${nh}),${k} then range(${nhl}),${k} seed 42`).result, `${nh}/${nhl}/${k}`);
    }
  });

  test("Python's errors: a sample larger than the population, a non-integer seed", () => {
    assert.throws(() => new PyRandom(1).sample([1, 2, 3], 4), /Sample larger than population/);
    assert.throws(() => new PyRandom(1.5), /must be an integer/);
  });
});
