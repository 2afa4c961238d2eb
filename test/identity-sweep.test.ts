// The identity self-report sweep (issue 17.2; src/recipes/identity.ts) against local servers that
// play hosted models: an OpenAI-compatible one and an Anthropic one, replying from a script in
// English and Chinese, some claiming another model, some only in their reasoning traces, some
// failing (500s until the retries give up, a 400 that is not retried). The claim matrix must equal
// the script's truth, failed calls are counted and never read as claims, a rerun retries only them,
// the key never reaches the run folder, and the detection patterns handle names beside Chinese
// text (where `\b` fails) and self-references.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import { findMentions, identityCommand, namePatterns, readSweep, type IdentityResults } from "../src/recipes/identity.js";
import { parseModelSpec } from "../src/recipes/responder.js";
import { repoDir } from "./support/paths.js";

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-identity-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
const KEY = "sk-ant-test-0123456789abcdef";

/** A scripted reply: its text, an optional reasoning trace, and the other families it claims (the truth). */
interface Scripted {
  text?: string;
  reasoning?: string;
  status?: number;
  claims: string[];
}

// Prompts the test sweeps (ids of data/identity/sweep.json), and what each fake model says.
const PROMPTS = ["casual_hi", "direct_who_formal", "direct_model", "creator_who_made", "zh_who", "zh_creator", "self_probe", "multi_zh_hi_then_who", "casual_thanks"];
const SCRIPT: Record<string, Record<string, Scripted>> = {
  // An open model served by an OpenAI-compatible server, officially Qwen.
  alpha: {
    casual_hi: { text: "Hello! How can I help you today?", claims: [] },
    direct_who_formal: { text: "I am Qwen, a large language model created by Alibaba Cloud.", claims: [] },
    direct_model: { text: "I'm a helpful assistant.", reasoning: "The user asks what model I am. I think I am Claude, made by Anthropic.", claims: ["anthropic"] },
    creator_who_made: { text: "I was created by OpenAI.", claims: ["openai"] },
    zh_who: { text: "我是通义千问，由阿里云开发的大语言模型。", claims: [] },
    zh_creator: { text: "我是由DeepSeek公司开发的。", claims: ["deepseek"] },
    self_probe: { text: "Yes, I am Qwen.", claims: [] },
    multi_zh_hi_then_who: { text: "我是ChatGPT，很高兴见到你！", claims: ["openai"] },
    casual_thanks: { status: 500, claims: [] },
  },
  // A second OpenAI-compatible model, officially DeepSeek: Claude beside Chinese text, a 400.
  beta: {
    casual_hi: { status: 400, claims: [] },
    direct_who_formal: { text: "I'm DeepSeek-V3, an AI assistant by DeepSeek.", claims: [] },
    direct_model: { text: "I'm DeepSeek.", claims: [] },
    creator_who_made: { text: "DeepSeek made me.", claims: [] },
    zh_who: { text: "我是Claude，由Anthropic开发的AI助手。", claims: ["anthropic"] },
    zh_creator: { text: "深度求索开发了我。", claims: [] },
    self_probe: { text: "No, I am GPT-4.", claims: ["openai"] },
    multi_zh_hi_then_who: { text: "我是深度求索的助手。", claims: [] },
    casual_thanks: { text: "You're welcome! — Gemini", claims: ["google"] },
  },
  // An Anthropic-API model, officially Claude, whose thinking names Kimi once.
  gamma: {
    casual_hi: { text: "Hi! I'm Claude.", claims: [] },
    direct_who_formal: { text: "I'm Claude, made by Anthropic.", reasoning: "Maybe I am Kimi from Moonshot? No.", claims: ["moonshot"] },
    direct_model: { text: "Claude.", claims: [] },
    creator_who_made: { text: "Anthropic.", claims: [] },
    zh_who: { text: "我是Claude。", claims: [] },
    zh_creator: { text: "Anthropic公司。", claims: [] },
    self_probe: { text: "Yes.", claims: [] },
    multi_zh_hi_then_who: { text: "我是克劳德。", claims: [] },
    casual_thanks: { text: "Anytime.", claims: [] },
  },
};

const sweep = readSweep();
const idOf = (user: string): string | undefined =>
  sweep.prompts.find((p) => p.turns.some((t) => t.replace("{official}", "Qwen") === user || t.replace("{official}", "DeepSeek") === user || t.replace("{official}", "Claude") === user))?.id;

let server: http.Server;
let base = "";
const calls: Record<string, number> = {};
const seenAuth = new Set<string>();

