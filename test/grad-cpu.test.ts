// Gradients and forward-mode derivatives on the cpu device (CpuEngine.lossAndGrad / jvpScale,
// src/engine/grad.ts) against float64 central finite differences of the float64 oracle
// (test/support/oracle64.ts), on every family fixture: a trained vector, a trained scale, a
// low-rank adapter on every linear layer kind, activations at sites of every shape, and the
// derivative of reads with respect to an intervention's scale. Each request runs a left-padded
// batch of two rows with a plan of constant interventions (add, weighted project, per-head
// ablate, patch), so the site ops' derivatives are in every check. Tolerance: the issue's 1e-4
// relative error (max |engine - fd| / max |fd| over the checked coordinates).
import { after, afterEach, before, beforeEach, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FIXTURE_FAMILIES, makeFixtures, type FixtureFamily, type FixturePaths } from "../scripts/make-fixtures.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import type { LinearName, TrainParam } from "../src/engine/grad.js";
import type { Intervention, Plan } from "../src/hooks/plan.js";
import type { HookName } from "../src/hooks/names.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { crossEntropySum, oracleFeatShape, oracleForward, type OracleIntervention, type OracleLora } from "./support/oracle64.js";
import { prng } from "./support/prng.js";

const TOL = 1e-4;
const H_FD = 1e-4;
/** Coordinates checked per array (all when fewer). */
const COORDS = 24;

const ROWS = [
  [5, 77, 123, 9, 250, 31, 64],
  [200, 17, 99, 140, 8],
];
/** Next-token style targets on some positions of each row (-1: no loss there). */
const TARGETS = [
  [-1, 123, 9, -1, 31, 64, 7],
  [17, -1, 140, 8, 300],
];

function rand(n: number, seed: number, scale: number): Float32Array {
  const u = prng(seed);
  return Float32Array.from({ length: n }, () => (u() * 2 - 1) * scale);
}

/** `n` distinct coordinates of an array of `len` (all of them when len <= n). */
function coords(len: number, n: number, seed: number): number[] {
  if (len <= n) return Array.from({ length: len }, (_, i) => i);
  const u = prng(seed);
  const s = new Set<number>();
  while (s.size < n) s.add(Math.floor(u() * len));
  return [...s].sort((a, b) => a - b);
}

function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0, m = 0;
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i]! - b[i]!));
    m = Math.max(m, Math.abs(b[i]!));
  }
  return Number.isNaN(d) ? NaN : d / m;
}

/** Relative errors seen by the running test (reported as its diagnostic). */
const seen: number[] = [];

function close(a: ArrayLike<number>, b: ArrayLike<number>, what: string, tol = TOL): void {
  assert.equal(a.length, b.length, `${what}: lengths`);
  const e = relErr(a, b);
  seen.push(e);
  assert.ok(e <= tol, `${what}: relative error ${e.toExponential(2)} > ${tol} (max |fd| ${Math.max(...Array.from(b, Math.abs)).toExponential(2)})`);
  assert.ok(Array.from(b).some((v) => v !== 0), `${what}: the finite differences are all zero (a vacuous check)`);
}

/** The constant plan every request carries: an injection on row 0, a weighted projection, a per-head ablation and a patch on row 1. */
function constantPlan(host: HostModel): Plan {
  const c = host.config;
  const D = c.dModel;
  const last = c.nLayers - 1;
  return [
    { op: "add", at: "blocks.0.hook_resid_post", vector: rand(D, 11, 0.5), scale: 3, pos: { from: 2 }, rows: [0] },
    { op: "project", at: `blocks.${last}.hook_resid_mid`, direction: rand(D, 12, 1), scale: 0.5 },
    { op: "ablate", at: "blocks.0.attn.hook_z", mode: "zero", heads: [1] },
    { op: "patch", at: `blocks.${last}.ln2.hook_normalized`, source: rand(2 * D, 13, 1), pos: { from: 1, to: 2 }, rows: [1] },
  ];
}

/** The float64 loss (mean cross-entropy over every target of both rows) with extra ops and adapters. */
function oracleLoss(host: HostModel, plan: readonly OracleIntervention[], lora: readonly OracleLora[] = []): number {
  let sum = 0, n = 0;
  ROWS.forEach((ids, b) => {
    const { logits } = oracleForward(host, ids, plan, { row: b, lora });
    const r = crossEntropySum(logits, TARGETS[b]!);
    sum += r.sum;
    n += r.n;
  });
  return sum / n;
}

/** Central difference of f at 0 (f takes the perturbation). */
const fd = (f: (h: number) => number): number => (f(H_FD) - f(-H_FD)) / (2 * H_FD);

/** The LoRA layers of a family: every linear kind it has, spread over its layers. */
function loraLinears(host: HostModel): LinearName[] {
  const all: LinearName[] = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"];
  return all.filter((l) => l !== "mlp.gate" || host.config.mlp.kind === "gated");
}

