// The shared flag parsers (core/parse.ts), the seeded integer draws every sampler of folds, splits
// and bootstraps uses (Rng.int / Rng.shuffle), and per-item seeds (core/seed.ts). References: the
// definitions written out independently here (rejection sampling on the same xoshiro stream,
// sha256 of "seed|id"), counts derived by hand, and a chi-square bound for uniformity.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { UsageError } from "../src/core/errors.js";
import { layerAt, layerFractionsOf, parseLayers, parseNumbers } from "../src/core/parse.js";
import { Rng } from "../src/core/rng.js";
import { seedOf } from "../src/core/seed.js";

const usage = (re: RegExp) => (e: unknown) => e instanceof UsageError && re.test((e as Error).message);

describe("parseLayers / parseNumbers", () => {
  test("integers, ranges, fractions of depth (int(n·f), clamped) and all, in the order given", () => {
    assert.deepEqual(parseLayers("37", 62), [37]);
    assert.deepEqual(parseLayers("20,30,40", 62), [20, 30, 40]);
    assert.deepEqual(parseLayers("0.6", 62), [37]); // int(62 · 0.6) = int(37.2)
    assert.deepEqual(parseLayers("1.0", 8), [7]); // int(8) clamped to the last layer
    assert.deepEqual(parseLayers(" 3 , 0.25", 8), [3, 2]);
    assert.deepEqual(parseLayers("5,0-2", 6), [5, 0, 1, 2]);
    assert.deepEqual(parseLayers("all", 3), [0, 1, 2]);
    assert.deepEqual(parseLayers("5,0-2,1", 6, "--layers", { sorted: true }), [0, 1, 2, 5]);
    assert.equal(layerAt(26, 2 / 3), 17); // int(17.33)
    assert.deepEqual(layerFractionsOf("3,0.4,0.8"), [0.4, 0.8]);
    assert.deepEqual(layerFractionsOf("all"), []);
  });

  test("bad specs name the flag, the spec and what to write", () => {
    assert.throws(() => parseLayers("4-9", 6, "--eval-layers"), usage(/^--eval-layers 4-9: layers must lie in 0\.\.5/));
    assert.throws(() => parseLayers("9", 6), usage(/^--layers 9: layers must lie in 0\.\.5/));
    assert.throws(() => parseLayers("3-1", 6), usage(/range 3-1 runs backwards \(write 1-3\)/));
    assert.throws(() => parseLayers("x", 6), usage(/bad layer "x"/));
    assert.throws(() => parseLayers("-1", 6), usage(/bad layer "-1"/));
    assert.throws(() => parseLayers(" , ", 6), usage(/^--layers is empty/));
    assert.deepEqual(parseNumbers("1, 2.5,-4", "--strengths"), [1, 2.5, -4]);
    assert.throws(() => parseNumbers("1,,2", "--strengths"), usage(/^--strengths 1,,2: "" is not a number/));
    assert.throws(() => parseNumbers("1,two", "--strengths"), usage(/"two" is not a number/));
  });
});

describe("Rng.int / Rng.shuffle / seedOf", () => {
  test("int(m) is the unbiased rejection draw on the xoshiro stream: u32 % m, redrawing u32 >= floor(2^32/m)·m", () => {
    for (const m of [1, 2, 3, 7, 1000, 3_000_000_000]) {
      const a = new Rng(99);
      const b = new Rng(99);
      const limit = Math.floor(4294967296 / m) * m;
      for (let i = 0; i < 200; i++) {
        let r = b.nextU32();
        while (r >= limit) r = b.nextU32();
        assert.equal(a.int(m), r % m, `m=${m}, draw ${i}`);
      }
    }
  });

  test("int(6) is uniform (chi-square, 5 dof, 60000 draws, below the 0.999 quantile 20.52)", () => {
    const rng = new Rng(5);
    const counts = new Array<number>(6).fill(0);
    const N = 60000;
    for (let i = 0; i < N; i++) counts[rng.int(6)]!++;
    const chi2 = counts.reduce((s, c) => s + (c - N / 6) ** 2 / (N / 6), 0);
    assert.ok(chi2 < 20.52, `chi2 = ${chi2}`);
  });

  test("shuffle is Fisher–Yates with int(): a permutation, j drawn from 0..i for i = n-1 down to 1", () => {
    const xs = Array.from({ length: 50 }, (_, i) => i);
    const got = new Rng(3).shuffle([...xs]);
    const ref = [...xs];
    const r = new Rng(3);
    for (let i = ref.length - 1; i > 0; i--) {
      const j = r.int(i + 1);
      [ref[i], ref[j]] = [ref[j]!, ref[i]!];
    }
    assert.deepEqual(got, ref);
    assert.deepEqual([...got].sort((a, b) => a - b), xs);
    assert.notDeepEqual(got, xs);
  });

  test("seedOf(seed, id) = the first 4 bytes of sha256(`seed|id`), little-endian", () => {
    for (const [s, id] of [[0, "a"], [1234, "injection|original|L2|s4|apple|n1|#0"]] as const) {
      const d = createHash("sha256").update(`${s}|${id}`).digest();
      assert.equal(seedOf(s, id), d[0]! + d[1]! * 256 + d[2]! * 65536 + d[3]! * 16777216);
    }
  });
});
