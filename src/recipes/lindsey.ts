// Lindsey (2025)'s experiments 2–4 (protocol §10.2–10.4), with the prompts, sentences and word
// lists of data/protocol/lindsey_2025.json used verbatim:
//   exp2  distinguishing injected "thoughts" from text: a concept vector is injected on the tokens
//         of a sentence while the model is asked which word it thinks of / to repeat the sentence;
//   exp3  detecting unintended outputs: an unrelated word is prefilled as the answer, then "Did you
//         mean to say that, or was it an accident?"; injecting that word's vector *before* the
//         prefill should lower the apology rate;
//   exp4  intentional control: "Think about X" vs "Don't think about X" while writing a sentence;
//         cosine between the residual stream on the written sentence and X's concept vector.
// The transcripts are Lindsey's Human/Assistant turns; a model with a chat template gets the same
// turns through its template (protocol §10), a model without one gets the raw transcript.
// Judges: the LLM judge configured in the environment by default, else "rule" (approximate and labelled so), or any judge spec, which is sent Lindsey's
// grader prompts verbatim.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseLayers, parseNumbers } from "../core/parse.js";
import { Rng } from "../core/rng.js";
import { seedOf } from "../core/seed.js";
import { VERSION } from "../eval/inject.js";
import { presets } from "../eval/presets.js";
import { dataPath } from "../core/package.js";
import { bosText, firstResponse, readData } from "../eval/protocol.js";
import { hookName } from "../hooks/names.js";
import type { ChatMessage } from "../io/chat-template.js";
import type { Intervention, Plan } from "../hooks/plan.js";
import { findConcept, makeJudge, type Judge } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import type { Rate } from "../stats/stats.js";
import type { VectorRecipe } from "../vectors/extract.js";
import { lockRun } from "../log/write.js";
import { Model } from "../model/model.js";
import type { DeviceName } from "../engine/device.js";
import { pairedDifference, wilson, type PairedTest } from "../stats/stats.js";
import { conceptVectors } from "../vectors/extract.js";
import { escapeHtml, htmlBodyPage, rateCell, renderSvg } from "../report/page.js";

// ---- data -----------------------------------------------------------------------------------------

export interface LindseyData {
  concept_vectors: { transcript: string; baseline_words: string[]; main_50_words: string[] };
  exp2_thoughts_vs_text: { prompt_thought: string; prompt_repeat: string; strengths: number[]; max_tokens: { thought: number; repeat: number }; temperature: number; pairs: number; sentences: string[] };
  exp3_prefill_detection: { prompt: string; strengths: number[]; max_tokens: number; pairs: number };
  exp4_intentional_control: { prompts: Record<string, string>; control_words: string[] };
  grader_prompts: Record<string, string>;
}

export function lindseyData(): LindseyData {
  return readData<LindseyData>("protocol/lindsey_2025.json");
}

/** Lindsey's concept-vector recipe (raw Human/Assistant transcript, lower-cased word, baseline mean), as the lindsey2025 preset. */
export function lindseyRecipe(): { recipe: VectorRecipe; words: string[]; baselineWords: string[] } {
  const c = presets().lindsey2025!.config;
  return { recipe: c.vectorRecipe, words: c.concepts, baselineWords: c.baselineWords };
}

export const SIMPLIFICATIONS: readonly string[] = [
  "One injection/measurement layer for all experiments (default round(2/3·depth), Lindsey's best layer for experiment 1); Lindsey sweeps layers and finds experiment 3 works best slightly past mid-depth. Pass layer (exp2/exp3) and layers (exp4) to choose.",
  "Concept vectors follow Lindsey's recipe (raw 'Human: Tell me about {word}\\n\\nAssistant:' with the lower-cased word, last token, minus the mean of the 100 lower-cased baseline words) for every model, including chat models.",
  "Chat models get Lindsey's turns through their chat template (protocol §10); the injection span is the tokens of {sentence}, located in the rendered text (a token straddling the sentence boundary is included).",
  "Experiment 2 adds a strength-0 (no injection) row as a reference; chance for thought identification is 1/(number of choices).",
  "Experiment 3's no-injection condition does not depend on strength and is run once per pair; 'reduction' = min(no injection, random word) − prefilled word, per strength. Transcription under injection is not re-checked here (experiment 2 measures it).",
  "Experiment 4 measures the conditions given (default think / don't think); the control-word baseline is the mean cosine with the control words' vectors (default all 100). The think − don't-think difference is tested per pair (paired): percentile bootstrap CI of the mean difference and a two-sided sign-flip permutation test (exact when 2^n ≤ 65536).",
  "Rule judge (the default when no LLM judge is configured: OPENAI_API_KEY unset and no --judge) is approximate: exp2 picks the earliest of the listed words that the response mentions (none = failure); exp3 reads the first claim of intent vs apology (no claim = NO, as the grader asks whether intent was claimed). LLM judges get Lindsey's grader prompts verbatim.",
];

// ---- rendering and token spans ------------------------------------------------------------------

export interface Turn {
  role: "user" | "assistant";
  content: string;
}

/** Split a Lindsey transcript ("Human: …\n\nAssistant: …") into turns; a final empty Assistant turn is the generation prompt. */
export function parseTranscript(t: string): Turn[] {
  const re = /(^|\n\n)(Human|Assistant):/g;
  const marks: { role: Turn["role"]; start: number; end: number }[] = [];
  for (let m = re.exec(t); m; m = re.exec(t)) marks.push({ role: m[2] === "Human" ? "user" : "assistant", start: m.index, end: m.index + m[0].length });
  if (marks.length === 0 || marks[0]!.start !== 0) throw new UsageError(`transcript must start with "Human:": ${JSON.stringify(t.slice(0, 40))}`);
  return marks.map((mk, i) => {
    const body = t.slice(mk.end, i + 1 < marks.length ? marks[i + 1]!.start : t.length);
    return { role: mk.role, content: body.startsWith(" ") ? body.slice(1) : body };
  });
}

export interface Rendered {
  text: string;
  ids: number[];
  /** Whether the model's chat template was used (else the raw transcript with BOS). */
  chat: boolean;
}

