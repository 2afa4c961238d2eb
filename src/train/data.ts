// Training data: JSONL of chat examples ({"messages": [...]}), raw completions ({"prompt": "...",
// "completion": "..."}) for models without a chat template, or preference pairs ({"prompt":
// [...messages] | "...", "chosen": "...", "rejected": "..."}), each optionally with a plan
// ({"plan": {"inject": {concept | vector, layer, strength, from}}}) so steering-detection training
// is data. Loss targets are the assistant's tokens only (chat template rendered by the model).
import fs from "node:fs";
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import type { Row } from "../engine/types.js";
import { hookName } from "../hooks/names.js";
import type { Intervention, PosSpec } from "../hooks/plan.js";
import type { ChatMessage } from "../io/chat-template.js";
import type { Model } from "../model/model.js";
import { bosText, readData } from "../eval/protocol.js";
import { conceptVectors, PROTOCOL_RECIPE, type VectorRecipe } from "../vectors/extract.js";
import { BASE_RECIPE } from "../eval/presets.js";
import type { Objective } from "./objectives.js";

export interface InjectSpec {
  concept?: string;
  vector?: number[];
  layer: number;
  strength: number;
  /** Token index, "assistant" (first response token), "trial" (the token before "Trial ", as the protocol), or "all" (default). */
  from?: number | "assistant" | "trial" | "all";
}

export type RawExample =
  | { kind: "chat"; messages: ChatMessage[]; inject: InjectSpec[]; where: string }
  | { kind: "completion"; prompt: string; completion: string; inject: InjectSpec[]; where: string }
  | { kind: "pair"; prompt: ChatMessage[] | string; chosen: string; rejected: string; inject: InjectSpec[]; where: string };

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

function messagesOf(x: unknown, where: string, field: string): ChatMessage[] {
  if (!Array.isArray(x) || x.length === 0) throw new UsageError(`${where}: field "${field}" must be a non-empty array of {"role", "content"} messages`);
  return x.map((m, i) => {
    if (!isObj(m) || typeof m.role !== "string" || typeof m.content !== "string") throw new UsageError(`${where}: field "${field}[${i}]" must be {"role": string, "content": string}`);
    return { role: m.role, content: m.content };
  });
}

function injectOf(x: unknown, where: string): InjectSpec[] {
  if (x === undefined) return [];
  if (!isObj(x)) throw new UsageError(`${where}: field "plan" must be an object like {"inject": {...}}`);
  for (const k of Object.keys(x)) if (k !== "inject") throw new UsageError(`${where}: field "plan.${k}" is not known (plans take "inject")`);
  const list = Array.isArray(x.inject) ? x.inject : x.inject === undefined ? [] : [x.inject];
  return list.map((s: unknown, i) => {
    const f = `plan.inject${Array.isArray(x.inject) ? `[${i}]` : ""}`;
    if (!isObj(s)) throw new UsageError(`${where}: field "${f}" must be an object`);
    if (!Number.isInteger(s.layer) || (s.layer as number) < 0) throw new UsageError(`${where}: field "${f}.layer" must be a non-negative integer`);
    if (typeof s.strength !== "number" || !Number.isFinite(s.strength)) throw new UsageError(`${where}: field "${f}.strength" must be a finite number`);
    if ((s.concept === undefined) === (s.vector === undefined)) throw new UsageError(`${where}: field "${f}" needs exactly one of "concept" (a word) or "vector" (numbers)`);
    if (s.concept !== undefined && (typeof s.concept !== "string" || s.concept === "")) throw new UsageError(`${where}: field "${f}.concept" must be a non-empty string`);
    if (s.vector !== undefined && (!Array.isArray(s.vector) || !s.vector.every((v) => typeof v === "number" && Number.isFinite(v)))) throw new UsageError(`${where}: field "${f}.vector" must be an array of finite numbers`);
    const from = s.from;
    if (from !== undefined && !(Number.isInteger(from) && (from as number) >= 0) && from !== "assistant" && from !== "trial" && from !== "all") {
      throw new UsageError(`${where}: field "${f}.from" must be a token index, "assistant", "trial" or "all"`);
    }
    return { layer: s.layer as number, strength: s.strength, ...(s.concept !== undefined ? { concept: s.concept as string } : {}), ...(s.vector !== undefined ? { vector: s.vector as number[] } : {}), ...(from !== undefined ? { from: from as InjectSpec["from"] } : {}) };
  });
}

