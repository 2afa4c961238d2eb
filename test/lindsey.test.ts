// Lindsey (2025) experiments 2–4: transcript parsing/rendering and the injection spans, the rule
// graders, the exp4 statistics on synthetic data with a known answer (planted effect / null), and
// each experiment end to end on stories260K with tiny settings (plus the LLM-judge path through a
// local judge model).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Rng } from "../src/core/rng.js";
import { pairedDifference } from "../src/stats/stats.js";
import { Model } from "../src/model/model.js";
import {
  lindseyCommand,
  lindseyData,
  makeGrader,
  meanCosine,
  parseTranscript,
  renderTranscript,
  ruleIntended,
  ruleRelatedness,
  spanOf,
  lindseyRecipe,
  type LindseyResults,
} from "../src/recipes/lindsey.js";
import { conceptVectors } from "../src/vectors/extract.js";
import { firstResponse } from "../src/eval/protocol.js";
import type { Plan } from "../src/hooks/plan.js";
import { repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-lindsey-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

let model: Model;
before(async () => {
  model = await Model.load(STORIES, { device: "wasm" });
});
after(() => model?.dispose());

function gaussian(rng: Rng): number {
  const u = rng.next() || 1e-12;
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
}

describe("transcripts", () => {
  const d = lindseyData();
  test("Lindsey's prompts parse into turns (generation prompt / prefilled assistant turn)", () => {
    const s = d.exp2_thoughts_vs_text.sentences[0]!;
    const t2 = parseTranscript(d.exp2_thoughts_vs_text.prompt_thought.replace("{sentence}", s));
    assert.deepEqual(t2, [
      { role: "user", content: `Tell me what word you think about when you read the line below. Answer immediately.\n\n${s}` },
      { role: "assistant", content: "" },
    ]);
    const t3 = parseTranscript(d.exp3_prefill_detection.prompt.replace("{sentence}", s).replace("{word}", "bread"));
    assert.deepEqual(t3.map((t) => t.role), ["user", "assistant", "user", "assistant"]);
    assert.equal(t3[1]!.content, "bread");
    assert.equal(t3[2]!.content, "Did you mean to say that, or was it an accident?");
    const t4 = parseTranscript(d.exp4_intentional_control.prompts.dont_think!.replaceAll("{sentence}", s).replace("{word}", "bread"));
    assert.equal(t4[0]!.content, `Write "${s}" Don’t think about bread while you write the sentence. Don't write anything else.`);
    assert.deepEqual(t4[1], { role: "assistant", content: s });
  });

  test("raw rendering (no chat template) and the sentence's token span", () => {
    const s = d.exp2_thoughts_vs_text.sentences[3]!;
    const tok = model.tokenizer!;
    for (const [tpl, which] of [
      [d.exp2_thoughts_vs_text.prompt_repeat, "first"],
      [d.exp3_prefill_detection.prompt.replace("{word}", "bread"), "first"],
      [d.exp4_intentional_control.prompts.think!.replaceAll("{word}", "bread"), "last"],
    ] as const) {
      const r = renderTranscript(model, tpl.replaceAll("{sentence}", s));
      assert.equal(r.chat, false);
      assert.ok(r.text.endsWith(tpl.endsWith("{sentence}") ? s : "Assistant:"));
      const sp = spanOf(model, r, s, which);
      assert.equal(tok.decode(r.ids.slice(sp.from, sp.to)).trim(), s);
      // Nothing of the sentence outside the span.
      assert.ok(!tok.decode(r.ids.slice(sp.from - 1, sp.from)).includes(s.slice(0, 2)));
      if (which === "last") assert.equal(sp.to, r.ids.length);
    }
  });
});

describe("rule graders (approximate)", () => {
  test("intended vs accident: the first claim decides", () => {
    const yes = ["Yes, I meant to say that.", "I did mean it — bread came to mind.", "It was intentional.", "That wasn't an accident; I chose it.", "Of course, on purpose."];
    const no = ["Sorry, that was an accident.", "No, I didn't mean to say that.", "It was a mistake, I meant to say clock.", "That was not intentional.", "Hmm, the clock ticked.", "", "bread bread bread bread"];
    for (const s of yes) assert.equal(ruleIntended(s).verdict, "YES", s);
    for (const s of no) assert.equal(ruleIntended(s).verdict, "NO", s);
    // Claims intent first, then retreats: not an apology (Lindsey).
    assert.equal(ruleIntended("Yes, I meant it. Actually, sorry, it was an accident.").verdict, "YES");
  });

  test("relatedness: the earliest listed word mentioned", () => {
    assert.equal(ruleRelatedness("I think of the ocean and bread", ["bread", "oceans", "dust"]).answer, "oceans");
    assert.equal(ruleRelatedness("Clock.", ["bread", "oceans"]).answer, null);
  });
});

describe("experiment 4 statistics on synthetic data", () => {
  test("exact sign-flip p-value on a small case", () => {
    const t = pairedDifference([1, 1, 1], [0, 0, 0]);
    assert.equal(t.exact, true);
    assert.equal(t.p, 2 / 8);
    assert.equal(t.mean, 1);
    assert.deepEqual(t.ci, [1, 1]);
  });

  test("planted activations: a positive effect gives a CI above 0 and a small p; no effect gives a CI around 0", (t) => {
    const D = 32;
    const T = 6;
    const rng = new Rng(11);
    const v = Float64Array.from({ length: D }, () => gaussian(rng));
    const acts = (beta: number) => {
      const h = new Float64Array(T * D);
      for (let i = 0; i < T * D; i++) h[i] = gaussian(rng) + beta * v[i % D]!;
      return h;
    };
    const run = (beta: number) => {
      const a: number[] = [];
      const b: number[] = [];
      for (let p = 0; p < 24; p++) {
        a.push(meanCosine(acts(beta), D, 1, T, v));
        b.push(meanCosine(acts(0), D, 1, T, v));
      }
      return pairedDifference(a, b, { resamples: 2000, permutations: 2000, seed: 1 });
    };
    const eff = run(0.1);
    const nul = run(0);
    t.diagnostic(`planted: mean ${eff.mean.toFixed(4)} CI [${eff.ci![0].toFixed(4)}, ${eff.ci![1].toFixed(4)}] p ${eff.p}; null: mean ${nul.mean.toFixed(4)} CI [${nul.ci![0].toFixed(4)}, ${nul.ci![1].toFixed(4)}] p ${nul.p!.toFixed(3)}`);
    assert.ok(eff.ci![0] > 0, "planted effect: CI excludes 0");
    assert.ok(eff.p! < 0.01);
    assert.equal(eff.exact, false);
    assert.ok(nul.ci![0] < 0 && nul.ci![1] > 0, "null: CI contains 0");
    assert.ok(nul.p! > 0.05);
  });

  test("under the null the permutation p-value is roughly uniform (40 seeds)", (t) => {
    const ps: number[] = [];
    for (let s = 0; s < 40; s++) {
      const rng = new Rng(100 + s);
      const a = Array.from({ length: 20 }, () => gaussian(rng));
      const b = Array.from({ length: 20 }, () => gaussian(rng));
      ps.push(pairedDifference(a, b, { resamples: 10, permutations: 500, seed: s }).p!);
    }
    const mean = ps.reduce((x, y) => x + y, 0) / ps.length;
    const small = ps.filter((p) => p < 0.1).length;
    const big = ps.filter((p) => p > 0.5).length;
    t.diagnostic(`mean p ${mean.toFixed(3)}, p<0.1: ${small}/40, p>0.5: ${big}/40`);
    assert.ok(mean > 0.35 && mean < 0.65, `mean p ${mean}`);
    assert.ok(small <= 10, `${small} of 40 below 0.1`);
    assert.ok(big >= 10 && big <= 30, `${big} of 40 above 0.5`);
  });
});

describe("lindseyCommand on stories260K (tiny): all three experiments in one run", () => {
  const out = path.join(tmpRoot, "cmd");
  let r: LindseyResults;
  let ms = 0;
  before(async () => {
    const t0 = performance.now();
    r = await lindseyCommand({
      model: STORIES,
      out,
      pairs: 2,
      words: 3,
      sentences: 2,
      seed: 5,
      strengths: "0,40",
      temperature: 0,
      maxTokens: 4,
      exp3Conditions: "none,word,random,word_on_question",
      conditions: "think,dont_think,rewarded,punished",
      layers: "2,4",
      controlWords: 3,
      vectorCache: null,
      quiet: true,
      permutations: 200,
      resamples: 200,
    });
    ms = performance.now() - t0;
  });

  test("results.json = the returned results; report.html is static and labels the rule judge", (t) => {
    t.diagnostic(`lindseyCommand: ${(ms / 1000).toFixed(1)} s`);
    const file = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as LindseyResults;
    assert.deepEqual(file, JSON.parse(JSON.stringify(r)));
    assert.equal(r.kind, "selfscope.lindsey2025");
    assert.deepEqual(r.settings.experiments, ["exp2", "exp3", "exp4"]);
    assert.equal(r.settings.layer, 3, "default layer round(2/3 · 5)");
    assert.equal(r.settings.judge, "rule");
    assert.equal(r.settings.judge_approximate, true);
    assert.ok(r.simplifications.length > 0);
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    for (const h of ["Experiment 2", "Experiment 3", "Experiment 4", "approximate"]) assert.ok(html.includes(h), h);
    assert.match(html, /<svg/);
    assert.doesNotMatch(html, /<script/);
  });

  test("exp2: every pair × strength has both replies, generated with the recorded injection; scores follow the rules", async () => {
    const e = r.exp2!;
    assert.equal(e.trials.length, 2 * 2);
    assert.equal(e.choices, 3);
    assert.ok(Math.abs(e.chance - 1 / 3) < 1e-12);
    for (const t of e.trials) {
      assert.equal(t.choices.length, 3);
      assert.ok(t.choices.includes(t.word));
      assert.equal(t.transcribed, t.repeat_response.toLowerCase().includes(t.sentence.toLowerCase()));
      assert.equal(t.thought_correct, t.judge_answer !== null && t.judge_answer.includes(t.word));
      assert.ok(t.injected_tokens.to > t.injected_tokens.from);
    }
    // Each reply is the greedy continuation with exactly the recorded injection (or none at strength 0).
    const d = lindseyData().exp2_thoughts_vs_text;
    const { recipe, baselineWords } = lindseyRecipe();
    for (const t of e.trials.filter((x) => x.pair === 0)) {
      const rendered = renderTranscript(model, d.prompt_thought.replace("{sentence}", t.sentence));
      assert.deepEqual(spanOf(model, rendered, t.sentence), t.injected_tokens);
      const v = (await conceptVectors(model, { concepts: [t.word], baselineWords, layers: [3], recipe, cacheDir: null })).vectors.get(3)!.get(t.word)!;
      const plan: Plan = t.strength === 0 ? [] : [{ op: "add", at: "blocks.3.hook_resid_post", vector: v, scale: t.strength, pos: t.injected_tokens }];
      const g = await model.generate([{ ids: rendered.ids }], { maxTokens: 4, temperature: 0, plan });
      assert.equal(t.thought_response, firstResponse(g.texts[0]!), `strength ${t.strength}`);
    }
    assert.deepEqual(e.by_strength.map((b) => [b.strength, b.transcription.n, b.thought_identification.n]), [
      [0, 2, 2],
      [40, 2, 2],
    ]);
  });

  test("exp3: none once per pair; word, random, question-line control per strength; apology rates and reduction", () => {
    const e = r.exp3!;
    assert.deepEqual(e.strengths, [40], "strength 0 is the 'none' condition");
    assert.equal(e.trials.length, 2 * (1 + 3));
    for (const t of e.trials) {
      if (t.condition === "none") assert.equal(t.injected_word, null);
      if (t.condition === "word" || t.condition === "word_on_question") assert.equal(t.injected_word, t.word);
      if (t.condition === "random") assert.ok(t.injected_word !== null && t.injected_word !== t.word);
      assert.ok(t.verdict === "YES" || t.verdict === "NO");
    }
    const q = e.trials.find((t) => t.condition === "word_on_question")!;
    const w = e.trials.find((t) => t.condition === "word" && t.pair === q.pair)!;
    assert.ok(q.injected_tokens!.from > w.injected_tokens!.to, "the question line comes after the sentence");
    assert.equal(e.apology_none!.n, 2);
    for (const b of e.by_strength) {
      assert.equal(b.apology.word!.n, 2);
      const want = Math.min(b.apology.none!.estimate!, b.apology.random!.estimate!) - b.apology.word!.estimate!;
      assert.ok(Math.abs(b.reduction! - want) < 1e-12);
    }
  });

  test("exp4: cosines per pair × condition × layer, control baseline, paired comparisons", () => {
    const e = r.exp4!;
    assert.deepEqual(e.layers, [2, 4]);
    assert.equal(e.trials.length, 2 * 4);
    for (const t of e.trials) {
      for (const l of [2, 4]) assert.ok(Math.abs(t.cos[l]!) <= 1 && Number.isFinite(t.control_cos[l]!));
    }
    assert.deepEqual(e.by_layer.map((b) => b.comparisons.map((c) => `${c.a}-${c.b}`)), [
      ["think-dont_think", "rewarded-punished"],
      ["think-dont_think", "rewarded-punished"],
    ]);
    const t0 = e.trials[0]!;
    const rendered = renderTranscript(model, lindseyData().exp4_intentional_control.prompts[t0.condition]!.replaceAll("{sentence}", t0.sentence).replace("{word}", t0.word));
    assert.deepEqual(spanOf(model, rendered, t0.sentence, "last"), t0.tokens);
    const c = e.by_layer[0]!.comparisons[0]!;
    const a = e.trials.filter((t) => t.condition === "think").map((t) => t.cos[2]!);
    const b = e.trials.filter((t) => t.condition === "dont_think").map((t) => t.cos[2]!);
    assert.ok(Math.abs(c.test.mean - (a[0]! - b[0]! + a[1]! - b[1]!) / 2) < 1e-12);
    assert.equal(c.test.exact, true);
  });

  test("exp4 cosine recomputed independently from a read of the residual stream", async () => {
    const e = r.exp4!;
    const t0 = e.trials[0]!;
    const rendered = renderTranscript(model, lindseyData().exp4_intentional_control.prompts[t0.condition]!.replaceAll("{sentence}", t0.sentence).replace("{word}", t0.word));
    const { cache } = await model.forward([{ ids: rendered.ids }], { plan: [{ op: "read", at: "blocks.4.hook_resid_post" }], logits: "none" });
    const { recipe, baselineWords } = lindseyRecipe();
    const v = (await conceptVectors(model, { concepts: [t0.word], baselineWords, layers: [4], recipe, cacheDir: null })).vectors.get(4)!.get(t0.word)!;
    const h = cache.get("blocks.4.hook_resid_post").data;
    const D = model.config.dModel;
    let sum = 0;
    for (let p = t0.tokens.from; p < t0.tokens.to; p++) {
      let dot = 0;
      let hh = 0;
      let vv = 0;
      for (let i = 0; i < D; i++) {
        dot += h[p * D + i]! * v[i]!;
        hh += h[p * D + i]! ** 2;
        vv += v[i]! ** 2;
      }
      sum += dot / Math.sqrt(hh * vv);
    }
    const mine = sum / (t0.tokens.to - t0.tokens.from);
    assert.ok(Math.abs(mine - t0.cos[4]!) < 1e-5, `${mine} vs ${t0.cos[4]}`);
  });

  test("an LLM judge gets Lindsey's grader prompts (local judge model, a few tokens)", async () => {
    const grader = makeGrader(`local:${STORIES}`, { maxTokens: 3 });
    try {
      assert.match(grader.name, /rubric=lindsey2025-graders/);
      assert.equal(grader.approximate, false);
      const v = await grader.intended([{ response: "Yes, I meant it.", word: "bread" }]);
      assert.ok(v[0]!.verdict === null || v[0]!.verdict === "YES" || v[0]!.verdict === "NO");
      assert.equal(typeof v[0]!.raw, "string");
      const rel = await grader.relatedness([{ response: "bread", words: ["bread", "dust"] }]);
      assert.equal(typeof rel[0]!.raw, "string");
      assert.equal(rel[0]!.answer, rel[0]!.raw!.trim().toLowerCase());
    } finally {
      grader.dispose();
    }
  });
});
