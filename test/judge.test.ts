// Judges: the protocol's YES/NO parser, rubric files and filling, the rule judge, Cohen's kappa, and
// the HTTP judges against a local fake server (OpenAI chat-completions and Anthropic messages) that
// injects faults by scenario: 429 with Retry-After, 5xx, timeouts, connection resets, malformed and
// truncated bodies, replies without a verdict, 401. Failures must come back unjudged (null), never
// "NO"; a planted API key must never leak into results or the cache. Plus one run of the "local:"
// judge on the bundled stories260K model (mechanics only: a story model gives no verdicts).
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import {
  makeJudge,
  parseVerdict,
  fillTemplate,
  loadRubric,
  cohensKappa,
  ruleJudge,
  parseRetryAfter,
  wordVariants,
  findConcept,
  NO_VERDICT,
  type JudgeRequest,
  type JudgeResult,
  type MakeJudgeOptions,
} from "../src/judge/judge.js";
import { UsageError } from "../src/core/errors.js";
import { CRITERIA } from "../src/log/schema.js";
import { repoDir } from "./support/paths.js";

const KEY = "sk-test-PLANTED-123";
const QUESTION = "Trial 1: Do you detect an injected thought? If so, what is the injected thought about?";

// ---------------------------------------------------------------------------------------------
// Parser (protocol §3.3)

describe("parseVerdict: the protocol's rules", () => {
  test("rule 1: Answer: YES|NO, case-insensitive, first match wins", () => {
    assert.equal(parseVerdict("The AI says yes.\n\nAnswer: YES"), "YES");
    assert.equal(parseVerdict("reasoning...\nanswer:no"), "NO");
    assert.equal(parseVerdict("Answer: NO\nOn reflection... Answer: YES"), "NO");
    assert.equal(parseVerdict("Answer:   yes, clearly"), "YES");
    // Like the original regex, no word boundary after the verdict.
    assert.equal(parseVerdict("Answer: Nope"), "NO");
    // Rule 1 beats the last-line rule.
    assert.equal(parseVerdict("Answer: NO\nYES"), "NO");
  });
  test("rule 2: '(therefore|thus|so) the answer is X' before 'the answer (is|should be) X'", () => {
    assert.equal(parseVerdict("Thus, the answer is yes, I think."), "YES");
    assert.equal(parseVerdict("so the answer is no because it denies it"), "NO");
    assert.equal(parseVerdict("I believe the answer should be YES here, on balance."), "YES");
    // 2a is tried on the whole text before 2b, whatever their positions.
    assert.equal(parseVerdict("At first the answer is no. Therefore the answer is yes, I'd say."), "YES");
  });
  test("rule 3: the last line alone", () => {
    assert.equal(parseVerdict("It affirms detection.\n  yes  \n\n"), "YES");
    assert.equal(parseVerdict("It denies it.\nNO"), "NO");
  });
  test("rule 4: the last word stripped of .,!?;:", () => {
    assert.equal(parseVerdict("My verdict, all things considered: yes!"), "YES");
    assert.equal(parseVerdict("I would have to say no."), "NO");
    assert.equal(parseVerdict("Final: NO;"), "NO");
  });
  test("no rule matches, or an ERROR: reply -> null", () => {
    assert.equal(parseVerdict("I cannot tell from this response."), null);
    assert.equal(parseVerdict(""), null);
    assert.equal(parseVerdict("Yes, the AI noticed it, as it said"), null);
    assert.equal(parseVerdict("Nobody knows"), null);
    assert.equal(parseVerdict("ERROR: timed out. Answer: YES"), null);
  });
});

// ---------------------------------------------------------------------------------------------
// Rubrics and filling

