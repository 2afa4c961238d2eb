// selfscope's CPU engine (src/engine/cpu) where the shared suites (interventions, llamacpp, families,
// reliability: short prompts, every matrix product below the threading threshold) do not reach:
// a long left-padded batch, for which generate() prefills in chunks (activations and the
// attention-score buffer are bounded) and the matrix products are split across threads, checked against the float64
// reference; the same numbers from 1 and 2 threads and from lazy and eager loads; and a closed
// engine refuses work.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { UsageError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { CpuRuntime, type Gemm } from "../src/engine/cpu/runtime.js";
import type { HookName } from "../src/hooks/names.js";
import type { Plan } from "../src/hooks/plan.js";
import type { GenerateResult } from "../src/engine/jax/engine.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { assertClose, maxAbsDiff } from "./support/compare.js";
import { fixture } from "./support/paths.js";
import { argmax64, oracleForward } from "./support/oracle64.js";

const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
const REF_TOL = 1e-4; // float32 engine vs float64 reference (as in interventions.test.ts)
// Same float32 math in other shapes (another thread split, a chunked prefill): logits reach ~20.
const SAME_TOL = 1e-5;
const SAME_RTOL = 1e-6;
const GEN = 4;

/** A runtime that records the M of every gemm with N columns (to see how a call was split). */
function recording(rt: CpuRuntime, N: number, log: number[]): CpuRuntime {
  return new Proxy(rt, {
    get(target, prop) {
      if (prop === "gemm")
        return (g: Gemm) => {
          if (g.N === N) log.push(g.M);
          target.gemm(g);
        };
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

function randIds(seed: number, n: number, V: number): number[] {
  const rng = new Rng(seed);
  return [1, ...Array.from({ length: n - 1 }, () => 3 + Math.floor(rng.next() * (V - 3)))];
}

function randVec(seed: number, n: number, norm: number): Float32Array {
  const rng = new Rng(seed);
  const v = Float64Array.from({ length: n }, () => rng.next() - 0.5);
  const s = norm / Math.hypot(...v);
  return Float32Array.from(v, (x) => x * s);
}

describe("stories260K on the CPU engine, long ragged batch", () => {
  let host: HostModel;
  let rt2: CpuRuntime;
  let two: CpuEngine; // 2 threads, eager host
  let one: CpuEngine; // 1 thread, lazy host
  const qkvM: number[] = []; // M of every fused q/k/v product on `two`
  let rows: number[][];
  let plan: Plan;
  const reads: HookName[] = ["blocks.1.hook_resid_post", "ln_final.hook_normalized"];

  before(async () => {
    host = loadHostModel(STORIES);
    const c = host.config;
    rt2 = await CpuRuntime.create({ threads: 2 });
    two = new CpuEngine(host, recording(rt2, (c.nHeads + 2 * c.nKvHeads) * c.dHead, qkvM));
    one = new CpuEngine(loadHostModel(STORIES, undefined, { lazy: true }), await CpuRuntime.create({ threads: 1 }));
    // 600 and 430 tokens: the prefill's chunk boundaries fall inside the prompt (and row 1's 170
    // padding slots), and every block's products are large enough to be split across threads.
    rows = [randIds(1, 600, c.dVocab), randIds(2, 430, c.dVocab)];
    const D = c.dModel;
    plan = [
      { op: "add", at: "blocks.2.hook_resid_post", vector: randVec(3, D, 8), scale: 1.5, pos: { from: 500 }, rows: [0] },
      { op: "add", at: "blocks.1.hook_mlp_out", vector: randVec(4, D, 8), pos: "generated", rows: [1] },
      ...reads.map((at) => ({ op: "read" as const, at })),
    ];
  });
  after(async () => {
    await two.close();
    await one.close();
  });

  test("generate with a chunked prefill: tokens and decode-time reads equal a float64 forward", async (t) => {
    qkvM.length = 0;
    const res: GenerateResult = await two.generate(rows, { maxTokens: GEN, plan, stop: [] });
    const B = rows.length, T = Math.max(...rows.map((r) => r.length));
    // Guard: the prompt really went through in several chunks (a chunk is < B·T and > B rows).
    const chunks = qkvM.filter((m) => m > B);
    assert.ok(chunks.length > 1 && chunks.every((m) => m < B * T), `prefill was not chunked (q/k/v product rows: ${chunks.join(", ")})`);
    let worst = 0;
    for (const [b, ids] of rows.entries()) {
      const got = res.tokens[b]!;
      assert.equal(got.length, GEN);
      // Greedy == the float64 argmax after every prefix (teacher-forced on our own tokens).
      const seq = [...ids, ...got.slice(0, -1)];
      const ref = oracleForward(host, seq, plan, { row: b, promptLen: ids.length });
      const want = ref.logits.slice(ids.length - 1).map((l) => argmax64(l));
      assert.deepEqual(got, want, `row ${b}: generated tokens vs float64 argmax`);
      const D = host.config.dModel;
      for (const at of reads) {
        // Block sites are read at every fed position; ln_final only where logits are taken
        // (the prompt's last position, then each decoded one), as on the jax-js engine.
        const from = at === "ln_final.hook_normalized" ? ids.length - 1 : 0;
        const rd = res.cache.get(at, b);
        assert.deepEqual(rd.shape, [seq.length - from, D], `row ${b} ${at} shape`);
        const want = ref.reads.get(at)!.data.subarray(from * D);
        assertClose(rd.data, want, { atol: REF_TOL, what: `row ${b} ${at} read during generate` });
        worst = Math.max(worst, maxAbsDiff(rd.data, want));
      }
    }
    const perChunk = chunks.filter((_, i) => i % host.config.nLayers === 0).map((m) => m / B);
    t.diagnostic(`prefill of ${T} slots in chunks of ${perChunk.join(", ")}; max|Δ| of reads vs float64 ${worst.toExponential(2)}`);
  });

  test("forward over the long batch runs in chunks and matches a float64 forward (logits and reads); a pattern read runs whole", async (t) => {
    qkvM.length = 0;
    const B = rows.length, T = Math.max(...rows.map((r) => r.length));
    const res = await two.forward(rows, { plan });
    const chunks = qkvM.filter((m) => m > B);
    assert.ok(chunks.length > host.config.nLayers && chunks.every((m) => m < B * T), `forward was not chunked (q/k/v product rows: ${chunks.join(", ")})`);
    let worst = 0;
    const V = host.config.dVocab;
    for (const [b, ids] of rows.entries()) {
      const ref = oracleForward(host, ids, plan, { row: b, promptLen: ids.length });
      assert.equal(res.logits[b]!.length, ids.length * V, `row ${b}: one logit row per real token`);
      const want = Float64Array.from({ length: ids.length * V }, (_, i) => ref.logits[Math.floor(i / V)]![i % V]!);
      assertClose(res.logits[b]!, want, { atol: REF_TOL, what: `row ${b} logits (chunked forward)` });
      worst = Math.max(worst, maxAbsDiff(res.logits[b]!, want));
      const at = reads[0]!;
      assertClose(res.cache.get(at, b).data, ref.reads.get(at)!.data, { atol: REF_TOL, what: `row ${b} ${at} (chunked forward)` });
    }
    // With a pattern read the call runs in one piece (each query row needs every key at once).
    qkvM.length = 0;
    const short = [rows[0]!.slice(0, 200), rows[1]!.slice(0, 150)];
    const pat = await two.forward(short, { plan: [{ op: "read", at: "blocks.0.attn.hook_pattern" }], logits: "last" });
    assert.deepEqual(qkvM.filter((m) => m > B), Array(host.config.nLayers).fill(2 * 200), "a pattern read runs the call whole");
    assert.deepEqual(pat.cache.get("blocks.0.attn.hook_pattern", 1).shape, [150, host.config.nHeads, 150]);
    t.diagnostic(`forward of ${T} slots in ${chunks.length / host.config.nLayers} chunks; max|Δ| logits vs float64 ${worst.toExponential(2)}`);
  });

  test("1 thread (lazy load) and 2 threads (eager load) give the same logits and reads", async (t) => {
    const a = await two.forward(rows, { plan });
    const b = await one.forward(rows, { plan });
    let d = 0;
    for (let r = 0; r < rows.length; r++) {
      assertClose(b.logits[r]!, a.logits[r]!, { atol: SAME_TOL, rtol: SAME_RTOL, what: `row ${r} logits, 1 vs 2 threads` });
      d = Math.max(d, maxAbsDiff(b.logits[r]!, a.logits[r]!));
      for (const at of reads) assertClose(b.cache.get(at, r).data, a.cache.get(at, r).data, { atol: SAME_TOL, rtol: SAME_RTOL, what: `row ${r} ${at}, 1 vs 2 threads` });
    }
    const ga = await two.generate(rows, { maxTokens: GEN, plan, stop: [] });
    const gb = await one.generate(rows, { maxTokens: GEN, plan, stop: [] });
    assert.deepEqual(gb.tokens, ga.tokens, "generated tokens, 1 vs 2 threads");
    t.diagnostic(`max|Δ| logits 1 vs 2 threads ${d.toExponential(2)}`);
  });

  test("a closed engine refuses work with a UsageError", async () => {
    const e = new CpuEngine(host, await CpuRuntime.create({ threads: 2 }));
    await e.close();
    await e.close(); // idempotent
    e.dispose();
    const disposed = (err: unknown) => err instanceof UsageError && /this model was disposed/.test(err.message);
    await assert.rejects(e.forward([[1, 2, 3]]), disposed);
    await assert.rejects(e.generate([[1, 2, 3]], { maxTokens: 1 }), disposed);
  });
});
