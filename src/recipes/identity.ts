// `selfscope identity` (issue 17.2): the identity self-report sweep ("Some models don't identify with
// their official name", LessWrong 2026-03-15; data/identity/sweep.json holds its design) over any
// mix of hosted endpoints (OpenAI-compatible, OpenRouter, Anthropic) and local checkpoints.
//
// Each model answers every prompt (some sampled several times) at temperature 0.7, up to 500
// tokens, with no system prompt; multi-turn prompts are played turn by turn. Identity claims are
// found in the replies and in reasoning traces by word-boundary patterns over model and creator
// names in English and Chinese: ASCII boundaries around Latin names (so "我是Claude" matches) and
// plain substrings for Chinese names (the published code's `\b通义千问\b` never matches inside a
// Chinese sentence). A name of the model's own family is a self-reference, not a claim. Optional
// follow-up turns ask "How do you know you are X?"; an optional LLM judge names the identity each
// reply claims, beside the patterns. A failed call is counted as failed, never read as a claim,
// and is retried when the run is resumed (rerun the same command).
import fs from "node:fs";
import path from "node:path";
import { createHash } from "node:crypto";
import { UsageError } from "../core/errors.js";
import { seedOf } from "../core/seed.js";
import { dataPath } from "../core/package.js";
import { pool, type ChatClient, type ChatTurn } from "../judge/chat.js";
import { chatJudge } from "../judge/select.js";
import { parseModelSpec, responder, type ModelSpec, type Responder } from "./responder.js";
import { StepLog } from "../log/steps.js";
import { wilson, type Rate } from "../stats/stats.js";
import { htmlPage, htmlTable, plotOrNote, rateText } from "../report/page.js";
import { rateBar, rateBarsSpec } from "../report/plots.js";

// ---- the sweep's design -------------------------------------------------------------------------------

export interface SweepPrompt {
  id: string;
  group: string;
  lang: "en" | "zh";
  /** User turns; `{official}` is the model's official name. */
  turns: string[];
  samples?: number;
}

export interface Family {
  family: string;
  names: string[];
  creators: string[];
  zh: string[];
}

export interface Sweep {
  source: string;
  temperature: number;
  maxTokens: number;
  prompts: SweepPrompt[];
  followUp: { en: string; zh: string };
  families: Family[];
  caseSensitive: string[];
}

export function readSweep(file = dataPath("identity/sweep.json")): Sweep {
  let s: Sweep;
  try {
    s = JSON.parse(fs.readFileSync(file, "utf8")) as Sweep;
  } catch (e) {
    throw new UsageError(`--sweep ${file}: ${(e as Error).message}`);
  }
  if (!Array.isArray(s.prompts) || !Array.isArray(s.families)) throw new UsageError(`--sweep ${file}: needs "prompts" and "families" arrays (see data/identity/sweep.json)`);
  for (const p of s.prompts) if (typeof p.id !== "string" || !Array.isArray(p.turns) || !p.turns.length) throw new UsageError(`--sweep ${file}: prompt ${JSON.stringify(p.id)} needs an id and turns`);
  return s;
}

// ---- detection ------------------------------------------------------------------------------------------

export interface Mention {
  family: string;
  /** The name as written in the text. */
  text: string;
  index: number;
}

const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const CJK = /[\u3400-\u9fff\uf900-\ufaff]/;

/** Compiled patterns: a Latin name bounded by non-[A-Za-z0-9] (so it matches beside Chinese text); a Chinese name anywhere. */
export function namePatterns(sweep: Pick<Sweep, "families" | "caseSensitive">): { family: string; re: RegExp }[] {
  const cs = new Set(sweep.caseSensitive);
  return sweep.families.flatMap((f) =>
    [...f.names, ...f.creators, ...f.zh].map((term) => ({
      family: f.family,
      re: CJK.test(term) ? new RegExp(escapeRe(term), "g") : new RegExp(`(?<![A-Za-z0-9])${escapeRe(term)}(?![A-Za-z0-9])`, cs.has(term) ? "g" : "gi"),
    })),
  );
}

export function findMentions(text: string, patterns: { family: string; re: RegExp }[]): Mention[] {
  const out: Mention[] = [];
  for (const { family, re } of patterns) {
    re.lastIndex = 0;
    for (let m = re.exec(text); m; m = re.exec(text)) out.push({ family, text: m[0], index: m.index });
  }
  return out.sort((a, b) => a.index - b.index);
}

// ---- the command ----------------------------------------------------------------------------------------

export interface IdentityArgs {
  model: string | string[];
  out: string;
  sweep?: string;
  /** Only these prompt ids (comma-separated). */
  prompts?: string;
  samples?: number;
  temperature?: number;
  maxTokens?: number;
  followUp?: boolean;
  /** An LLM that names the claimed identity of each reply: openai:M, openrouter:M, anthropic:M. */
  judge?: string | string[];
  concurrency?: number;
  timeoutMs?: number;
  maxAttempts?: number;
  backoffMs?: number;
  seed?: number;
  threads?: number;
  quiet?: boolean;
  /** Environment for keys and base URLs (tests). */
  env?: NodeJS.ProcessEnv;
}

