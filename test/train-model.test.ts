// Training on the bundled stories260K (cpu, one thread): the SFT assistant mask (targets and the
// loss they give, against log-softmax of the forward logits), SFT loss falling with LoRA, the DPO
// gradient against central finite differences of the DPO objective itself, and a toy DPO problem
// whose optimum is known in closed form (Bradley–Terry: σ(β·margin*) = p).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import type { TrainParam } from "../src/engine/grad.js";
import { Model } from "../src/model/model.js";
import { buildExamples, encodeChat, parseTrainJsonl, type Example } from "../src/train/data.js";
import { batchLossAndGrad, referenceLogps, train } from "../src/train/loop.js";
import { DEFAULT_HYPER, objective } from "../src/train/objectives.js";
import { initLora, ParamSet } from "../src/train/params.js";
import { adapterPlan, readAdapter, writeAdapter } from "../src/train/adapter.js";
import os from "node:os";
import { repoDir } from "./support/paths.js";
import { withGemmaTemplate } from "./support/templates.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");

let model: Model;
before(async () => {
  model = await Model.load(STORIES, { threads: 1 });
});
after(() => model?.dispose());


const jsonl = (xs: unknown[]) => xs.map((x) => JSON.stringify(x)).join("\n");

function logSoftmax(row: Float32Array, V: number, pos: number, tok: number): number {
  let m = -Infinity;
  for (let v = 0; v < V; v++) m = Math.max(m, row[pos * V + v]!);
  let s = 0;
  for (let v = 0; v < V; v++) s += Math.exp(row[pos * V + v]! - m);
  return row[pos * V + tok]! - m - Math.log(s);
}

describe("SFT on stories260K", () => {
  test("the assistant mask: targets on assistant tokens only, and the loss is their mean −log p", async () => {
    const m = withGemmaTemplate(model);
    const messages = [
      { role: "user", content: "Tell me about the cat." },
      { role: "assistant", content: "The cat sat." },
      { role: "user", content: "And then?" },
      { role: "assistant", content: "It ran home." },
    ];
    const seq = encodeChat(m, messages, "x:1");
    const tok = model.tokenizer!;
    // The expected render, written out: each model turn's content and its "<end_of_turn>\n" are targets.
    const u = (s: string) => `<start_of_turn>user\n${s}<end_of_turn>\n<start_of_turn>model\n`;
    const parts = ["<s>" + u("Tell me about the cat."), "The cat sat.<end_of_turn>\n", u("And then?"), "It ran home.<end_of_turn>\n"];
    assert.equal(seq.text, parts.join(""));
    const len = (k: number) => tok.encode(parts.slice(0, k).join(""), { addSpecial: false }).length;
    const on = new Set<number>();
    for (const [a, b] of [[len(1), len(2)], [len(3), len(4)]] as const) for (let j = a; j < b; j++) on.add(j);
    const want = seq.ids.map((_, i) => (on.has(i + 1) ? seq.ids[i + 1]! : -1));
    assert.deepEqual(seq.targets, want);
    assert.equal(seq.nTargets, on.size);
    assert.ok(on.size > 4 && on.size < seq.ids.length / 2, "a real mask (some tokens in, most out)");
    // The loss lossAndGrad takes with these targets = the mean of −log softmax at exactly those positions.
    const r = await model.lossAndGrad([{ ids: seq.ids }], { targets: [seq.targets], params: [] });
    const f = await model.forward([{ ids: seq.ids }]);
    const V = model.config.dVocab;
    let s = 0;
    seq.targets.forEach((t, i) => {
      if (t >= 0) s -= logSoftmax(f.logits[0]!, V, i, t);
    });
    assert.ok(Math.abs(r.loss - s / on.size) < 1e-4 * Math.max(1, s / on.size), `loss ${r.loss} vs ${s / on.size}`);
  });

  test("LoRA SFT lowers the loss on its data", async (t) => {
    const raw = parseTrainJsonl(
      jsonl([
        { prompt: "Once upon a time", completion: " there was a big red dog." },
        { prompt: "Lily liked", completion: " to play with her ball." },
        { prompt: "The sun", completion: " was hot and the sky was blue." },
        { prompt: "Tom said", completion: " hello to the little bird." },
      ]),
      "sft.jsonl",
    );
    const obj = objective("sft");
    const ex = await buildExamples(model, raw, obj, { seed: 1, vectorCache: null });
    const params = initLora(model.config, { rank: 4, alpha: 8, targets: ["attn.q", "attn.v", "mlp.down"], seed: 1 });
    const evals: number[] = [];
    const res = await train({ model, params, examples: ex, config: { objective: obj, hyper: DEFAULT_HYPER, lr: 1e-2, warmup: 0, steps: 30, batch: 4, seed: 1 }, modelHash: "x", evalEvery: 10, onEval: async (step) => void evals.push(step) });
    assert.deepEqual(evals, [10, 20, 30], "the evaluation hook runs every 10 steps");
    const first = res.curve[0]!.loss;
    const last = res.curve[res.curve.length - 1]!.loss;
    t.diagnostic(`SFT loss ${first.toFixed(4)} → ${last.toFixed(4)} in 30 steps`);
    assert.ok(last < 0.7 * first, `loss ${first.toFixed(3)} → ${last.toFixed(3)}`);
    // B starts at zero (PEFT), so the first step's loss is the base model's.
    const base = await model.lossAndGrad(ex.map((e) => ({ ids: (e as Extract<Example, { kind: "sft" }>).seq.ids })), { targets: ex.map((e) => (e as Extract<Example, { kind: "sft" }>).seq.targets), params: [] });
    assert.ok(Math.abs(base.loss - first) < 1e-5, `${base.loss} vs ${first}`);
  });
});

