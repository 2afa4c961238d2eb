// SelfIE adapters (src/recipes/selfie.ts) on the bundled stories260K: the adapter's gradients
// (s, b, W) against float64 central differences of the float64 oracle's loss (relative error
// ≤ 1e-4), the error paths, and held-out topic recall of a trained scalar-affine adapter against
// its untrained (s = 1, b = 0) and label-shuffled baselines.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { BUNDLED_MODEL } from "../src/index.js";
import { Model } from "../src/model/model.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import { conceptVectors } from "../src/vectors/extract.js";
import {
  adapt64, adapterLossAndGrad, flatParams, identityAdapter, labelRow, loadAdapter, renderTemplate, saveAdapter, shuffleLabels, trainAdapter,
  type Adapter, type Example,
} from "../src/recipes/selfie.js";
import { evalRecall, readVectorFile, SELFIE_RECIPE } from "../src/recipes/selfie-cli.js";
import { crossEntropySum, oracleForward, type OracleIntervention } from "./support/oracle64.js";
import { prng } from "./support/prng.js";

const TEMPLATE = "Lily saw a <v>. Lily saw a {word}";
/** Two placeholders, so the gradient check covers the sum over injection sites. */
const GRAD_TEMPLATE = "Lily saw a <v> and a <v>. Lily saw a {word}";
let model: Model;
let host: HostModel;
let dir = "";
before(async () => {
  model = await Model.load(BUNDLED_MODEL, { threads: 1 });
  host = loadHostModel(BUNDLED_MODEL);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-selfie-"));
});
after(() => {
  model?.dispose();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function rand(n: number, seed: number, scale: number): Float64Array {
  const u = prng(seed);
  return Float64Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

describe("gradients vs float64 finite differences", () => {
  /** The oracle's mean cross-entropy of the label tokens, with e = adapter(v) in place of the placeholder's embedding. */
  function oracleLoss(a: Adapter, ex: readonly { v: Float64Array; label: string }[]): number {
    const p = renderTemplate(model, GRAD_TEMPLATE);
    let sum = 0, n = 0;
    for (const { v, label } of ex) {
      const r = labelRow(model, p, label);
      const plan: OracleIntervention[] = p.positions.flatMap((q): OracleIntervention[] => [
        { op: "ablate", at: "hook_embed", mode: "zero", pos: { from: q, to: q + 1 } },
        { op: "add", at: "hook_embed", vector: adapt64(a, v), pos: { from: q, to: q + 1 } },
      ]);
      const c = crossEntropySum(oracleForward(host, r.ids, plan).logits, r.targets);
      sum += c.sum;
      n += c.n;
    }
    return sum / n;
  }

  for (const kind of ["scalar", "full"] as const)
    test(`${kind} adapter: loss and dLoss/d(${kind === "scalar" ? "s, b" : "W, b"})`, async () => {
      const d = model.config.dModel;
      const a = identityAdapter(kind, d);
      a.b.set(rand(d, 3, 0.5));
      if (kind === "scalar") a.s[0] = 1.7;
      else a.W.set(rand(d * d, 4, 0.2));
      // Two examples of different label lengths, in one padded batch.
      const ex = [{ v: rand(d, 5, 1), label: "cat" }, { v: rand(d, 6, 1), label: "flower" }];
      // The engine takes float32 vectors: round them first, so both sides see the same input.
      ex.forEach((e) => e.v.set(Float32Array.from(e.v)));
      const p = renderTemplate(model, GRAD_TEMPLATE);
      const res = await adapterLossAndGrad(model, a, p, ex.map((e) => ({ vector: Float32Array.from(e.v), label: e.label })));
      const ref = oracleLoss(a, ex);
      assert.ok(Math.abs(res.loss - ref) / ref <= 1e-4, `loss ${res.loss} vs oracle ${ref}`);
      const flat = flatParams(a);
      const u = prng(7);
      const idx = [0, ...Array.from({ length: 10 }, () => Math.floor(u() * flat.length)), flat.length - 1];
      const h = 1e-4;
      const fd = idx.map((i) => {
        const at = (x: number) => {
          const b = identityAdapter(kind, d);
          const f = flatParams(a);
          f[i] = x;
          (kind === "scalar" ? b.s : b.W).set(f.subarray(0, kind === "scalar" ? 1 : d * d));
          b.b.set(f.subarray(kind === "scalar" ? 1 : d * d));
          return oracleLoss(b, ex);
        };
        return (at(flat[i]! + h) - at(flat[i]! - h)) / (2 * h);
      });
      const got = idx.map((i) => res.grad[i]!);
      const err = Math.max(...got.map((g, j) => Math.abs(g - fd[j]!))) / Math.max(...fd.map(Math.abs));
      assert.ok(fd.some((x) => x !== 0), "finite differences all zero (vacuous)");
      assert.ok(err <= 1e-4, `relative error ${err.toExponential(2)} > 1e-4 (engine ${got.slice(0, 3)}, fd ${fd.slice(0, 3)})`);
    });
});

describe("error paths", () => {
  test("templates without exactly one <v> before one {word}", () => {
    assert.throws(() => renderTemplate(model, "no placeholder {word}"), /--template .*needs one or more <v>/);
    assert.throws(() => renderTemplate(model, "<v> {word} then <v>"), /needs one or more <v>/);
    assert.throws(() => renderTemplate(model, "<v> {word} {word}"), /before exactly one \{word\}/);
    assert.deepEqual(renderTemplate(model, "A <v> and a <v>. A {word}").positions.length, 2);
  });

  test("adapter files: missing, not an adapter, another model, another layer, wrong d", () => {
    const a = identityAdapter("scalar", model.config.dModel);
    const good = path.join(dir, "good.safetensors");
    const meta = { kind: "scalar" as const, layer: 1, model: model.weightsHash(), template: TEMPLATE, vectorRecipe: JSON.stringify(SELFIE_RECIPE) };
    saveAdapter(good, a, meta);
    assert.equal(loadAdapter(good, model, { layer: 1 }).meta.layer, 1);
    assert.throws(() => loadAdapter(path.join(dir, "none.safetensors"), model), /none\.safetensors does not exist/);
    const other = path.join(dir, "other.safetensors");
    saveAdapter(other, a, { ...meta, model: "0".repeat(64) });
    assert.throws(() => loadAdapter(other, model), /other\.safetensors was trained on another model/);
    assert.throws(() => loadAdapter(good, model, { layer: 3 }), /good\.safetensors was trained on layer 1 vectors, not layer 3/);
    const plain = path.join(dir, "plain.safetensors");
    writeSafetensors(plain, { x: { data: new Float32Array(4), shape: [4] } });
    assert.throws(() => loadAdapter(plain, model), /plain\.safetensors is not a SelfIE adapter/);
    const wrongD = path.join(dir, "wrongd.safetensors");
    saveAdapter(wrongD, identityAdapter("scalar", 8), meta);
    assert.throws(() => loadAdapter(wrongD, model), /wrongd\.safetensors: tensor shapes do not fit d_model 64/);
    assert.throws(() => readVectorFile(plain, 64), /plain\.safetensors has 4 values; the model's d_model is 64/);
    // A version-1 .npy of 64 float32 values reads back exactly; a wrong dtype is an error naming the file.
    const npy = (descr: string, body: Buffer) => {
      let h = `{'descr': '${descr}', 'fortran_order': False, 'shape': (64,), }`;
      h += " ".repeat(63 - ((10 + h.length) % 64)) + "\n";
      const len = Buffer.alloc(2);
      len.writeUInt16LE(h.length);
      return Buffer.concat([Buffer.from("\x93NUMPY\x01\x00", "latin1"), len, Buffer.from(h, "latin1"), body]);
    };
    const want = Float32Array.from({ length: 64 }, (_, i) => i / 7 - 3);
    fs.writeFileSync(path.join(dir, "v.npy"), npy("<f4", Buffer.from(want.buffer)));
    assert.deepEqual(readVectorFile(path.join(dir, "v.npy"), 64), want);
    fs.writeFileSync(path.join(dir, "i.npy"), npy("<i4", Buffer.alloc(256)));
    assert.throws(() => readVectorFile(path.join(dir, "i.npy"), 64), /i\.npy: dtype .* is not <f4 or <f8/);
  });
});

// 45 simple TinyStories nouns: 26 to train on, 19 held out. Recall is ranked among the 19 held-out
// labels, so chance recall@1 is 1/19 ≈ 0.053 (expected 1 hit of 19).
const TRAIN = "cat dog ball tree sun girl boy bird cake park fish car hat box flower apple toy mom dad friend house book door water bed sky".split(" ");
const HELD = "rain cookie doll bear duck frog garden school truck boat kite shoe cup milk moon star egg bunny horse".split(" ");
const LAYER = 1;

describe("held-out topic recall", () => {
  // Measured on this commit (docs/selfie.md): trained 3/19, untrained 2/19, label-shuffled 3/19 —
  // below the margin this test asks for, so it is marked todo (it runs and reports, and fails
  // honestly) until a template/layer/vector recipe is found that stories260K can decode.
  test("a trained scalar-affine adapter beats the untrained and label-shuffled baselines by ≥ 3 of 19 held-out words", { todo: "stories260K: measured trained 3/19, untrained 2/19, shuffled 3/19 (docs/selfie.md)" }, async (t) => {
    const baselineWords = "the a and is was it he she they to".split(" ");
    const vs = (await conceptVectors(model, { concepts: [...TRAIN, ...HELD], baselineWords, layers: [LAYER], recipe: SELFIE_RECIPE, cacheDir: null })).vectors.get(LAYER)!;
    const data: Example[] = TRAIN.map((w) => ({ vector: vs.get(w)!, label: w }));
    const p = renderTemplate(model, TEMPLATE);
    const o = { steps: 100, lr: 0.1, batchSize: 8, seed: 1 };
    const trained = (await trainAdapter(model, "scalar", p, data, o)).adapter;
    const shuffled = (await trainAdapter(model, "scalar", p, shuffleLabels(data, 2), o)).adapter;
    const r = {
      trained: await evalRecall(model, trained, p, vs, HELD),
      untrained: await evalRecall(model, identityAdapter("scalar", model.config.dModel), p, vs, HELD),
      shuffled: await evalRecall(model, shuffled, p, vs, HELD),
    };
    t.diagnostic(Object.entries(r).map(([k, e]) => `${k} ${e.recall1.hits}/${e.recall1.n} @5 ${e.recall5.hits}`).join("; "));
    // Margin 3 hits over the better baseline and at least 4 hits: P(≥ 4 of 19 at chance 1/19) ≈ 0.015.
    assert.ok(r.trained.recall1.hits >= 4, `trained recall@1 ${r.trained.recall1.hits}/19`);
    assert.ok(r.trained.recall1.hits >= Math.max(r.untrained.recall1.hits, r.shuffled.recall1.hits) + 3, JSON.stringify(Object.fromEntries(Object.entries(r).map(([k, e]) => [k, e.recall1.hits]))));
  });
});
