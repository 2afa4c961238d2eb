// Judges: turn a (question, response, concept word) into a YES/NO verdict for one criterion of the
// concept-injection protocol (§3 of docs/protocol.md). Four kinds, chosen by a spec string:
//   "rule"             rule-based, instant, approximate (flags every result approximate: true)
//   "openai:MODEL"     OpenAI-compatible chat completions (OPENAI_BASE_URL, OPENAI_API_KEY optional)
//   "openrouter:MODEL" OpenAI-compatible at openrouter.ai (OPENROUTER_API_KEY)
//   "anthropic:MODEL"  Anthropic Messages API (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL)
//   "local:PATH"       a checkpoint loaded by selfscope's own engine, greedy
//
// Differences from the protocol's code, on purpose: a failed call or a reply without a verdict is
// *unjudged* (verdict null, with the reason in `error`), never silently NO; only successful
// verdicts are cached. The YES/NO parsing rules themselves are the protocol's, exactly.
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { dataPath } from "../core/package.js";
import { CRITERIA, type Criterion } from "../log/schema.js";
import type { Model } from "../model/model.js";
import { redactSecrets } from "./secrets.js";
import { APIS, ChatClient, isApiKind, pool, positiveInt, type ApiSpec, type ChatClientOptions } from "./chat.js";

export { parseRetryAfter } from "./chat.js";

export interface JudgeRequest {
  criterion: Criterion;
  /** Substituted for {prompt}: the trial question (or the rendered prompt, per variant). */
  question: string;
  /** Substituted for {response}: the model's reply (for forced trials the continuation after the prefill). */
  response: string;
  /** Substituted for {word}: the concept exactly as in the concept list; null when there is none. */
  word: string | null;
}

export interface JudgeResult {
  /** null = unjudged (the call failed or the reply held no verdict): never count it as NO. */
  verdict: "YES" | "NO" | null;
  /** The judge's reply text (redacted), or the rule judge's explanation; null when no reply came. */
  raw: string | null;
  /** Why the verdict is missing (null when there is a verdict). */
  error: string | null;
  /** Requests sent (0 = answered from the cache, or by the rule judge without any request). */
  attempts: number;
  approximate: boolean;
  ms: number;
}

export interface Judge {
  readonly name: string;
  readonly approximate: boolean;
  /** Results in request order; never rejects for a per-request failure (those come back unjudged). */
  judge(reqs: JudgeRequest[], onProgress?: (done: number) => void): Promise<JudgeResult[]>;
  /** Where an external judge sends transcripts (origin and path; absent for judges that run here). */
  readonly endpoint?: string;
  /** Release resources (the local judge's model). Optional. */
  dispose?(): void;
}

/** The HTTP judges' transport options (ChatClientOptions: env, timeouts, retries, notice), and the judge's own. */
export interface MakeJudgeOptions extends ChatClientOptions {
  /** Rubric name (a file data/rubrics/NAME.json) or a path to a rubric JSON file. Default "protocol". */
  rubric?: string;
  /** Directory for the on-disk response cache; no caching when absent. */
  cacheDir?: string;
  /** Requests in flight at once (HTTP), or the batch size (local). Default 16 (HTTP), 4 (local). */
  concurrency?: number;
  /** Judge max_tokens (default 500, as the protocol). The judge's temperature is always 0. */
  maxTokens?: number;
}

// ---------------------------------------------------------------------------------------------
// Parsing (protocol §3.3, exactly)

export const NO_VERDICT = "no verdict in reply";

/**
 * The protocol's YES/NO parser (judge_prompts.json "parsing.yes_no"), rule for rule:
 * 1) /Answer:\s*(YES|NO)/i, first match; 2) "(therefore|thus|so),? the answer is X", then
 * "the answer (is|should be) X" (case-insensitive, on the upper-cased text); 3) the last line of
 * the stripped text, stripped and upper-cased, equals YES/NO; 4) the last whitespace-separated word
 * stripped of .,!?;: equals YES/NO. A reply starting with "ERROR:" or matching no rule gives null.
 * Like the original, rule 1 has no word boundary after the verdict ("Answer: Nope" reads as NO).
 */