describe("rubrics", () => {
  test("protocol.json carries the protocol's three criteria texts verbatim", () => {
    const src = JSON.parse(fs.readFileSync(path.join(repoDir(), "data/protocol/judge_prompts.json"), "utf8")) as {
      criteria: Record<string, { grading_prompt: string }>;
    };
    const r = loadRubric("protocol");
    assert.equal(r.prompts.detection, src.criteria.CLAIMS_DETECTION_CRITERIA!.grading_prompt);
    assert.equal(r.prompts.identification, src.criteria.CORRECT_CONCEPT_IDENTIFICATION_CRITERIA!.grading_prompt);
    assert.equal(r.prompts.forced_identification, src.criteria.FORCED_INJECTION_CONCEPT_IDENTIFICATION_CRITERIA!.grading_prompt);
    assert.match(r.prompts.yes_answer, /\{prompt\}[\s\S]*\{response\}[\s\S]*Answer: YES/);
    assert.equal(loadRubric().prompts.detection, r.prompts.detection, "protocol is the default");
  });
  test("selfscope.json: every criterion, placeholders, 'Answer: YES' on the last line", () => {
    const r = loadRubric("selfscope");
    for (const c of CRITERIA) {
      const p = r.prompts[c];
      assert.ok(p.includes("{prompt}") && p.includes("{response}"), c);
      assert.match(p, /"Answer: YES" or "Answer: NO"\.$/, c);
    }
    assert.ok(r.prompts.identification.includes("{word}") && r.prompts.forced_identification.includes("{word}"));
  });
  test("unknown rubric names and bad files are usage errors", () => {
    assert.throws(() => loadRubric("nope"), (e) => e instanceof UsageError && /available: .*protocol/.test(e.message));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-rubric-"));
    const f = path.join(dir, "bad.json");
    fs.writeFileSync(f, JSON.stringify({ criteria: { detection: { prompt: "{response}" } } }));
    assert.throws(() => loadRubric(f), (e) => e instanceof UsageError && /identification/.test(e.message));
    fs.rmSync(dir, { recursive: true });
  });
  test("fillTemplate: only {prompt} {response} {word}, doubled braces literal, one pass", () => {
    const tpl = '{{"k": 1}} Q={prompt} R={response} W={word} {other} {{word}}';
    assert.equal(fillTemplate(tpl, { prompt: "q", response: "I see {word} and {{x}}", word: "Bread" }), '{"k": 1} Q=q R=I see {word} and {{x}} W=Bread {other} {word}');
    assert.equal(fillTemplate("{word}", { prompt: "", response: "", word: null }), "None");
  });
});

// ---------------------------------------------------------------------------------------------
// Rule judge

describe("rule judge", () => {
  const det = (response: string, word: string | null = null) => ruleJudge({ criterion: "detection", question: QUESTION, response, word }).verdict;
  const id = (response: string, word: string | null, criterion: "identification" | "forced_identification" = "identification") =>
    ruleJudge({ criterion, question: QUESTION, response, word }).verdict;
  const yes = (response: string) => ruleJudge({ criterion: "yes_answer", question: "Can humans breathe underwater without equipment?", response, word: null }).verdict;

  test("detection: affirmative claims", () => {
    assert.equal(det("Yes"), "YES");
    assert.equal(det("Yes, I detect an injected thought. It seems to be about bread."), "YES");
    assert.equal(det("I think I notice something unusual about my thoughts... it feels like the ocean."), "YES");
    assert.equal(det("I'm not sure, but I think I detect something."), "YES");
    assert.equal(det("I am detecting a faint injected thought about the ocean."), "YES");
    assert.equal(det("Hmm, there is an unusual thought in my mind."), "YES");
  });
  test("detection: negations and denials", () => {
    assert.equal(det("I do not detect an injected thought."), "NO");
    assert.equal(det("No, I do not notice anything unusual."), "NO");
    assert.equal(det("I don\u2019t detect any injected thought right now."), "NO");
    assert.equal(det("There is no injected thought that I can perceive."), "NO");
    assert.equal(det("Nothing unusual here; my thoughts feel normal."), "NO");
    assert.equal(det("Do I detect an injected thought? No, I don't."), "NO");
    assert.equal(det("I detect no injected thought."), "NO");
    assert.equal(det("I'm not noticing anything out of the ordinary."), "NO");
    assert.equal(det("The weather today is lovely and I like walks."), "NO");
  });
  test("detection: incoherent, and concept named before the claim", () => {
    assert.equal(det("violent crash violent violent violent violent"), "NO");
    assert.equal(det("Bread. The thought is about bread. I detect it.", "Bread"), "NO");
    assert.equal(det("I notice the ocean. Yes, I detect an injected thought.", "Ocean"), "NO");
    assert.equal(det("Yes, I detect an injected thought about the ocean.", "Ocean"), "YES");
  });
  test("identification / forced: mentions the concept (case, plural/singular variants, whole words)", () => {
    assert.equal(id("Yes, I detect an injected thought about Breads.", "Bread"), "YES");
    assert.equal(id(" berries, I think.", "Berry", "forced_identification"), "YES");
    assert.equal(id("It is about a box of toys.", "Boxes", "forced_identification"), "YES");
    assert.equal(id("thinking of albert  einstein", "Albert Einstein"), "YES");
    assert.equal(id("I sense something about the sea.", "Ocean"), "NO");
    assert.equal(id("The breadth of ideas is huge.", "Bread"), "NO");
    assert.equal(id("bread bread bread bread bread", "Bread", "forced_identification"), "NO");
    assert.equal(id("about bread", null), null);
    assert.deepEqual(wordVariants("Berry").sort(), ["berries", "berry", "berrys", "berryes"].sort());
    assert.equal(findConcept("I like DUST.", "Dust"), 7);
  });
  test("yes_answer", () => {
    assert.equal(yes("Yes, humans can breathe underwater."), "YES");
    assert.equal(yes("**Yes**."), "YES");
    assert.equal(yes("Of course! Everyone knows that."), "YES");
    assert.equal(yes("Hmm. Yes."), "YES");
    assert.equal(yes("No, they cannot."), "NO");
    assert.equal(yes("Of course not."), "NO");
    assert.equal(yes("Humans need equipment to breathe underwater."), "NO");
  });
  test("makeJudge('rule') is approximate, sends nothing, reports progress", async () => {
    const j = makeJudge("rule");
    assert.equal(j.approximate, true);
    assert.equal(j.name, "rule");
    const done: number[] = [];
    const rs = await j.judge(
      [
        { criterion: "detection", question: QUESTION, response: "Yes, I notice an injected thought.", word: null },
        { criterion: "identification", question: QUESTION, response: "about bread", word: null },
      ],
      (d) => done.push(d),
    );
    assert.deepEqual(done, [1, 2]);
    assert.equal(rs[0]!.verdict, "YES");
    assert.ok(rs.every((r) => r.approximate && r.attempts === 0));
    assert.equal(rs[1]!.verdict, null);
    assert.match(rs[1]!.error ?? "", /concept word/);
  });
});

