// The engine's forward pass, interventions, KV-cached steering, batching, weight chunking and
// gradients, checked against an independent float64 reference (test/support/oracle64.ts) on two
// real checkpoints of different families: stories260K (llama: RMSNorm, RoPE, GQA 8q/4kv, SwiGLU)
// and tiny-random-gpt2 (LayerNorm, learned positions, gelu_tanh MLP, biases, tied unembedding).
// The reference itself is first checked against float64 logits staged with the models, so a
// failure here points at the engine, not at the oracle. Every test runs for both engines, the
// jax-js one on the wasm backend ("[wasm]") and selfscope's own CPU engine ("[cpu]"), to the same
// tolerances; weight chunking (maxBindingBytes) and gradients (lossAndGrad) exist only on jax-js.
// The float64 greedy references (the slow part) are computed once per fixture and shared by both.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { NumericalError, UsageError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import type { HookName } from "../src/hooks/names.js";
import type { Intervention, Plan } from "../src/hooks/plan.js";
import { Engine, type GenerateResult, type Row } from "../src/engine/jax/engine.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { initDevice } from "../src/engine/device.js";
import { assertClose, maxAbsDiff } from "./support/compare.js";
import { fixture } from "./support/paths.js";
import { crossEntropySum, flat, oracleForward, oracleGreedy, type OraclePlan } from "./support/oracle64.js";

const REF_TOL = 1e-4; // engine (float32) vs float64 reference
const SAME_TOL = 1e-6; // "unchanged" positions, zero-scale add
// Batched / chunked vs single runs: same float32 math in other shapes. Stories logits reach ~20,
// where 1e-5 is only ~4 float32 ulps, hence the small relative term.
const BATCH_TOL = 1e-5;
const BATCH_RTOL = 1e-6;
const CHANGED = 1e-3; // an intervention must move some in-scope logit by more than this
const GEN = 32; // tokens generated in the steering tests

// ---------------------------------------------------------------- fixtures

interface Fixture {
  name: string;
  file: string;
  /** Main prompt (16 tokens) and a different one of the same length (patch / mean sources). */
  prompt: number[];
  other: number[];
  /** First position of the scoped interventions. */
  p: number;
  /** Norm of added vectors: about the residual stream's norm at the middle layer. */
  mag: number;
  /** Ragged prompts for batched generation and batched forwards. */
  ragged: number[][];
  /** Check oracle64 and the engine against the staged reference outputs. */
  oracle: (host: HostModel, engine: AnyEngine, t: TestContext, greedy: Greedy64) => Promise<void>;
}

/** Either engine: both have forward, generate, featShape, config and dispose. */
type AnyEngine = Engine | CpuEngine;

interface Backend {
  name: "wasm" | "cpu";
  make: (host: HostModel) => Promise<AnyEngine>;
}

const BACKENDS: Backend[] = [
  { name: "wasm", make: (host) => Promise.resolve(new Engine(host)) },
  {
    name: "cpu",
    make: async (host) => {
      return CpuEngine.create(host, { threads: 2 });
    },
  },
];

/** Frees an engine; the CPU engine's worker threads have exited when this resolves. */
async function closeEngine(e: AnyEngine): Promise<void> {
  if (e instanceof CpuEngine) await e.close();
  else e.dispose();
}

/** oracleGreedy, memoised per fixture on its exact inputs (vectors by their bytes). */
type Greedy64 = (host: HostModel, prompt: readonly number[], n: number, plan?: OraclePlan) => number[];

function memoGreedy(): Greedy64 {
  const memo = new Map<string, number[]>();
  const key = (v: unknown) =>
    JSON.stringify(v, (_k, x: unknown) => (ArrayBuffer.isView(x) ? `bytes:${Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString("base64")}` : x));
  return (host, prompt, n, plan = []) => {
    const k = key([prompt, n, plan]);
    let r = memo.get(k);
    if (!r) memo.set(k, (r = oracleGreedy(host, prompt, n, plan)));
    return r.slice();
  };
}

const models = fixture;

function readF32(file: string): Float32Array {
  const b = fs.readFileSync(file);
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

const STORIES_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426];