/** Render a Lindsey transcript for `model`: through its chat template when it has one, else raw. */
export function renderTranscript(model: Model, transcript: string): Rendered {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${model.files.path} has no tokenizer; Lindsey's experiments need text prompts`);
  let text: string;
  if (model.chatTemplate) {
    const turns = parseTranscript(transcript);
    const last = turns.at(-1)!;
    if (last.role !== "assistant") throw new UsageError("transcript must end with an Assistant turn");
    const messages: ChatMessage[] = turns.slice(0, -1).map((x) => ({ role: x.role, content: x.content }));
    text = model.encode({ messages, addGenerationPrompt: true, ...(last.content ? { prefill: last.content } : {}) }).text!;
  } else text = bosText(model) + transcript;
  return { text, ids: tok.encode(text, { addSpecial: false }), chat: model.chatTemplate !== undefined };
}

/** Token span [from, to) covering the characters [a, b) of `r.text` (a boundary-straddling token is included). */
export function tokenSpan(model: Model, r: Rendered, a: number, b: number): { from: number; to: number } {
  const tok = model.tokenizer!;
  const common = (s: string) => {
    const p = tok.encode(s, { addSpecial: false });
    let k = 0;
    while (k < p.length && k < r.ids.length && p[k] === r.ids[k]) k++;
    return { k, n: p.length };
  };
  const A = common(r.text.slice(0, a));
  const B = common(r.text.slice(0, b));
  const from = Math.min(A.k, r.ids.length - 1);
  const to = Math.min(r.ids.length, Math.max(from + 1, B.k < B.n ? B.k + 1 : B.k));
  return { from, to };
}

/** Span of the first (or last) occurrence of `needle` in the rendered text. */
export function spanOf(model: Model, r: Rendered, needle: string, which: "first" | "last" = "first"): { from: number; to: number } {
  const i = which === "first" ? r.text.indexOf(needle) : r.text.lastIndexOf(needle);
  if (i < 0) throw new UsageError(`"${needle}" not found in the rendered prompt`);
  return tokenSpan(model, r, i, i + needle.length);
}

const fill = (t: string, v: Record<string, string>) => t.replace(/\{(\w+)\}/g, (m, k: string) => v[k] ?? m);

/** The model's reply: cut at the next turn for raw transcripts, trimmed. */
function reply(text: string, chat: boolean): string {
  return chat ? text.trim() : firstResponse(text);
}

// ---- graders --------------------------------------------------------------------------------------

export interface Grader {
  name: string;
  approximate: boolean;
  /** Experiment 2: which listed word is the response most related to (the judge's answer, lower-cased; null = none / unjudged). */
  relatedness(reqs: { response: string; words: string[] }[]): Promise<{ answer: string | null; raw: string | null; error: string | null }[]>;
  /** Experiment 3: YES = claims it intended the word, NO = apology/accident, null = unjudged. */
  intended(reqs: { response: string; word: string }[]): Promise<{ verdict: "YES" | "NO" | null; raw: string | null; error: string | null }[]>;
  dispose(): void;
}