/** Parse JSONL text (file names the errors: file:line and the field). Blank lines are skipped. */
export function parseTrainJsonl(text: string, file: string): RawExample[] {
  const out: RawExample[] = [];
  text.split("\n").forEach((line, i) => {
    const where = `${file}:${i + 1}`;
    if (line.trim() === "") return;
    let x: unknown;
    try {
      x = JSON.parse(line);
    } catch (e) {
      throw new UsageError(`${where}: not valid JSON (${(e as Error).message})`);
    }
    if (!isObj(x)) throw new UsageError(`${where}: each line must be a JSON object`);
    const inject = injectOf(x.plan, where);
    if (x.messages !== undefined) {
      const messages = messagesOf(x.messages, where, "messages");
      if (!messages.some((m) => m.role === "assistant")) throw new UsageError(`${where}: field "messages" has no assistant message (the loss is on assistant tokens)`);
      out.push({ kind: "chat", messages, inject, where });
    } else if (x.chosen !== undefined || x.rejected !== undefined) {
      if (typeof x.chosen !== "string") throw new UsageError(`${where}: field "chosen" must be a string`);
      if (typeof x.rejected !== "string") throw new UsageError(`${where}: field "rejected" must be a string`);
      const prompt = typeof x.prompt === "string" ? x.prompt : messagesOf(x.prompt, where, "prompt");
      out.push({ kind: "pair", prompt, chosen: x.chosen, rejected: x.rejected, inject, where });
    } else if (x.completion !== undefined) {
      if (typeof x.prompt !== "string") throw new UsageError(`${where}: field "prompt" must be a string`);
      if (typeof x.completion !== "string") throw new UsageError(`${where}: field "completion" must be a string`);
      out.push({ kind: "completion", prompt: x.prompt, completion: x.completion, inject, where });
    } else throw new UsageError(`${where}: expected "messages", "prompt"+"completion", or "prompt"+"chosen"+"rejected"`);
  });
  if (out.length === 0) throw new UsageError(`${file}: no examples`);
  return out;
}

export function readTrainJsonl(file: string): RawExample[] {
  if (!fs.existsSync(file)) throw new UsageError(`--data ${file}: no such file`);
  return parseTrainJsonl(fs.readFileSync(file, "utf8"), file);
}

/** One tokenized sequence with its loss targets. */
export interface Seq {
  ids: number[];
  /** The text the ids encode (special tokens as text), for marker positions. */
  text: string;
  /** Per position: the next token when it is an assistant token, else -1. */
  targets: number[];
  nTargets: number;
  /** First assistant token (the "assistant" injection position). */
  assistantStart: number;
}

export interface Resolved {
  at: ReturnType<typeof hookName>;
  vector: Float32Array;
  strength: number;
  pos: PosSpec;
}

export type Example = { kind: "sft"; seq: Seq; inject: Resolved[]; where: string } | { kind: "pair"; chosen: Seq; rejected: Seq; inject: Resolved[]; where: string };

function targetsOf(ids: number[], spans: [number, number][]): { targets: number[]; n: number } {
  const on = new Uint8Array(ids.length);
  for (const [a, b] of spans) for (let j = a; j < b; j++) on[j] = 1;
  const targets = ids.map((_, i) => (i + 1 < ids.length && on[i + 1] ? ids[i + 1]! : -1));
  return { targets, n: targets.filter((t) => t >= 0).length };
}

const startsWith = (a: number[], p: number[]) => p.length <= a.length && p.every((v, i) => a[i] === v);

