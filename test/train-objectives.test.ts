// The training objectives and 03f presets on hand-computed log-probs, the JSONL parser's errors,
// the batch schedule, and the param flattening (no model: fast).
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { UsageError } from "../src/core/errors.js";
import { parseTrainJsonl } from "../src/train/data.js";
import { batchIndices } from "../src/train/loop.js";
import { objective, OBJECTIVES, pairLoss, type Hyper } from "../src/train/objectives.js";
import { loraDeltaNorm, ParamSet, randomLora } from "../src/train/params.js";
import type { TrainParam } from "../src/engine/grad.js";

const H: Hyper = { beta: 0.5, margin: 2, kl: 0.3 };
const X = { sc: -3.2, sr: -4.1, rc: -3.5, rr: -3.9, nc: 4 };
const near = (a: number, b: number, what: string) => assert.ok(Math.abs(a - b) <= 1e-12 * Math.max(1, Math.abs(b)), `${what}: ${a} vs ${b}`);

/** d/dx of f at x by central differences (f64; the formulas are smooth where checked). */
const fd = (f: (x: number) => number, x: number) => (f(x + 1e-6) - f(x - 1e-6)) / 2e-6;

describe("pairwise losses on hand-computed log-probs", () => {
  test("dpo: −log σ(β[(sc−rc)−(sr−rr)]) and its derivatives", () => {
    // z = 0.5 · ((−3.2 + 3.5) − (−4.1 + 3.9)) = 0.5 · (0.3 + 0.2) = 0.25
    const z = 0.25;
    const l = pairLoss("dpo", X, H);
    near(l.loss, Math.log(1 + Math.exp(-z)), "loss");
    near(l.dc, -0.5 / (1 + Math.exp(z)), "dc");
    near(l.dr, 0.5 / (1 + Math.exp(z)), "dr");
    assert.ok(Math.abs(l.dc - fd((s) => pairLoss("dpo", { ...X, sc: s }, H).loss, X.sc)) < 1e-8);
    // No reference: rc = rr = 0 → z = 0.5 · 0.9.
    near(pairLoss("dpo", { ...X, rc: 0, rr: 0 }, H).loss, Math.log(1 + Math.exp(-0.45)), "no-ref loss");
    // Large margins stay finite (softplus, not log(σ)).
    assert.ok(Number.isFinite(pairLoss("dpo", { ...X, sc: -1e4, rc: 0, rr: 0 }, H).loss));
  });

  test("contrastive_margin: max(0, m − (sc − sr)); contrastive_margin_kl adds λ/2 (sc − rc)²", () => {
    // sc − sr = 0.9 < m = 2 → loss 1.1, dc −1, dr +1.
    const l = pairLoss("margin", X, H);
    near(l.loss, 1.1, "margin loss");
    assert.deepEqual([l.dc, l.dr], [-1, 1]);
    const off = pairLoss("margin", { ...X, sc: -1 }, H); // difference 3.1 ≥ 2: inactive
    assert.deepEqual([off.loss, off.dc, off.dr], [0, 0, 0]);
    const k = pairLoss("margin_kl", X, H);
    near(k.loss, 1.1 + 0.5 * 0.3 * 0.3 ** 2, "margin_kl loss");
    near(k.dc, -1 + 0.3 * 0.3, "margin_kl dc");
  });

  test("sft_chosen_kl: −sc/nc + λ/2 (sc − rc)²", () => {
    const l = pairLoss("sft_kl", X, H);
    near(l.loss, 3.2 / 4 + 0.5 * 0.3 * 0.09, "loss");
    near(l.dc, -1 / 4 + 0.3 * 0.3, "dc");
    assert.equal(l.dr, 0);
  });

  test("every preset is declared with its data, transform, loss and reference", () => {
    const table = Object.fromEntries(OBJECTIVES.map((n) => [n, objective(n)]));
    assert.equal(table.sft!.data, "sft");
    assert.deepEqual([table.dpo!.loss, table.dpo!.reference], ["dpo", true]);
    assert.deepEqual([table.dpo_no_ref!.loss, table.dpo_no_ref!.reference], ["dpo", false]);
    assert.equal(table.dpo_shuffled!.transform, "shuffle_rejected");
    assert.equal(table.dpo_reversed!.transform, "swap");
    assert.deepEqual([table.dpo_chosen_sft!.transform, table.dpo_chosen_sft!.loss], ["chosen_only", "sft"]);
    assert.deepEqual([table.dpo_rejected_sft!.transform, table.dpo_rejected_sft!.loss], ["rejected_only", "sft"]);
    assert.deepEqual([table.contrastive_margin!.loss, table.contrastive_margin!.reference], ["margin", false]);
    assert.deepEqual([table.contrastive_margin_kl!.loss, table.contrastive_margin_kl!.reference], ["margin_kl", true]);
    assert.deepEqual([table.sft_chosen_kl!.loss, table.sft_chosen_kl!.transform], ["sft_kl", "chosen_only"]);
    assert.equal(table.random_lora!.loss, "none");
    assert.throws(() => objective("ppo"), (e: Error) => e instanceof UsageError && /unknown objective "ppo"/.test(e.message));
  });
});

