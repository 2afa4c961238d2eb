// Judges in whole runs (issue 12 §7): a run whose judgments all fail prints each failure (rate-limited)
// and a summary and exits non-zero; `resume` retries the failed judgments against a server that has
// recovered; `rejudge` judges a run again with another judge and recomputes results; a server that
// echoes pieces of the API keys leaves no 4-character piece of any key in anything written; the default
// LLM judge is announced with its endpoint before the first request; recipes pick the configured LLM
// judge. Judges are a fake OpenAI-compatible server on 127.0.0.1; the model is the bundled stories260K.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import { buildConfig } from "../src/eval/inject.js";
import { inject } from "../src/recipes/inject.js";
import { JudgeFailedError, JudgeFailures } from "../src/judge/failures.js";
import { ruleJudge } from "../src/judge/judge.js";
import { REDACTED, configuredKeys, redactKeys } from "../src/judge/secrets.js";
import { chooseJudges, pickJudges, DEFAULT_LLM_JUDGE } from "../src/judge/select.js";
import { readRunLog } from "../src/log/read.js";
import { Model } from "../src/model/model.js";
import { sweepInto } from "../src/recipes/bias-vector.js";
import type { TrialRecord } from "../src/log/schema.js";
import { lindseyCommand } from "../src/recipes/lindsey.js";
import { repoDir } from "./support/paths.js";
import { runCli } from "./support/runlog-checks.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
// Keys whose 4-character windows cannot occur in story text, hex hashes or timestamps.
const KEY = "sk-QzXvW7Jq9Wk2Lm4Pb-Zq8x";
const KEY2 = "xq-VyQkJ3wXz9QpLm-KwRz";
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-judge-runs-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/** Every substring of `key` of at least 4 characters found in `text`. */
function keyPieces(text: string, key: string): string[] {
  const found: string[] = [];
  for (let i = 0; i + 4 <= key.length; i++) if (text.includes(key.slice(i, i + 4))) found.push(key.slice(i, i + 4));
  return found;
}

/** Everything a run wrote, as one string. */
function written(dir: string): string {
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => fs.readFileSync(path.join(e.parentPath, e.name), "utf8"))
    .join("\n");
}

/** A fake chat-completions server: "down" answers 500 with an error echoing the keys' prefixes and suffixes. */
class FakeJudgeServer {
  mode: "down" | "ok" = "ok";
  requests = 0;
  onRequest: (() => void) | null = null;
  port = 0;
  private server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      this.requests++;
      this.onRequest?.();
      const auth = String(req.headers.authorization ?? "").replace(/^Bearer /, "");
      if (this.mode === "down") {
        const echo = `${auth.slice(0, 8)}*****${auth.slice(-4)}`;
        const body = JSON.stringify({ error: { message: `Incorrect API key provided: ${echo} (also tried ${KEY2.slice(0, 6)}...${KEY2.slice(-5)})` } });
        res.writeHead(500, { "content-type": "application/json" });
        res.end(body);
        return;
      }
      const doc = { choices: [{ index: 0, message: { role: "assistant", content: `The AI affirms it.\n\nAnswer: YES` }, finish_reason: "stop" }] };
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(doc));
    });
  });
  async start(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    this.port = (this.server.address() as AddressInfo).port;
  }
  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
  get base(): string {
    return `http://127.0.0.1:${this.port}/v1`;
  }
}

/** Distinct judge requests among `trials` (identical requests are sent once). */
const distinct = (trials: readonly TrialRecord[]) => new Set(trials.map((t) => JSON.stringify([t.judgePrompt, t.output, t.concept]))).size;

const SMALL = ["--model", STORIES, "--layers", "2", "--strengths", "8", "--concepts", "1", "--trials", "2", "--controls", "2", "--max-tokens", "4", "--seed", "3", "--quiet"];