/** A chat rendered with the template; targets on every assistant turn's tokens (its end-of-turn tokens included). */
export function encodeChat(model: Model, messages: ChatMessage[], where: string): Seq {
  if (!model.chatTemplate) throw new UsageError(`${where}: ${model.files.path} has no chat template; give {"prompt", "completion"} (raw text) instead of "messages"`);
  const full = model.encode({ messages, addGenerationPrompt: false });
  const spans: [number, number][] = [];
  messages.forEach((m, i) => {
    if (m.role !== "assistant") return;
    const before = model.encode({ messages: messages.slice(0, i), addGenerationPrompt: true }).ids;
    const upto = model.encode({ messages: messages.slice(0, i + 1), addGenerationPrompt: false }).ids;
    // The mask is by token position, so the partial renders must be token prefixes of the full one.
    if (!startsWith(full.ids, upto) || !startsWith(upto, before)) throw new UsageError(`${where}: the chat template's render of the first ${i + 1} messages is not a token prefix of the whole conversation; the assistant mask cannot be placed`);
    spans.push([before.length, upto.length]);
  });
  const { targets, n } = targetsOf(full.ids, spans);
  if (n === 0) throw new UsageError(`${where}: no assistant tokens to train on`);
  return { ids: full.ids, text: full.text!, targets, nTargets: n, assistantStart: spans[spans.length - 1]![0] };
}

