// Steering resistance (issue 17.4; src/recipes/esr.ts, src/stats/correlates.ts). The rule judge on
// written answers; feature correlates on planted data (the planted feature comes out on top, a
// constant one is skipped); end to end on the bundled organism: the control strength equals plain
// generation, steering changes answers, rates equal a recount of the trials, a rerun resumes
// everything; with a scripted LLM judge (local server) and an SAE, the verdicts are the script's,
// a failed judge call is counted and retried on the rerun, and the ablation check runs.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import { Rng } from "../src/core/rng.js";
import { hookName } from "../src/hooks/names.js";
import { Model } from "../src/model/model.js";
import { esrCommand, readQuestions, ruleVerdicts, type EsrTrial } from "../src/recipes/esr.js";
import { featureCorrelates } from "../src/stats/correlates.js";
import { saveDictionary } from "../src/vectors/dictionary.js";
import { chatJudge } from "../src/judge/select.js";
import { repoDir } from "./support/paths.js";

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-esr-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
const ORGANISM = path.join(repoDir(), "models", "organism", "organism.gguf");
const QUESTIONS = path.join(repoDir(), "data", "esr", "questions.jsonl");

describe("esr pieces", () => {
  test("the rule judge: self-correction phrases, the reference as a word near the end", () => {
    assert.deepEqual(ruleVerdicts("Volcanoes erupt with lava... wait, I made a mistake. 2 + 3 is 5.", ["5", "five"]), { noticed: true, correct: true });
    assert.deepEqual(ruleVerdicts("The answer is 15.", ["5", "five"]), { noticed: false, correct: false });
    assert.deepEqual(ruleVerdicts("Lava, lava everywhere. Sorry, let me get back to the question: Paris.", ["Paris"]), { noticed: true, correct: true });
    assert.deepEqual(ruleVerdicts("The sky is blue but volcanoes are red.", ["blue"]), { noticed: false, correct: true });
  });

  test("feature correlates: the planted predictor is on top; a constant feature is skipped", () => {
    const rng = new Rng(3);
    const n = 120, F = 30;
    const outcome = Array.from({ length: n }, () => (rng.next() < 0.4 ? 1 : 0));
    const acts = new Float32Array(n * F);
    for (let t = 0; t < n; t++)
      for (let f = 0; f < F; f++) acts[t * F + f] = f === 4 ? 0 : f === 7 ? 2 * outcome[t]! + rng.next() : rng.next();
    const top = featureCorrelates(acts, F, outcome);
    assert.equal(top.length, F - 1);
    assert.equal(top[0]!.feature, 7);
    assert.ok(top[0]!.r > 0.8 && top[0]!.lo! > 0.7, JSON.stringify(top[0]));
    assert.ok(Math.abs(top[0]!.meanWith - top[0]!.meanWithout - 2) < 0.2);
    assert.ok(!top.some((x) => x.feature === 4));
    assert.ok(Math.abs(top[1]!.r) < 0.35);
  });

  test("without --judge, the configured default: an LLM when OPENAI_API_KEY is set, else the rule judge; each announced", () => {
    const notes: string[] = [];
    const rule = chatJudge(undefined, { env: {} }, (n) => notes.push(n));
    assert.deepEqual([rule.spec, rule.client], ["rule", null]);
    const llm = chatJudge(undefined, { env: { OPENAI_API_KEY: "sk-test-123456789" } }, (n) => notes.push(n));
    assert.equal(llm.spec, "openai:gpt-4.1-mini");
    assert.ok(llm.client !== null);
    assert.match(notes[0]!, /judge rule \(approximate\)/);
    assert.match(notes[1]!, /the default: OPENAI_API_KEY is set/);
    assert.throws(() => chatJudge("local:x.gguf", { env: {} }, () => undefined), /need openai:MODEL/);
  });

  test("questions are read and checked", () => {
    assert.equal(readQuestions(QUESTIONS).length, 16);
    const bad = path.join(tmpRoot, "bad.jsonl");
    fs.writeFileSync(bad, '{"question":"q"}\n');
    assert.throws(() => readQuestions(bad), /line 1: needs "question" and "answer"/);
  });
});