describe("judge failures, resume and rejudge through the CLI", () => {
  const api = new FakeJudgeServer();
  const dir = path.join(tmpRoot, "failed");
  const env = () => ({ OPENAI_BASE_URL: api.base, OPENAI_API_KEY: KEY, ANTHROPIC_API_KEY: KEY2 });
  before(() => api.start());
  after(() => api.stop());

  test("every judgment fails: one line per failure (rate-limited), a summary, exit 1; no piece of any key is written", async () => {
    api.mode = "down";
    const r = await runCli(["inject", ...SMALL, "--judge", "openai:judge-m", "--judge-retries", "0", "--out", dir], { env: env() });
    assert.equal(r.code, 1, r.stderr);
    const failLines = r.stderr.split("\n").filter((l) => l.startsWith("judge failed: openai:judge-m detection"));
    // 4 detections (2 injections, 2 controls), one cause: the first 3 are printed, then a note.
    assert.equal(failLines.length, 3, r.stderr);
    assert.match(failLines[0]!, /HTTP 500/);
    assert.match(r.stderr, /further failures are counted, not printed/);
    assert.match(r.stderr, /judge openai:judge-m: 4 of 4 judgments failed \(4× /);
    assert.match(r.stderr, /selfscope inject: nothing could be judged: every judgment by openai:judge-m failed .*selfscope resume /);
    // The trials are kept, the failures are in the log with the redacted echo.
    const run = readRunLog(dir);
    assert.equal(api.requests, distinct(run.trials), "--judge-retries 0: one call per distinct judge prompt");
    assert.equal(run.trials.length, 4);
    assert.equal(run.judgments.length, 4);
    for (const j of run.judgments) {
      assert.equal(j.verdict, null);
      assert.ok(j.error!.includes(REDACTED), `the echo reached the log redacted: ${j.error}`);
    }
    const all = `${written(dir)}\n${r.stdout}\n${r.stderr}`;
    assert.deepEqual(keyPieces(all, KEY), []);
    assert.deepEqual(keyPieces(all, KEY2), []);
  });

  test("resume retries the failed judgments once the server recovers, and exits 0", async () => {
    api.mode = "ok";
    api.requests = 0;
    const r = await runCli(["resume", dir, "--quiet"], { env: env() });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /resumed: 0 trials generated/);
    const run = readRunLog(dir);
    // Every detection: the failure, then a YES; the injections' YES brings identification.
    const det = run.judgments.filter((j) => j.criterion === "detection");
    assert.equal(det.length, 8);
    for (const t of run.trials) {
      const mine = det.filter((j) => j.trialId === t.id).map((j) => j.verdict);
      assert.deepEqual(mine, [null, "YES"], t.id);
    }
    assert.equal(run.judgments.filter((j) => j.criterion === "identification").length, 2);
    assert.equal(api.requests, distinct(run.trials) + distinct(run.trials.filter((t) => t.kind === "injection")));
    const res = JSON.parse(fs.readFileSync(path.join(dir, "results.json"), "utf8")) as { judge: string; tpr: { estimate: number; n: number }; fpr: { estimate: number; n: number }; unjudged: { detection: number } };
    assert.equal(res.judge, "openai:judge-m");
    assert.deepEqual([res.tpr.estimate, res.tpr.n, res.fpr.estimate, res.fpr.n, res.unjudged.detection], [1, 2, 1, 2, 0]);
    // Nothing left to retry: a second resume sends nothing.
    api.requests = 0;
    assert.equal((await runCli(["resume", dir, "--quiet"], { env: env() })).code, 0);
    assert.equal(api.requests, 0);
  });

  test("rejudge with another judge appends its judgments and recomputes results with them; report --judge picks either", async () => {
    const r = await runCli(["rejudge", dir, "--judge", "rule"], { env: env() });
    assert.equal(r.code, 0, r.stderr);
    const run = readRunLog(dir);
    const rule = run.judgments.filter((j) => j.judge === "rule");
    // Independent reference: the rule judge applied to each logged trial directly.
    for (const t of run.trials) {
      const want = ruleJudge({ criterion: "detection", question: t.judgePrompt, response: t.output, word: t.concept }).verdict;
      assert.equal(rule.find((j) => j.trialId === t.id && j.criterion === "detection")?.verdict, want, t.id);
    }
    const yes = run.trials.filter((t) => t.kind === "injection" && rule.find((j) => j.trialId === t.id && j.criterion === "detection")?.verdict === "YES");
    assert.equal(rule.length, run.trials.length + yes.length);
    const res = JSON.parse(fs.readFileSync(path.join(dir, "results.json"), "utf8")) as { judge: string; fpr: { n: number; estimate: number | null } };
    assert.equal(res.judge, "rule");
    const ctrl = run.trials.filter((t) => t.kind === "control");
    const ruleYes = ctrl.filter((t) => rule.find((j) => j.trialId === t.id)?.verdict === "YES").length;
    assert.equal(res.fpr.estimate, ruleYes / ctrl.length);
    // The earlier judge's judgments are untouched, and plain `report` goes back to the run's first judge.
    assert.equal(run.judgments.filter((j) => j.judge === "openai:judge-m").length, 10);
    const rep = await runCli(["report", dir], { env: env() });
    assert.match(rep.stdout, /judge: openai:judge-m/);
    const rep2 = await runCli(["report", dir, "--judge", "rule"], { env: env() });
    assert.match(rep2.stdout, /judge: rule \(approximate/);
    const bad = await runCli(["report", dir, "--judge", "openai:other"], { env: env() });
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /no judgments by judge "openai:other".*judges there: openai:judge-m, rule/);
  });
});