const PAIRS = [
  { prompt: "Once upon a time", chosen: " there was a dog.", rejected: " the sky fell." },
  { prompt: "Lily liked", chosen: " to play.", rejected: " a box of rocks." },
];

describe("adapters", () => {
  test("a trained vector written, read back and run as a withPlan view gives the training pass's loss", async () => {
    const D = model.config.dModel;
    const params: TrainParam[] = [{ kind: "vector", at: "blocks.2.hook_resid_post", value: Float32Array.from({ length: D }, (_, i) => 0.3 * Math.sin(i)) }];
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "adapter-")), "a.safetensors");
    writeAdapter(file, params, { objective: "sft" });
    const back = readAdapter(file);
    assert.deepEqual(back.config, { objective: "sft" });
    assert.deepEqual(Array.from((back.params[0] as { value: Float32Array }).value), Array.from((params[0] as { value: Float32Array }).value));
    const ids = model.tokenizer!.encode("Once upon a time there was a cat", { addSpecial: true });
    const targets = ids.map((_, i) => (i + 1 < ids.length ? ids[i + 1]! : -1));
    const trained = await model.lossAndGrad([{ ids }], { targets: [targets], params });
    const f = await model.withPlan(adapterPlan(back.params)).forward([{ ids }]);
    let s = 0;
    targets.forEach((t, i) => {
      if (t >= 0) s -= logSoftmax(f.logits[0]!, model.config.dVocab, i, t);
    });
    const plain = await model.lossAndGrad([{ ids }], { targets: [targets], params: [] });
    assert.ok(Math.abs(plain.loss - trained.loss) > 1e-3, "the vector changes the loss (else the check is vacuous)");
    assert.ok(Math.abs(s / (ids.length - 1) - trained.loss) < 1e-4, `${s / (ids.length - 1)} vs ${trained.loss}`);
    const lora = initLora(model.config, { rank: 1, alpha: 1, targets: ["attn.q"], layers: [0], seed: 1 });
    assert.throws(() => adapterPlan(lora), /changes weights/);
  });
});

