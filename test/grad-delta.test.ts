// Full-weight deltas (TrainParam kind "delta", src/engine/grad.ts) on both backends (the cpu
// engine and the jax-js engine on wasm): on every
// family fixture, one request carries a random delta on every weight trainableWeights lists
// (embeddings, norms and their biases, q/k/v/o/gate/up/down and their biases, qk-norms,
// post-norms, the final norm, the unembedding; tied embeddings as one weight). The loss must equal
// the float64 oracle (test/support/oracle64.ts) run on W + delta, and sampled coordinates of every
// gradient must match float64 central differences of that oracle with relative error <= 1e-4
// (max |engine - fd| / max |fd| per tensor). The batch is left-padded, with the constant plan of
// test/grad-cpu.test.ts applied, plus a per-head ablation of the last block's attn.hook_result (so
// that block's o projection runs per head, and the first block's as one product). The weights are perturbed in float32 (the oracle reads
// HostTensors), and each difference divides by the perturbation actually stored, so rounding the
// step to float32 costs no accuracy.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FIXTURE_FAMILIES, makeFixtures, type FixtureFamily, type FixturePaths } from "../scripts/make-fixtures.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { initDevice } from "../src/engine/device.js";
import { Engine } from "../src/engine/jax/engine.js";
import { trainableWeights, type LossAndGradRequest, type LossAndGradResult, type TrainParam, type TrainableWeight } from "../src/engine/grad.js";
import type { Plan } from "../src/hooks/plan.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { crossEntropySum, oracleForward, type OracleIntervention } from "./support/oracle64.js";
import { prng } from "./support/prng.js";

const TOL = 1e-4;
const H_FD = 1e-3;
/** Coordinates checked per tensor. */
const COORDS = 3;
/** Absolute error always accepted (see the check). */
const ABS_FLOOR = 1e-8;

const ROWS = [
  [5, 77, 123, 9, 250, 31, 64],
  [200, 17, 99, 140, 8],
];
const TARGETS = [
  [-1, 123, 9, -1, 31, 64, 7],
  [17, -1, 140, 8, 300],
];