const FIXTURES: Fixture[] = [
  {
    name: "stories260K (llama)",
    file: models("stories260K-gguf", "stories260K.gguf"),
    prompt: STORIES_IDS,
    // Not a continuation of the greedy story (patching with its own future would be a no-op).
    other: [1, 426, 317, 395, 421, 315, 298, 376, 261, 286, 383, 432, 378, 261, 407, 403],
    p: 6,
    mag: 8,
    ragged: [
      [1, 403, 407, 261, 378],
      [1, 338, 401, 396, 267, 337, 410, 408, 419],
      [1, 292, 411],
      [1, 261, 376, 298, 315, 421, 395],
    ],
    oracle: async (host, engine, t, greedy64) => {
      const dir = models("stories260K-gguf", "reference");
      const meta = JSON.parse(fs.readFileSync(path.join(dir, "logits_16x512.json"), "utf8")) as { input_ids: number[] };
      const want = readF32(path.join(dir, "logits_16x512.f32"));
      const ref = flat(oracleForward(host, meta.input_ids).logits);
      // The file is float64 results rounded to float32 (logits ~20: half an ulp ~1e-6).
      assertClose(ref, want, { atol: 1e-5, what: "oracle64 vs staged stories260K logits" });
      const eng = (await engine.forward([meta.input_ids])).logits[0]!;
      assertClose(eng, want, { atol: REF_TOL, what: "engine vs staged stories260K logits" });
      t.diagnostic(`staged logits: max|Δ| oracle64 ${maxAbsDiff(ref, want).toExponential(2)}, engine ${maxAbsDiff(eng, want).toExponential(2)}`);
      // llama2.c's documented greedy sample from BOS (first GEN tokens; the full 256 is O(T^3) here).
      const greedy = JSON.parse(fs.readFileSync(path.join(dir, "greedy_from_bos.json"), "utf8")) as { generated_ids: number[] };
      const expect = greedy.generated_ids.slice(0, GEN);
      assert.deepEqual(greedy64(host, [1], GEN), expect, "oracle64 greedy from BOS vs llama2.c sample");
      const gen = await engine.generate([[1]], { maxTokens: GEN, stop: [] });
      assert.deepEqual(gen.tokens[0], expect, "engine greedy from BOS vs llama2.c sample");
    },
  },
  {
    name: "tiny-random-gpt2",
    file: models("tiny-random-gpt2"),
    prompt: [0, 0, 195, 731, 5, 17, 300, 999, 12, 44, 500, 77, 1, 2, 3, 600],
    other: [52, 9, 800, 13, 640, 31, 2, 410, 87, 250, 6, 999, 120, 4, 333, 71],
    p: 6,
    mag: 0.3,
    ragged: [
      [0, 0, 0, 52, 9],
      [195, 731, 5, 17, 300, 999, 12, 44, 500],
      [7, 8, 9],
      [640, 31, 2, 410, 87, 250, 6],
    ],
    oracle: async (host, engine, t, greedy64) => {
      const dir = models("tiny-random-gpt2", "reference");
      const meta = JSON.parse(fs.readFileSync(path.join(dir, "greedy_and_logits.json"), "utf8")) as {
        cases: { input_ids: number[]; greedy_max_length_10: number[] }[];
      };
      const all = readF32(path.join(dir, "logits_2x4x1000.f32"));
      let dRef = 0;
      let dEng = 0;
      for (const [i, cs] of meta.cases.entries()) {
        const want = all.subarray(i * 4 * 1000, (i + 1) * 4 * 1000);
        const ref = flat(oracleForward(host, cs.input_ids).logits);
        assertClose(ref, want, { atol: 1e-6, what: `oracle64 vs staged gpt2 logits, case ${i}` });
        const eng = (await engine.forward([cs.input_ids])).logits[0]!;
        assertClose(eng, want, { atol: REF_TOL, what: `engine vs staged gpt2 logits, case ${i}` });
        dRef = Math.max(dRef, maxAbsDiff(ref, want));
        dEng = Math.max(dEng, maxAbsDiff(eng, want));
        const n = cs.greedy_max_length_10.length - cs.input_ids.length;
        const expect = cs.greedy_max_length_10.slice(cs.input_ids.length);
        assert.deepEqual(greedy64(host, cs.input_ids, n), expect, `oracle64 greedy, case ${i}`);
        const gen = await engine.generate([cs.input_ids], { maxTokens: n, stop: [] });
        assert.deepEqual(gen.tokens[0], expect, `engine greedy, case ${i}`);
      }
      t.diagnostic(`staged logits: max|Δ| oracle64 ${dRef.toExponential(2)}, engine ${dEng.toExponential(2)}`);
    },
  },
];

// ---------------------------------------------------------------- helpers

/** A random Float32Array of the given Euclidean norm (Box–Muller normals, seeded). */
function randVec(seed: number, n: number, norm: number): Float32Array {
  const rng = new Rng(seed);
  const v = new Float64Array(n);
  for (let i = 0; i < n; i++) v[i] = Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
  const s = norm / Math.hypot(...v);
  return Float32Array.from(v, (x) => x * s);
}

/** A row whose text has one word per token, so a prefix's token count is its word count. */
function markerRow(ids: number[], markerAt: number): { row: Row; countPrefix: (s: string) => number } {
  const text = ids.map((id, i) => (i === markerAt ? "MARKER" : `w${id}`)).join(" ");
  return { row: { ids, text }, countPrefix: (s) => s.split(" ").filter((w) => w.length > 0).length };
}

/** The plan one row of a batch sees, as a single-row plan (rows: [0]). */
function planForRow(plan: Plan, b: number): Plan {
  return plan.filter((iv) => !iv.rows || iv.rows.includes(b)).map((iv) => ({ ...iv, rows: [0] }));
}

async function logitsOf(engine: AnyEngine, ids: number[], plan: Plan = []): Promise<Float32Array> {
  return (await engine.forward([ids], { plan })).logits[0]!;
}