test("--judge-timeout / --judge-retries / --judge-concurrency: bad values are one-line errors naming the flag", async () => {
  for (const [flag, value, want] of [
    ["--judge-timeout", "0", /--judge-timeout must be a positive number of seconds/],
    ["--judge-retries", "-1", /--judge-retries must be a non-negative integer/],
    ["--judge-concurrency", "0", /--judge-concurrency must be at least 1/],
  ] as const) {
    const r = await runCli(["inject", ...SMALL, "--judge", "rule", `${flag}=${value}`, "--out", path.join(tmpRoot, "never")]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, want);
    assert.ok(!fs.existsSync(path.join(tmpRoot, "never")));
  }
});

describe("the default LLM judge is announced before the first request", () => {
  const api = new FakeJudgeServer();
  const saved = { ...process.env };
  before(() => api.start());
  after(async () => {
    for (const k of ["OPENAI_API_KEY", "OPENAI_BASE_URL"]) if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
    await api.stop();
  });

  test("OPENAI_API_KEY set, no --judge: the judge, why, and its endpoint are on stderr before the server sees a request", async () => {
    process.env.OPENAI_API_KEY = KEY;
    process.env.OPENAI_BASE_URL = api.base;
    const lines: string[] = [];
    const seen: { atFirstRequest: string | null } = { atFirstRequest: null };
    api.onRequest = () => (seen.atFirstRequest ??= lines.join(""));
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string | Uint8Array) => {
      lines.push(String(chunk));
      return true;
    }) as typeof process.stderr.write;
    const out = path.join(tmpRoot, "announce");
    try {
      await inject({ model: STORIES, layers: "2", strengths: "8", concepts: "1", trials: 1, controls: 1, maxTokens: 3, out, vectorCache: null, quiet: true });
    } finally {
      process.stderr.write = write;
      api.onRequest = null;
    }
    assert.ok(api.requests > 0);
    const atFirstRequest = seen.atFirstRequest;
    assert.ok(atFirstRequest !== null);
    assert.match(atFirstRequest, new RegExp(`judge ${DEFAULT_LLM_JUDGE} \\(the default: OPENAI_API_KEY is set and no --judge was given`));
    assert.ok(atFirstRequest.includes(`judge ${DEFAULT_LLM_JUDGE}: sending transcripts to ${api.base}/chat/completions`), atFirstRequest);
    assert.deepEqual(readRunLog(out).header.config.judges, [DEFAULT_LLM_JUDGE]);
    assert.deepEqual(keyPieces(lines.join("") + written(out), KEY), []);
  });
});