/** Raw text (BOS as the protocol prepends it) + completion; targets on the completion's tokens. */
export function encodeCompletion(model: Model, prompt: string, completion: string, where: string): Seq {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${where}: ${model.files.path} has no tokenizer`);
  const head = bosText(model) + prompt;
  const text = head + completion;
  const ids = tok.encode(text, { addSpecial: false });
  const p = tok.encode(head, { addSpecial: false });
  // Tokens can merge across the boundary: the completion starts at the first token that differs.
  let cp = 0;
  while (cp < p.length && cp < ids.length && ids[cp] === p[cp]) cp++;
  const { targets, n } = targetsOf(ids, [[cp, ids.length]]);
  if (n === 0) throw new UsageError(`${where}: the completion has no tokens to train on`);
  return { ids, text, targets, nTargets: n, assistantStart: cp };
}

function encodeResponse(model: Model, prompt: ChatMessage[] | string, response: string, where: string): Seq {
  return typeof prompt === "string" ? encodeCompletion(model, prompt, response, where) : encodeChat(model, [...prompt, { role: "assistant", content: response }], where);
}

/**
 * The concept-vector recipe for `plan.inject.concept`: the one `selfscope inject` uses on this model by
 * default (the chat recipe with a chat template; the raw base-model recipe without one), so a model
 * trained on injections is evaluated with the very vectors it was trained on.
 */
export function trainVectorRecipe(model: Model): VectorRecipe {
  return model.chatTemplate ? PROTOCOL_RECIPE : BASE_RECIPE;
}

/**
 * Turn raw examples into what `objective` trains on: pairs stay pairs (shuffled / swapped per the
 * preset, with `seed`) or become SFT sequences (chosen_only / rejected_only); concept vectors are
 * computed with the project's recipe (src/vectors/extract.ts) for every (concept, layer) used.
 */
export async function buildExamples(model: Model, raw: RawExample[], obj: Objective, o: { seed: number; vectorCache?: string | null }): Promise<Example[]> {
  const D = model.config.dModel;
  const nL = model.config.nLayers;
  for (const r of raw) {
    if (obj.data === "sft" && r.kind === "pair") throw new UsageError(`${r.where}: a preference pair, but --objective ${obj.name} trains on chat/completion examples`);
    if (obj.data === "pairs" && r.kind !== "pair") throw new UsageError(`${r.where}: --objective ${obj.name} needs preference pairs ({"prompt", "chosen", "rejected"})`);
    for (const s of r.inject) {
      if (s.layer >= nL) throw new UsageError(`${r.where}: field "plan.inject.layer" = ${s.layer} is out of range (the model has ${nL} layers)`);
      if (s.vector && s.vector.length !== D) throw new UsageError(`${r.where}: field "plan.inject.vector" has ${s.vector.length} numbers; the model's d_model is ${D}`);
    }
  }
  // Concept vectors, once for every concept and layer the data names.
  const concepts = [...new Set(raw.flatMap((r) => r.inject.flatMap((s) => (s.concept ? [s.concept] : []))))];
  const layers = [...new Set(raw.flatMap((r) => r.inject.filter((s) => s.concept).map((s) => s.layer)))].sort((a, b) => a - b);
  const vecs =
    concepts.length > 0
      ? (await conceptVectors(model, { concepts, layers, baselineWords: readData<{ words: string[] }>("protocol/baseline_words.json").words, recipe: trainVectorRecipe(model), ...(o.vectorCache !== undefined ? { cacheDir: o.vectorCache } : {}) })).vectors
      : new Map<number, Map<string, Float32Array>>();
  const resolve = (r: RawExample, seq: Seq): Resolved[] =>
    r.inject.map((s) => {
      const vector = s.vector ? Float32Array.from(s.vector) : vecs.get(s.layer)?.get(s.concept!);
      if (!vector) throw new Error(`internal: no concept vector for ${s.concept} at layer ${s.layer}`);
      const f = s.from ?? "all";
      // "trial" is the protocol's injection start (the token before "Trial n", src/eval/protocol.ts), as an engine marker position.
      const pos: PosSpec = f === "all" ? "all" : f === "assistant" ? { from: seq.assistantStart } : f === "trial" ? { marker: "Trial ", offset: -1 } : { from: f };
      if (f === "trial" && !seq.text.includes("Trial ")) throw new UsageError(`${r.where}: field "plan.inject.from" is "trial" but the prompt has no "Trial "`);
      return { at: hookName(s.layer, "hook_resid_post"), vector, strength: s.strength, pos };
    });
  let pairs = raw;
  if (obj.transform === "shuffle_rejected") {
    // dpo_shuffled: the rejected responses are permuted across pairs (seeded).
    const rej = raw.map((r) => (r.kind === "pair" ? r.rejected : ""));
    new Rng(o.seed ^ 0x5eed).shuffle(rej);
    pairs = raw.map((r, i) => (r.kind === "pair" ? { ...r, rejected: rej[i]! } : r));
  }
  return pairs.map((r): Example => {
    if (r.kind === "chat") {
      const seq = encodeChat(model, r.messages, r.where);
      return { kind: "sft", seq, inject: resolve(r, seq), where: r.where };
    }
    if (r.kind === "completion") {
      const seq = encodeCompletion(model, r.prompt, r.completion, r.where);
      return { kind: "sft", seq, inject: resolve(r, seq), where: r.where };
    }
    if (obj.transform === "chosen_only" && obj.loss === "sft") {
      const seq = encodeResponse(model, r.prompt, r.chosen, r.where);
      return { kind: "sft", seq, inject: resolve(r, seq), where: r.where };
    }
    if (obj.transform === "rejected_only") {
      const seq = encodeResponse(model, r.prompt, r.rejected, r.where);
      return { kind: "sft", seq, inject: resolve(r, seq), where: r.where };
    }
    const [c, j] = obj.transform === "swap" ? [r.rejected, r.chosen] : [r.chosen, r.rejected];
    const chosen = encodeResponse(model, r.prompt, c, r.where);
    const rejected = encodeResponse(model, r.prompt, j, r.where);
    return { kind: "pair", chosen, rejected, inject: resolve(r, chosen), where: r.where };
  });
}

/** Rows, targets and the plan for a batch of sequences (each injection on its own row). */
export function batchOf(items: { seq: Seq; inject: Resolved[] }[]): { rows: Row[]; targets: number[][]; plan: Intervention[] } {
  const plan: Intervention[] = [];
  items.forEach((it, b) => {
    for (const s of it.inject) plan.push({ op: "add", at: s.at, vector: s.vector, scale: s.strength, pos: s.pos, rows: [b] });
  });
  return { rows: items.map((it) => ({ ids: it.seq.ids, text: it.seq.text })), targets: items.map((it) => it.seq.targets), plan };
}