async function rejectsWith(p: Promise<unknown>, cls: typeof UsageError | typeof NumericalError, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${String(e)}`);
    assert.match(e.message, re);
    return true;
  });
}

/** Max |Δ| over positions [from, to) of two [T*V] logit arrays. */
function maxDiffRange(a: ArrayLike<number>, b: ArrayLike<number>, V: number, from: number, to: number): number {
  let m = 0;
  for (let i = from * V; i < to * V; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

// ---------------------------------------------------------------- the tests

before(async () => {
  await initDevice("wasm");
});

for (const fx of FIXTURES) {
  // Shared by both engines' suites: the checkpoint (read-only here) and the float64 greedy runs.
  let sharedHost: HostModel | undefined;
  const greedy64 = memoGreedy();
  for (const be of BACKENDS) describe(`${fx.name} [${be.name}]`, () => {
    let host: HostModel;
    let engine: AnyEngine;
    let base: Float32Array; // no-plan logits of fx.prompt
    let D = 0;
    let V = 0;
    let L = 0;
    const T = fx.prompt.length;

    before(async () => {
      host = sharedHost ??= loadHostModel(fx.file);
      engine = await be.make(host);
      ({ dModel: D, dVocab: V, nLayers: L } = host.config);
      base = await logitsOf(engine, fx.prompt);
    });
    after(async () => {
      await closeEngine(engine);
    });

    /** Only jax-js has maxBindingBytes and lossAndGrad: those tests are skipped in the [cpu] suite. */
    const jaxOnly = { skip: be.name === "wasm" ? false : "jax-js engine only" };
    const jax = (): Engine => {
      assert.ok(engine instanceof Engine, "a jax-js engine");
      return engine;
    };

    test("oracle64 and the engine reproduce the staged float64 reference", async (t) => {
      await fx.oracle(host, engine, t, greedy64);
    });

    test("no-plan logits match oracle64", (t) => {
      const ref = flat(oracleForward(host, fx.prompt).logits);
      assertClose(base, ref, { atol: REF_TOL, what: "no-plan logits" });
      t.diagnostic(`max|Δ| ${maxAbsDiff(base, ref).toExponential(2)}`);
    });

    /**
     * Engine vs oracle64 under `plan`, and exactly the scoped positions change: positions < from
     * equal the no-plan run, positions >= from move by more than CHANGED somewhere.
     */
    async function checkScoped(t: TestContext, plan: Plan, from: number, refPlan: OraclePlan = plan): Promise<void> {
      const eng = await logitsOf(engine, fx.prompt, plan);
      const ref = flat(oracleForward(host, fx.prompt, refPlan).logits);
      assertClose(eng, ref, { atol: REF_TOL, what: "logits vs oracle64" });
      const before = maxDiffRange(eng, base, V, 0, from);
      const moved = maxDiffRange(eng, base, V, from, T);
      assert.ok(before <= SAME_TOL, `positions before ${from} changed by ${before}`);
      assert.ok(moved > CHANGED, `scoped positions moved by only ${moved}`);
      t.diagnostic(`vs oracle64 ${maxAbsDiff(eng, ref).toExponential(2)}; before scope ${before.toExponential(2)}; in scope ${moved.toExponential(2)}`);
    }

    test("add at a middle layer's resid_post from position p", async (t) => {
      await checkScoped(t, [{ op: "add", at: "blocks.2.hook_resid_post", vector: randVec(11, D, fx.mag), scale: 1.5, pos: { from: fx.p } }], fx.p);
    });

    test("project a direction out at every layer's resid_pre, attn_out and mlp_out", async (t) => {
      const dir = randVec(12, D, 3); // the engine normalises it
      const plan: Intervention[] = [];
      for (let l = 0; l < L; l++)
        for (const s of ["hook_resid_pre", "hook_attn_out", "hook_mlp_out"] as const) plan.push({ op: "project", at: `blocks.${l}.${s}`, direction: dir, pos: { from: fx.p } });
      await checkScoped(t, plan, fx.p);
      // The projected component is really gone from what the next site sees.
      const r = await engine.forward([fx.prompt], { plan: [...plan, { op: "read", at: "blocks.3.hook_resid_pre" }] });
      const x = r.cache.get("blocks.3.hook_resid_pre");
      const u = Float64Array.from(dir, (v) => v / 3);
      for (let pos = fx.p; pos < T; pos++) {
        let d = 0;
        for (let i = 0; i < D; i++) d += x.data[pos * D + i]! * u[i]!;
        assert.ok(Math.abs(d) < 1e-4, `component along the direction at ${pos}: ${d}`);
      }
    });

    test("patch resid_mid from an activation read in another run", async (t) => {
      const at: HookName = "blocks.1.hook_resid_mid";
      const src = (await engine.forward([fx.other], { plan: [{ op: "read", at }] })).cache.get(at);
      assert.deepEqual(src.shape, [T, D]);
      const plan: Plan = [{ op: "patch", at, source: src.data, pos: { from: fx.p } }];
      await checkScoped(t, plan, fx.p);
      const got = (await engine.forward([fx.prompt], { plan: [...plan, { op: "read", at }] })).cache.get(at).data;
      assert.deepEqual(got.subarray(fx.p * D), src.data.subarray(fx.p * D), "patched positions hold the source exactly");
    });

    test("zero- and mean-ablate attn.hook_z heads", async (t) => {
      const at: HookName = "blocks.1.attn.hook_z";
      const { nHeads: H, dHead: hd } = host.config;
      const z = (await engine.forward([fx.other], { plan: [{ op: "read", at }] })).cache.get(at);
      assert.deepEqual(z.shape, [T, H, hd]);
      const mean = new Float32Array(H * hd);
      for (let i = 0; i < T * H * hd; i++) mean[i % (H * hd)]! += z.data[i]! / T;
      await checkScoped(t, [{ op: "ablate", mode: "zero", at, heads: [1, 3], pos: { from: fx.p } }], fx.p);
      await checkScoped(t, [{ op: "ablate", mode: "mean", mean, at: "blocks.2.attn.hook_z", heads: [0, 2], pos: { from: fx.p } }], fx.p);
      // Only the chosen heads are replaced.
      const r = await engine.forward([fx.prompt], { plan: [{ op: "ablate", mode: "zero", at, heads: [1, 3], pos: { from: fx.p } }, { op: "read", at }] });
      const zz = r.cache.get(at).data;
      const ref = oracleForward(host, fx.prompt, [{ op: "read", at }]).reads.get(at)!.data;
      for (let pos = 0; pos < T; pos++)
        for (let h = 0; h < H; h++)
          for (let j = 0; j < hd; j++) {
            const i = (pos * H + h) * hd + j;
            if (pos >= fx.p && (h === 1 || h === 3)) assert.equal(zz[i], 0);
            else assert.ok(Math.abs(zz[i]! - ref[i]!) < REF_TOL, `z[${pos},${h},${j}] ${zz[i]} vs ${ref[i]}`);
          }
    });

    test("zero-ablate mlp.hook_post", async (t) => {
      await checkScoped(t, [{ op: "ablate", mode: "zero", at: "blocks.3.mlp.hook_post", pos: { from: fx.p } }], fx.p);
    });

    test("every op at mlp.hook_down (add, project, patch, zero- and mean-ablate)", async (t) => {
      const at: HookName = "blocks.2.mlp.hook_down";
      const src = (await engine.forward([fx.other], { plan: [{ op: "read", at }] })).cache.get(at);
      assert.deepEqual(src.shape, [T, D]);
      const mean = new Float32Array(D);
      for (let i = 0; i < T * D; i++) mean[i % D]! += src.data[i]! / T;
      await checkScoped(t, [{ op: "add", at, vector: randVec(31, D, fx.mag), scale: 0.7, pos: { from: fx.p } }], fx.p);
      await checkScoped(t, [{ op: "project", at, direction: randVec(32, D, 1), pos: { from: fx.p } }], fx.p);
      await checkScoped(t, [{ op: "patch", at, source: src.data, pos: { from: fx.p } }], fx.p);
      await checkScoped(t, [{ op: "ablate", mode: "zero", at, pos: { from: fx.p } }], fx.p);
      await checkScoped(t, [{ op: "ablate", mode: "mean", mean, at, pos: { from: fx.p } }], fx.p);
    });

    test("add at hook_embed (and hook_pos_embed for learned positions)", async (t) => {
      await checkScoped(t, [{ op: "add", at: "hook_embed", vector: randVec(13, D, fx.mag), scale: 0.5, pos: { from: fx.p } }], fx.p);
      if (host.config.pos.kind === "learned") {
        await checkScoped(t, [{ op: "add", at: "hook_pos_embed", vector: randVec(14, D, fx.mag), pos: { from: fx.p + 2, to: fx.p + 5 } }], fx.p + 2);
      } else {
        await rejectsWith(engine.forward([fx.prompt], { plan: [{ op: "add", at: "hook_pos_embed", vector: new Float32Array(D) }] }), UsageError, /no learned position embedding/);
      }
    });

    test("bounded scope {from, to} and 'prompt' scope", async (t) => {
      const v = randVec(15, D, fx.mag);
      await checkScoped(t, [{ op: "add", at: "blocks.0.hook_resid_mid", vector: v, pos: { from: fx.p, to: fx.p + 3 } }], fx.p);
      await checkScoped(t, [{ op: "add", at: "blocks.4.hook_mlp_out", vector: v, pos: "prompt" }], 0);
    });

    test("zero-scale add equals no intervention", async (t) => {
      const eng = await logitsOf(engine, fx.prompt, [{ op: "add", at: "blocks.2.hook_resid_post", vector: randVec(16, D, fx.mag), scale: 0 }]);
      assertClose(eng, base, { atol: SAME_TOL, what: "scale 0 vs no plan" });
      t.diagnostic(`max|Δ| ${maxAbsDiff(eng, base).toExponential(2)}`);
    });

    test("reads match oracle64 and have the documented shapes", async (t) => {
      const c = host.config;
      const shapes = new Map<HookName, number[]>([
        ["hook_embed", [T, D]],
        ["blocks.2.hook_resid_post", [T, D]],
        ["blocks.1.hook_resid_pre", [T, D]],
        ["blocks.1.attn.hook_q", [T, c.nHeads, c.dHead]],
        ["blocks.1.attn.hook_k", [T, c.nKvHeads, c.dHead]],
        ["blocks.1.attn.hook_v", [T, c.nKvHeads, c.dHead]],
        ["blocks.1.attn.hook_z", [T, c.nHeads, c.dHead]],
        ["blocks.1.hook_attn_out", [T, D]],
        ["blocks.1.hook_resid_mid", [T, D]],
        ["blocks.3.mlp.hook_pre", [T, c.dMlp]],
        ["blocks.1.mlp.hook_post", [T, c.dMlp]],
        ["blocks.1.mlp.hook_down", [T, D]],
        ["blocks.1.hook_mlp_out", [T, D]],
        ["ln_final.hook_normalized", [T, D]],
      ]);
      if (c.pos.kind === "learned") shapes.set("hook_pos_embed", [T, D]);
      // A steering add upstream makes the reads depend on the plan, not just the weights.
      const plan: Intervention[] = [{ op: "add", at: "blocks.0.hook_resid_post", vector: randVec(17, D, fx.mag), pos: { from: fx.p } }];
      for (const at of shapes.keys()) plan.push({ op: "read", at });
      const r = await engine.forward([fx.prompt], { plan });
      const ref = oracleForward(host, fx.prompt, plan);
      let worst = 0;
      for (const [at, shape] of shapes) {
        const got = r.cache.get(at);
        assert.deepEqual(got.shape, shape, `${at} shape`);
        assert.deepEqual(engine.featShape(at.replace(/^blocks\.\d+\./, "")), shape.slice(1), `featShape of ${at}`);
        const want = ref.reads.get(at)!;
        assert.deepEqual(want.shape, shape, `oracle64 ${at} shape`);
        assertClose(got.data, want.data, { atol: REF_TOL, what: `read ${at}` });
        worst = Math.max(worst, maxAbsDiff(got.data, want.data));
      }
      t.diagnostic(`max|Δ| over ${shapes.size} reads ${worst.toExponential(2)}`);
    });

    // attn.hook_pattern is stored per row as [T_b, H, T_b] (padding dropped), unlike the other
    // reads' fixed feature shape; these two tests pin that down (B=1, then a ragged batch).
    test("attn.hook_pattern read (B=1): shape [T, H, T], matches oracle64, causal rows summing to 1", async (t) => {
      const H = host.config.nHeads;
      const plan: Plan = [
        { op: "add", at: "blocks.0.hook_resid_post", vector: randVec(18, D, fx.mag), pos: { from: fx.p } },
        { op: "read", at: "blocks.0.attn.hook_pattern" },
        { op: "read", at: "blocks.3.attn.hook_pattern" },
      ];
      const r = await engine.forward([fx.prompt], { plan });
      const ref = oracleForward(host, fx.prompt, plan);
      for (const at of ["blocks.0.attn.hook_pattern", "blocks.3.attn.hook_pattern"] as const) {
        const got = r.cache.get(at);
        assert.deepEqual(got.shape, [T, H, T], `${at} shape`);
        assertClose(got.data, ref.reads.get(at)!.data, { atol: REF_TOL, what: `read ${at}` });
        for (let q = 0; q < T; q++)
          for (let h = 0; h < H; h++) {
            let s = 0;
            for (let k = 0; k < T; k++) {
              const a = got.data[(q * H + h) * T + k]!;
              if (k > q) assert.equal(a, 0, `${at}[${q},${h},${k}] attends to the future`);
              s += a;
            }
            assert.ok(Math.abs(s - 1) < 1e-5, `${at} row ${q},${h} sums to ${s}`);
          }
        t.diagnostic(`${at}: max|Δ| vs oracle64 ${maxAbsDiff(got.data, ref.reads.get(at)!.data).toExponential(2)}`);
      }
    });

    test("attn.hook_pattern read in a ragged batch: row b is [T_b, H, T_b] and matches oracle64", async () => {
      const H = host.config.nHeads;
      const at: HookName = "blocks.1.attn.hook_pattern";
      const batch = await engine.forward(fx.ragged, { plan: [{ op: "read", at }] });
      for (const [b, ids] of fx.ragged.entries()) {
        const n = ids.length;
        const got = batch.cache.get(at, b);
        assert.deepEqual(got.shape, [n, H, n], `row ${b} shape`);
        const ref = oracleForward(host, ids, [{ op: "read", at }]).reads.get(at)!;
        assertClose(got.data, ref.data, { atol: REF_TOL, what: `row ${b} ${at} vs oracle64` });
      }
    });

    // ------------------------------------------------------------ KV-cached steering

    test("KV-cached generate under steering equals oracleGreedy (B=1)", async (t) => {
      const ids = fx.ragged[1]!;
      const unsteered = (await engine.generate([ids], { maxTokens: GEN, stop: [] })).tokens[0]!;
      assert.deepEqual(unsteered, greedy64(host, ids, GEN), "unsteered");
      const markerAt = 4;
      const { row, countPrefix } = markerRow(ids, markerAt);
      const patchSrc = (await engine.forward([fx.other], { plan: [{ op: "read", at: "blocks.3.hook_resid_mid" }] })).cache.get("blocks.3.hook_resid_mid").data;
      const { nKvHeads: K, dHead: hd } = host.config;
      const kvPlan: Intervention[] = [
        { op: "ablate", mode: "zero", at: "blocks.1.attn.hook_k", heads: [1], pos: { from: 2 } },
        { op: "add", at: "blocks.2.attn.hook_v", vector: randVec(24, K * hd, fx.mag * 2), pos: { from: 2 } },
      ];
      const cases: { name: string; plan: Plan; ref: OraclePlan; row: Row }[] = [
        {
          name: "add from p (prompt and generated)",
          plan: [{ op: "add", at: "blocks.2.hook_resid_post", vector: randVec(21, D, fx.mag), scale: 1.5, pos: { from: 3 } }],
          ref: [{ op: "add", at: "blocks.2.hook_resid_post", vector: randVec(21, D, fx.mag), scale: 1.5, pos: { from: 3 } }],
          row: { ids },
        },
        {
          name: "add on generated tokens only",
          plan: [{ op: "add", at: "blocks.1.hook_resid_mid", vector: randVec(22, D, fx.mag), scale: 2, pos: "generated" }],
          ref: [{ op: "add", at: "blocks.1.hook_resid_mid", vector: randVec(22, D, fx.mag), scale: 2, pos: "generated" }],
          row: { ids },
        },
        {
          name: "add from a marker (offset -1)",
          plan: [{ op: "add", at: "blocks.3.hook_resid_pre", vector: randVec(23, D, fx.mag), scale: 1.5, pos: { marker: "MARKER", offset: -1 } }],
          // The marker is token markerAt, so the scope starts one before it.
          ref: [{ op: "add", at: "blocks.3.hook_resid_pre", vector: randVec(23, D, fx.mag), scale: 1.5, pos: { from: markerAt - 1 } }],
          row,
        },
        {
          // The source covers positions 0..15: prompt slots and the first decoded ones are patched
          // (a scope past the source is an error, tested below).
          name: "patch resid_mid into prompt and decoded positions",
          plan: [{ op: "patch", at: "blocks.3.hook_resid_mid", source: patchSrc, pos: { from: 5, to: patchSrc.length / D } }],
          ref: [{ op: "patch", at: "blocks.3.hook_resid_mid", source: patchSrc, pos: { from: 5, to: patchSrc.length / D } }],
          row: { ids },
        },
        {
          // q/k/v sites sit before RoPE and, for k/v, use the kv-head count (GQA); cached k/v carry the edit.
          name: "ablate a kv head at attn.hook_k, add at attn.hook_v",
          plan: kvPlan,
          ref: kvPlan,
          row: { ids },
        },
      ];
      const read: HookName = "blocks.2.hook_resid_post";
      let worst = 0;
      for (const cs of cases) {
        const res: GenerateResult = await engine.generate([cs.row], { maxTokens: GEN, plan: [...cs.plan, { op: "read", at: read }], stop: [], countPrefix });
        const got = res.tokens[0]!;
        const want = greedy64(host, ids, GEN, cs.ref);
        assert.deepEqual(got, want, `${cs.name}: engine vs oracleGreedy`);
        assert.notDeepEqual(got, unsteered, `${cs.name}: steering should change the continuation`);
        // Reads collected while decoding (prompt + every fed token) equal a full float64 forward.
        const seq = [...ids, ...got.slice(0, -1)];
        const rd = res.cache.get(read);
        assert.deepEqual(rd.shape, [seq.length, D], `${cs.name}: read shape during generate`);
        const refRead = oracleForward(host, seq, [...cs.ref, { op: "read", at: read }], { promptLen: ids.length }).reads.get(read)!;
        assertClose(rd.data, refRead.data, { atol: REF_TOL, what: `${cs.name}: ${read} read during generate` });
        worst = Math.max(worst, maxAbsDiff(rd.data, refRead.data));
        t.diagnostic(`${cs.name}: ${GEN} tokens equal; first change vs unsteered at ${got.findIndex((x, i) => x !== unsteered[i])}`);
      }
      t.diagnostic(`max|Δ| of decode-time reads vs oracle64 ${worst.toExponential(2)}`);
    });

    /** Four ragged rows, each with its own intervention (different sites, vectors, scales, scopes). */
    function raggedPlan(): { plan: Plan; refPlans: OraclePlan[]; rows: Row[]; countPrefix: (s: string) => number } {
      const markerAt = 2;
      const { row: r2, countPrefix } = markerRow(fx.ragged[2]!, markerAt);
      const v = [randVec(31, D, fx.mag), randVec(32, D, fx.mag), randVec(33, D, fx.mag), randVec(34, D, fx.mag)];
      const plan: Intervention[] = [
        { op: "add", at: "blocks.2.hook_resid_post", vector: v[0]!, scale: 1.5, pos: { from: 2 }, rows: [0] },
        { op: "add", at: "blocks.3.hook_resid_post", vector: v[1]!, scale: -2, pos: "generated", rows: [1] },
        { op: "add", at: "blocks.1.hook_resid_pre", vector: v[2]!, scale: 1, pos: { marker: "MARKER", offset: 0 }, rows: [2] },
        { op: "add", at: "blocks.1.hook_mlp_out", vector: v[3]!, scale: 2.5, pos: { from: 1, to: 12 }, rows: [3] },
      ];
      const refPlans: OraclePlan[] = [
        [plan[0]!],
        [plan[1]!],
        [{ op: "add", at: "blocks.1.hook_resid_pre", vector: v[2]!, scale: 1, pos: { from: markerAt } }],
        [plan[3]!],
      ];
      return { plan, refPlans, rows: [{ ids: fx.ragged[0]! }, { ids: fx.ragged[1]! }, r2, { ids: fx.ragged[3]! }], countPrefix };
    }

    test("left-padded ragged batch, a different intervention per row: each row equals its B=1 run and oracleGreedy", async (t) => {
      const { plan, refPlans, rows, countPrefix } = raggedPlan();
      const batch = await engine.generate(rows, { maxTokens: GEN, plan, stop: [], countPrefix });
      for (let b = 0; b < rows.length; b++) {
        const single = (await engine.generate([rows[b]!], { maxTokens: GEN, plan: planForRow(plan, b), stop: [], countPrefix })).tokens[0]!;
        const ref = greedy64(host, rows[b]!.ids, GEN, refPlans[b]!);
        const unsteered = greedy64(host, rows[b]!.ids, GEN);
        assert.deepEqual(batch.tokens[b], single, `row ${b}: batch vs B=1`);
        assert.deepEqual(single, ref, `row ${b}: B=1 vs oracleGreedy`);
        assert.notDeepEqual(ref, unsteered, `row ${b}: steering should change the continuation`);
      }
      t.diagnostic(`4 rows x ${GEN} tokens equal (batch = B=1 = oracleGreedy)`);
    });

    test("batched forward with per-row interventions equals per-row single forwards", async (t) => {
      const at: HookName = "blocks.3.hook_resid_mid";
      const src = (await engine.forward([fx.other], { plan: [{ op: "read", at }] })).cache.get(at).data;
      const { nHeads: H, dHead: hd } = host.config;
      const plan: Plan = [
        { op: "add", at: "blocks.2.hook_resid_post", vector: randVec(41, D, fx.mag), scale: 3, pos: { from: 2 }, rows: [0] },
        { op: "project", at: "blocks.1.hook_attn_out", direction: randVec(42, D, 1), rows: [1] },
        { op: "ablate", mode: "zero", at: "blocks.0.attn.hook_z", heads: [1], pos: { from: 1 }, rows: [2] },
        { op: "ablate", mode: "mean", mean: randVec(43, H * hd, 1), at: "blocks.2.attn.hook_z", heads: [0, 3], rows: [0] },
        { op: "patch", at, source: src, pos: { from: 2 }, rows: [3] },
        { op: "add", at: "hook_embed", vector: randVec(44, D, fx.mag), scale: -2, rows: [1, 3] },
        { op: "read", at: "blocks.2.hook_resid_post" },
        { op: "read", at: "blocks.1.attn.hook_z" },
      ];
      const rows = fx.ragged.map((ids) => ({ ids }));
      const batch = await engine.forward(rows, { plan });
      let dSingle = 0;
      let dRef = 0;
      for (let b = 0; b < rows.length; b++) {
        const ids = rows[b]!.ids;
        const single = await engine.forward([ids], { plan: planForRow(plan, b) });
        assertClose(batch.logits[b]!, single.logits[0]!, { atol: BATCH_TOL, rtol: BATCH_RTOL, what: `row ${b} logits: batch vs single` });
        for (const r of ["blocks.2.hook_resid_post", "blocks.1.attn.hook_z"] as const) {
          const got = batch.cache.get(r, b);
          assert.deepEqual(got.shape, single.cache.get(r).shape, `row ${b} ${r} shape`);
          assertClose(got.data, single.cache.get(r).data, { atol: BATCH_TOL, rtol: BATCH_RTOL, what: `row ${b} read ${r}` });
        }
        const ref = flat(oracleForward(host, ids, plan, { row: b }).logits);
        assertClose(batch.logits[b]!, ref, { atol: REF_TOL, what: `row ${b} logits vs oracle64` });
        dSingle = Math.max(dSingle, maxAbsDiff(batch.logits[b]!, single.logits[0]!));
        dRef = Math.max(dRef, maxAbsDiff(batch.logits[b]!, ref));
      }
      t.diagnostic(`max|Δ| batch vs single ${dSingle.toExponential(2)}, vs oracle64 ${dRef.toExponential(2)}`);
    });

    test("weights split in row chunks (maxBindingBytes 4096) give the same results", jaxOnly, async (t) => {
      const small = new Engine(host, { maxBindingBytes: 4096 });
      try {
        // Guard that the split really happens (the unembedding is far larger than 4 KiB).
        const unembed = (small as unknown as { params: { unembed: unknown } }).params.unembed;
        assert.ok(Array.isArray(unembed) && unembed.length > 1, "unembedding should be split into chunks");
        const { plan, rows, countPrefix } = raggedPlan();
        const full = await jax().forward(rows, { plan: [...plan, { op: "read", at: "blocks.2.hook_mlp_out" }], countPrefix });
        const split = await small.forward(rows, { plan: [...plan, { op: "read", at: "blocks.2.hook_mlp_out" }], countPrefix });
        let d = 0;
        for (let b = 0; b < rows.length; b++) {
          assertClose(split.logits[b]!, full.logits[b]!, { atol: BATCH_TOL, rtol: BATCH_RTOL, what: `row ${b} logits, chunked vs whole` });
          assertClose(split.cache.get("blocks.2.hook_mlp_out", b).data, full.cache.get("blocks.2.hook_mlp_out", b).data, { atol: BATCH_TOL, rtol: BATCH_RTOL, what: `row ${b} mlp_out, chunked vs whole` });
          d = Math.max(d, maxAbsDiff(split.logits[b]!, full.logits[b]!));
        }
        const g1 = await engine.generate(rows, { maxTokens: 12, plan, stop: [], countPrefix });
        const g2 = await small.generate(rows, { maxTokens: 12, plan, stop: [], countPrefix });
        assert.deepEqual(g2.tokens, g1.tokens, "generated tokens, chunked vs whole");
        t.diagnostic(`max|Δ| chunked vs whole ${d.toExponential(2)}`);
      } finally {
        small.dispose();
      }
    });

    // ------------------------------------------------------------ gradients

    for (const [at, pos] of [
      ["blocks.2.hook_mlp_out", { from: 3 }],
      ["blocks.2.mlp.hook_down", { from: 3 }],
      ["blocks.1.hook_resid_post", "all"],
    ] as const) {
      test(`lossAndGrad for a vector added at ${at} matches float64 finite differences`, jaxOnly, async (t) => {
        const rows = [fx.prompt, fx.ragged[1]!];
        // Next-token targets; the last position of each row has none.
        const targets = rows.map((ids) => ids.map((_, i) => (i + 1 < ids.length ? ids[i + 1]! : -1)));
        const value = randVec(51, D, fx.mag * 0.5);
        const { loss, grad } = await jax().lossAndGrad(rows, targets, { at, pos, value });
        const lossAt = (v: Float64Array): number => {
          let sum = 0;
          let n = 0;
          rows.forEach((ids, b) => {
            const r = crossEntropySum(oracleForward(host, ids, [{ op: "add", at, vector: v, pos }]).logits, targets[b]!);
            sum += r.sum;
            n += r.n;
          });
          return sum / n;
        };
        const v64 = Float64Array.from(value);
        const refLoss = lossAt(v64);
        assert.ok(Math.abs(loss - refLoss) <= REF_TOL, `loss ${loss} vs oracle64 ${refLoss}`);
        const h = 1e-4;
        const fd = new Float64Array(D);
        for (let i = 0; i < D; i++) {
          const vp = v64.slice();
          const vm = v64.slice();
          vp[i] = vp[i]! + h;
          vm[i] = vm[i]! - h;
          fd[i] = (lossAt(vp) - lossAt(vm)) / (2 * h);
        }
        assert.equal(grad.length, D);
        let dd = 0;
        let nf = 0;
        let ng = 0;
        let dot = 0;
        for (let i = 0; i < D; i++) {
          dd += (grad[i]! - fd[i]!) ** 2;
          nf += fd[i]! ** 2;
          ng += grad[i]! ** 2;
          dot += grad[i]! * fd[i]!;
        }
        const rel = Math.sqrt(dd / nf);
        const cos = dot / Math.sqrt(nf * ng);
        assert.ok(nf > 1e-12, "the gradient should not vanish");
        assert.ok(rel < 1e-3, `relative error of the gradient ${rel}`);
        assert.ok(cos > 0.9999, `cosine with finite differences ${cos}`);
        t.diagnostic(`loss |Δ| ${Math.abs(loss - refLoss).toExponential(2)}; grad rel err ${rel.toExponential(2)}, cos 1-${(1 - cos).toExponential(2)}`);
      });
    }

    // ------------------------------------------------------------ bad input

    test("bad input is rejected with a clear typed error", async () => {
      const ids = fx.prompt;
      await rejectsWith(engine.forward([ids], { plan: [{ op: "read", at: "blocks.0.hook_nope" as HookName }] }), UsageError, /unknown hook point "blocks\.0\.hook_nope"/);
      await rejectsWith(engine.forward([ids], { plan: [{ op: "read", at: `blocks.${L}.hook_resid_post` }] }), UsageError, new RegExp(`has ${L} blocks`));
      await rejectsWith(
        engine.forward([ids], { plan: [{ op: "add", at: "blocks.0.hook_resid_post", vector: new Float32Array(D + 1) }] }),
        UsageError,
        new RegExp(`vector has length ${D + 1}, expected ${D}`),
      );
      const nan = new Float32Array(D);
      nan[3] = NaN;
      await rejectsWith(engine.forward([ids], { plan: [{ op: "add", at: "blocks.0.hook_resid_post", vector: nan }] }), NumericalError, /NaN or Inf/);
      await rejectsWith(engine.generate([ids], { maxTokens: 2, plan: [{ op: "add", at: "hook_embed", vector: nan }] }), NumericalError, /NaN or Inf/);
      const { row, countPrefix } = markerRow(ids, 3);
      await rejectsWith(engine.forward([row], { plan: [{ op: "add", at: "hook_embed", vector: new Float32Array(D), pos: { marker: "zebra" } }], countPrefix }), UsageError, /marker "zebra" not found/);
      await rejectsWith(engine.forward([ids], { plan: [{ op: "add", at: "hook_embed", vector: new Float32Array(D), pos: { marker: "MARKER" } }] }), UsageError, /needs the row's text and a tokenizer/);
      if (engine instanceof Engine) await rejectsWith(engine.lossAndGrad([ids], [[1]], { at: "blocks.0.hook_resid_post", value: new Float32Array(D - 1) }), UsageError, /takes a vector of length/);
      await rejectsWith(engine.generate([ids], { maxTokens: 2, plan: [{ op: "read", at: "blocks.0.attn.hook_pattern" }] }), UsageError, /hook_pattern can be read with forward/);
      await rejectsWith(engine.forward([[ids[0]!, V]]), UsageError, new RegExp(`token id ${V} is outside the vocabulary \\(0\\.\\.${V - 1}\\)`));
      await rejectsWith(engine.forward([[ids[0]!, -1]]), UsageError, /token id -1 is outside the vocabulary/);
      await rejectsWith(engine.generate([[ids[0]!, V]], { maxTokens: 2 }), UsageError, /outside the vocabulary/);
      await rejectsWith(engine.generate([[]], { maxTokens: 2 }), UsageError, /every row needs at least one token/);
    });

    test("a patch whose scope reaches past its source is an error, in forward and generate, not a partial patch", async () => {
      const at: HookName = "blocks.1.hook_resid_mid";
      const full = (await engine.forward([fx.other], { plan: [{ op: "read", at }] })).cache.get(at).data;
      const short = full.slice(0, 8 * D); // positions 0..7 of a T-position prompt
      const fwd = (pos: Intervention["pos"], source = short) => engine.forward([fx.prompt], { plan: [{ op: "patch", at, source, ...(pos ? { pos } : {}) }, { op: "read", at }] });
      await rejectsWith(fwd({ from: 2 }), UsageError, /patch at blocks\.1\.hook_resid_mid: its scope reaches position 8 of row 0 .*source holds positions 0\.\.7 only/);
      await rejectsWith(fwd(undefined), UsageError, /reaches position 8 of row 0/);
      await rejectsWith(fwd({ from: 10 }), UsageError, /reaches position 10 of row 0/);
      // Within the source it patches exactly those positions and nothing else.
      const got = (await fwd({ from: 2, to: 8 })).cache.get(at).data;
      assert.deepEqual(got.subarray(2 * D, 8 * D), short.subarray(2 * D, 8 * D), "in scope: the source");
      assert.notDeepEqual(got.subarray(8 * D, 9 * D), full.subarray(8 * D, 9 * D), "past the scope: the live activation");
      // generate runs the prompt and every generated token but the last: a prompt-length source
      // covers maxTokens 1 and nothing longer.
      const gen = (maxTokens: number, pos?: Intervention["pos"]) => engine.generate([fx.prompt], { maxTokens, stop: [], plan: [{ op: "patch", at, source: full, ...(pos ? { pos } : {}) }] });
      await gen(1);
      await rejectsWith(gen(4), UsageError, new RegExp(`reaches position ${T} of row 0 \\(the call runs prompt and generated positions 0\\.\\.${T + 2}\\)`));
      await rejectsWith(gen(3, "generated"), UsageError, new RegExp(`reaches position ${T} of row 0`));
      await gen(4, "prompt");
      // In a batch, the row the patch is for decides.
      await rejectsWith(
        engine.forward([fx.other.slice(0, 6), fx.prompt], { plan: [{ op: "patch", at, source: short, rows: [1] }] }),
        UsageError,
        /reaches position 8 of row 1/,
      );
      await engine.forward([fx.prompt.slice(0, 8), fx.prompt], { plan: [{ op: "patch", at, source: short, rows: [0] }] });
    });

    test("an unknown op or a payload its op lacks is a UsageError naming the plan entry, not a TypeError", async () => {
      const ids = fx.prompt;
      const v = new Float32Array(D);
      const bad = (iv: Record<string, unknown>) => [{ op: "read", at: "blocks.0.hook_resid_post" }, iv] as unknown as Plan;
      for (const call of [(plan: Plan) => engine.forward([ids], { plan }), (plan: Plan) => engine.generate([ids], { maxTokens: 2, plan })]) {
        await rejectsWith(call(bad({ op: "steer", at: "blocks.1.hook_resid_post", vector: v })), UsageError, /^plan\[1\] \(steer at blocks\.1\.hook_resid_post\): unknown op "steer"; use one of read, add, project, patch, ablate$/);
        await rejectsWith(call(bad({ op: "patch", at: "blocks.1.hook_resid_post", vector: v })), UsageError, /plan\[1\] \(patch at .*\): source must be a Float32Array, got nothing/);
        await rejectsWith(call(bad({ op: "add", at: "blocks.1.hook_resid_post", direction: v })), UsageError, /vector must be a Float32Array/);
        await rejectsWith(call(bad({ op: "add", at: "blocks.1.hook_resid_post", vector: v, scale: "2" })), UsageError, /scale must be a number/);
        await rejectsWith(call(bad({ op: "ablate", mode: "Mean", at: "blocks.1.hook_resid_post", mean: v })), UsageError, /mode must be "zero" or "mean", got "Mean"/);
      }
    });
  });
}