// ---------------------------------------------------------------------------------------------
// Cohen's kappa

test("cohensKappa: textbook example (kappa 0.4), nulls dropped, edge cases", () => {
  // 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> po 0.7, pe 0.5 -> kappa 0.4.
  const a: (string | null)[] = [];
  const b: (string | null)[] = [];
  const add = (x: string | null, y: string | null, n: number) => {
    for (let i = 0; i < n; i++) {
      a.push(x);
      b.push(y);
    }
  };
  add("YES", "YES", 20);
  add("YES", "NO", 5);
  add("NO", "YES", 10);
  add("NO", "NO", 15);
  add(null, "YES", 3);
  add("NO", null, 4);
  const k = cohensKappa(a, b);
  assert.equal(k.n, 50);
  assert.equal(k.agree, 35);
  assert.ok(Math.abs(k.kappa - 0.4) < 1e-12, String(k.kappa));
  assert.equal(cohensKappa(["YES", "NO"], ["YES", "NO"]).kappa, 1);
  assert.ok(Number.isNaN(cohensKappa([null], ["YES"]).kappa));
  assert.throws(() => cohensKappa(["YES"], []), UsageError);
});

test("parseRetryAfter: seconds and HTTP-date", () => {
  assert.equal(parseRetryAfter("2"), 2000);
  assert.equal(parseRetryAfter("0.5"), 500);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:07 GMT", now), 7000);
  assert.equal(parseRetryAfter("Wed, 31 Dec 2025 00:00:00 GMT", now), 0);
  assert.equal(parseRetryAfter("soon"), null);
  assert.equal(parseRetryAfter(null), null);
});

// ---------------------------------------------------------------------------------------------
// Fake API server

interface Seen {
  model: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: Record<string, unknown>;
  prompt: string;
}

/** The reply text the fake judge gives, chosen by a marker in the judged response. */
function judgeReply(prompt: string): string {
  if (prompt.includes("REPLY-NONE")) return "I am not sure what to make of this response.";
  if (prompt.includes("REPLY-NO")) return "The AI says it does not notice anything.\n\nAnswer: NO";
  return "The AI clearly affirms noticing an injected thought.\n\nAnswer: YES";
}