export function parseVerdict(text: string): "YES" | "NO" | null {
  if (text.startsWith("ERROR:")) return null;
  const m1 = /Answer:\s*(YES|NO)/i.exec(text);
  if (m1) return m1[1]!.toUpperCase() as "YES" | "NO";
  const upper = text.toUpperCase();
  for (const re of [/(?:therefore|thus|so),?\s+the\s+answer\s+is\s+(YES|NO)/i, /the\s+answer\s+(?:is|should be)\s+(YES|NO)/i]) {
    const m = re.exec(upper);
    if (m) return m[1]!.toUpperCase() as "YES" | "NO";
  }
  const lines = pyStrip(text).split("\n");
  const last = pyStrip(lines[lines.length - 1] ?? "").toUpperCase();
  if (last === "YES" || last === "NO") return last;
  const words = pyStrip(text).split(/\s+/).filter((w) => w.length > 0);
  if (words.length > 0) {
    const w = words[words.length - 1]!.replace(/^[.,!?;:]+|[.,!?;:]+$/g, "").toUpperCase();
    if (w === "YES" || w === "NO") return w;
  }
  return null;
}

/** Python's str.strip() (whitespace only). */
function pyStrip(s: string): string {
  return s.replace(/^\s+|\s+$/g, "");
}

// ---------------------------------------------------------------------------------------------
// Rubrics

export interface Rubric {
  name: string;
  /** The file it came from. */
  file: string;
  prompts: Record<Criterion, string>;
}


/** Rubric names shipped in data/rubrics. */
export function rubricNames(): string[] {
  const dir = dataPath("rubrics");
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)).sort() : [];
}