describe("selfscope esr on the bundled organism", () => {
  const common = { model: ORGANISM, questions: QUESTIONS, n: 3, concepts: "Volcanoes,Origami", layer: 2, strengths: "0,8", maxTokens: 12, threads: 2, quiet: true, vectorCache: null, judge: "rule" };

  test("rule judge: the control is plain generation, steering changes answers, rates recount the trials, a rerun resumes", async () => {
    const out = path.join(tmpRoot, "rule");
    const r = await esrCommand({ ...common, out });
    assert.equal(r.trials.length, 3 + 3 * 2);
    assert.equal(r.approximate, true);
    const model = await Model.load(ORGANISM, { threads: 2 });
    const qs = readQuestions(QUESTIONS).slice(0, 3);
    const plain = await model.generate(qs.map((q) => `User: ${q.question}\n\nAssistant:`), { maxTokens: 12, temperature: 0 });
    model.dispose();
    const control = r.trials.filter((t) => t.strength === 0);
    assert.deepEqual(control.map((t) => t.text), plain.texts);
    const steered = r.trials.filter((t) => t.strength === 8);
    assert.ok(steered.some((t) => !plain.texts.includes(t.text)), "steering changed an answer");
    for (const rate of r.rates) {
      const ts = r.trials.filter((t) => t.strength === rate.strength);
      assert.deepEqual([rate.noticed.n, rate.noticed.estimate], [ts.length, ts.filter((t) => t.noticed).length / ts.length]);
      assert.equal(rate.correct.estimate, ts.filter((t) => t.correct).length / ts.length);
    }
    for (const t of r.trials) assert.deepEqual({ noticed: t.noticed, correct: t.correct }, ruleVerdicts(t.text, qs.find((q) => q.id === t.question)!.answer));
    const again = await esrCommand({ ...common, out });
    assert.deepEqual(again.trials, r.trials);
    assert.equal(again.resumedSteps, 2 * 9);
  });

  describe("with a scripted judge and an SAE", () => {
    let server: http.Server;
    let base = "";
    let failOnce = true;
    const script = (answer: string, kind: "notice" | "correct") => (kind === "notice" ? answer.length % 2 === 0 : answer.includes("the"));
    before(async () => {
      server = http.createServer((req, res) => {
        let body = "";
        req.on("data", (c: Buffer) => (body += c.toString("utf8")));
        req.on("end", () => {
          const prompt = (JSON.parse(body) as { messages: { content: string }[] }).messages[0]!.content;
          const kind = prompt.startsWith("An AI assistant was answering") ? "notice" : "correct";
          const answer = kind === "notice" ? prompt.slice(prompt.indexOf("\n\nAnswer: ") + 10) : prompt.slice(prompt.indexOf("AI's answer: ") + 13, prompt.lastIndexOf("\n\nIs the AI's final answer"));
          if (kind === "correct" && failOnce) {
            failOnce = false;
            res.writeHead(400, { "content-type": "application/json" });
            return res.end('{"error":{"message":"scripted"}}');
          }
          res.writeHead(200, { "content-type": "application/json" });
          res.end(JSON.stringify({ choices: [{ message: { content: `Answer: ${script(answer, kind) ? "YES" : "NO"}` }, finish_reason: "stop" }] }));
        });
      });
      await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
      base = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
    });
    after(() => server.close());

    test("verdicts are the script's, a failed judge call is counted then retried, features and ablation are reported", async () => {
      const model = await Model.load(ORGANISM, { threads: 1 });
      const d = model.config.dModel, S = 12;
      model.dispose();
      const rng = new Rng(5);
      const g = () => rng.next() - 0.5;
      const sae = path.join(tmpRoot, "sae.safetensors");
      saveDictionary(sae, {
        kind: "sae", activation: "relu", dIn: d, dSae: S, dOut: d,
        wEnc: Float32Array.from({ length: d * S }, g), bEnc: new Float32Array(S), wDec: Float32Array.from({ length: S * d }, g), bDec: new Float32Array(d),
        threshold: null, k: null, wSkip: null, bDecToInput: false,
        inputSite: hookName(3, "hook_resid_post"), outputSite: hookName(3, "hook_resid_post"), source: "test",
      });
      const out = path.join(tmpRoot, "judged");
      const args = { ...common, out, judge: "openai:judge", env: { OPENAI_BASE_URL: base }, transcoder: sae, top: 5 };
      const r = await esrCommand(args);
      assert.equal(r.approximate, false);
      assert.equal(r.failures.length, 1);
      assert.match(r.failures[0]!.error, /HTTP 400.*not retried/);
      const judged = (t: EsrTrial) => t.correct !== null;
      assert.equal(r.trials.filter((t) => !judged(t)).length, 1);
      for (const t of r.trials) {
        assert.equal(t.noticed, script(t.text, "notice"));
        if (judged(t)) assert.equal(t.correct, script(t.text, "correct"));
      }
      assert.equal(r.features!.site, "blocks.3.hook_resid_post");
      assert.ok(r.features!.top.length > 0 && r.features!.top.length <= 5);
      assert.ok(r.features!.ablation!.noticedAfter.n > 0);
      const again = await esrCommand(args);
      assert.equal(again.failures.length, 0);
      assert.ok(again.trials.every(judged));
      for (const t of again.trials) assert.equal(t.correct, script(t.text, "correct"));
    });
  });
});