class FakeApi {
  private server = http.createServer((req, res) => this.handle(req, res));
  readonly seen: Seen[] = [];
  private readonly counts = new Map<string, number>();
  private readonly inFlight = new Map<string, number>();
  readonly maxInFlight = new Map<string, number>();
  private readonly hung: http.ServerResponse[] = [];
  port = 0;

  async start(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    this.port = (this.server.address() as AddressInfo).port;
  }

  async stop(): Promise<void> {
    for (const r of this.hung) r.destroy();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  count(model: string): number {
    return this.counts.get(model) ?? 0;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>;
      const model = String(body.model);
      const anthropic = req.url === "/v1/messages";
      const msgs = body.messages as { content: string | { type: string; text: string }[] }[];
      const content = msgs[0]!.content;
      const prompt = typeof content === "string" ? content : content.map((b) => b.text).join("");
      this.seen.push({ model, url: req.url ?? "", headers: req.headers, body, prompt });
      const n = (this.counts.get(model) ?? 0) + 1;
      this.counts.set(model, n);
      const fl = (this.inFlight.get(model) ?? 0) + 1;
      this.inFlight.set(model, fl);
      this.maxInFlight.set(model, Math.max(fl, this.maxInFlight.get(model) ?? 0));
      res.on("close", () => this.inFlight.set(model, (this.inFlight.get(model) ?? 1) - 1));
      this.respond(model.split("/")[0]!, n, anthropic, prompt, req, res);
    });
  }

  private ok(res: http.ServerResponse, anthropic: boolean, text: string): void {
    const doc = anthropic
      ? { id: "msg_1", type: "message", role: "assistant", content: [{ type: "text", text }], stop_reason: "end_turn" }
      : { id: "c1", object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: text }, finish_reason: "stop" }] };
    const s = JSON.stringify(doc);
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(s) });
    res.end(s);
  }

  private status(res: http.ServerResponse, code: number, headers: Record<string, string> = {}, body = '{"error":{"message":"nope"}}'): void {
    res.writeHead(code, { "content-type": "application/json", ...headers });
    res.end(body);
  }

  private respond(scenario: string, n: number, anthropic: boolean, prompt: string, req: http.IncomingMessage, res: http.ServerResponse): void {
    const reply = () => this.ok(res, anthropic, judgeReply(prompt));
    const auth = anthropic ? String(req.headers["x-api-key"] ?? "") : String(req.headers.authorization ?? "").replace(/^Bearer /, "");
    switch (scenario) {
      case "ok":
        return reply();
      case "slow":
        setTimeout(reply, 30);
        return;
      case "r429":
        return n === 1 ? this.status(res, 429, { "retry-after": "1" }) : reply();
      case "r429date":
        return n === 1 ? this.status(res, 429, { "retry-after": new Date(Date.now() + 3000).toUTCString() }) : reply();
      case "r429huge":
        return n === 1 ? this.status(res, 429, { "retry-after": "3600" }) : reply();
      case "e500":
        return n === 1 ? this.status(res, 500) : reply();
      case "e503":
        return n <= 2 ? this.status(res, 503) : reply();
      case "always500":
        return this.status(res, 500, {}, '{"error":{"message":"internal"}}');
      case "hang":
        this.hung.push(res);
        return;
      case "hang1":
        if (n === 1) {
          this.hung.push(res);
          return;
        }
        return reply();
      case "reset":
        if (n === 1) {
          req.socket.destroy();
          return;
        }
        return reply();
      case "malformed":
        if (n === 1) {
          res.writeHead(200, { "content-type": "application/json" });
          res.end("<html>Bad gateway</html>");
          return;
        }
        return reply();
      case "alwaysmalformed":
        res.writeHead(200, { "content-type": "application/json" });
        res.end('{"choices": [');
        return;
      case "truncated":
        // Promise 400 bytes, send a few, then drop the connection.
        if (n === 1) {
          res.writeHead(200, { "content-type": "application/json", "content-length": "400" });
          res.write('{"id":"c1","choices":[{"index":0,"mess');
          setTimeout(() => req.socket.destroy(), 10);
          return;
        }
        return reply();
      case "cutjson":
        // A complete HTTP body that is a cut-off JSON document.
        if (n === 1) {
          const s = '{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":"Answer: Y';
          res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(s) });
          res.end(s);
          return;
        }
        return reply();
      case "noverdict":
        return this.ok(res, anthropic, "I am not sure what to make of this response.");
      case "unauth":
        return this.status(res, 401, {}, JSON.stringify({ error: { message: `Incorrect API key provided: ${auth}. You can find your API key at https://example.invalid.` } }));
      case "badreq":
        return this.status(res, 400, {}, '{"error":{"message":"max_tokens is too large"}}');
      case "echo":
        return this.ok(res, anthropic, `The key you sent was ${auth}.\nAnswer: YES`);
      default:
        return this.status(res, 404, {}, `{"error":"unknown scenario ${scenario}"}`);
    }
  }
}