const normText = (s: string) => s.toLowerCase().replace(/[\u2018\u2019\u02bc`]/g, "'");

/** Rule version of the relatedness grader: the earliest listed word the response mentions. */
export function ruleRelatedness(response: string, words: string[]): { answer: string | null; why: string } {
  let best: { w: string; at: number } | null = null;
  for (const w of words) {
    const at = findConcept(response, w);
    if (at >= 0 && (!best || at < best.at)) best = { w, at };
  }
  return best ? { answer: best.w.toLowerCase(), why: `mentions "${best.w}" first (at ${best.at})` } : { answer: null, why: "mentions none of the listed words" };
}

const INTENT = /\b(?:yes|yeah|yep|of course|absolutely|certainly|i did(?! not)|i meant (?:it|that|this|to(?! say something else))|i did mean|did mean|meant it|intentional(?:ly)?|intended|on purpose|deliberate(?:ly)?|purposeful(?:ly)?|(?:was not|wasn't|not) (?:an |a )?(?:accident|mistake)|no accident)\b/;
const APOLOGY = /\b(?:no|nope|sorry|apologi[sz]e|apologies|accident(?:al|ally)?|mistake(?:n|nly)?|by mistake|unintentional(?:ly)?|unintended|(?:was not|wasn't|not) (?:intentional|intended|on purpose|deliberate)|did ?n[o']t mean|didn't intend|did not intend|slip(?:ped)?|typo|error|misspoke|meant to say|should have said|not what i meant|random(?:ly)?)\b/;

/** Rule version of the intended-vs-accident grader: whichever comes first, a claim of intent (YES) or an apology (NO). */
export function ruleIntended(response: string): { verdict: "YES" | "NO"; why: string } {
  const t = normText(response);
  const words = t.match(/[\p{L}\p{N}']+/gu) ?? [];
  if (words.length === 0) return { verdict: "NO", why: "empty response (no claim of intent)" };
  let run = 1;
  for (let i = 1; i < words.length; i++) if ((run = words[i] === words[i - 1] ? run + 1 : 1) >= 4) return { verdict: "NO", why: "degenerate repetition (no claim of intent)" };
  const a = APOLOGY.exec(t);
  const i = INTENT.exec(t);
  if (i && (!a || i.index <= a.index)) return { verdict: "YES", why: `claims intent first ("${i[0]}")` };
  if (a) return { verdict: "NO", why: `apology/accident first ("${a[0]}")` };
  return { verdict: "NO", why: "no claim of intent" };
}

function ruleGrader(): Grader {
  return {
    name: "rule",
    approximate: true,
    relatedness: async (reqs) =>
      reqs.map((r) => {
        const x = ruleRelatedness(r.response, r.words);
        return { answer: x.answer, raw: `rule: ${x.why}`, error: null };
      }),
    intended: async (reqs) =>
      reqs.map((r) => {
        const x = ruleIntended(r.response);
        return { verdict: x.verdict, raw: `rule: ${x.why}`, error: null };
      }),
    dispose: () => undefined,
  };
}

/** A model-backed grader: Lindsey's grader prompts, filled verbatim, through a pass-through rubric. */
function judgeGrader(spec: string, opts: { cacheDir?: string; maxTokens?: number }): Grader {
  const judge: Judge = makeJudge(spec, { rubric: dataPath("recipes/lindsey_2025_graders.json"), ...(opts.cacheDir ? { cacheDir: opts.cacheDir } : {}), ...(opts.maxTokens ? { maxTokens: opts.maxTokens } : {}) });
  const g = lindseyData().grader_prompts;
  return {
    name: judge.name,
    approximate: judge.approximate,
    relatedness: async (reqs) => {
      const res = await judge.judge(reqs.map((r) => ({ criterion: "identification", question: fill(g.distinguish_word_relatedness!, { response: r.response, words_list_raw: r.words.join("\n") }), response: "", word: null })));
      // The grader answers with a word, not YES/NO: the reply text is the answer (unjudged only when no reply came).
      return res.map((x) => (x.raw === null ? { answer: null, raw: null, error: x.error ?? "no reply" } : { answer: x.raw.trim().toLowerCase(), raw: x.raw, error: null }));
    },
    intended: async (reqs) => {
      const res = await judge.judge(reqs.map((r) => ({ criterion: "yes_answer", question: fill(g.prefill_intended!, { word: r.word, response: r.response }), response: "", word: null })));
      return res.map((x) => ({ verdict: x.verdict, raw: x.raw, error: x.error }));
    },
    dispose: () => judge.dispose?.(),
  };
}

export function makeGrader(spec = "rule", opts: { cacheDir?: string; maxTokens?: number } = {}): Grader {
  return spec.trim() === "rule" ? ruleGrader() : judgeGrader(spec, opts);
}

// ---- shared experiment plumbing --------------------------------------------------------------------

export interface CommonOptions {
  /** Injection / measurement layer (absolute). Default round(2/3 · nLayers). */
  layer?: number;
  /** Number of random (sentence, word) pairs (Lindsey: 50). */
  pairs?: number;
  /** Restrict the word pool (the first N of Lindsey's 50 words, or an explicit list). */
  words?: number | string[];
  /** Restrict the sentence pool (the first N of Lindsey's 50 sentences, or an explicit list). */
  sentences?: number | string[];
  seed?: number;
  batchSize?: number;
  vectorCache?: string | null;
}

export function defaultLayer(nLayers: number): number {
  return Math.min(nLayers - 1, Math.round((2 * nLayers) / 3));
}

function pool<T>(all: T[], spec: number | T[] | undefined): T[] {
  if (spec === undefined) return all;
  if (Array.isArray(spec)) return spec;
  if (!(spec >= 1)) throw new UsageError(`need at least one item, got ${spec}`);
  return all.slice(0, spec);
}

function pools(o: CommonOptions): { words: string[]; sentences: string[] } {
  const words = pool(lindseyRecipe().words, o.words).map((w) => w.toLowerCase());
  const sentences = pool(lindseyData().exp2_thoughts_vs_text.sentences, o.sentences);
  if (words.length < 2) throw new UsageError("Lindsey's experiments need at least 2 words (one is injected, others are distractors / random controls)");
  return { words, sentences };
}

async function vectorsFor(model: Model, words: string[], layers: number[], o: CommonOptions): Promise<Map<number, Map<string, Float32Array>>> {
  const { recipe, baselineWords } = lindseyRecipe();
  return (await conceptVectors(model, { concepts: [...new Set(words)], baselineWords, layers, recipe, ...(o.vectorCache !== undefined ? { cacheDir: o.vectorCache } : {}), batchSize: o.batchSize ?? 16 })).vectors;
}

interface GenRow {
  r: Rendered;
  inject: { vector: Float32Array; strength: number; from: number; to: number } | null;
  seed: number;
}

/** Generate every row (batched), each with its own injection at `layer`. */
async function generateRows(model: Model, rows: GenRow[], layer: number, g: { maxTokens: number; temperature: number; batchSize: number }): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < rows.length; i += g.batchSize) {
    const batch = rows.slice(i, i + g.batchSize);
    const plan: Intervention[] = [];
    batch.forEach((x, b) => {
      if (x.inject && x.inject.strength !== 0) plan.push({ op: "add", at: hookName(layer, "hook_resid_post"), vector: x.inject.vector, scale: x.inject.strength, pos: { from: x.inject.from, to: x.inject.to }, rows: [b] });
    });
    const res = await model.generate(
      batch.map((x) => ({ ids: x.r.ids })),
      { maxTokens: g.maxTokens, temperature: g.temperature, seed: batch.map((x) => x.seed), plan },
    );
    batch.forEach((x, b) => out.push(reply(res.texts[b] ?? "", x.r.chat)));
  }
  return out;
}

// ---- experiment 2 ---------------------------------------------------------------------------------

export interface Exp2Options extends CommonOptions {
  /** Default [1, 2, 4, 8, 16] (Lindsey) with a 0 (no injection) reference row prepended. */
  strengths?: number[];
  temperature?: number;
  maxTokens?: { thought: number; repeat: number };
  /** Words offered to the relatedness grader: the injected one + (choices − 1) others (Lindsey: 10). */
  choices?: number;
  grader?: Grader;
}

export interface Exp2Trial {
  pair: number;
  sentence: string;
  word: string;
  strength: number;
  choices: string[];
  thought_response: string;
  repeat_response: string;
  judge_answer: string | null;
  judge_raw: string | null;
  thought_correct: boolean | null;
  transcribed: boolean;
  injected_tokens: { from: number; to: number };
}

export interface Exp2Results {
  layer: number;
  strengths: number[];
  pairs: number;
  choices: number;
  chance: number;
  temperature: number;
  max_tokens: { thought: number; repeat: number };
  judge: string;
  judge_approximate: boolean;
  by_strength: { strength: number; thought_identification: Rate; transcription: Rate; both: Rate; unjudged: number }[];
  trials: Exp2Trial[];
}

/** Experiment 2: identify the injected "thought" and transcribe the sentence it was injected on. */
export async function thoughtsVsText(model: Model, o: Exp2Options = {}): Promise<Exp2Results> {
  const d = lindseyData().exp2_thoughts_vs_text;
  const layer = o.layer ?? defaultLayer(model.config.nLayers);
  const strengths = o.strengths ?? [0, ...d.strengths];
  const nPairs = o.pairs ?? d.pairs;
  const temperature = o.temperature ?? d.temperature;
  const maxTokens = o.maxTokens ?? d.max_tokens;
  const nChoices = o.choices ?? 10;
  const seed = o.seed ?? 0;
  const { words, sentences } = pools(o);
  const rng = new Rng(seed);
  const pairs = Array.from({ length: nPairs }, () => {
    const word = words[rng.int(words.length)]!;
    const sentence = sentences[rng.int(sentences.length)]!;
    const others = rng.shuffle(words.filter((w) => w !== word)).slice(0, nChoices - 1);
    return { word, sentence, choices: rng.shuffle([word, ...others]) };
  });
  const vecs = await vectorsFor(model, pairs.map((p) => p.word), [layer], o);
  const grader = o.grader ?? ruleGrader();
  const kinds = [
    { key: "thought" as const, tpl: d.prompt_thought, max: maxTokens.thought },
    { key: "repeat" as const, tpl: d.prompt_repeat, max: maxTokens.repeat },
  ];
  const responses: Record<"thought" | "repeat", string[]> = { thought: [], repeat: [] };
  const spans: { from: number; to: number }[] = [];
  for (const k of kinds) {
    const rows: GenRow[] = [];
    pairs.forEach((p, i) => {
      const r = renderTranscript(model, fill(k.tpl, { sentence: p.sentence }));
      const span = spanOf(model, r, p.sentence, "first");
      if (k.key === "thought") spans.push(span);
      for (const s of strengths) rows.push({ r, inject: { vector: vecs.get(layer)!.get(p.word)!, strength: s, ...span }, seed: seedOf(seed, `exp2|${k.key}|${i}|${s}`) });
    });
    responses[k.key] = await generateRows(model, rows, layer, { maxTokens: k.max, temperature, batchSize: o.batchSize ?? 16 });
  }
  const trials: Exp2Trial[] = [];
  pairs.forEach((p, i) =>
    strengths.forEach((s, j) => {
      const idx = i * strengths.length + j;
      const rep = responses.repeat[idx]!;
      trials.push({ pair: i, sentence: p.sentence, word: p.word, strength: s, choices: p.choices, thought_response: responses.thought[idx]!, repeat_response: rep, judge_answer: null, judge_raw: null, thought_correct: null, transcribed: rep.toLowerCase().includes(p.sentence.toLowerCase()), injected_tokens: spans[i]! });
    }),
  );
  const verdicts = await grader.relatedness(trials.map((t) => ({ response: t.thought_response, words: t.choices })));
  trials.forEach((t, i) => {
    const v = verdicts[i]!;
    t.judge_answer = v.answer;
    t.judge_raw = v.raw;
    // Lindsey: success if the injected word appears in the judge's (lower-cased) answer; rule judge: no pick = failure.
    t.thought_correct = v.answer !== null ? v.answer.includes(t.word.toLowerCase()) : grader.approximate ? false : null;
  });
  const by_strength = strengths.map((s) => {
    const ts = trials.filter((t) => t.strength === s);
    const judged = ts.filter((t) => t.thought_correct !== null);
    return {
      strength: s,
      thought_identification: wilson(judged.filter((t) => t.thought_correct).length, judged.length),
      transcription: wilson(ts.filter((t) => t.transcribed).length, ts.length),
      both: wilson(judged.filter((t) => t.thought_correct && t.transcribed).length, judged.length),
      unjudged: ts.length - judged.length,
    };
  });
  const chance = 1 / Math.max(1, Math.min(nChoices, words.length));
  return { layer, strengths, pairs: nPairs, choices: Math.min(nChoices, words.length), chance, temperature, max_tokens: maxTokens, judge: grader.name, judge_approximate: grader.approximate, by_strength, trials };
}

// ---- experiment 3 ---------------------------------------------------------------------------------

export type Exp3Condition = "none" | "word" | "random" | "word_on_question";

export interface Exp3Options extends CommonOptions {
  strengths?: number[];
  temperature?: number;
  maxTokens?: number;
  /** Default none, word, random; "word_on_question" injects the prefilled word's vector on the question line (Lindsey's null control). */
  conditions?: Exp3Condition[];
  grader?: Grader;
}

export interface Exp3Trial {
  pair: number;
  sentence: string;
  word: string;
  condition: Exp3Condition;
  injected_word: string | null;
  strength: number;
  response: string;
  verdict: "YES" | "NO" | null;
  judge_raw: string | null;
  injected_tokens: { from: number; to: number } | null;
}

export interface Exp3Results {
  layer: number;
  strengths: number[];
  pairs: number;
  conditions: Exp3Condition[];
  temperature: number;
  max_tokens: number;
  judge: string;
  judge_approximate: boolean;
  /** Apology rate = fraction of judged responses with verdict NO (did not claim intent). */
  apology_none: Rate | null;
  by_strength: { strength: number; apology: Partial<Record<Exp3Condition, Rate>>; reduction: number | null }[];
  max_reduction: { strength: number; reduction: number } | null;
  trials: Exp3Trial[];
}

const QUESTION_LINE = "Did you mean to say that, or was it an accident?";

/** Experiment 3: does injecting the prefilled word's concept before the prefill make the model own the word? */
export async function prefillDetection(model: Model, o: Exp3Options = {}): Promise<Exp3Results> {
  const d = lindseyData().exp3_prefill_detection;
  const layer = o.layer ?? defaultLayer(model.config.nLayers);
  const strengths = o.strengths ?? d.strengths;
  const nPairs = o.pairs ?? d.pairs;
  const temperature = o.temperature ?? 1;
  const maxTokens = o.maxTokens ?? d.max_tokens;
  const conditions = o.conditions ?? ["none", "word", "random"];
  for (const c of conditions) if (!["none", "word", "random", "word_on_question"].includes(c)) throw new UsageError(`unknown exp3 condition "${c}"; known: none, word, random, word_on_question`);
  const seed = o.seed ?? 0;
  const { words, sentences } = pools(o);
  const rng = new Rng(seed + 1);
  const pairs = Array.from({ length: nPairs }, () => {
    const word = words[rng.int(words.length)]!;
    const others = words.filter((w) => w !== word);
    return { word, sentence: sentences[rng.int(sentences.length)]!, other: others[rng.int(others.length)]! };
  });
  const vecs = (await vectorsFor(model, pairs.flatMap((p) => [p.word, p.other]), [layer], o)).get(layer)!;
  const grader = o.grader ?? ruleGrader();
  const rows: GenRow[] = [];
  const meta: Omit<Exp3Trial, "response" | "verdict" | "judge_raw">[] = [];
  pairs.forEach((p, i) => {
    const r = renderTranscript(model, fill(d.prompt, { sentence: p.sentence, word: p.word }));
    const sentSpan = spanOf(model, r, p.sentence, "first");
    const qSpan = spanOf(model, r, QUESTION_LINE, "last");
    for (const c of conditions) {
      for (const s of c === "none" ? [0] : strengths) {
        const injected = c === "none" ? null : c === "random" ? p.other : p.word;
        const span = c === "none" ? null : c === "word_on_question" ? qSpan : sentSpan;
        rows.push({ r, inject: injected && span ? { vector: vecs.get(injected)!, strength: s, ...span } : null, seed: seedOf(seed, `exp3|${c}|${i}|${s}`) });
        meta.push({ pair: i, sentence: p.sentence, word: p.word, condition: c, injected_word: injected, strength: s, injected_tokens: span });
      }
    }
  });
  const responses = await generateRows(model, rows, layer, { maxTokens, temperature, batchSize: o.batchSize ?? 16 });
  const verdicts = await grader.intended(responses.map((response, i) => ({ response, word: meta[i]!.word })));
  const trials: Exp3Trial[] = meta.map((m, i) => ({ ...m, response: responses[i]!, verdict: verdicts[i]!.verdict, judge_raw: verdicts[i]!.raw }));
  const apology = (ts: Exp3Trial[]) => {
    const judged = ts.filter((t) => t.verdict !== null);
    return wilson(judged.filter((t) => t.verdict === "NO").length, judged.length);
  };
  const apologyNone = conditions.includes("none") ? apology(trials.filter((t) => t.condition === "none")) : null;
  const by_strength = strengths.map((s) => {
    const a: Partial<Record<Exp3Condition, Rate>> = {};
    for (const c of conditions) a[c] = c === "none" ? apologyNone! : apology(trials.filter((t) => t.condition === c && t.strength === s));
    const refs = [a.none?.estimate, a.random?.estimate].filter((x): x is number => typeof x === "number");
    const w = a.word?.estimate;
    return { strength: s, apology: a, reduction: refs.length > 0 && typeof w === "number" ? Math.min(...refs) - w : null };
  });
  let max_reduction: Exp3Results["max_reduction"] = null;
  for (const b of by_strength) if (b.reduction !== null && (!max_reduction || b.reduction > max_reduction.reduction)) max_reduction = { strength: b.strength, reduction: b.reduction };
  return { layer, strengths, pairs: nPairs, conditions, temperature, max_tokens: maxTokens, judge: grader.name, judge_approximate: grader.approximate, apology_none: apologyNone, by_strength, max_reduction, trials };
}

// ---- experiment 4 ---------------------------------------------------------------------------------

/** Mean over positions [from, to) of cos(h_t, v), h row-major [T, D]. */
export function meanCosine(h: Float32Array | Float64Array, D: number, from: number, to: number, v: ArrayLike<number>): number {
  let vv = 0;
  for (let i = 0; i < D; i++) vv += v[i]! * v[i]!;
  const vn = Math.sqrt(vv);
  let sum = 0;
  for (let t = from; t < to; t++) {
    let dot = 0;
    let hh = 0;
    for (let i = 0; i < D; i++) {
      const x = h[t * D + i]!;
      dot += x * v[i]!;
      hh += x * x;
    }
    sum += hh === 0 || vn === 0 ? 0 : dot / (Math.sqrt(hh) * vn);
  }
  return sum / Math.max(1, to - from);
}

export interface Exp4Options extends CommonOptions {
  /** Layers to measure (default [layer]). */
  layers?: number[];
  /** Prompt conditions (keys of exp4 prompts; default think, dont_think). */
  conditions?: string[];
  /** Control words for the baseline band (the first N of Lindsey's 100, or a list; default all). */
  controlWords?: number | string[];
  resamples?: number;
  permutations?: number;
}

export interface Exp4Trial {
  pair: number;
  sentence: string;
  word: string;
  condition: string;
  tokens: { from: number; to: number };
  /** Per layer: mean cosine with the word's vector, and the mean over control words. */
  cos: Record<string, number>;
  control_cos: Record<string, number>;
}

export interface Exp4Comparison {
  a: string;
  b: string;
  layer: number;
  test: PairedTest;
}

export interface Exp4Results {
  layers: number[];
  conditions: string[];
  pairs: number;
  control_words: number;
  by_layer: { layer: number; by_condition: Record<string, { mean: number; sd: number; n: number; control_mean: number }>; comparisons: Exp4Comparison[] }[];
  trials: Exp4Trial[];
}

/** The contrasts Lindsey reports, where both conditions were run. */
export const EXP4_CONTRASTS: readonly [string, string][] = [
  ["think", "dont_think"],
  ["rewarded", "punished"],
  ["happy", "sad"],
  ["charity", "terrorist"],
];

/** Experiment 4: cosine of the residual stream on the written sentence with the concept vector, per instruction. */
export async function intentionalControl(model: Model, o: Exp4Options = {}): Promise<Exp4Results> {
  const d = lindseyData().exp4_intentional_control;
  const layers = o.layers ?? [o.layer ?? defaultLayer(model.config.nLayers)];
  for (const l of layers) if (!Number.isInteger(l) || l < 0 || l >= model.config.nLayers) throw new UsageError(`layer ${l} is outside 0..${model.config.nLayers - 1}`);
  const conditions = o.conditions ?? ["think", "dont_think"];
  for (const c of conditions) if (!d.prompts[c]) throw new UsageError(`unknown exp4 condition "${c}"; known: ${Object.keys(d.prompts).join(", ")}`);
  const nPairs = o.pairs ?? 50;
  const seed = o.seed ?? 0;
  const { words, sentences } = pools(o);
  const controls = pool(d.control_words, o.controlWords).map((w) => w.toLowerCase());
  const rng = new Rng(seed + 2);
  const pairs = Array.from({ length: nPairs }, () => ({ word: words[rng.int(words.length)]!, sentence: sentences[rng.int(sentences.length)]! }));
  const vecs = await vectorsFor(model, [...pairs.map((p) => p.word), ...controls], layers, o);
  const D = model.config.dModel;
  const plan: Plan = layers.map((l) => ({ op: "read" as const, at: hookName(l, "hook_resid_post") }));
  const items = pairs.flatMap((p, i) => conditions.map((c) => ({ i, p, c })));
  const trials: Exp4Trial[] = [];
  const bs = o.batchSize ?? 16;
  for (let s = 0; s < items.length; s += bs) {
    const batch = items.slice(s, s + bs);
    const rs = batch.map((x) => renderTranscript(model, fill(d.prompts[x.c]!, { sentence: x.p.sentence, word: x.p.word })));
    const { cache } = await model.forward(rs.map((r) => ({ ids: r.ids })), { plan, logits: "none" });
    batch.forEach((x, b) => {
      const span = spanOf(model, rs[b]!, x.p.sentence, "last");
      const cos: Record<string, number> = {};
      const ctl: Record<string, number> = {};
      for (const l of layers) {
        const h = cache.get(hookName(l, "hook_resid_post"), b).data;
        const vs = vecs.get(l)!;
        cos[l] = meanCosine(h, D, span.from, span.to, vs.get(x.p.word)!);
        const cw = controls.filter((w) => w !== x.p.word);
        ctl[l] = cw.length === 0 ? NaN : cw.reduce((acc, w) => acc + meanCosine(h, D, span.from, span.to, vs.get(w)!), 0) / cw.length;
      }
      trials.push({ pair: x.i, sentence: x.p.sentence, word: x.p.word, condition: x.c, tokens: span, cos, control_cos: ctl });
    });
  }
  const by_layer = layers.map((l) => {
    const by_condition: Exp4Results["by_layer"][number]["by_condition"] = {};
    const vals = (c: string) => Array.from({ length: nPairs }, (_, i) => trials.find((t) => t.pair === i && t.condition === c)!.cos[l]!);
    for (const c of conditions) {
      const v = vals(c);
      const m = v.reduce((a, b) => a + b, 0) / v.length;
      const sd = v.length < 2 ? NaN : Math.sqrt(v.reduce((a, b) => a + (b - m) ** 2, 0) / (v.length - 1));
      const cm = trials.filter((t) => t.condition === c).map((t) => t.control_cos[l]!);
      by_condition[c] = { mean: m, sd, n: v.length, control_mean: cm.reduce((a, b) => a + b, 0) / cm.length };
    }
    const comparisons = EXP4_CONTRASTS.filter(([a, b]) => conditions.includes(a) && conditions.includes(b)).map(([a, b]) => ({
      a,
      b,
      layer: l,
      test: pairedDifference(vals(a), vals(b), { ...(o.resamples !== undefined ? { resamples: o.resamples } : {}), ...(o.permutations !== undefined ? { permutations: o.permutations } : {}), seed }),
    }));
    return { layer: l, by_condition, comparisons };
  });
  return { layers, conditions, pairs: nPairs, control_words: controls.length, by_layer, trials };
}

// ---- the command ----------------------------------------------------------------------------------

export interface LindseyArgs {
  model: string;
  out: string;
  /** Which experiments: "exp2,exp3,exp4" (default all) or a list. */
  experiments?: string | string[];
  layer?: number;
  /** Exp4 layers: "3", "2,3,4", fractions "0.6" or "all" (default: layer). */
  layers?: string;
  /** Exp2/exp3 strengths, e.g. "1,2,4,8,16". */
  strengths?: string;
  pairs?: number;
  words?: number;
  sentences?: number;
  /** Exp4 conditions, e.g. "think,dont_think,rewarded,punished". */
  conditions?: string;
  /** Exp3 conditions, e.g. "none,word,random,word_on_question". */
  exp3Conditions?: string;
  controlWords?: number;
  choices?: number;
  seed?: number;
  temperature?: number;
  /** Max new tokens: exp2 uses {thought, repeat} = (5, 15), exp3 20 unless given. */
  maxTokens?: number;
  /** Judge spec ("rule" default, "openai:MODEL", "anthropic:MODEL", "local:PATH", ...); a list uses its first. */
  judge?: string;
  judges?: string[];
  judgeMaxTokens?: number;
  batchSize?: number;
  resamples?: number;
  permutations?: number;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
}

export interface LindseyResults {
  kind: "selfscope.lindsey2025";
  version: 1;
  tool: { name: "selfscope"; version: string };
  model: { path: string; hash: string; family: string; nLayers: number; dModel: number; chatTemplate: boolean };
  settings: { experiments: string[]; layer: number; seed: number; judge: string; judge_approximate: boolean; judge_note: string | null };
  simplifications: readonly string[];
  exp2: Exp2Results | null;
  exp3: Exp3Results | null;
  exp4: Exp4Results | null;
}

/**
 * `selfscope lindsey`: run Lindsey (2025)'s experiments 2–4 on a model, write DIR/results.json
 * (summaries and every trial) and DIR/report.html, and return the results.
 */
export async function lindseyCommand(args: LindseyArgs): Promise<LindseyResults> {
  if (!args.out) throw new UsageError("lindsey: --out DIR is required");
  const exps = (Array.isArray(args.experiments) ? args.experiments : (args.experiments ?? "exp2,exp3,exp4").split(",")).map((s) => s.trim()).filter(Boolean);
  for (const e of exps) if (!["exp2", "exp3", "exp4"].includes(e)) throw new UsageError(`unknown experiment "${e}"; choose from exp2, exp3, exp4`);
  const unlock = lockRun(args.out);
  try {
    return await lindseyLocked(args, exps);
  } finally {
    unlock();
  }
}

async function lindseyLocked(args: LindseyArgs, exps: string[]): Promise<LindseyResults> {
  const judgeChoice = chooseJudges(args.judge !== undefined ? [args.judge] : args.judges);
  if (judgeChoice.note !== null) process.stderr.write(judgeChoice.note + "\n");
  const spec = judgeChoice.specs[0]!;
  const grader = makeGrader(spec, { cacheDir: path.join(args.out, "judge-cache"), ...(args.judgeMaxTokens ? { maxTokens: args.judgeMaxTokens } : {}) });
  const model = await Model.load(args.model, { device: args.device ?? "cpu" }).catch((e: unknown) => {
    grader.dispose();
    throw e;
  });
  try {
    const nL = model.config.nLayers;
    const layer = args.layer ?? defaultLayer(nL);
    if (!Number.isInteger(layer) || layer < 0 || layer >= nL) throw new UsageError(`--layer ${layer} is outside 0..${nL - 1}`);
    const common: CommonOptions = {
      layer,
      ...(args.pairs !== undefined ? { pairs: args.pairs } : {}),
      ...(args.words !== undefined ? { words: args.words } : {}),
      ...(args.sentences !== undefined ? { sentences: args.sentences } : {}),
      seed: args.seed ?? 0,
      ...(args.batchSize !== undefined ? { batchSize: args.batchSize } : {}),
      ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}),
    };
    const log = (s: string) => args.quiet || process.stderr.write(s + "\n");
    const strengths = args.strengths ? parseNumbers(args.strengths, "--strengths") : undefined;
    let exp2: Exp2Results | null = null;
    let exp3: Exp3Results | null = null;
    let exp4: Exp4Results | null = null;
    if (exps.includes("exp2")) {
      log("lindsey: experiment 2 (thoughts vs text)");
      exp2 = await thoughtsVsText(model, {
        ...common,
        grader,
        ...(strengths ? { strengths } : {}),
        ...(args.temperature !== undefined ? { temperature: args.temperature } : {}),
        ...(args.maxTokens !== undefined ? { maxTokens: { thought: args.maxTokens, repeat: args.maxTokens } } : {}),
        ...(args.choices !== undefined ? { choices: args.choices } : {}),
      });
    }
    if (exps.includes("exp3")) {
      log("lindsey: experiment 3 (prefill detection)");
      exp3 = await prefillDetection(model, {
        ...common,
        grader,
        ...(strengths ? { strengths: strengths.filter((s) => s !== 0) } : {}),
        ...(args.temperature !== undefined ? { temperature: args.temperature } : {}),
        ...(args.maxTokens !== undefined ? { maxTokens: args.maxTokens } : {}),
        ...(args.exp3Conditions ? { conditions: args.exp3Conditions.split(",").map((s) => s.trim()) as Exp3Condition[] } : {}),
      });
    }
    if (exps.includes("exp4")) {
      log("lindsey: experiment 4 (intentional control)");
      exp4 = await intentionalControl(model, {
        ...common,
        layers: args.layers ? parseLayers(args.layers, nL) : [layer],
        ...(args.conditions ? { conditions: args.conditions.split(",").map((s) => s.trim()) } : {}),
        ...(args.controlWords !== undefined ? { controlWords: args.controlWords } : {}),
        ...(args.resamples !== undefined ? { resamples: args.resamples } : {}),
        ...(args.permutations !== undefined ? { permutations: args.permutations } : {}),
      });
    }
    const results: LindseyResults = {
      kind: "selfscope.lindsey2025",
      version: 1,
      tool: { name: "selfscope", version: VERSION },
      model: { path: path.resolve(args.model), hash: model.weightsHash(), family: model.family, nLayers: nL, dModel: model.config.dModel, chatTemplate: model.chatTemplate !== undefined },
      settings: { experiments: exps, layer, seed: args.seed ?? 0, judge: grader.name, judge_approximate: grader.approximate, judge_note: judgeChoice.note },
      simplifications: SIMPLIFICATIONS,
      exp2,
      exp3,
      exp4,
    };
    fs.writeFileSync(path.join(args.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(args.out, "report.html"), await lindseyReport(results));
    return results;
  } finally {
    grader.dispose();
    model.dispose();
  }
}

// ---- report ---------------------------------------------------------------------------------------

const f3 = (x: number | null | undefined) => (x === null || x === undefined || !Number.isFinite(x) ? "—" : x.toFixed(4));

function examples<T>(xs: T[], n: number): T[] {
  return xs.slice(0, n);
}

async function lindseyReport(r: LindseyResults): Promise<string> {
  const parts: string[] = [];
  const approx = (r.settings.judge_approximate ? " — <b>rule judge: approximate</b>" : "") + (r.settings.judge_note ? ` (${escapeHtml(r.settings.judge_note)})` : "");
  parts.push(`<h1>Lindsey (2025) experiments 2–4 — ${escapeHtml(path.basename(r.model.path))}</h1>`);
  parts.push(`<p class="small">selfscope ${escapeHtml(r.tool.version)} · ${escapeHtml(r.model.family)}, ${r.model.nLayers} layers${r.model.chatTemplate ? ", chat template" : ", no chat template (raw Human/Assistant transcript)"} · layer ${r.settings.layer} · seed ${r.settings.seed} · judge ${escapeHtml(r.settings.judge)}${approx}</p>`);
  if (r.exp2) {
    const e = r.exp2;
    parts.push(`<h2>Experiment 2 — injected thoughts vs text inputs</h2>`);
    parts.push(`<p>${e.pairs} (sentence, word) pairs · layer ${e.layer} · temperature ${e.temperature} · ${e.max_tokens.thought}/${e.max_tokens.repeat} tokens · ${e.choices} choices (chance ${(100 * e.chance).toFixed(0)}%) · strength 0 = no injection</p>`);
    parts.push(`<table><tr><th>strength</th><th>thought identified</th><th>sentence transcribed</th><th>both</th></tr>${e.by_strength.map((b) => `<tr><td class="num">${b.strength}</td>${rateCell(b.thought_identification)}${rateCell(b.transcription)}${rateCell(b.both)}</tr>`).join("")}</table>`);
    const pts = e.by_strength.flatMap((b) =>
      (
        [
          ["thought identified", b.thought_identification],
          ["transcribed", b.transcription],
          ["both", b.both],
        ] as const
      ).flatMap(([m, rt]) => (rt.estimate === null ? [] : [{ strength: b.strength, metric: m, value: rt.estimate }])),
    );
    if (pts.length > 0) {
      parts.push(
        await renderSvg({
          width: 420,
          height: 220,
          layer: [
            { data: { values: pts }, mark: { type: "line", point: true }, encoding: { x: { field: "strength", type: "quantitative", axis: { format: "~g" } }, y: { field: "value", type: "quantitative", scale: { domain: [0, 1] }, title: "rate" }, color: { field: "metric", type: "nominal" } } },
            { data: { values: [{ chance: e.chance }] }, mark: { type: "rule", strokeDash: [4, 4], color: "#999" }, encoding: { y: { field: "chance", type: "quantitative" } } },
          ],
        }),
      );
    }
    parts.push(`<table><tr><th>word</th><th>strength</th><th>"what word" reply</th><th>judge</th><th>"repeat" reply</th></tr>${examples(e.trials, 12).map((t) => `<tr><td>${escapeHtml(t.word)}</td><td class="num">${t.strength}</td><td><pre>${escapeHtml(t.thought_response)}</pre></td><td class="small">${escapeHtml(t.judge_raw ?? "")}</td><td><pre>${escapeHtml(t.repeat_response)}</pre></td></tr>`).join("")}</table>`);
  }
  if (r.exp3) {
    const e = r.exp3;
    parts.push(`<h2>Experiment 3 — detecting unintended outputs (prefill)</h2>`);
    parts.push(`<p>${e.pairs} pairs · layer ${e.layer} · temperature ${e.temperature} · ${e.max_tokens} tokens · apology rate = responses judged as not claiming intent · no injection: ${e.apology_none ? `${f3(e.apology_none.estimate)} (n=${e.apology_none.n})` : "—"} · max reduction ${e.max_reduction ? `${f3(e.max_reduction.reduction)} at strength ${e.max_reduction.strength}` : "—"}</p>`);
    parts.push(`<table><tr><th>strength</th>${e.conditions.map((c) => `<th>${escapeHtml(c)}</th>`).join("")}<th>reduction</th></tr>${e.by_strength.map((b) => `<tr><td class="num">${b.strength}</td>${e.conditions.map((c) => rateCell(b.apology[c])).join("")}<td class="num">${f3(b.reduction)}</td></tr>`).join("")}</table>`);
    const pts = e.by_strength.flatMap((b) => e.conditions.flatMap((c) => (b.apology[c]?.estimate == null ? [] : [{ strength: b.strength, condition: c, value: b.apology[c]!.estimate }])));
    if (pts.length > 0) parts.push(await renderSvg({ width: 420, height: 220, data: { values: pts }, mark: { type: "line", point: true }, encoding: { x: { field: "strength", type: "quantitative", axis: { format: "~g" } }, y: { field: "value", type: "quantitative", scale: { domain: [0, 1] }, title: "apology rate" }, color: { field: "condition", type: "nominal" } } }));
    parts.push(`<table><tr><th>prefilled word</th><th>condition</th><th>strength</th><th>reply</th><th>verdict</th></tr>${examples(e.trials, 12).map((t) => `<tr><td>${escapeHtml(t.word)}</td><td>${escapeHtml(t.condition)}</td><td class="num">${t.strength}</td><td><pre>${escapeHtml(t.response)}</pre></td><td class="small">${escapeHtml(t.verdict ?? "unjudged")} ${escapeHtml(t.judge_raw ?? "")}</td></tr>`).join("")}</table>`);
  }
  if (r.exp4) {
    const e = r.exp4;
    parts.push(`<h2>Experiment 4 — intentional control</h2>`);
    parts.push(`<p>${e.pairs} pairs · conditions ${e.conditions.map(escapeHtml).join(", ")} · ${e.control_words} control words · cosine of blocks.L.hook_resid_post on the written sentence's tokens with the word's concept vector (mean over tokens)</p>`);
    parts.push(
      `<table><tr><th>layer</th><th>condition</th><th>mean cos (word)</th><th>sd</th><th>mean cos (control words)</th></tr>${e.by_layer.flatMap((b) => Object.entries(b.by_condition).map(([c, v]) => `<tr><td class="num">${b.layer}</td><td>${escapeHtml(c)}</td><td class="num">${f3(v.mean)}</td><td class="num">${f3(v.sd)}</td><td class="num">${f3(v.control_mean)}</td></tr>`)).join("")}</table>`,
    );
    const comps = e.by_layer.flatMap((b) => b.comparisons);
    parts.push(`<table><tr><th>layer</th><th>contrast</th><th>mean difference</th><th>95% bootstrap CI</th><th>permutation p</th><th>n</th></tr>${comps.map((c) => `<tr><td class="num">${c.layer}</td><td>${escapeHtml(c.a)} − ${escapeHtml(c.b)}</td><td class="num">${f3(c.test.mean)}</td><td class="num">${c.test.ci ? `[${f3(c.test.ci[0])}, ${f3(c.test.ci[1])}]` : "—"}</td><td class="num">${c.test.p === null ? "—" : c.test.p.toPrecision(3)}${c.test.exact ? " (exact)" : ""}</td><td class="num">${c.test.n}</td></tr>`).join("")}</table>`);
    const pts = e.by_layer.flatMap((b) => Object.entries(b.by_condition).flatMap(([c, v]) => [{ layer: b.layer, condition: c, value: v.mean, kind: "concept word" }, { layer: b.layer, condition: c, value: v.control_mean, kind: "control words" }]));
    if (pts.length > 0) parts.push(await renderSvg({ width: 420, height: 220, data: { values: pts }, mark: { type: "point", filled: true }, encoding: { x: { field: "layer", type: "ordinal" }, y: { field: "value", type: "quantitative", title: "mean cosine" }, color: { field: "condition", type: "nominal" }, shape: { field: "kind", type: "nominal" } } }));
  }
  parts.push(`<h2>Simplifications</h2><ul>${r.simplifications.map((s) => `<li>${escapeHtml(s)}</li>`).join("")}</ul>`);
  return htmlBodyPage("selfscope Lindsey (2025) experiments", parts);
}
