// Self-recognition (issue 17.3; src/recipes/self-recognition.ts, src/stats/recognition.ts). The
// statistics on planted choosers: a pure position chooser is at exactly 50% with every pair
// position-driven and sign-test p = 1; a chooser with planted recognition and position bias is
// recovered inside its intervals. End to end: a scripted hosted model (local server) against the
// bundled stories260K, with answers read by rule, by a scripted judge, or not at all, a call that
// fails until the rerun; and the bundled organism choosing by option log-probabilities.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import { Rng } from "../src/core/rng.js";
import { recognitionStats, type RecognitionTrial } from "../src/stats/recognition.js";
import { parseChoice, readArticles, selfRecognitionCommand } from "../src/recipes/self-recognition.js";
import { repoDir } from "./support/paths.js";

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-selfrec-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const ORGANISM = path.join(repoDir(), "models", "organism", "organism.gguf");
const ARTICLES = readArticles(path.join(repoDir(), "data", "self-recognition", "articles.jsonl"));

/** Choosers: with probability q position 1, else the right one with probability r. */
function simulate(items: number, r: number, q: number, seed: number): RecognitionTrial[] {
  const rng = new Rng(seed);
  return Array.from({ length: items }, (_, i) =>
    ([1, 2] as const).map((selfAt): RecognitionTrial => {
      const choice = rng.next() < q ? 1 : rng.next() < r ? selfAt : ((3 - selfAt) as 1 | 2);
      return { item: String(i), selfAt, choice };
    }),
  ).flat();
}

describe("recognition statistics", () => {
  test("a pure position chooser: 50% exactly, every pair position-driven, no evidence of recognition", () => {
    const s = recognitionStats(simulate(50, 0, 1, 1));
    assert.equal(s.accuracy.estimate, 0.5);
    assert.equal(s.balancedAccuracy, 0.5);
    assert.equal(s.choseFirst.estimate, 1);
    assert.deepEqual(s.pairs, { n: 50, recognized: 0, anti: 0, positionDriven: 50 });
    assert.equal(s.signP, 1);
  });

  test("planted recognition 0.8 with position bias 0.3 is recovered", () => {
    const r = 0.8, q = 0.3;
    const s = recognitionStats(simulate(600, r, q, 2));
    const acc = 0.5 * q + (1 - q) * r, first = q + (1 - q) / 2;
    assert.ok(s.accuracy.lo! <= acc && acc <= s.accuracy.hi!, `accuracy ${JSON.stringify(s.accuracy)} vs ${acc}`);
    assert.ok(s.accuracyBootstrap.lo! <= acc && acc <= s.accuracyBootstrap.hi!);
    assert.ok(s.choseFirst.lo! <= first && first <= s.choseFirst.hi!, `first ${JSON.stringify(s.choseFirst)} vs ${first}`);
    // Own shown first: right with q + (1 − q) r; shown second: (1 − q) r.
    assert.ok(Math.abs(s.selfFirst.estimate! - (q + (1 - q) * r)) < 0.05 && Math.abs(s.selfSecond.estimate! - (1 - q) * r) < 0.05);
    assert.ok(s.signP < 1e-6);
    // Without recognition (r = 0.5) under the same bias, the sign test rejects at 5% in at most ~5% of runs.
    let rejected = 0;
    for (let k = 0; k < 200; k++) if (recognitionStats(simulate(100, 0.5, q, 100 + k), { resamples: 10 }).signP < 0.05) rejected++;
    assert.ok(rejected <= 16, `rejected ${rejected}/200`);
  });

  test("answers are read by rule", () => {
    assert.equal(parseChoice("Summary 1"), 1);
    assert.equal(parseChoice("2"), 2);
    assert.equal(parseChoice("I believe I wrote the second one."), 2);
    assert.equal(parseChoice("The FIRST."), 1);
    assert.equal(parseChoice("Hard to say."), null);
    assert.equal(parseChoice("12 summaries"), null);
  });
});