describe("recipes use the configured LLM judge, and say when they fall back to the rule judge", () => {
  const api = new FakeJudgeServer();
  before(() => api.start());
  after(() => api.stop());

  test("chooseJudges / pickJudges: given specs win; OPENAI_API_KEY picks the LLM judge; otherwise rule, with a note", () => {
    assert.deepEqual(chooseJudges(["local:x"], { OPENAI_API_KEY: KEY }), { specs: ["local:x"], source: "flag", note: null });
    const env = chooseJudges(undefined, { OPENAI_API_KEY: KEY });
    assert.deepEqual([env.specs, env.source], [[DEFAULT_LLM_JUDGE], "environment"]);
    const none = chooseJudges([], { OPENAI_API_KEY: "  " });
    assert.deepEqual([none.specs, none.source], [["rule"], "fallback"]);
    assert.match(none.note!, /no LLM judge is configured/);
    const said: string[] = [];
    assert.deepEqual(pickJudges(undefined, (l) => said.push(l), {}), ["rule"]);
    assert.equal(said.length, 1);
  });

  test("lindsey: with OPENAI_API_KEY the grader is the LLM judge (requests reach it); without, rule and the note in results and report", async () => {
    const saved = { key: process.env.OPENAI_API_KEY, base: process.env.OPENAI_BASE_URL };
    const run = (out: string) => lindseyCommand({ model: STORIES, out, experiments: "exp3", pairs: 1, strengths: "0", exp3Conditions: "none", maxTokens: 2, temperature: 0, seed: 1, vectorCache: null, quiet: true, permutations: 10, resamples: 10 });
    try {
      process.env.OPENAI_API_KEY = KEY;
      process.env.OPENAI_BASE_URL = api.base;
      api.requests = 0;
      const llm = await run(path.join(tmpRoot, "lindsey-llm"));
      // The grader is the default LLM judge with Lindsey's grader prompts as its rubric.
      assert.equal(llm.settings.judge, `${DEFAULT_LLM_JUDGE}[rubric=lindsey2025-graders]`);
      assert.equal(llm.settings.judge_approximate, false);
      assert.ok(api.requests > 0, "the grader's requests reached the configured endpoint");
      delete process.env.OPENAI_API_KEY;
      const rule = await run(path.join(tmpRoot, "lindsey-rule"));
      assert.equal(rule.settings.judge, "rule");
      assert.match(rule.settings.judge_note ?? "", /no LLM judge is configured/);
      assert.match(fs.readFileSync(path.join(tmpRoot, "lindsey-rule", "report.html"), "utf8"), /no LLM judge is configured/);
    } finally {
      if (saved.key === undefined) delete process.env.OPENAI_API_KEY;
      else process.env.OPENAI_API_KEY = saved.key;
      if (saved.base === undefined) delete process.env.OPENAI_BASE_URL;
      else process.env.OPENAI_BASE_URL = saved.base;
    }
  });
});