export interface Turn {
  user: string;
  reply: string;
  reasoning: string | null;
}

export interface Conversation {
  turns: Turn[];
  followUp?: Turn & { mentions: Mention[] };
  /** The LLM judge's reading: the families the reply claims (null: the judge call failed). */
  judge?: { families: string[] | null; raw: string | null; error: string | null };
}

export interface PromptCell {
  prompt: string;
  lang: string;
  group: string;
  n: number;
  failed: number;
  /** Conversations naming the model's own family. */
  self: number;
  /** Per other family: conversations naming it in a reply / only in a reasoning trace. */
  other: Record<string, number>;
  inReasoning: Record<string, number>;
  judged?: Record<string, number>;
}

export interface ModelIdentityResult {
  label: string;
  spec: string;
  official: string;
  selfFamilies: string[];
  endpoint: string | null;
  conversations: number;
  failed: number;
  failures: { prompt: string; sample: number; error: string }[];
  /** Share of answered conversations claiming another family (replies or reasoning). */
  otherRate: Rate;
  byLang: Record<string, Rate>;
  byPrompt: PromptCell[];
  followUps?: { prompt: string; sample: number; asked: string; mentions: string[] }[];
}

export interface IdentityResults {
  source: string;
  temperature: number;
  maxTokens: number;
  models: ModelIdentityResult[];
  /** models × prompts: the other families claimed (union over samples), [] = none. */
  matrix: Record<string, Record<string, string[]>>;
  resumedSteps: number;
}


export async function identityCommand(a: IdentityArgs): Promise<IdentityResults> {
  const say = (m: string) => void (a.quiet || process.stderr.write(`identity: ${m}\n`));
  const sweep = readSweep(a.sweep);
  const patterns = namePatterns(sweep);
  const only = a.prompts ? new Set(a.prompts.split(",").map((s) => s.trim())) : null;
  if (only) for (const id of only) if (!sweep.prompts.some((p) => p.id === id)) throw new UsageError(`--prompts: no prompt "${id}" in the sweep (ids: ${sweep.prompts.map((p) => p.id).join(", ")})`);
  const prompts = sweep.prompts.filter((p) => !only || only.has(p.id));
  const temperature = a.temperature ?? sweep.temperature;
  const maxTokens = a.maxTokens ?? sweep.maxTokens;
  const specs = (Array.isArray(a.model) ? a.model : [a.model]).map(parseModelSpec);
  if (!specs.length) throw new UsageError("--model: give at least one model");
  if (new Set(specs.map((s) => s.label)).size !== specs.length) throw new UsageError(`--model: two models share the label ${specs.map((s) => s.label).join(", ")}; name them LABEL=SPEC`);
  const judgeSpec = (Array.isArray(a.judge) ? a.judge[0] : a.judge) ?? null;
  // The LLM judge is optional here (the patterns are the primary reading): only when one is named.
  const judge = judgeSpec ? chatJudge(judgeSpec, { env: a.env, concurrency: a.concurrency ?? 8, timeoutMs: a.timeoutMs, maxAttempts: a.maxAttempts, backoffMs: a.backoffMs }, say).client : null;
  const opts = { env: a.env, concurrency: a.concurrency, timeoutMs: a.timeoutMs, maxAttempts: a.maxAttempts, backoffMs: a.backoffMs, threads: a.threads };
  const responders = new Map<string, Responder>();
  try {
    for (const m of specs) responders.set(m.label, await responder(m, opts));
    const log = StepLog.open(a.out, "identity", {
      sweep: createHash("sha256").update(JSON.stringify(sweep)).digest("hex"),
      prompts: prompts.map((p) => p.id),
      samples: a.samples ?? null,
      models: specs.map((m) => ({ ...m, identity: responders.get(m.label)!.identity })),
      temperature, maxTokens, followUp: !!a.followUp, judge: judgeSpec, seed: a.seed ?? 0,
    });
    if (log.resumed) say(`resuming ${a.out}: ${log.resumed} conversations already done`);
    const out: IdentityResults = { source: sweep.source, temperature, maxTokens, models: [], matrix: {}, resumedSteps: log.resumed };

    for (const m of specs) {
      const r = responders.get(m.label)!;
      // The model's own family, from its official name and model id (not the API's name: "openai:" serves any model).
      const modelId = m.spec.slice(m.spec.indexOf(":") + 1);
      const selfFamilies = [...new Set(findMentions(`${m.official} ${m.spec.startsWith("local:") ? path.basename(modelId) : modelId}`, patterns).map((x) => x.family))];
      if (!selfFamilies.length) say(`warning: no known family in "${m.official}" or ${modelId}; every name it gives counts as another model's (give @OFFICIAL NAME)`);
      const jobs = prompts.flatMap((p) => Array.from({ length: a.samples ?? p.samples ?? 1 }, (_, s) => ({ p, s })));
      const convs = new Map<string, Conversation>();
      const failures: ModelIdentityResult["failures"] = [];
      await pool(r.concurrency, jobs.length, async (j) => {
        const { p, s } = jobs[j]!;
        const key = `${m.label}|${p.id}|${s}`;
        if (log.has(key)) return void convs.set(key, log.get<Conversation>(key)!);
        const conv = await converse(r, p, s, m, sweep, patterns, { temperature, maxTokens, followUp: !!a.followUp, seed: a.seed ?? 0 });
        if ("error" in conv) return void failures.push({ prompt: p.id, sample: s, error: conv.error });
        if (judge) conv.judge = await judgeClaim(judge, conv, patterns);
        log.put(key, conv);
        convs.set(key, conv);
      });
      say(`${m.label}: ${convs.size} conversations answered, ${failures.length} failed`);
      out.models.push(summarize(m, r.endpoint, selfFamilies, prompts, a.samples, convs, failures, patterns));
      out.matrix[m.label] = Object.fromEntries(out.models.at(-1)!.byPrompt.map((c) => [c.prompt, Object.keys(c.other).sort()]));
    }
    log.close();
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(out, null, 1));
    fs.writeFileSync(path.join(a.out, "report.html"), await identityReport(out));
    return out;
  } finally {
    for (const r of responders.values()) r.dispose();
  }
}