function rand(n: number, seed: number, scale: number): Float32Array {
  const u = prng(seed);
  return Float32Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

function constantPlan(host: HostModel): Plan {
  const c = host.config;
  const D = c.dModel;
  const last = c.nLayers - 1;
  return [
    { op: "add", at: "blocks.0.hook_resid_post", vector: rand(D, 11, 0.5), scale: 3, pos: { from: 2 }, rows: [0] },
    { op: "project", at: `blocks.${last}.hook_resid_mid`, direction: rand(D, 12, 1), scale: 0.5 },
    { op: "ablate", at: "blocks.0.attn.hook_z", mode: "zero", heads: [1] },
    { op: "patch", at: `blocks.${last}.ln2.hook_normalized`, source: rand(2 * D, 13, 1), pos: { from: 1, to: 2 }, rows: [1] },
    // Touches attn.hook_result: the last block's o projection runs per head (its own dW_O path).
    { op: "ablate", at: `blocks.${last}.attn.hook_result`, mode: "zero", heads: [0], rows: [0] },
  ];
}

/** The host model with some weights replaced (a fresh object: the oracle caches float64 copies per host). */
function withWeights(host: HostModel, over: Map<string, Float32Array>): HostModel {
  const weights = new Map(host.weights);
  for (const [n, v] of over) weights.set(n, { data: v, shape: host.weights.get(n)!.shape });
  return { ...host, weights };
}

function oracleLoss(host: HostModel, plan: Plan): number {
  let sum = 0, n = 0;
  ROWS.forEach((ids, b) => {
    const { logits } = oracleForward(host, ids, plan as OracleIntervention[], { row: b });
    const r = crossEntropySum(logits, TARGETS[b]!);
    sum += r.sum;
    n += r.n;
  });
  return sum / n;
}

/** Coordinates to check: rows of tokens the batch uses for the embedding tables (other rows have zero gradient). */
function coordsOf(host: HostModel, w: TrainableWeight, seed: number): number[] {
  const u = prng(seed);
  const len = w.shape.reduce((a, b) => a * b, 1);
  const D = host.config.dModel;
  const rowsUsed =
    w.name === "embed.weight"
      ? [...new Set([...ROWS.flat(), ...(host.config.tieEmbeddings ? TARGETS.flat().filter((t) => t >= 0) : [])])]
      : w.name === "unembed.weight"
        ? [...new Set(TARGETS.flat().filter((t) => t >= 0))]
        : w.name === "posEmbed.weight"
          ? Array.from({ length: 7 }, (_, i) => i)
          : null;
  const s = new Set<number>();
  while (s.size < Math.min(COORDS, len)) s.add(rowsUsed ? rowsUsed[Math.floor(u() * rowsUsed.length)]! * D + Math.floor(u() * D) : Math.floor(u() * len));
  return [...s].sort((a, b) => a - b);
}

interface Differentiator {
  lossAndGrad(rows: number[][], req: LossAndGradRequest): Promise<LossAndGradResult>;
}

let dir = "";
let fixtures = new Map<FixtureFamily, FixturePaths>();
before(async () => {
  await initDevice("wasm");
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-grad-delta-"));
  fixtures = new Map(makeFixtures(dir).map((p) => [p.family, p]));
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** The float64 references of one family, shared by both backends. */
interface Reference {
  ws: TrainableWeight[];
  deltas: Float32Array[];
  /** The oracle's loss on W and on W + delta. */
  base: number;
  loss: number;
  /** Per weight: the checked coordinates and the central differences there. */
  fd: { idx: number[]; fd: number[] }[];
}

function reference(host: HostModel, plan: Plan): Reference {
  const ws = trainableWeights(host);
  const deltas = ws.map((w, i) => rand(w.shape.reduce((a, b) => a * b, 1), 100 + i, 0.05));
  const W = new Map(ws.map((w, i) => [w.name, Float32Array.from(host.weights.get(w.name)!.data, (x, j) => x + deltas[i]![j]!)]));
  const hostD = withWeights(host, W);
  const fd = ws.map((w, k) => {
    const cur = W.get(w.name)!;
    const idx = coordsOf(host, w, 200 + k);
    return {
      idx,
      fd: idx.map((i) => {
        const at = (h: number): { loss: number; step: number } => {
          const v = cur.slice();
          v[i] = Math.fround(cur[i]! + h);
          return { loss: oracleLoss(withWeights(hostD, new Map([[w.name, v]])), plan), step: v[i]! - cur[i]! };
        };
        const p = at(H_FD), m = at(-H_FD);
        return (p.loss - m.loss) / (p.step - m.step);
      }),
    };
  });
  return { ws, deltas, base: oracleLoss(host, plan), loss: oracleLoss(hostD, plan), fd };
}

for (const family of FIXTURE_FAMILIES)
  describe(family, () => {
    let host: HostModel;
    let cpu: CpuEngine;
    let jax: Engine;
    let plan: Plan;
    let ref: Reference;
    before(async () => {
      const p = fixtures.get(family)!;
      host = loadHostModel(p.hf);
      cpu = await CpuEngine.create(loadHostModel(p.gguf, undefined, { lazy: true }), { threads: 1 });
      jax = new Engine(host);
      plan = constantPlan(host);
      ref = reference(host, plan);
    });
    after(async () => {
      await cpu?.close();
      jax?.dispose();
    });
    const engine = (backend: "cpu" | "jax"): Differentiator => (backend === "cpu" ? cpu : jax);

    test("trainableWeights lists every weight kind, with the same names and shapes from a lazy GGUF store", () => {
      const names = new Set(ref.ws.map((w) => w.name));
      // Every weight the loader produced is trainable (a tied model has no unembed.weight).
      assert.deepEqual([...names].sort(), [...host.weights.keys()].sort());
      for (const n of ["embed.weight", "lnFinal.weight", "blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight", "blocks.0.attn.o.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"])
        assert.ok(names.has(n), `${n} listed`);
      assert.equal(names.has("unembed.weight"), !host.config.tieEmbeddings);
      assert.equal(names.has("blocks.0.mlp.gate.weight"), host.config.mlp.kind === "gated");
      assert.equal(names.has("posEmbed.weight"), host.config.pos.kind === "learned");
      assert.equal(names.has("blocks.0.attn.qNorm.weight"), host.config.qkNorm.kind !== "none");
      assert.deepEqual(trainableWeights(loadHostModel(fixtures.get(family)!.gguf, undefined, { lazy: true })), ref.ws);
    });

    for (const backend of ["cpu", "jax"] as const)
      test(`${backend}: a delta on every trainable weight: the loss on W + delta and every gradient against float64 finite differences`, async (t) => {
        const eng = engine(backend);
        const { ws, deltas } = ref;
        const params: TrainParam[] = ws.map((w, i) => ({ kind: "delta", name: w.name, value: deltas[i]! }));
        const probe: TrainParam[] = [{ kind: "vector", at: "blocks.0.hook_resid_post", value: new Float32Array(host.config.dModel) }];
        const before0 = await eng.lossAndGrad(ROWS, { targets: TARGETS, params: probe, plan });
        const res = await eng.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
        const after0 = await eng.lossAndGrad(ROWS, { targets: TARGETS, params: probe, plan });
        assert.equal(after0.loss, before0.loss, "the weights are unchanged after a pass with deltas");
        assert.ok(Math.abs(before0.loss - ref.base) / ref.base <= TOL, `loss without deltas ${before0.loss} vs oracle ${ref.base}`);
        assert.ok(Math.abs(res.loss - ref.loss) / Math.abs(ref.loss) <= TOL, `loss ${res.loss} vs oracle on W + delta ${ref.loss}`);
        assert.ok(Math.abs(ref.loss - ref.base) > 10 * TOL * Math.abs(ref.loss), `the deltas change the loss (${ref.base} -> ${ref.loss}), so the forward check is not vacuous`);
        let worst = 0;
        ws.forEach((w, k) => {
          const g = res.grads[k]![0]!;
          assert.equal(g.length, deltas[k]!.length, `${w.name}: gradient length`);
          const { idx, fd } = ref.fd[k]!;
          const got = idx.map((i) => g[i]!);
          const maxFd = Math.max(...fd.map(Math.abs));
          const err = Math.max(...got.map((v, j) => Math.abs(v - fd[j]!)));
          if (maxFd < 1e-9) {
            // Zero in exact arithmetic: a key bias without RoPE shifts all of a query's scores alike.
            assert.ok(err < 1e-6, `${w.name}: expected a zero gradient, got ${got.join(", ")}`);
            return;
          }
          const rel = err / maxFd;
          worst = Math.max(worst, rel);
          // Floor: float32 partial sums of a loss near 3 carry ~1e-9 absolute noise, which matters
          // only for gradients that nearly cancel (a key bias under RoPE: ~1e-5 on qwen2).
          assert.ok(rel <= TOL || err <= ABS_FLOOR, `${w.name} at [${idx.join(", ")}]: relative error ${rel.toExponential(2)} > ${TOL} (engine ${got.map((x) => x.toExponential(4)).join(", ")}; fd ${fd.map((x) => x.toExponential(4)).join(", ")})`);
        });
        t.diagnostic(`${ws.length} weights, largest relative error ${worst.toExponential(2)}`);
      });

    for (const backend of ["cpu", "jax"] as const)
      test(`${backend}: bad deltas: unknown name (the error lists the valid ones), wrong length, two on one weight`, async () => {
        const eng = engine(backend);
        const D = host.config.dModel;
        await assert.rejects(eng.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "delta", name: "blocks.0.attn.qq.weight", value: new Float32Array(1) }] }), /unknown weight "blocks\.0\.attn\.qq\.weight".*lnFinal\.weight/);
        await assert.rejects(eng.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "delta", name: "lnFinal.weight", value: new Float32Array(D + 1) }] }), /expected \d+/);
        const v = new Float32Array(D);
        await assert.rejects(
          eng.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "delta", name: "lnFinal.weight", value: v }, { kind: "delta", name: "lnFinal.weight", value: v }] }),
          /two deltas on one weight/,
        );
        if (host.config.tieEmbeddings) await assert.rejects(eng.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "delta", name: "unembed.weight", value: v }] }), /unknown weight "unembed\.weight"/);
      });
  });