function loraShape(host: HostModel, linear: LinearName): { in: number; out: number } {
  const c = host.config;
  const q = c.nHeads * c.dHead, kv = c.nKvHeads * c.dHead;
  switch (linear) {
    case "attn.q":
      return { in: c.dModel, out: q };
    case "attn.k":
    case "attn.v":
      return { in: c.dModel, out: kv };
    case "attn.o":
      return { in: q, out: c.dModel };
    case "mlp.gate":
    case "mlp.up":
      return { in: c.dModel, out: c.dMlp };
    case "mlp.down":
      return { in: c.dMlp, out: c.dModel };
  }
}

let dir = "";
let fixtures = new Map<FixtureFamily, FixturePaths>();
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-grad-cpu-"));
  fixtures = new Map(makeFixtures(dir).map((p) => [p.family, p]));
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

for (const family of FIXTURE_FAMILIES)
  describe(family, () => {
    let host: HostModel;
    let cpu: CpuEngine;
    let plan: Plan;
    before(async () => {
      const p = fixtures.get(family)!;
      host = loadHostModel(p.hf);
      cpu = await CpuEngine.create(loadHostModel(p.gguf, undefined, { lazy: true }), { threads: 2 });
      plan = constantPlan(host);
    });
    after(async () => {
      await cpu?.close();
    });
    beforeEach(() => {
      seen.length = 0;
    });
    afterEach((t) => {
      if (seen.length && "diagnostic" in t) t.diagnostic(`largest relative error ${Math.max(...seen).toExponential(2)} over ${seen.length} checks`);
    });

    test("trained vector (mlp.hook_down, from position 2) and trained scale (ln2.hook_normalized): loss and gradients", async () => {
      const c = host.config;
      const L = Math.min(1, c.nLayers - 1);
      const D = c.dModel;
      const vAt: HookName = `blocks.${L}.mlp.hook_down`;
      const sAt: HookName = `blocks.0.ln2.hook_normalized`;
      const value = rand(D, 21, 0.3), dir = rand(D, 22, 0.5), s0 = 1.5;
      const params: TrainParam[] = [
        { kind: "vector", at: vAt, pos: { from: 2 }, value },
        { kind: "scale", at: sAt, vector: dir, value: s0, rows: [1] },
      ];
      const res = await cpu.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      const ops = (v: ArrayLike<number>, s: number): OracleIntervention[] => [
        ...(plan as OracleIntervention[]),
        { op: "add", at: vAt, pos: { from: 2 }, vector: v },
        { op: "add", at: sAt, vector: dir, scale: s, rows: [1] },
      ];
      const v64 = Float64Array.from(value);
      close([res.loss], [oracleLoss(host, ops(v64, s0))], "loss");
      const idx = coords(D, COORDS, 23);
      const ref = idx.map((i) => fd((h) => oracleLoss(host, ops(v64.map((x, j) => (j === i ? x + h : x)), s0))));
      close(idx.map((i) => res.grads[0]![0]![i]!), ref, "vector gradient");
      close([res.grads[1]![0]![0]!], [fd((h) => oracleLoss(host, ops(v64, s0 + h)))], "scale gradient");
    });

    test("low-rank adapters on every linear layer kind: dA and dB", async () => {
      const c = host.config;
      const rank = 2;
      const lin = loraLinears(host);
      const lora = lin.map((linear, i): OracleLora & { a: Float32Array; b: Float32Array } => {
        const s = loraShape(host, linear);
        return { layer: i % c.nLayers, linear, rank, scale: 0.5, a: rand(rank * s.in, 31 + i, 0.3), b: rand(s.out * rank, 41 + i, 0.3) };
      });
      const params: TrainParam[] = lora.map((l) => ({ kind: "lora", layer: l.layer, linear: l.linear, a: l.a, b: l.b, rank, scale: 0.5 }));
      const res = await cpu.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      const base = lora.map((l) => ({ ...l, a: Float64Array.from(l.a), b: Float64Array.from(l.b) }));
      close([res.loss], [oracleLoss(host, plan as OracleIntervention[], base)], "loss");
      lora.forEach((l, k) => {
        for (const which of ["a", "b"] as const) {
          const arr = base[k]![which];
          const idx = coords(arr.length, COORDS / 2, 51 + k);
          const ref = idx.map((i) =>
            fd((h) => oracleLoss(host, plan as OracleIntervention[], base.map((m, j) => (j === k ? { ...m, [which]: arr.map((x, e) => (e === i ? x + h : x)) } : m)))),
          );
          close(idx.map((i) => res.grads[k]![which === "a" ? 0 : 1]![i]!), ref, `${l.linear} (layer ${l.layer}) d${which.toUpperCase()}`);
        }
      });
    });

    test("a low-rank adapter on attn.o through the per-head path (attn.hook_result touched): dA, dB and the result's gradient", async () => {
      const c = host.config;
      const L = c.nLayers - 1;
      const rank = 2;
      const s = loraShape(host, "attn.o");
      const l = { layer: L, linear: "attn.o" as const, rank, scale: 0.5, a: rand(rank * s.in, 81, 0.3), b: rand(s.out * rank, 82, 0.3) };
      const at: HookName = `blocks.${L}.attn.hook_result`;
      // Ablating head 0 of the result zeroes its share of the adapter's gradient too.
      const p2: Plan = [...plan, { op: "ablate", at, mode: "zero", heads: [0] }];
      const res = await cpu.lossAndGrad(ROWS, { targets: TARGETS, params: [{ kind: "lora", ...l }, { kind: "activation", at }], plan: p2 });
      const base = { ...l, a: Float64Array.from(l.a), b: Float64Array.from(l.b) };
      close([res.loss], [oracleLoss(host, p2 as OracleIntervention[], [base])], "loss");
      for (const which of ["a", "b"] as const) {
        const arr = base[which];
        const idx = coords(arr.length, COORDS, 83);
        const ref = idx.map((i) => fd((h) => oracleLoss(host, p2 as OracleIntervention[], [{ ...base, [which]: arr.map((x, e) => (e === i ? x + h : x)) }])));
        close(idx.map((i) => res.grads[0]![which === "a" ? 0 : 1]![i]!), ref, `attn.o d${which.toUpperCase()}`);
      }
      const F = c.nHeads * c.dModel;
      const g = res.grads[1]![0]!;
      const idx = coords(g.length, COORDS, 84);
      const ref = idx.map((i) => {
        const t = Math.floor(i / F);
        return fd((h) => {
          const e = new Float64Array(F);
          e[i % F] = h;
          return oracleLoss(host, [...(p2 as OracleIntervention[]), { op: "add", at, vector: e, pos: { from: t, to: t + 1 }, rows: [0] }], [base]);
        });
      });
      close(idx.map((i) => g[i]!), ref, `${at} row 0`);
    });

    test("activation gradients at hook_embed, attn.hook_q (per head), attn.hook_result and mlp.hook_post", async () => {
      const c = host.config;
      const last = c.nLayers - 1;
      const sites: HookName[] = ["hook_embed", "blocks.0.attn.hook_q", `blocks.${last}.attn.hook_result`, `blocks.${last}.mlp.hook_post`];
      const params: TrainParam[] = sites.map((at) => ({ kind: "activation", at }));
      const res = await cpu.lossAndGrad(ROWS, { targets: TARGETS, params, plan });
      sites.forEach((at, k) => {
        const site = /^blocks\.\d+\.(.+)$/.exec(at)?.[1] ?? at;
        const F = oracleFeatShape(c, site).reduce((a, b) => a * b, 1);
        ROWS.forEach((ids, b) => {
          const g = res.grads[k]![b]!;
          assert.equal(g.length, ids.length * F, `${at} row ${b}: [positions, ...feature] without padding`);
          const idx = coords(g.length, COORDS, 61 + 7 * k + b);
          const ref = idx.map((i) => {
            const t = Math.floor(i / F);
            return fd((h) => {
              const e = new Float64Array(F);
              e[i % F] = h;
              return oracleLoss(host, [...(plan as OracleIntervention[]), { op: "add", at, vector: e, pos: { from: t, to: t + 1 }, rows: [b] }]);
            });
          });
          close(idx.map((i) => g[i]!), ref, `${at} row ${b}`);
        });
      });
    });

    test("forward mode: reads and their derivative with respect to an add's scale", async () => {
      const c = host.config;
      const D = c.dModel;
      const last = c.nLayers - 1;
      const add: Intervention = { op: "add", at: "blocks.0.hook_resid_mid", vector: rand(D, 71, 0.5), scale: 2, pos: { from: 1 } };
      const full: Plan = [...plan, add];
      const wrt = full.length - 1;
      const reads: HookName[] = ["blocks.0.mlp.hook_post", `blocks.${last}.attn.hook_z`, `blocks.${last}.attn.hook_result`, `blocks.${last}.hook_resid_post`, "ln_final.hook_normalized"];
      const res = await cpu.jvpScale(ROWS, { plan: full, wrt, reads });
      const withScale = (s: number): OracleIntervention[] => [...(plan as OracleIntervention[]), { ...add, scale: s }, ...reads.map((at): OracleIntervention => ({ op: "read", at }))];
      for (const at of reads)
        ROWS.forEach((ids, b) => {
          const run = (s: number) => oracleForward(host, ids, withScale(s), { row: b }).reads.get(at)!.data;
          const value = run(2);
          const lo = run(2 - H_FD);
          const tangent = run(2 + H_FD).map((v, i) => (v - lo[i]!) / (2 * H_FD));
          close(res.values.get(at)![b]!, value, `${at} row ${b} value`);
          close(res.tangents.get(at)![b]!, tangent, `${at} row ${b} tangent`);
        });
    });
  });