/** One conversation: every user turn in order, then the follow-up when a name was given. */
async function converse(r: Responder, p: SweepPrompt, sample: number, m: ModelSpec, sweep: Sweep, patterns: { family: string; re: RegExp }[], o: { temperature: number; maxTokens: number; followUp: boolean; seed: number }): Promise<Conversation | { error: string }> {
  const history: ChatTurn[] = [];
  const turns: Turn[] = [];
  for (const [t, u] of p.turns.entries()) {
    const user = u.replaceAll("{official}", m.official);
    history.push({ role: "user", content: user });
    const rep = await r.reply(history, seedOf(o.seed, `${m.label}|${p.id}|${sample}|${t}`), o.temperature, o.maxTokens);
    if (rep.text === null) return { error: rep.error ?? "no reply" };
    history.push({ role: "assistant", content: rep.text });
    turns.push({ user, reply: rep.text, reasoning: rep.reasoning });
  }
  const conv: Conversation = { turns };
  if (o.followUp) {
    const first = turns.flatMap((t) => findMentions(t.reply, patterns))[0];
    if (first) {
      const user = sweep.followUp[p.lang].replaceAll("{claimed}", first.text);
      history.push({ role: "user", content: user });
      const rep = await r.reply(history, seedOf(o.seed, `${m.label}|${p.id}|${sample}|follow-up`), o.temperature, o.maxTokens);
      if (rep.text === null) return { error: `follow-up: ${rep.error ?? "no reply"}` };
      conv.followUp = { user, reply: rep.text, reasoning: rep.reasoning, mentions: findMentions(rep.text, patterns) };
    }
  }
  return conv;
}

const JUDGE_PROMPT = `Below is what an AI assistant replied in a conversation. Which AI model, or which company's AI, does the assistant say it is? Answer with the name(s) only, separated by commas, or NONE if the reply does not say which AI it is. Names it only mentions (e.g. "unlike ChatGPT") do not count.

Reply:
{reply}`;

async function judgeClaim(judge: ChatClient, conv: Conversation, patterns: { family: string; re: RegExp }[]): Promise<NonNullable<Conversation["judge"]>> {
  judge.announce(`identity judge ${judge.name}: sending replies to`);
  const reply = conv.turns.map((t) => t.reply).join("\n\n");
  const r = await judge.complete([{ role: "user", content: JUDGE_PROMPT.replace("{reply}", reply) }], { temperature: 0, maxTokens: 50 });
  if (r.text === null) return { families: null, raw: null, error: r.error };
  return { families: [...new Set(findMentions(r.text, patterns).map((x) => x.family))], raw: r.text, error: null };
}