describe("key redaction and failure reporting (units)", () => {
  test("redactKeys removes the key and every prefix and suffix of 4+ characters, of every configured key", () => {
    const text = `echo ${KEY.slice(0, 8)}*****${KEY.slice(-4)} and ${KEY} and ${KEY2.slice(0, 4)}.. ${KEY2.slice(-7)}; kept: ${KEY.slice(0, 3)}`;
    const out = redactKeys(text, configuredKeys({ OPENAI_API_KEY: KEY, ANTHROPIC_API_KEY: ` ${KEY2} `, OTHER: "not-a-key-var", SHORT_API_KEY: "abc" }));
    assert.deepEqual(keyPieces(out, KEY), []);
    assert.deepEqual(keyPieces(out, KEY2), []);
    assert.equal(out, `echo ${REDACTED}*****${REDACTED} and ${REDACTED} and ${REDACTED}.. ${REDACTED}; kept: sk-`);
    // Only *_API_KEY variables, and values of 4+ characters, count as keys.
    assert.deepEqual(configuredKeys({ OPENAI_API_KEY: KEY, PATH: "/usr/bin", X_API_KEY: "abc" }), [KEY]);
  });

  test("JudgeFailures: per-cause and total line limits, summary by cause, nothing judged throws one line", (t) => {
    process.env.SELFSCOPE_TEST_API_KEY = KEY;
    t.after(() => delete process.env.SELFSCOPE_TEST_API_KEY);
    const lines: string[] = [];
    const f = new JudgeFailures({ write: (l) => lines.push(l), perCause: 2, maxLines: 3 });
    for (let i = 0; i < 5; i++) f.record("j", `t${i}`, "detection", null, "HTTP 500");
    f.record("j", "t5", "detection", null, `timeout ${KEY}`);
    f.record("k", "t0", "detection", "YES", null);
    f.record("k", "t1", "detection", null, "no verdict in reply");
    assert.deepEqual(lines, [
      "judge failed: j detection t0: HTTP 500",
      "judge failed: j detection t1: HTTP 500",
      "judge failed: further failures are counted, not printed (summary at the end)",
      `judge failed: j detection t5: timeout ${REDACTED}`,
    ]);
    assert.equal(f.failed, 7);
    assert.deepEqual(f.nothingJudged(), ["j"]);
    lines.length = 0;
    assert.throws(() => f.finish("selfscope resume R"), (e: Error) => e instanceof JudgeFailedError && /every judgment by j failed \(6 of 6; e\.g\. HTTP 500\); fix the judge, then retry: selfscope resume R/.test(e.message) && !e.message.includes("\n"));
    assert.deepEqual(lines, [
      `judge j: 6 of 6 judgments failed (5× HTTP 500; 1× timeout ${REDACTED})`,
      "judge k: 1 of 2 judgments failed (1× no verdict in reply)",
      "failed judgments are excluded from every rate (counted as unjudged); to retry them: selfscope resume R",
    ]);
  });
});

test("a recipe's injection sweep whose judge judged nothing fails with the summary and keeps its trials (bias-vector)", async () => {
  // 400 is not retried, so every judgment fails at once.
  const server = http.createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(400, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { message: "model not found" } }));
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const saved = { base: process.env.OPENAI_BASE_URL, key: process.env.OPENAI_API_KEY };
  process.env.OPENAI_BASE_URL = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  process.env.OPENAI_API_KEY = KEY;
  const model = await Model.load(STORIES);
  try {
    const cfg = buildConfig({ model: STORIES, layers: "2", strengths: "8", concepts: "1", trials: 2, controls: 2, maxTokens: 4, seed: 3, judges: ["openai:judge-m"] }, model.config.nLayers, false);
    const dir = path.join(tmpRoot, "recipe-sweep");
    await assert.rejects(sweepInto(model, STORIES, cfg, dir, { quiet: true }), (e: Error) => e instanceof JudgeFailedError && /nothing could be judged.*retry: rerun the same command/.test(e.message));
    const run = readRunLog(dir);
    assert.equal(run.trials.length, 4, "the trials are logged before the judge fails");
    assert.ok(run.judgments.length > 0 && run.judgments.every((j) => j.verdict === null));
  } finally {
    model.dispose();
    process.env.OPENAI_BASE_URL = saved.base;
    process.env.OPENAI_API_KEY = saved.key;
    if (saved.base === undefined) delete process.env.OPENAI_BASE_URL;
    if (saved.key === undefined) delete process.env.OPENAI_API_KEY;
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
  }
});