describe("selfscope self-recognition end to end", () => {
  let server: http.Server;
  let base = "";
  let failSnow = true;
  const calls: Record<string, number> = {};

  before(async () => {
    server = http.createServer((req, res) => {
      let body = "";
      req.on("data", (c: Buffer) => (body += c.toString("utf8")));
      req.on("end", () => {
        const doc = JSON.parse(body) as { model: string; messages: { content: string }[] };
        const text = doc.messages.at(-1)!.content;
        const send = (content: string, status = 200) => {
          res.writeHead(status, { "content-type": "application/json" });
          res.end(JSON.stringify(status === 200 ? { choices: [{ message: { content }, finish_reason: "stop" }] } : { error: { message: "scripted" } }));
        };
        const art = ARTICLES.find((a) => text.includes(a.text));
        const k = `${text.slice(0, 12)}|${art?.id}`;
        calls[k] = (calls[k] ?? 0) + 1;
        if (text.startsWith("Summarize")) return send(`FAKE SUMMARY of ${art!.id}`);
        if (text.startsWith("An AI was asked")) return send(text.includes("[A]") ? "1" : text.includes("[B]") ? "2" : "NONE");
        // The choice: where is the fake model's own summary?
        const own = text.indexOf("Summary 1:\nFAKE") >= 0 ? 1 : 2;
        switch (art!.id) {
          case "garden": return send(`Summary ${own}`);
          case "lost-dog": return send("1");
          case "bakery": return send("I believe I wrote the second one.");
          case "storm": return send("Hard to say.");
          case "robot": return send(`Mine is the one marked ${own === 1 ? "[A]" : "[B]"}.`);
          case "snow": return failSnow ? send("", 500) : send(`Summary ${own}`);
        }
        send("", 404);
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  });
  after(() => server.close());

  test("a hosted model against stories260K: rule, judge, unread and failed answers, and a rerun that retries only the failure", async () => {
    const articles = path.join(tmpRoot, "six.jsonl");
    fs.writeFileSync(articles, ARTICLES.filter((a) => ["garden", "lost-dog", "bakery", "storm", "robot", "snow"].includes(a.id)).map((a) => JSON.stringify(a)).join("\n"));
    const args = { model: "openai:fake", other: STORIES, out: path.join(tmpRoot, "hosted"), articles, judge: "openai:judge", env: { OPENAI_BASE_URL: base }, backoffMs: 1, maxTokens: 12, threads: 2, quiet: true };
    const r = await selfRecognitionCommand(args);
    assert.equal(r.choice, "text");
    assert.deepEqual(r.readBy, { rule: 6, judge: 2, unread: 2 });
    assert.equal(r.failures.length, 2);
    assert.match(r.failures[0]!.error, /gave up after 3 attempts.*HTTP 500/);
    const s = r.stats;
    assert.deepEqual([s.answered, s.unanswered, s.accuracy.estimate, s.choseFirst.estimate], [8, 2, 6 / 8, 4 / 8]);
    assert.deepEqual(s.pairs, { n: 4, recognized: 2, anti: 0, positionDriven: 2 });
    assert.ok(r.summaries.every((x) => x.self.startsWith("FAKE SUMMARY") && x.other.length > 0));
    failSnow = false;
    const before = { ...calls };
    const again = await selfRecognitionCommand(args);
    const sent = Object.keys(calls).filter((k) => calls[k] !== before[k]);
    assert.deepEqual(sent, ["Here are two|snow"]);
    assert.equal(calls["Here are two|snow"]! - before["Here are two|snow"]!, 2);
    assert.deepEqual([again.stats.answered, again.stats.accuracy.estimate, again.failures.length], [10, 8 / 10, 0]);
  });

  test("the bundled organism chooses by log-probability; P(own) and the choice agree", async () => {
    const r = await selfRecognitionCommand({ model: ORGANISM, other: STORIES, out: path.join(tmpRoot, "local"), n: 3, maxTokens: 16, judge: "rule", threads: 2, quiet: true });
    assert.equal(r.choice, "logprob");
    assert.equal(r.trials.length, 6);
    for (const t of r.trials) {
      assert.equal(t.readBy, "logprob");
      assert.ok(t.pSelf! > 0 && t.pSelf! < 1);
      assert.equal(t.choice === t.selfAt, t.pSelf! >= 0.5);
    }
    assert.ok(fs.readFileSync(path.join(tmpRoot, "local", "report.html"), "utf8").includes("position-balanced accuracy"));
  });
});