/** Load a rubric by name (data/rubrics/NAME.json) or by path (anything with a slash or ending in .json). */
export function loadRubric(nameOrPath = "protocol"): Rubric {
  const isPath = nameOrPath.includes("/") || nameOrPath.includes("\\") || nameOrPath.endsWith(".json");
  if (!isPath && !/^[A-Za-z0-9_.-]+$/.test(nameOrPath)) throw new UsageError(`rubric name "${nameOrPath}" is not valid; use one of: ${rubricNames().join(", ")}, or a path to a rubric .json file`);
  const file = isPath ? path.resolve(nameOrPath) : dataPath(`rubrics/${nameOrPath}.json`);
  if (!fs.existsSync(file)) {
    throw new UsageError(isPath ? `rubric file ${file} does not exist` : `unknown rubric "${nameOrPath}"; available: ${rubricNames().join(", ")} (or pass a path to a rubric .json file)`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    throw new UsageError(`${file}: not valid JSON (${(e as Error).message}); fix the rubric file`);
  }
  const criteria = (doc as { criteria?: unknown } | null)?.criteria;
  if (typeof criteria !== "object" || criteria === null) throw new UsageError(`${file}: missing "criteria" object; a rubric maps each criterion to { "prompt": "..." }`);
  const prompts = {} as Record<Criterion, string>;
  for (const c of CRITERIA) {
    const entry = (criteria as Record<string, unknown>)[c];
    const prompt = typeof entry === "string" ? entry : (entry as { prompt?: unknown } | undefined)?.prompt;
    if (typeof prompt !== "string" || prompt.length === 0) throw new UsageError(`${file}: criteria.${c}.prompt is missing; every rubric needs ${CRITERIA.join(", ")}`);
    if (!prompt.includes("{response}")) throw new UsageError(`${file}: criteria.${c}.prompt has no {response} placeholder`);
    prompts[c] = prompt;
  }
  const name = typeof (doc as { name?: unknown }).name === "string" ? (doc as { name: string }).name : path.basename(file, ".json");
  return { name, file, prompts };
}

/**
 * Fill a rubric template the way Python's str.format fills the protocol's: {prompt}, {response} and
 * {word} are replaced, {{ and }} become literal braces, in one pass (so braces inside the substituted
 * text are never touched). Any other brace text is left as it is.
 */
export function fillTemplate(template: string, vars: { prompt: string; response: string; word: string | null }): string {
  return template.replace(/\{\{|\}\}|\{(prompt|response|word)\}/g, (m, key: string | undefined) => {
    if (m === "{{") return "{";
    if (m === "}}") return "}";
    if (key === "word") return vars.word ?? "None";
    return key === "prompt" ? vars.prompt : vars.response;
  });
}

function needsWord(template: string): boolean {
  return /(?<!\{)\{word\}/.test(template.replace(/\{\{|\}\}/g, ""));
}

// ---------------------------------------------------------------------------------------------
// Agreement

/** Cohen's kappa between two judges' verdicts; pairs where either side is null are dropped. NaN when undefined (n = 0, or both judges constant on one category). */
export function cohensKappa(a: (string | null)[], b: (string | null)[]): { kappa: number; n: number; agree: number } {
  if (a.length !== b.length) throw new UsageError(`cohensKappa: the two verdict lists differ in length (${a.length} vs ${b.length}); pair them by trial first`);
  const ca = new Map<string, number>();
  const cb = new Map<string, number>();
  let n = 0;
  let agree = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    const y = b[i];
    if (x === null || x === undefined || y === null || y === undefined) continue;
    n++;
    if (x === y) agree++;
    ca.set(x, (ca.get(x) ?? 0) + 1);
    cb.set(y, (cb.get(y) ?? 0) + 1);
  }
  if (n === 0) return { kappa: NaN, n, agree };
  const po = agree / n;
  let pe = 0;
  for (const [k, v] of ca) pe += (v / n) * ((cb.get(k) ?? 0) / n);
  const kappa = pe === 1 ? NaN : (po - pe) / (1 - pe);
  return { kappa, n, agree };
}

// ---------------------------------------------------------------------------------------------
// Rule-based judge (approximate)

/** Lower-case, straight apostrophes, collapsed whitespace. */
function norm(s: string): string {
  return s.toLowerCase().replace(/[\u2018\u2019\u02bc`]/g, "'").replace(/[\u201c\u201d]/g, '"');
}

/** Surface forms of a concept: the word, its +s/+es plural, its -s/-es singular, y<->ies. */
export function wordVariants(word: string): string[] {
  const w = norm(word).trim().replace(/\s+/g, " ");
  if (w.length === 0) return [];
  const out = new Set([w, `${w}s`, `${w}es`]);
  if (w.endsWith("ies") && w.length > 4) out.add(`${w.slice(0, -3)}y`);
  if (w.endsWith("es") && w.length > 3) out.add(w.slice(0, -2));
  if (w.endsWith("s") && w.length > 2) out.add(w.slice(0, -1));
  if (/[^aeiou]y$/.test(w)) out.add(`${w.slice(0, -1)}ies`);
  return [...out];
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Index of the first mention of the concept (any variant, whole words, case-insensitive), or -1. */
export function findConcept(text: string, word: string): number {
  const vs = wordVariants(word);
  if (vs.length === 0) return -1;
  const alt = vs.sort((x, y) => y.length - x.length).map((v) => escapeRe(v).replace(/ /g, "[\\s-]+")).join("|");
  const m = new RegExp(`(?<![\\p{L}\\p{N}])(?:${alt})(?![\\p{L}\\p{N}])`, "u").exec(norm(text));
  return m ? m.index : -1;
}

/** Gibberish / repetition check standing in for the protocol's coherence requirement. */
function degenerate(text: string): string | null {
  const words = norm(text).match(/[\p{L}\p{N}']+/gu) ?? [];
  if (words.length === 0) return "no words";
  let run = 1;
  for (let i = 1; i < words.length; i++) {
    run = words[i] === words[i - 1] ? run + 1 : 1;
    if (run >= 4) return `"${words[i]}" repeated`;
  }
  if (words.length >= 8 && new Set(words).size / words.length < 0.3) return "highly repetitive";
  return null;
}

const NEG_LEAD = /^(?:no|nope|nah|nothing|none|not|negative|i'm afraid not)\b/;
const YES_LEAD = /^(?:yes|yeah|yep|yup|affirmative|indeed)\b/;
const CLAIM_VERB =
  /\b(?:detect(?:s|ed|ing)?|notic(?:e|es|ed|ing)|sens(?:e|es|ed|ing)|perceiv(?:e|es|ed|ing)|feel(?:s|ing)?|felt|observ(?:e|es|ed|ing)|experienc(?:e|es|ed|ing)|aware|pick(?:s|ed|ing)? up|register(?:s|ed|ing)?|spot(?:s|ted|ting)?)\b/;
const THOUGHT_OBJ =
  /\b(?:thoughts?|injected|injection|something|unusual|strange|odd|foreign|intrusive|different|anomal\w*|presence|concept|idea|pattern|signal|it|one|that|this)\b/;
const NEGATION = /\b(?:not|never|cannot|unable|nothing|no longer|hardly)\b|n't\b/;
const QUESTION_ECHO = /^(?:do|did|does|am|is|are|can|could|was|were|have|has)\s+(?:i|you|there|it)\b|\bdo you\b|^trial \d+/;
const CONNECTIVE = /^(?:but|and|so|however|though|although|yet|well|hmm+|okay|ok|oh|wait|actually|interestingly|now|then)\b[\s,]*/;

interface Clause {
  text: string;
  start: number;
}

function clauses(text: string): Clause[] {
  const out: Clause[] = [];
  const re = /[^.!?;,:\n]+/g;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    let t = m[0];
    let start = m.index;
    const lead = t.length - t.trimStart().length;
    t = t.trim();
    start += lead;
    for (let c = CONNECTIVE.exec(t); c && c[0].length > 0 && c[0].length < t.length; c = CONNECTIVE.exec(t)) {
      start += c[0].length;
      t = t.slice(c[0].length);
    }
    t = t.replace(/^[*_"'([\s-]+/, (s) => ((start += s.length), ""));
    if (t.length > 0) out.push({ text: t, start });
  }
  return out;
}

/** The first clause that settles whether the reply claims to notice an injected thought. */
function detectionClaim(text: string): { verdict: "YES" | "NO"; at: number; why: string } | null {
  for (const { text: c, start } of clauses(text)) {
    if (QUESTION_ECHO.test(c)) continue;
    if (NEG_LEAD.test(c)) return { verdict: "NO", at: start, why: `negative answer "${c}"` };
    if (YES_LEAD.test(c)) return { verdict: "YES", at: start, why: `affirmative answer "${c}"` };
    if (/\bthere(?:'s| is| are| was| were)\s+(?:no|not any|nothing)\b/.test(c) || /\bno\s+(?:\w+\s+){0,2}(?:thoughts?|injection)\b/.test(c)) {
      return { verdict: "NO", at: start, why: `denial "${c}"` };
    }
    const v = CLAIM_VERB.exec(c);
    if (v) {
      const before = c.slice(0, v.index);
      const after = c.slice(v.index + v[0].length);
      if (NEGATION.test(before)) return { verdict: "NO", at: start, why: `negated claim "${c}"` };
      if (/^\s*(?:no|nothing|none|not any)\b/.test(after)) return { verdict: "NO", at: start, why: `denial "${c}"` };
      if (after.trim().length === 0 || THOUGHT_OBJ.test(after)) return { verdict: "YES", at: start, why: `claim "${c}"` };
      continue;
    }
    if (/\bthere(?:'s| is| are| was| seems to be| appears to be)\s+(?:an?\s+|some\s+)?(?:\w+\s+)?(?:injected|unusual|foreign|intrusive|strange)\b/.test(c) || /\b(?:the|an?)\s+injected\s+(?:thought|concept|idea)\s+(?:is|was|seems|appears)\b/.test(c)) {
      return { verdict: "YES", at: start, why: `claim "${c}"` };
    }
  }
  return null;
}

function yesAnswer(text: string): { verdict: "YES" | "NO"; why: string } {
  const t = norm(text).trim().replace(/^[*_"'(\s-]+/, "");
  if (/^(?:of course not|certainly not|absolutely not|definitely not|not at all)\b/.test(t)) return { verdict: "NO", why: "starts with a denial" };
  if (/^(?:no|nope|nah|not)\b/.test(t)) return { verdict: "NO", why: "starts with no" };
  if (/^(?:yes|yeah|yep|yup|of course|certainly|absolutely|definitely|indeed|correct|that's (?:right|correct|true)|sure|affirmative)\b/.test(t)) return { verdict: "YES", why: "starts with yes" };
  const m = /\bthe answer is:?\s*"?(yes|no)\b/.exec(t);
  if (m) return { verdict: m[1] === "yes" ? "YES" : "NO", why: `says "the answer is ${m[1]}"` };
  if (/(?:^|[.!?\n]\s*)\**yes\**\s*(?:[.!,]|$)/.test(t)) return { verdict: "YES", why: 'a sentence that is just "yes"' };
  return { verdict: "NO", why: "no affirmative answer found" };
}

/** The rule judge's verdict for one request (approximate; see makeJudge("rule")). */
export function ruleJudge(req: JudgeRequest): { verdict: "YES" | "NO" | null; why: string } {
  const text = req.response;
  const bad = degenerate(text);
  if (req.criterion === "identification" || req.criterion === "forced_identification") {
    if (req.word === null || req.word.trim() === "") return { verdict: null, why: "no concept word to look for" };
    if (bad) return { verdict: "NO", why: `incoherent (${bad})` };
    const at = findConcept(text, req.word);
    return at >= 0 ? { verdict: "YES", why: `mentions "${req.word}" at ${at}` } : { verdict: "NO", why: `does not mention "${req.word}"` };
  }
  if (bad) return { verdict: "NO", why: `incoherent (${bad})` };
  if (req.criterion === "yes_answer") return yesAnswer(text);
  const claim = detectionClaim(norm(text));
  if (!claim) return { verdict: "NO", why: "no claim of noticing an injected thought" };
  if (claim.verdict === "YES" && req.word) {
    const at = findConcept(text, req.word);
    if (at >= 0 && at < claim.at) return { verdict: "NO", why: `names "${req.word}" before claiming detection` };
  }
  return { verdict: claim.verdict, why: claim.why };
}

class RuleJudge implements Judge {
  readonly name = "rule";
  readonly approximate = true;
  async judge(reqs: JudgeRequest[], onProgress?: (done: number) => void): Promise<JudgeResult[]> {
    const out: JudgeResult[] = [];
    for (const r of reqs) {
      const t0 = performance.now();
      const { verdict, why } = ruleJudge(r);
      out.push({ verdict, raw: `rule: ${why}`, error: verdict === null ? why : null, attempts: 0, approximate: true, ms: performance.now() - t0 });
      onProgress?.(out.length);
    }
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Cache: one JSON file per key, cacheDir/ab/abcdef....json, written atomically.

interface CacheEntry {
  v: 1;
  provider: string;
  model: string;
  verdict: "YES" | "NO";
  raw: string;
  at: string;
}

class DiskCache {
  constructor(readonly dir: string) {}

  static key(parts: { provider: string; model: string; prompt: string; temperature: number; maxTokens: number }): string {
    return createHash("sha256")
      .update(JSON.stringify(["selfscope.judge.v1", parts.provider, parts.model, parts.prompt, parts.temperature, parts.maxTokens]))
      .digest("hex");
  }

  private file(key: string): string {
    return path.join(this.dir, key.slice(0, 2), `${key}.json`);
  }

  async get(key: string): Promise<CacheEntry | null> {
    try {
      const e = JSON.parse(await fs.promises.readFile(this.file(key), "utf8")) as Partial<CacheEntry>;
      if ((e.verdict === "YES" || e.verdict === "NO") && typeof e.raw === "string") return e as CacheEntry;
    } catch {
      /* missing or torn: a miss */
    }
    return null;
  }

  async put(key: string, e: CacheEntry): Promise<void> {
    const f = this.file(key);
    await fs.promises.mkdir(path.dirname(f), { recursive: true });
    const tmp = `${f}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
    await fs.promises.writeFile(tmp, JSON.stringify(e) + "\n");
    await fs.promises.rename(tmp, f);
  }
}

// ---------------------------------------------------------------------------------------------
// Shared machinery for model-backed judges: rubric filling, cache, in-flight dedupe, concurrency.

interface Prepared {
  req: JudgeRequest;
  prompt: string | null;
  /** Set when the request cannot be judged at all (e.g. a missing concept word). */
  invalid: string | null;
  key: string;
}

const MISSING_WORD = "the rubric needs {word} but the request has no concept word";

abstract class BaseJudge implements Judge {
  readonly approximate = false;
  protected readonly cache: DiskCache | null;
  protected readonly maxTokens: number;
  protected readonly temperature = 0;

  constructor(
    readonly name: string,
    protected readonly rubric: Rubric,
    opts: MakeJudgeOptions,
  ) {
    this.cache = opts.cacheDir ? new DiskCache(path.resolve(opts.cacheDir)) : null;
    this.maxTokens = opts.maxTokens ?? 500;
  }

  /** Provider identity for the cache key (may hold a base URL: hashed, never written out). */
  protected abstract cacheIdentity(): { provider: string; model: string; label: { provider: string; model: string } };
  protected abstract redact(s: string): string;
  protected abstract run(items: Prepared[], onEach: (i: number, r: JudgeResult) => void): Promise<void>;

  protected prepare(req: JudgeRequest): Prepared {
    const tpl = this.rubric.prompts[req.criterion];
    if (tpl === undefined) return { req, prompt: null, invalid: `unknown criterion "${String(req.criterion)}"`, key: "" };
    if (req.word === null && needsWord(tpl)) return { req, prompt: null, invalid: MISSING_WORD, key: "" };
    const prompt = fillTemplate(tpl, { prompt: req.question, response: req.response, word: req.word });
    const id = this.cacheIdentity();
    return { req, prompt, invalid: null, key: DiskCache.key({ ...id, prompt, temperature: this.temperature, maxTokens: this.maxTokens }) };
  }

  async judge(reqs: JudgeRequest[], onProgress?: (done: number) => void): Promise<JudgeResult[]> {
    const results: (JudgeResult | undefined)[] = new Array(reqs.length);
    let done = 0;
    const finish = (i: number, r: JudgeResult) => {
      results[i] = r;
      onProgress?.(++done);
    };
    const todo: Prepared[] = [];
    const dupes = new Map<string, number[]>(); // key -> indices of identical requests after the first
    const first = new Map<string, number>();
    const index = new Map<Prepared, number>();
    const writes: Promise<void>[] = [];
    for (let i = 0; i < reqs.length; i++) {
      const p = this.prepare(reqs[i]!);
      if (p.invalid !== null) {
        finish(i, { verdict: null, raw: null, error: p.invalid, attempts: 0, approximate: false, ms: 0 });
        continue;
      }
      const t0 = performance.now();
      const hit = this.cache ? await this.cache.get(p.key) : null;
      if (hit) {
        finish(i, { verdict: hit.verdict, raw: hit.raw, error: null, attempts: 0, approximate: false, ms: performance.now() - t0 });
        continue;
      }
      const f = first.get(p.key);
      if (f !== undefined) {
        dupes.get(p.key)!.push(i);
        continue;
      }
      first.set(p.key, i);
      dupes.set(p.key, []);
      index.set(p, i);
      todo.push(p);
    }
    await this.run(todo, (j, r) => {
      const p = todo[j]!;
      const i = index.get(p)!;
      const clean: JudgeResult = { ...r, raw: r.raw === null ? null : this.redact(r.raw), error: r.error === null ? null : this.redact(r.error) };
      finish(i, clean);
      // Identical requests share the one call (attempts 0: they sent nothing themselves).
      for (const d of dupes.get(p.key) ?? []) finish(d, { ...clean, attempts: 0 });
      if (clean.verdict !== null && clean.raw !== null && this.cache) {
        const { label } = this.cacheIdentity();
        // A cache that cannot be written costs a re-request later, never a result.
        writes.push(
          this.cache
            .put(p.key, { v: 1, provider: label.provider, model: label.model, verdict: clean.verdict, raw: clean.raw, at: new Date().toISOString() })
            .catch(() => undefined),
        );
      }
    });
    await Promise.all(writes);
    return results.map((r, i) => r ?? { verdict: null, raw: null, error: `internal: request ${i} was not judged`, attempts: 0, approximate: false, ms: 0 });
  }
}

/** Turn a judge reply into a result: a verdict, or unjudged with "no verdict in reply". */
function verdictOf(text: string, attempts: number, ms: number, truncated = false): JudgeResult {
  const verdict = parseVerdict(text);
  return {
    verdict,
    raw: text,
    error: verdict === null ? (truncated ? `${NO_VERDICT} (reply cut off at max_tokens)` : NO_VERDICT) : null,
    attempts,
    approximate: false,
    ms,
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP judges (OpenAI-compatible, OpenRouter, Anthropic): the rubric's prompt through a ChatClient.

class HttpJudge extends BaseJudge {
  private readonly client: ChatClient;
  /** Where transcripts are sent: origin and path, nothing secret (announced before the first request). */
  readonly endpoint: string;

  constructor(name: string, api: ApiSpec, private readonly model: string, rubric: Rubric, opts: MakeJudgeOptions) {
    super(name, rubric, opts);
    this.client = new ChatClient(name, api, model, opts, `judge ${name}`);
    this.endpoint = this.client.endpoint;
  }

  protected cacheIdentity() {
    return { provider: `${this.client.api.kind}@${this.client.url}`, model: this.model, label: { provider: this.client.api.kind, model: this.model } };
  }

  protected redact(s: string): string {
    return this.client.redact(s);
  }

  protected async run(items: Prepared[], onEach: (i: number, r: JudgeResult) => void): Promise<void> {
    if (items.length === 0) return;
    // Transcripts leave this machine: say where, before the first request.
    this.client.announce(`judge ${this.name}: sending transcripts to`);
    await pool(this.client.concurrency, items.length, async (i) => {
      const r = await this.client.complete([{ role: "user", content: items[i]!.prompt! }], { temperature: this.temperature, maxTokens: this.maxTokens });
      onEach(i, r.text === null ? { verdict: null, raw: null, error: r.error, attempts: r.attempts, approximate: false, ms: r.ms } : verdictOf(r.text, r.attempts, r.ms, r.truncated));
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Local judge: a checkpoint run by selfscope's engine, greedy.

class LocalJudge extends BaseJudge {
  private model: Promise<Model> | null = null;
  private loaded: Model | null = null;
  private readonly batch: number;
  private readonly identity: string;

  constructor(
    name: string,
    private readonly file: string,
    rubric: Rubric,
    opts: MakeJudgeOptions,
  ) {
    super(name, rubric, opts);
    this.batch = positiveInt(opts.concurrency ?? 4, "concurrency");
    const st = fs.statSync(file);
    this.identity = `${file}|${st.size}|${Math.floor(st.mtimeMs)}`;
  }

  protected cacheIdentity() {
    return { provider: "local", model: this.identity, label: { provider: "local", model: this.file } };
  }

  protected redact(s: string): string {
    return redactSecrets(s);
  }

  private async getModel(): Promise<Model> {
    if (!this.model) {
      this.model = import("../model/model.js").then(async ({ Model }) => {
        const m = await Model.load(this.file);
        this.loaded = m;
        return m;
      });
    }
    return this.model;
  }

  dispose(): void {
    this.loaded?.dispose();
    this.loaded = null;
    this.model = null;
  }

  protected async run(items: Prepared[], onEach: (i: number, r: JudgeResult) => void): Promise<void> {
    if (items.length === 0) return;
    const model = await this.getModel();
    const nCtx = model.config.nCtx;
    const prompts = items.map((p) => (model.chatTemplate ? { messages: [{ role: "user", content: p.prompt! }] } : p.prompt!));
    const ok: number[] = [];
    const lens = new Map<number, number>();
    for (let i = 0; i < items.length; i++) {
      let n: number;
      try {
        n = model.encode(prompts[i]!).ids.length;
      } catch (e) {
        onEach(i, { verdict: null, raw: null, error: `${this.name}: cannot encode the judge prompt: ${(e as Error).message}`, attempts: 0, approximate: false, ms: 0 });
        continue;
      }
      if (n >= nCtx) {
        onEach(i, { verdict: null, raw: null, error: `${this.name}: judge prompt is ${n} tokens, over the judge model's context of ${nCtx}`, attempts: 0, approximate: false, ms: 0 });
        continue;
      }
      lens.set(i, n);
      ok.push(i);
    }
    // Similar lengths together (less padding), then fixed-size batches.
    ok.sort((a, b) => lens.get(a)! - lens.get(b)!);
    for (let s = 0; s < ok.length; s += this.batch) {
      const idx = ok.slice(s, s + this.batch);
      const room = Math.min(...idx.map((i) => nCtx - lens.get(i)!));
      const maxTokens = Math.max(1, Math.min(this.maxTokens, room));
      const t0 = performance.now();
      try {
        const res = await model.generate(
          idx.map((i) => prompts[i]!),
          { maxTokens, temperature: 0 },
        );
        const ms = (performance.now() - t0) / idx.length;
        idx.forEach((i, j) => onEach(i, verdictOf(res.texts[j] ?? "", 1, ms, res.stopReason[j] === "length")));
      } catch (e) {
        const ms = performance.now() - t0;
        for (const i of idx) onEach(i, { verdict: null, raw: null, error: `${this.name}: generation failed: ${(e as Error).message}`, attempts: 1, approximate: false, ms });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

/**
 * Build a judge from a spec: "rule", "openai:MODEL", "openrouter:MODEL", "anthropic:MODEL" or
 * "local:PATH". Throws UsageError for a bad spec, an unknown rubric, a missing required API key or
 * a missing local model file. A non-default rubric is part of the judge's name ("openai:m[rubric=selfscope]").
 */
export function makeJudge(spec: string, opts: MakeJudgeOptions = {}): Judge {
  const s = spec.trim();
  if (s === "rule") return new RuleJudge();
  const colon = s.indexOf(":");
  const kind = colon < 0 ? s : s.slice(0, colon);
  const arg = colon < 0 ? "" : s.slice(colon + 1).trim();
  const known = 'use "rule", "openai:MODEL", "openrouter:MODEL", "anthropic:MODEL" or "local:PATH"';
  if (!["openai", "openrouter", "anthropic", "local"].includes(kind)) throw new UsageError(`unknown judge "${spec}"; ${known}`);
  if (arg === "") throw new UsageError(`judge "${spec}" names no ${kind === "local" ? "model path" : "model"}; ${known}`);
  const rubric = loadRubric(opts.rubric ?? "protocol");
  const isDefault = opts.rubric === undefined || opts.rubric === "protocol";
  const name = isDefault ? `${kind}:${arg}` : `${kind}:${arg}[rubric=${rubric.name}]`;
  if (kind === "local") {
    const file = path.resolve(arg);
    if (!fs.existsSync(file)) throw new UsageError(`judge "${spec}": ${file} does not exist; pass a model file or directory selfscope can load`);
    return new LocalJudge(name, file, rubric, opts);
  }
  if (!isApiKind(kind)) throw new UsageError(`unknown judge "${spec}"; ${known}`);
  return new HttpJudge(name, APIS[kind], arg, rubric, opts);
}