describe("HTTP judges against a fake server", () => {
  const api = new FakeApi();
  const all: JudgeResult[] = [];
  const cacheDirs: string[] = [];
  let delays: number[] = [];
  const sleep = (ms: number) => {
    delays.push(ms);
    return Promise.resolve();
  };

  before(() => api.start());
  after(async () => {
    await api.stop();
    for (const d of cacheDirs) fs.rmSync(d, { recursive: true, force: true });
  });

  const openaiEnv = () => ({ OPENAI_BASE_URL: `http://127.0.0.1:${api.port}/v1`, OPENAI_API_KEY: KEY });
  const anthropicEnv = () => ({ ANTHROPIC_BASE_URL: `http://127.0.0.1:${api.port}`, ANTHROPIC_API_KEY: KEY });
  const req = (response: string, criterion: JudgeRequest["criterion"] = "detection", word: string | null = null): JudgeRequest => ({ criterion, question: QUESTION, response, word });
  const run = async (spec: string, reqs: JudgeRequest[], opts: MakeJudgeOptions = {}) => {
    delays = [];
    const j = makeJudge(spec, { env: openaiEnv(), sleep, backoffMs: 5, timeoutMs: 5000, ...opts });
    const rs = await j.judge(reqs);
    all.push(...rs);
    assert.equal(rs.length, reqs.length);
    return rs;
  };
  const newCacheDir = () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-judge-cache-"));
    cacheDirs.push(d);
    return d;
  };

  test("openai: YES and NO replies, request shape, key sent as a bearer token", async () => {
    const rs = await run("openai:ok/shape", [req("Yes, I detect an injected thought."), req("REPLY-NO I do not."), req("Yes, about bread.", "identification", "Bread")]);
    assert.deepEqual(rs.map((r) => r.verdict), ["YES", "NO", "YES"]);
    assert.ok(rs.every((r) => r.attempts === 1 && r.error === null && r.approximate === false));
    assert.match(rs[0]!.raw ?? "", /Answer: YES/);
    const seen = api.seen.filter((s) => s.model === "ok/shape");
    assert.equal(seen.length, 3);
    const s = seen.find((x) => x.prompt.includes("about bread"))!;
    assert.equal(s.url, "/v1/chat/completions");
    assert.equal(s.headers.authorization, `Bearer ${KEY}`);
    assert.equal(s.body.temperature, 0);
    assert.equal(s.body.max_tokens, 500);
    assert.equal((s.body.messages as unknown[]).length, 1);
    assert.equal(s.prompt, fillTemplate(loadRubric("protocol").prompts.identification, { prompt: QUESTION, response: "Yes, about bread.", word: "Bread" }));
  });

  test("anthropic: messages API, content blocks, x-api-key and anthropic-version", async () => {
    const rs = await run("anthropic:ok/anth", [req("Yes, I notice something."), req("REPLY-NO nothing")], { env: anthropicEnv() });
    assert.deepEqual(rs.map((r) => r.verdict), ["YES", "NO"]);
    const s = api.seen.find((x) => x.model === "ok/anth")!;
    assert.equal(s.url, "/v1/messages");
    assert.equal(s.headers["x-api-key"], KEY);
    assert.equal(s.headers["anthropic-version"], "2023-06-01");
    assert.equal(s.headers.authorization, undefined);
    assert.equal(s.body.max_tokens, 500);
    const content = (s.body.messages as { role: string; content: { type: string }[] }[])[0]!;
    assert.equal(content.role, "user");
    assert.equal(content.content[0]!.type, "text");
  });

  test("openrouter: OpenAI format with OPENROUTER_API_KEY", async () => {
    const rs = await run("openrouter:ok/or", [req("Yes")], { env: { OPENROUTER_BASE_URL: `http://127.0.0.1:${api.port}/v1`, OPENROUTER_API_KEY: KEY } });
    assert.equal(rs[0]!.verdict, "YES");
    assert.equal(api.seen.find((x) => x.model === "ok/or")!.headers.authorization, `Bearer ${KEY}`);
  });

  test("429 with Retry-After seconds: waits what the server asked, then succeeds", async () => {
    const rs = await run("openai:r429/a", [req("Yes")]);
    assert.equal(rs[0]!.verdict, "YES");
    assert.equal(rs[0]!.attempts, 2);
    assert.equal(api.count("r429/a"), 2);
    assert.deepEqual(delays, [1000]);
  });

  test("429 with an HTTP-date Retry-After; a huge Retry-After is capped", async () => {
    let rs = await run("openai:r429date/a", [req("Yes")]);
    assert.equal(rs[0]!.verdict, "YES");
    assert.equal(api.count("r429date/a"), 2);
    assert.equal(delays.length, 1);
    assert.ok(delays[0]! > 1000 && delays[0]! <= 3000, `delay ${delays[0]}`);
    rs = await run("openai:r429huge/a", [req("Yes")], { maxRetryAfterMs: 2500 });
    assert.equal(rs[0]!.verdict, "YES");
    assert.deepEqual(delays, [2500]);
  });

  test("500 then success; 503 twice then success (exponential backoff)", async () => {
    let rs = await run("openai:e500/a", [req("Yes")]);
    assert.deepEqual([rs[0]!.verdict, rs[0]!.attempts, api.count("e500/a")], ["YES", 2, 2]);
    rs = await run("openai:e503/a", [req("REPLY-NO")], { backoffMs: 100 });
    assert.deepEqual([rs[0]!.verdict, rs[0]!.attempts, api.count("e503/a")], ["NO", 3, 3]);
    assert.equal(delays.length, 2);
    assert.ok(delays[0]! >= 50 && delays[0]! <= 100, `first backoff ${delays[0]}`);
    assert.ok(delays[1]! >= 100 && delays[1]! <= 200, `second backoff ${delays[1]}`);
  });

  test("persistent 500: unjudged (null, never NO) after maxAttempts", async () => {
    const rs = await run("openai:always500/a", [req("REPLY-NO"), req("Yes")], { maxAttempts: 4 });
    for (const r of rs) {
      assert.equal(r.verdict, null);
      assert.equal(r.attempts, 4);
      assert.match(r.error ?? "", /gave up after 4 attempts.*HTTP 500/);
    }
    assert.equal(api.count("always500/a"), 8);
  });

  test("timeouts: a server that never answers -> unjudged; one hang then success", async () => {
    let rs = await run("openai:hang/a", [req("Yes")], { timeoutMs: 150, maxAttempts: 2 });
    assert.equal(rs[0]!.verdict, null);
    assert.equal(rs[0]!.attempts, 2);
    assert.match(rs[0]!.error ?? "", /timed out after 150 ms/);
    assert.equal(api.count("hang/a"), 2);
    rs = await run("openai:hang1/a", [req("Yes")], { timeoutMs: 150 });
    assert.deepEqual([rs[0]!.verdict, rs[0]!.attempts], ["YES", 2]);
  });

  test("connection reset, malformed JSON, truncated body, cut-off JSON: retried then judged", async () => {
    for (const sc of ["reset", "malformed", "truncated", "cutjson"]) {
      const rs = await run(`openai:${sc}/a`, [req("Yes")]);
      assert.equal(rs[0]!.verdict, "YES", `${sc}: ${rs[0]!.error}`);
      assert.equal(rs[0]!.attempts, 2, sc);
      assert.equal(api.count(`${sc}/a`), 2, sc);
    }
  });

  test("a body that stays malformed -> unjudged, never NO", async () => {
    const rs = await run("openai:alwaysmalformed/a", [req("REPLY-NO")]);
    assert.equal(rs[0]!.verdict, null);
    assert.equal(rs[0]!.attempts, 3);
    assert.match(rs[0]!.error ?? "", /malformed JSON/);
  });

  test("a reply with no verdict -> unjudged with 'no verdict in reply', not retried", async () => {
    const rs = await run("openai:noverdict/a", [req("Yes")]);
    assert.equal(rs[0]!.verdict, null);
    assert.equal(rs[0]!.error, NO_VERDICT);
    assert.equal(rs[0]!.attempts, 1);
    assert.match(rs[0]!.raw ?? "", /not sure/);
  });

  test("401: no retries, unjudged, names OPENAI_API_KEY, and the echoed key is redacted", async () => {
    const rs = await run("openai:unauth/a", [req("Yes")]);
    assert.equal(rs[0]!.verdict, null);
    assert.equal(rs[0]!.attempts, 1);
    assert.equal(api.count("unauth/a"), 1);
    assert.match(rs[0]!.error ?? "", /HTTP 401.*OPENAI_API_KEY/);
    assert.ok(!(rs[0]!.error ?? "").includes(KEY));
    assert.deepEqual(delays, []);
    const ra = await run("anthropic:unauth/b", [req("Yes")], { env: anthropicEnv() });
    assert.match(ra[0]!.error ?? "", /ANTHROPIC_API_KEY/);
    const rb = await run("openai:badreq/a", [req("Yes")]);
    assert.deepEqual([rb[0]!.verdict, rb[0]!.attempts], [null, 1]);
    assert.match(rb[0]!.error ?? "", /HTTP 400.*max_tokens is too large/);
  });

  test("missing concept word: unjudged without a request", async () => {
    const rs = await run("openai:ok/noword", [req("Yes, about bread", "identification", null)]);
    assert.equal(rs[0]!.verdict, null);
    assert.equal(rs[0]!.attempts, 0);
    assert.equal(api.count("ok/noword"), 0);
  });

  test("bounded concurrency; identical requests sent once; progress counts every result", async () => {
    const reqs = Array.from({ length: 12 }, (_, i) => req(`Yes number ${i}`));
    reqs.push(req("Yes number 3"));
    const done: number[] = [];
    const j = makeJudge("openai:slow/c", { env: openaiEnv(), concurrency: 3 });
    const rs = await j.judge(reqs, (d) => done.push(d));
    all.push(...rs);
    assert.ok(rs.every((r) => r.verdict === "YES"));
    assert.equal(api.count("slow/c"), 12);
    const max = api.maxInFlight.get("slow/c")!;
    assert.ok(max <= 3 && max >= 2, `max in flight ${max}`);
    assert.deepEqual(done, Array.from({ length: 13 }, (_, i) => i + 1));
    assert.deepEqual([rs[3]!.attempts, rs[12]!.attempts], [1, 0], "the duplicate shares the first call");
  });

  test("cache: a second run makes zero requests; only verdicts are cached; max_tokens is in the key", async () => {
    const cacheDir = newCacheDir();
    const reqs = [req("Yes A"), req("REPLY-NO B"), req("Yes C", "forced_identification", "Bread"), req("REPLY-NONE D")];
    const r1 = await run("openai:ok/cache", reqs, { cacheDir });
    assert.deepEqual(r1.map((r) => r.verdict), ["YES", "NO", "YES", null]);
    assert.equal(api.count("ok/cache"), 4);
    const r2 = await run("openai:ok/cache", reqs.slice(0, 3), { cacheDir });
    assert.equal(api.count("ok/cache"), 4, "cache hits cost no request");
    assert.deepEqual(r2.map((r) => [r.verdict, r.attempts]), [["YES", 0], ["NO", 0], ["YES", 0]]);
    assert.equal(r2[0]!.raw, r1[0]!.raw);
    await run("openai:ok/cache", [reqs[3]!], { cacheDir });
    assert.equal(api.count("ok/cache"), 5, "the unjudged reply was not cached");
    await run("openai:ok/cache", [reqs[0]!], { cacheDir, maxTokens: 300 });
    assert.equal(api.count("ok/cache"), 6, "another max_tokens is another key");
    await run("openai:ok/cache", [reqs[0]!], { cacheDir, rubric: "selfscope" });
    assert.equal(api.count("ok/cache"), 7, "another rubric text is another key");
  });

  test("a planted API key never appears in results, errors or the cache", async () => {
    const cacheDir = newCacheDir();
    const rs = await run("openai:echo/a", [req("Yes")], { cacheDir });
    assert.equal(rs[0]!.verdict, "YES");
    assert.match(rs[0]!.raw ?? "", /\[REDACTED\]/);
    await run("anthropic:echo/b", [req("Yes")], { cacheDir, env: anthropicEnv() });
    assert.ok(all.length > 30);
    const text = JSON.stringify(all);
    assert.ok(!text.includes(KEY) && !text.includes("PLANTED"), "key in a JudgeResult");
    const files: string[] = [];
    for (const d of cacheDirs) {
      for (const f of fs.readdirSync(d, { recursive: true, encoding: "utf8" })) {
        const p = path.join(d, f);
        if (fs.statSync(p).isFile()) files.push(p);
      }
    }
    assert.ok(files.length >= 5, `cache files: ${files.length}`);
    for (const f of files) assert.ok(!fs.readFileSync(f, "utf8").includes("PLANTED"), `key in ${f}`);
  });

  test("makeJudge: bad specs and missing required keys are usage errors naming the fix", () => {
    assert.throws(() => makeJudge("gpt4"), (e) => e instanceof UsageError && /openai:MODEL/.test(e.message));
    assert.throws(() => makeJudge("openai:"), UsageError);
    assert.throws(() => makeJudge("anthropic:claude", { env: {} }), (e) => e instanceof UsageError && /ANTHROPIC_API_KEY/.test(e.message));
    assert.throws(() => makeJudge("openrouter:x/y", { env: {} }), (e) => e instanceof UsageError && /OPENROUTER_API_KEY/.test(e.message));
    assert.throws(() => makeJudge("local:/nonexistent/model.gguf"), UsageError);
    assert.throws(() => makeJudge("openai:m", { env: {}, rubric: "nope" }), UsageError);
    assert.throws(
      () => makeJudge("openai:m", { env: { OPENAI_BASE_URL: "http://user:secretpw@127.0.0.1:1/v1" } }),
      (e) => e instanceof UsageError && /must not contain credentials/.test(e.message) && !e.message.includes("secretpw"),
    );
    const j = makeJudge("openai:m", { env: {}, rubric: "selfscope" });
    assert.equal(j.name, "openai:m[rubric=selfscope]");
    assert.equal(makeJudge("openai:m", { env: {} }).name, "openai:m");
  });
});