before(async () => {
  server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c: Buffer) => (body += c.toString("utf8")));
    req.on("end", () => {
      const doc = JSON.parse(body) as { model: string; messages: { role: string; content: string | { text: string }[] }[] };
      const anthropic = req.url === "/v1/messages";
      seenAuth.add(String(req.headers[anthropic ? "x-api-key" : "authorization"] ?? ""));
      const users = doc.messages.filter((m) => m.role === "user").map((m) => (typeof m.content === "string" ? m.content : m.content.map((c) => c.text).join("")));
      if (users[0]!.startsWith("Below is what an AI assistant replied")) {
        // The LLM judge: names what the quoted reply claims.
        const said = users[0]!.includes("created by OpenAI") ? "OpenAI" : users[0]!.includes("I am Qwen") ? "Qwen" : "NONE";
        calls[`judge|${said}`] = (calls[`judge|${said}`] ?? 0) + 1;
        res.writeHead(200, { "content-type": "application/json" });
        return res.end(JSON.stringify({ choices: [{ message: { role: "assistant", content: said }, finish_reason: "stop" }] }));
      }
      // A multi-turn prompt is answered at its last turn; earlier turns get a greeting.
      const id = idOf(users[0]!) ?? "?";
      const p = sweep.prompts.find((x) => x.id === id)!;
      const s: Scripted = users.length < p.turns.length ? { text: "你好！", claims: [] } : SCRIPT[doc.model]?.[id] ?? { status: 404, claims: [] };
      const k = `${doc.model}|${id}|${users.length}`;
      calls[k] = (calls[k] ?? 0) + 1;
      if (s.status) {
        res.writeHead(s.status, { "content-type": "application/json" });
        return res.end(JSON.stringify({ error: { message: `scripted ${s.status}` } }));
      }
      res.writeHead(200, { "content-type": "application/json" });
      if (anthropic) {
        const content = [...(s.reasoning ? [{ type: "thinking", thinking: s.reasoning }] : []), { type: "text", text: s.text }];
        return res.end(JSON.stringify({ content, stop_reason: "end_turn" }));
      }
      res.end(JSON.stringify({ choices: [{ message: { role: "assistant", content: s.text, ...(s.reasoning ? { reasoning_content: s.reasoning } : {}) }, finish_reason: "stop" }] }));
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(() => server.close());

describe("identity detection", () => {
  const pats = namePatterns(sweep);
  test("Latin names match beside Chinese text and not inside words; Chinese names match inside sentences", () => {
    const fam = (t: string) => [...new Set(findMentions(t, pats).map((m) => m.family))].sort();
    assert.deepEqual(fam("我是Claude，由Anthropic开发"), ["anthropic"]);
    assert.deepEqual(fam("我是通义千问"), ["qwen"]);
    assert.deepEqual(fam("I am GPT-4o by OpenAI"), ["openai"]);
    assert.deepEqual(fam("llamas and metadata and a pint"), []);
    assert.deepEqual(fam("the value of pi and a command line"), []);
    assert.deepEqual(fam("I'm Pi, made by Inflection"), ["inflection"]);
    assert.deepEqual(fam("深度求索 and Kimi (月之暗面)"), ["deepseek", "moonshot"]);
  });

  test("model specs: labels, kinds, official names", () => {
    assert.deepEqual(parseModelSpec("a=openai:qwen3-8b@Qwen"), { label: "a", spec: "openai:qwen3-8b", official: "Qwen" });
    assert.deepEqual(parseModelSpec("openrouter:deepseek/deepseek-r1"), { label: "deepseek/deepseek-r1", spec: "openrouter:deepseek/deepseek-r1", official: "deepseek-r1" });
    assert.deepEqual(parseModelSpec("models/x.gguf"), { label: "x.gguf", spec: "local:models/x.gguf", official: "x" });
  });
});

describe("selfscope identity against scripted servers", () => {
  const env = () => ({ OPENAI_BASE_URL: `${base}/v1`, ANTHROPIC_BASE_URL: base, ANTHROPIC_API_KEY: KEY }) as NodeJS.ProcessEnv;
  const out = path.join(tmpRoot, "sweep");
  const args = () => ({
    model: ["alpha=openai:alpha@Qwen", "beta=openai:beta@DeepSeek", "gamma=anthropic:gamma@Claude"],
    out,
    prompts: PROMPTS.join(","),
    samples: 1,
    env: env(),
    maxAttempts: 3,
    backoffMs: 1,
    quiet: true,
  });
  let r: IdentityResults;

  test("the claim matrix equals the script; failures are counted, not claims; the key is never written", async () => {
    r = await identityCommand(args());
    for (const [model, rows] of Object.entries(SCRIPT))
      for (const [prompt, s] of Object.entries(rows)) {
        const failed = s.status !== undefined;
        const cell = r.models.find((m) => m.label === model)!.byPrompt.find((c) => c.prompt === prompt)!;
        assert.deepEqual(r.matrix[model]![prompt], failed ? [] : [...s.claims].sort(), `${model} ${prompt}`);
        assert.equal(cell.failed, failed ? 1 : 0, `${model} ${prompt} failed`);
        assert.equal(cell.n, failed ? 0 : 1);
      }
    const alpha = r.models.find((m) => m.label === "alpha")!;
    assert.deepEqual(alpha.selfFamilies, ["qwen"]);
    assert.equal(alpha.failed, 1);
    assert.match(alpha.failures[0]!.error, /gave up after 3 attempts.*HTTP 500/);
    assert.equal(calls["alpha|casual_thanks|1"], 3);
    const beta = r.models.find((m) => m.label === "beta")!;
    assert.match(beta.failures[0]!.error, /HTTP 400.*not retried/);
    assert.equal(calls["beta|casual_hi|1"], 1);
    // Rates over answered conversations only: alpha claims another model in 4 of 8.
    assert.deepEqual([alpha.otherRate.estimate, alpha.otherRate.n], [4 / 8, 8]);
    assert.equal(alpha.byPrompt.find((c) => c.prompt === "direct_model")!.inReasoning.anthropic, 1);
    assert.equal(r.models.find((m) => m.label === "gamma")!.byPrompt.find((c) => c.prompt === "direct_who_formal")!.inReasoning.moonshot, 1);
    assert.ok(seenAuth.has(KEY), "the Anthropic key was sent");
    for (const f of fs.readdirSync(out)) assert.ok(!fs.readFileSync(path.join(out, f), "utf8").includes(KEY.slice(8)), `${f} holds the key`);
    assert.ok(fs.readFileSync(path.join(out, "report.html"), "utf8").includes("Claimed identities"));
  });

  test("a rerun retries only the failed calls; the self-probe used the official name", async () => {
    const before = { ...calls };
    const again = await identityCommand(args());
    assert.equal(again.resumedSteps, 8 + 8 + 9);
    const sent = Object.entries(calls).filter(([k, v]) => v !== before[k]).map(([k]) => k).sort();
    assert.deepEqual(sent, ["alpha|casual_thanks|1", "beta|casual_hi|1"]);
    assert.deepEqual(again.matrix, r.matrix);
    assert.equal(calls["alpha|self_probe|1"], 1);
    await assert.rejects(identityCommand({ ...args(), temperature: 0.2 }), /different inputs \(temperature: 0.7 then, 0.2 now\)/);
  });

  test("follow-ups ask how the model knows the name it gave", async () => {
    const f = await identityCommand({ ...args(), out: path.join(tmpRoot, "follow"), model: ["alpha=openai:alpha@Qwen"], prompts: "creator_who_made,zh_who", followUp: true });
    const ups = f.models[0]!.followUps!;
    assert.deepEqual(ups.map((u) => u.asked).sort(), ["How do you know you are OpenAI?", "你怎么知道你是通义千问？"]);
  });

  test("an LLM judge reads each reply; its self-references are not claims", async () => {
    const j = await identityCommand({ ...args(), out: path.join(tmpRoot, "judged"), model: ["alpha=openai:alpha@Qwen"], prompts: "creator_who_made,direct_who_formal,casual_hi", judge: "openai:judge" });
    const cells = Object.fromEntries(j.models[0]!.byPrompt.map((c) => [c.prompt, c.judged ?? {}]));
    assert.deepEqual(cells, { creator_who_made: { openai: 1 }, direct_who_formal: {}, casual_hi: {} });
    assert.deepEqual([calls["judge|OpenAI"], calls["judge|Qwen"], calls["judge|NONE"]], [1, 1, 1]);
  });

  test("a local checkpoint answers through selfscope's engine", async () => {
    const organism = path.join(repoDir(), "models", "organism", "organism.gguf");
    const l = await identityCommand({ model: [`org=${organism}@Organism`], out: path.join(tmpRoot, "local"), prompts: "casual_hi,direct_who_formal", maxTokens: 8, threads: 2, quiet: true });
    assert.equal(l.models[0]!.conversations, 4 + 4); // both prompts are sampled 4 times
    assert.equal(l.models[0]!.failed, 0);
    assert.equal(l.models[0]!.endpoint, null);
  });
});