describe("JSONL parser", () => {
  const err = (text: string, re: RegExp) => assert.throws(() => parseTrainJsonl(text, "d.jsonl"), (e: Error) => e instanceof UsageError && re.test(e.message), re.source);
  test("reads the three kinds and plans", () => {
    const xs = parseTrainJsonl(
      [
        JSON.stringify({ messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "yo" }] }),
        "",
        JSON.stringify({ prompt: "Once", completion: " upon" }),
        JSON.stringify({ prompt: [{ role: "user", content: "q" }], chosen: "a", rejected: "b", plan: { inject: { concept: "ocean", layer: 3, strength: 4, from: "trial" } } }),
      ].join("\n"),
      "d.jsonl",
    );
    assert.deepEqual(xs.map((x) => x.kind), ["chat", "completion", "pair"]);
    assert.deepEqual(xs[2]!.inject, [{ concept: "ocean", layer: 3, strength: 4, from: "trial" }]);
    assert.equal(xs[1]!.where, "d.jsonl:3");
  });
  test("errors name file:line and the field", () => {
    err('{"messages": [{"role": "user", "content": "hi"}]}', /^d\.jsonl:1: field "messages" has no assistant/);
    err('\n{"prompt": "p", "chosen": 3, "rejected": "r"}', /^d\.jsonl:2: field "chosen" must be a string/);
    err('{"prompt": "p", "chosen": "c"}', /d\.jsonl:1: field "rejected"/);
    err('{"messages": [{"role": "user"}]}', /d\.jsonl:1: field "messages\[0\]"/);
    err("{oops", /d\.jsonl:1: not valid JSON/);
    err('{"prompt": "p", "completion": "c", "plan": {"inject": {"layer": 1, "strength": 2}}}', /d\.jsonl:1: field "plan\.inject" needs exactly one of "concept"/);
    err('{"prompt": "p", "completion": "c", "plan": {"inject": {"concept": "x", "layer": -1, "strength": 2}}}', /field "plan\.inject\.layer"/);
    err('{"prompt": "p", "completion": "c", "plan": {"inject": {"concept": "x", "layer": 1, "strength": 2, "from": "end"}}}', /field "plan\.inject\.from"/);
    err('{"prompt": "p", "completion": "c", "plan": {"steer": 1}}', /field "plan\.steer" is not known/);
    err('{"text": "x"}', /d\.jsonl:1: expected "messages"/);
    err("\n\n", /d\.jsonl: no examples/);
  });
});

describe("schedule and params", () => {
  test("batches: each epoch a permutation, a pure function of (seed, step)", () => {
    const n = 7, b = 3;
    const epoch0 = [0, 1, 2].flatMap((s) => batchIndices(s, b, n, 5));
    assert.deepEqual([...epoch0].sort(), [0, 1, 2, 3, 4, 5, 6]);
    assert.deepEqual(batchIndices(4, b, n, 5), batchIndices(4, b, n, 5));
    const epoch1 = [3, 4, 5].flatMap((s) => batchIndices(s, b, n, 5));
    assert.notDeepEqual(epoch1, epoch0, "a new order each epoch");
    assert.notDeepEqual([0, 1, 2].flatMap((s) => batchIndices(s, b, n, 6)), epoch0, "the seed matters");
  });

  test("ParamSet flattens vector, scale, lora (and a delta) and writes back", () => {
    const ps: TrainParam[] = [
      { kind: "vector", at: "blocks.0.hook_resid_post", value: Float32Array.of(1, 2) },
      { kind: "scale", at: "blocks.0.hook_resid_post", vector: Float32Array.of(1, 1), value: 3 },
      { kind: "lora", layer: 0, linear: "attn.q", rank: 1, a: Float32Array.of(4, 5), b: Float32Array.of(6, 7, 8), scale: 2 },
      { kind: "delta", name: "blocks.0.attn.q.weight", value: Float32Array.of(9) } as unknown as TrainParam,
    ];
    const s = new ParamSet(ps);
    assert.equal(s.size, 9);
    assert.deepEqual(Array.from(s.get()), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    s.set([10, 20, 30, 40, 50, 60, 70, 80, 90]);
    assert.deepEqual([Array.from((ps[0] as { value: Float32Array }).value), (ps[1] as { value: number }).value, (ps[3] as unknown as { value: Float32Array }).value[0]], [[10, 20], 30, 90]);
    const g = s.flattenGrads([[Float32Array.of(1, 2)], [Float32Array.of(3)], [Float32Array.of(4, 5), Float32Array.of(6, 7, 8)], [Float32Array.of(9)]]);
    assert.deepEqual(Array.from(g), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });

  test("random_lora matches the target update norms", () => {
    const p: TrainParam = { kind: "lora", layer: 0, linear: "attn.q", rank: 2, a: new Float32Array(2 * 5), b: new Float32Array(3 * 2), scale: 4 };
    const [q] = randomLora([p], [0.7], 3);
    assert.ok(Math.abs(loraDeltaNorm(q as Extract<TrainParam, { kind: "lora" }>) - 0.7) < 1e-5);
    assert.ok((q as Extract<TrainParam, { kind: "lora" }>).b.some((v) => v !== 0));
  });
});