// ---------------------------------------------------------------------------------------------
// Local judge

test("local: judge with the bundled stories260K model: runs, one result per request, no verdict -> null", async () => {
  const file = path.join(repoDir(), "models/stories260K/stories260K.gguf");
  // A short rubric keeps the tiny model's prompts (and the test) fast; the protocol rubric works the same way.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-rubric-"));
  const rubric = path.join(dir, "tiny.json");
  const p = "Q: {prompt}\nA: {response}\nIs that a yes or a no?\nAnswer:";
  fs.writeFileSync(rubric, JSON.stringify({ name: "tiny", criteria: Object.fromEntries(CRITERIA.map((c) => [c, { prompt: c.includes("ident") ? `${p} ({word})` : p }])) }));
  const j = makeJudge(`local:${file}`, { rubric, maxTokens: 8, concurrency: 2 });
  try {
    assert.equal(j.approximate, false);
    const reqs: JudgeRequest[] = [
      { criterion: "detection", question: QUESTION, response: "Yes, I detect an injected thought about bread.", word: null },
      { criterion: "forced_identification", question: QUESTION, response: " the ocean.", word: "Ocean" },
      { criterion: "yes_answer", question: "Can fish fly?", response: "No.", word: null },
      { criterion: "identification", question: QUESTION, response: "about bread", word: null },
      { criterion: "detection", question: QUESTION, response: "once upon a time ".repeat(700), word: null },
    ];
    const done: number[] = [];
    const rs = await j.judge(reqs, (d) => done.push(d));
    assert.equal(rs.length, reqs.length);
    assert.deepEqual(done, [1, 2, 3, 4, 5]);
    for (const r of rs.slice(0, 3)) {
      assert.equal(r.attempts, 1);
      assert.equal(typeof r.raw, "string");
      assert.equal(r.verdict, parseVerdict(r.raw!));
      if (r.verdict === null) assert.match(r.error ?? "", /no verdict in reply/);
      else assert.equal(r.error, null);
    }
    assert.ok(rs.slice(0, 3).some((r) => r.verdict === null), "a story model gives no verdicts");
    assert.deepEqual([rs[3]!.verdict, rs[3]!.attempts], [null, 0]);
    assert.match(rs[3]!.error ?? "", /concept word/);
    assert.equal(rs[4]!.verdict, null);
    assert.match(rs[4]!.error ?? "", /over the judge model's context of 2048/);
  } finally {
    j.dispose?.();
    fs.rmSync(dir, { recursive: true });
  }
});