describe("DPO on stories260K", () => {
  test("preset data transforms: reversed swaps, shuffled permutes the rejected (seeded), chosen/rejected SFT keep one side", async () => {
    const pairs = [0, 1, 2, 3, 4, 5].map((i) => ({ prompt: `Tom had ${i}`, chosen: ` good ${i}.`, rejected: ` bad ${i} day.` }));
    const raw = parseTrainJsonl(jsonl(pairs), "p.jsonl");
    const build = (name: string) => buildExamples(model, raw, objective(name), { seed: 4, vectorCache: null });
    const dpo = (await build("dpo")) as Extract<Example, { kind: "pair" }>[];
    const rev = (await build("dpo_reversed")) as Extract<Example, { kind: "pair" }>[];
    rev.forEach((e, i) => {
      assert.deepEqual(e.chosen.ids, dpo[i]!.rejected.ids);
      assert.deepEqual(e.rejected.ids, dpo[i]!.chosen.ids);
    });
    const shuf = (await build("dpo_shuffled")) as Extract<Example, { kind: "pair" }>[];
    const tails = (xs: typeof dpo) => xs.map((e) => model.tokenizer!.decode(e.rejected.ids.slice(e.rejected.assistantStart)));
    assert.deepEqual([...tails(shuf)].sort(), [...tails(dpo)].sort(), "a permutation of the rejected responses");
    assert.notDeepEqual(tails(shuf), tails(dpo), "not the identity");
    shuf.forEach((e, i) => assert.deepEqual(e.chosen.ids, dpo[i]!.chosen.ids));
    const cs = await build("dpo_chosen_sft");
    const rs = await build("dpo_rejected_sft");
    cs.forEach((e, i) => assert.deepEqual(e.kind === "sft" && e.seq.ids, dpo[i]!.chosen.ids));
    rs.forEach((e, i) => assert.deepEqual(e.kind === "sft" && e.seq.ids, dpo[i]!.rejected.ids));
    // Only the response is a target: the prompt's tokens carry none.
    const c0 = dpo[0]!.chosen;
    assert.ok(c0.targets.slice(0, c0.assistantStart - 1).every((t) => t === -1) && c0.nTargets === c0.ids.length - c0.assistantStart);
  });

  for (const name of ["dpo", "contrastive_margin_kl", "sft_chosen_kl"]) test(`the ${name} gradient matches central differences of the objective itself (f64 over the param vector)`, async (t) => {
    const obj = objective(name);
    const ex = await buildExamples(model, parseTrainJsonl(jsonl(PAIRS), "p.jsonl"), obj, { seed: 1, vectorCache: null });
    const params: TrainParam[] = initLora(model.config, { rank: 2, alpha: 4, targets: ["attn.v", "mlp.up"], layers: [1, 3], seed: 2 });
    const D = model.config.dModel;
    params.push({ kind: "vector", at: "blocks.2.hook_resid_post", value: new Float32Array(D) });
    const set = new ParamSet(params);
    const refs = await referenceLogps(model, params.map((p) => (p.kind === "lora" ? { ...p, a: p.a.slice(), b: p.b.slice() } : { ...p })), ex);
    // Move away from the init (B ≠ 0, the vector ≠ 0) so every factor has a gradient and the reference differs from the policy.
    const x0 = set.get();
    for (let i = 0; i < x0.length; i++) x0[i] = x0[i]! + 0.05 * Math.sin(1.7 * i + 0.3);
    set.set(x0);
    // β 0.5; a margin of 50 nats keeps the hinge active (away from its kink); λ 0.05.
    const hyper = { ...DEFAULT_HYPER, beta: 0.5, margin: 50, kl: 0.05 };
    const { grad } = await batchLossAndGrad(model, set, obj, hyper, ex, refs);
    const L = async (x: Float32Array) => {
      set.set(x);
      return (await batchLossAndGrad(model, set, obj, hyper, ex, refs)).loss;
    };
    // The largest gradient coordinates (FD is informative there) and a few others.
    const order = Array.from(grad, (g, i) => [Math.abs(g), i] as const).sort((a, b) => b[0] - a[0]).map(([, i]) => i);
    const picks = [...order.slice(0, 6), order[Math.floor(order.length / 3)]!, order[Math.floor(order.length / 2)]!];
    // h: truncation error O(h²) against f32 rounding of the loss (~1e-7) / h.
    const h = 4e-3;
    const got: number[] = [];
    const fdv: number[] = [];
    for (const i of picks) {
      const xp = x0.slice(), xm = x0.slice();
      xp[i] = x0[i]! + h;
      xm[i] = x0[i]! - h;
      // Steps are exact in f32 around these values; the difference is taken in f64 on the actual step.
      const fdi = ((await L(xp)) - (await L(xm))) / (xp[i]! - xm[i]!);
      got.push(grad[i]!);
      fdv.push(fdi);
    }
    set.set(x0);
    let d = 0, mx = 0;
    got.forEach((g, k) => {
      d = Math.max(d, Math.abs(g - fdv[k]!));
      mx = Math.max(mx, Math.abs(fdv[k]!));
    });
    t.diagnostic(`${name} gradient vs FD: relative error ${(d / mx).toExponential(2)} over ${picks.length} coordinates`);
    assert.ok(mx > 1e-4, `finite differences are all ~0 (max ${mx})`);
    assert.ok(d / mx <= 1e-3, `relative error ${(d / mx).toExponential(2)} (grad ${got.map((g) => g.toExponential(3))}, fd ${fdv.map((g) => g.toExponential(3))})`);
  });

  test("toy DPO reaches its closed-form optimum: σ(β·margin) = p, margin* = logit(p)/β", async (t) => {
    // Three votes for "a" over "b" and one for "b" over "a" on the same prompt: p = 3/4. With a free
    // enough policy, DPO's optimum has log-ratio margin m = [log π/π_ref](a) − [log π/π_ref](b) = ln 3 / β.
    const a = " a dog.", b = " the sky.";
    const data = [
      { prompt: "Once upon a time", chosen: a, rejected: b },
      { prompt: "Once upon a time", chosen: a, rejected: b },
      { prompt: "Once upon a time", chosen: a, rejected: b },
      { prompt: "Once upon a time", chosen: b, rejected: a },
    ];
    const beta = 0.5;
    const obj = objective("dpo");
    const ex = await buildExamples(model, parseTrainJsonl(jsonl(data), "toy.jsonl"), obj, { seed: 1, vectorCache: null });
    const D = model.config.dModel;
    const L = model.config.nLayers;
    const params: TrainParam[] = [{ kind: "vector", at: `blocks.${L - 1}.hook_resid_post`, value: new Float32Array(D) }];
    const res = await train({ model, params, examples: ex, config: { objective: obj, hyper: { ...DEFAULT_HYPER, beta }, lr: 0.02, warmup: 0, steps: 250, batch: 4, seed: 3 }, modelHash: "x" });
    const set = new ParamSet(res.params);
    const ref = await referenceLogps(model, [{ kind: "vector", at: `blocks.${L - 1}.hook_resid_post`, value: new Float32Array(D) }], ex.slice(0, 1));
    const pol = await referenceLogps(model, set.params, ex.slice(0, 1));
    const margin = pol[0]!.rc - ref[0]!.rc - (pol[0]!.rr - ref[0]!.rr);
    const want = Math.log(3) / beta;
    t.diagnostic(`toy DPO: learned margin ${margin.toFixed(4)}, closed form ln3/β = ${want.toFixed(4)}`);
    assert.ok(Math.abs(margin - want) < 0.02 * want, `margin ${margin.toFixed(4)}, closed form ${want.toFixed(4)} (final loss ${res.curve.at(-1)!.loss.toFixed(5)})`);
    // The optimum's loss: −[p ln σ(βm*) + (1−p) ln σ(−βm*)] with σ(βm*) = 3/4.
    const lstar = -(0.75 * Math.log(0.75) + 0.25 * Math.log(0.25));
    const final = (await batchLossAndGrad(model, set, obj, { ...DEFAULT_HYPER, beta }, ex, await referenceLogps(model, [{ kind: "vector", at: `blocks.${L - 1}.hook_resid_post`, value: new Float32Array(D) }], ex))).loss;
    assert.ok(final - lstar < 1e-3 && final >= lstar - 1e-5, `loss ${final} vs optimum ${lstar}`);
  });
});