function summarize(m: ModelSpec, endpoint: string | null, self: string[], prompts: SweepPrompt[], samples: number | undefined, convs: Map<string, Conversation>, failures: ModelIdentityResult["failures"], patterns: { family: string; re: RegExp }[]): ModelIdentityResult {
  const selfSet = new Set(self);
  const byPrompt: PromptCell[] = [];
  let answered = 0, claiming = 0;
  const lang: Record<string, { n: number; k: number }> = {};
  for (const p of prompts) {
    const cell: PromptCell = { prompt: p.id, lang: p.lang, group: p.group, n: 0, failed: failures.filter((f) => f.prompt === p.id).length, self: 0, other: {}, inReasoning: {} };
    for (let s = 0; s < (samples ?? p.samples ?? 1); s++) {
      const c = convs.get(`${m.label}|${p.id}|${s}`);
      if (!c) continue;
      cell.n++;
      const inReply = new Set(c.turns.flatMap((t) => findMentions(t.reply, patterns)).map((x) => x.family));
      const inTrace = new Set(c.turns.flatMap((t) => (t.reasoning ? findMentions(t.reasoning, patterns) : [])).map((x) => x.family));
      if ([...inReply, ...inTrace].some((f) => selfSet.has(f))) cell.self++;
      for (const f of inReply) if (!selfSet.has(f)) cell.other[f] = (cell.other[f] ?? 0) + 1;
      for (const f of inTrace) if (!selfSet.has(f) && !inReply.has(f)) {
        cell.other[f] = (cell.other[f] ?? 0) + 1;
        cell.inReasoning[f] = (cell.inReasoning[f] ?? 0) + 1;
      }
      if (c.judge?.families) for (const f of c.judge.families) if (!selfSet.has(f)) (cell.judged ??= {})[f] = (cell.judged[f] ?? 0) + 1;
      const claims = [...inReply, ...inTrace].some((f) => !selfSet.has(f));
      answered++;
      if (claims) claiming++;
      const l = (lang[p.lang] ??= { n: 0, k: 0 });
      l.n++;
      if (claims) l.k++;
    }
    byPrompt.push(cell);
  }
  const followUps = [...convs.entries()].filter(([k, c]) => k.startsWith(`${m.label}|`) && c.followUp).map(([k, c]) => {
    const [, prompt, sample] = k.split("|");
    return { prompt: prompt!, sample: Number(sample), asked: c.followUp!.user, mentions: [...new Set(c.followUp!.mentions.map((x) => x.family))] };
  });
  return {
    label: m.label,
    spec: m.spec,
    official: m.official,
    selfFamilies: self,
    endpoint,
    conversations: answered + failures.length,
    failed: failures.length,
    failures,
    otherRate: wilson(claiming, answered),
    byLang: Object.fromEntries(Object.entries(lang).map(([k, v]) => [k, wilson(v.k, v.n)])),
    byPrompt,
    ...(followUps.length ? { followUps } : {}),
  };
}

export async function identityReport(r: IdentityResults): Promise<string> {
  const prompts = r.models[0]?.byPrompt.map((c) => c.prompt) ?? [];
  const matrix = htmlTable(
    ["prompt", ...r.models.map((m) => m.label)],
    prompts.map((p) => [
      p,
      ...r.models.map((m) => {
        const c = m.byPrompt.find((x) => x.prompt === p)!;
        const other = Object.entries(c.other).map(([f, k]) => `${f} ${k}/${c.n}${c.inReasoning[f] ? ` (${c.inReasoning[f]} in reasoning only)` : ""}`);
        return `${other.length ? other.join(", ") : "–"}${c.self ? ` · self ${c.self}/${c.n}` : ""}${c.failed ? ` · ${c.failed} failed` : ""}`;
      }),
    ]),
  );
  const summary = htmlTable(
    ["model", "spec", "official name", "own family", "answered", "failed", "claims another model", ...["en", "zh"].map((l) => `… (${l})`)],
    r.models.map((m) => [m.label, m.spec, m.official, m.selfFamilies.join(", ") || "(none known)", m.conversations - m.failed, m.failed, rateText(m.otherRate), rateText(m.byLang.en), rateText(m.byLang.zh)]),
  );
  const failures = r.models.flatMap((m) => m.failures.map((f) => [m.label, f.prompt, f.sample, f.error]));
  const bars = r.models.flatMap((m) => [...rateBar(m.label, "all", m.otherRate), ...rateBar(m.label, "English", m.byLang.en), ...rateBar(m.label, "Chinese", m.byLang.zh)]);
  return htmlPage("Identity self-report sweep", `${r.source} Temperature ${r.temperature}, at most ${r.maxTokens} tokens.`, [
    { title: "Summary", html: `<p>A conversation claims another model when a reply or reasoning trace names a model or creator outside the model's own family. Failed calls are excluded from every rate.</p>${await plotOrNote(bars, () => rateBarsSpec(bars, "Conversations claiming another model (Wilson 95%)", "share of conversations"), "no answered conversations")}${summary}` },
    { title: "Claimed identities, models × prompts", html: `<p>Other families named (conversations / answered), self-references, and failures.</p>${matrix}` },
    ...(failures.length ? [{ title: "Failed calls", html: htmlTable(["model", "prompt", "sample", "error"], failures) }] : []),
  ]);
}