describe("plan.inject from \"trial\" in training", () => {
  test("the protocol's { marker: \"Trial \" } position resolves in lossAndGrad exactly as the equivalent { from } (raw dialogue, the vectors inject uses)", async () => {
    const prompt = "User: Do you detect an injected thought?\n\nAssistant: Trial 3: Do you detect one?\n\nAssistant:";
    const data = [{ prompt, chosen: " Yes, dog.", rejected: " No.", plan: { inject: { concept: "dog", layer: 1, strength: 2, from: "trial" } } }];
    const obj = objective("dpo_chosen_sft");
    const [ex] = await buildExamples(model, parseTrainJsonl(jsonl(data), "marker.jsonl"), obj, { seed: 1, vectorCache: null });
    assert.ok(ex && ex.kind === "sft");
    const inj = ex.inject[0]!;
    assert.deepEqual(inj.pos, { marker: "Trial ", offset: -1 });
    // The token before "Trial ", counted by hand.
    const tok = model.tokenizer!;
    const from = tok.encode(ex.seq.text.slice(0, ex.seq.text.indexOf("Trial ")), { addSpecial: false }).length - 1;
    const params = initLora(model.config, { rank: 2, alpha: 2, targets: ["mlp.up"], layers: [2], seed: 5 });
    (params[0] as Extract<TrainParam, { kind: "lora" }>).b.fill(0.01);
    const run = (pos: unknown) =>
      model.lossAndGrad([{ ids: ex.seq.ids, text: ex.seq.text }], { targets: [ex.seq.targets], params, plan: [{ op: "add", at: inj.at, vector: inj.vector, scale: inj.strength, pos: pos as { from: number }, rows: [0] }] });
    const byMarker = await run(inj.pos);
    const byIndex = await run({ from });
    const none = await model.lossAndGrad([{ ids: ex.seq.ids, text: ex.seq.text }], { targets: [ex.seq.targets], params });
    assert.equal(byMarker.loss, byIndex.loss);
    assert.deepEqual(byMarker.grads, byIndex.grads);
    assert.notEqual(byMarker.loss, none.loss, "the injection changes the loss");
  });
});
