// SelfIE adapters (arXiv 2602.10352; SelfIE: Chen et al. 2024): a frozen model describes an
// activation vector v after a small adapter maps it into its embedding space. The adapted vector
// e replaces the token embedding at one placeholder position of a prompt template:
//   scalar-affine  e = s·v + b   (d+1 parameters)
//   full-rank      e = W·v + b   (d²+d parameters)
// Training minimises the cross-entropy of the label tokens after the prompt, model frozen. The
// replacement is a plan that zero-ablates hook_embed at the placeholder plus a trained vector e
// added there; lossAndGrad gives dLoss/de per example, chained here in float64 to s, b, W.
import fs from "node:fs";
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import { readSafetensorsHeader, readStTensor, writeSafetensors } from "../io/safetensors.js";
import type { Row } from "../engine/types.js";
import type { TrainParam } from "../engine/grad.js";
import type { Plan } from "../hooks/plan.js";
import type { Model } from "../model/model.js";
import { findConcept } from "../judge/judge.js";
import { wilson, type Rate } from "../stats/stats.js";
import { adamInit, adamStep } from "../math/adam.js";

export type AdapterKind = "scalar" | "full";

/** Parameters in float64: scalar-affine holds s (length 1), full-rank holds W (d×d, row-major); both hold b. */
export interface Adapter {
  kind: AdapterKind;
  d: number;
  s: Float64Array;
  W: Float64Array;
  b: Float64Array;
}

/** The untrained baseline: the identity map (s = 1 or W = I, b = 0), i.e. the raw vector as an embedding. */
export function identityAdapter(kind: AdapterKind, d: number): Adapter {
  const W = new Float64Array(kind === "full" ? d * d : 0);
  if (kind === "full") for (let i = 0; i < d; i++) W[i * d + i] = 1;
  return { kind, d, s: Float64Array.of(kind === "scalar" ? 1 : 0), W, b: new Float64Array(d) };
}

export function paramCount(a: Adapter): number {
  return a.kind === "scalar" ? a.d + 1 : a.d * a.d + a.d;
}

/** The parameters as one flat array ([s, b] or [W, b]) for the optimizer, and back. */
export function flatParams(a: Adapter): Float64Array {
  const head = a.kind === "scalar" ? a.s : a.W;
  const out = new Float64Array(head.length + a.d);
  out.set(head);
  out.set(a.b, head.length);
  return out;
}

export function setFlatParams(a: Adapter, p: Float64Array): void {
  const head = a.kind === "scalar" ? a.s : a.W;
  head.set(p.subarray(0, head.length));
  a.b.set(p.subarray(head.length));
}

function checkDim(a: Adapter, v: ArrayLike<number>): void {
  if (v.length !== a.d) throw new UsageError(`a ${v.length}-dim vector does not fit a ${a.d}-dim adapter (d_model differs: another model?)`);
}

/** e = s·v + b or W·v + b, in float64. */
export function adapt64(a: Adapter, v: ArrayLike<number>): Float64Array {
  checkDim(a, v);
  const d = a.d;
  const e = new Float64Array(d);
  if (a.kind === "scalar") for (let i = 0; i < d; i++) e[i] = a.s[0]! * v[i]! + a.b[i]!;
  else
    for (let i = 0; i < d; i++) {
      let acc = a.b[i]!;
      for (let j = 0; j < d; j++) acc += a.W[i * d + j]! * v[j]!;
      e[i] = acc;
    }
  return e;
}

export function adapt(a: Adapter, v: ArrayLike<number>): Float32Array {
  return Float32Array.from(adapt64(a, v));
}

/** Chain rule from dLoss/de to the flat parameters ([s, b] or [W, b]), accumulated into `out` (float64). */
export function accumulateGrad(a: Adapter, v: ArrayLike<number>, dE: ArrayLike<number>, out: Float64Array): void {
  const d = a.d;
  const off = a.kind === "scalar" ? 1 : d * d;
  if (a.kind === "scalar") {
    let ds = 0;
    for (let i = 0; i < d; i++) ds += dE[i]! * v[i]!;
    out[0]! += ds;
  } else for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) out[i * d + j]! += dE[i]! * v[j]!;
  for (let i = 0; i < d; i++) out[off + i]! += dE[i]!;
}

// ---------------------------------------------------------------------------------------------
// Prompts

export const PLACEHOLDER = "<v>";
export const LABEL = "{word}";

/**
 * A rendered template: ids with placeholders at `positions` (their token id is irrelevant: their
 * embeddings are replaced; the paper's template names the injection site twice), and what the
 * label tokens are encoded with.
 */
export interface SelfiePrompt {
  template: string;
  ids: number[];
  /** Placeholder positions, ascending; the same e goes into each. */
  positions: number[];
  /** Text after the last placeholder and before {word} (the label tokens are encoded together with it). */
  suffix: string;
  /** Whatever follows {word} in the template (part of the label text). */
  tail: string;
}

/** The tokenizer's dummy prefix (SentencePiece's leading "▁" on text encoded on its own), or null. */
function dummyPrefix(model: Model): number | null {
  const t = model.tokenizer!;
  const a = t.encode(".", { addSpecial: false });
  const b = t.encode("!", { addSpecial: false });
  return a.length === 2 && b.length === 2 && a[0] === b[0] ? a[0]! : null;
}

/** Encode text that continues a sequence (no BOS; the dummy prefix, when the tokenizer adds one, dropped). */
function encodeCont(model: Model, text: string): number[] {
  const ids = model.tokenizer!.encode(text, { addSpecial: false });
  const dp = dummyPrefix(model);
  return dp !== null && ids[0] === dp ? ids.slice(1) : ids;
}

/** Parse a template "prefix <v> … <v> suffix {word} tail" (one or more <v>, all before exactly one {word}). */
export function renderTemplate(model: Model, template: string, where = "--template"): SelfiePrompt {
  if (!model.tokenizer) throw new UsageError(`${model.files.path} has no tokenizer; SelfIE needs text prompts`);
  const nw = template.split(LABEL).length - 1;
  if (!template.includes(PLACEHOLDER) || nw !== 1 || template.lastIndexOf(PLACEHOLDER) > template.indexOf(LABEL))
    throw new UsageError(`${where} ${JSON.stringify(template)}: needs one or more ${PLACEHOLDER} (where the vector goes) before exactly one ${LABEL} (the label), e.g. "Lily saw a <v>. Lily saw a {word}"`);
  const [head, tail] = template.split(LABEL) as [string, string];
  const segs = head.split(PLACEHOLDER);
  // The placeholders' id: any token (the embedding is replaced); BOS when the model has one.
  const ph = model.config.bosTokenId ?? model.tokenizer.bos ?? 0;
  const ids = model.tokenizer.encode(segs[0]!, { addSpecial: true });
  const positions: number[] = [];
  segs.slice(1).forEach((seg, i) => {
    positions.push(ids.length);
    ids.push(ph);
    if (i < segs.length - 2) ids.push(...encodeCont(model, seg));
  });
  const suffix = segs.at(-1)!;
  return { template, ids: [...ids, ...encodeCont(model, suffix)], positions, suffix, tail };
}

/**
 * Prompt ids followed by the label's ids, and next-token targets on the label tokens only. The
 * suffix and label are encoded together (as the model reads them); where a merge crosses the
 * boundary ("a house" as one token run), the targets start where the encodings first differ.
 */
export function labelRow(model: Model, p: SelfiePrompt, label: string): { ids: number[]; targets: number[] } {
  const head = encodeCont(model, p.suffix);
  const full = encodeCont(model, p.suffix + label + p.tail);
  let k = 0;
  while (k < head.length && k < full.length && head[k] === full[k]) k++;
  if (k >= full.length) throw new UsageError(`the label ${JSON.stringify(label)} adds no tokens after the template ${JSON.stringify(p.template)}`);
  const last = p.positions.at(-1)!;
  const start = last + 1 + k;
  const ids = [...p.ids.slice(0, last + 1), ...full];
  const targets = ids.map((_, i) => (i >= start - 1 && i + 1 < ids.length ? ids[i + 1]! : -1));
  return { ids, targets };
}

/** The constant part of the insertion: zero the placeholder's own token embedding. */
export function insertionPlan(p: SelfiePrompt): Plan {
  return p.positions.map((q) => ({ op: "ablate", at: "hook_embed", mode: "zero", pos: { from: q, to: q + 1 } }));
}

/** The full insertion as a plan (ablate, then add e), for forward() and generate(). */
export function insertPlan(p: SelfiePrompt, e: Float32Array, rows?: number[]): Plan {
  return [...insertionPlan(p), ...p.positions.map((q) => ({ op: "add" as const, at: "hook_embed" as const, vector: e, pos: { from: q, to: q + 1 }, ...(rows ? { rows } : {}) }))];
}

// ---------------------------------------------------------------------------------------------
// Loss, gradients, training

export interface Example {
  vector: Float32Array;
  label: string;
}

/**
 * Mean cross-entropy of the label tokens over `examples` (one row each) and its gradient with
 * respect to the adapter's flat parameters (float64). Each row's e is its own trained vector
 * (rows: [i]) at each placeholder; dLoss/de_i chains to the parameters.
 */
export async function adapterLossAndGrad(model: Model, a: Adapter, p: SelfiePrompt, examples: readonly Example[]): Promise<{ loss: number; grad: Float64Array }> {
  const rows: Row[] = [];
  const targets: number[][] = [];
  const params: TrainParam[] = [];
  examples.forEach((ex, i) => {
    const r = labelRow(model, p, ex.label);
    rows.push({ ids: r.ids });
    targets.push(r.targets);
    const e = adapt(a, ex.vector);
    for (const q of p.positions) params.push({ kind: "vector", at: "hook_embed", pos: { from: q, to: q + 1 }, rows: [i], value: e });
  });
  const res = await model.lossAndGrad(rows, { targets, params, plan: insertionPlan(p) });
  const grad = new Float64Array(paramCount(a));
  // dL/de of one example is the sum over its placeholder positions.
  const P = p.positions.length;
  examples.forEach((ex, i) => {
    for (let k = 0; k < P; k++) accumulateGrad(a, ex.vector, res.grads[i * P + k]![0]!, grad);
  });
  return { loss: res.loss, grad };
}

export interface TrainOptions {
  steps: number;
  lr: number;
  batchSize: number;
  seed: number;
  onStep?: (step: number, loss: number) => void;
}

/** Adam on the flat parameters from the identity adapter, mini-batches drawn by a seeded shuffle per epoch. */
export async function trainAdapter(model: Model, kind: AdapterKind, p: SelfiePrompt, data: readonly Example[], o: TrainOptions): Promise<{ adapter: Adapter; losses: number[] }> {
  if (data.length === 0) throw new UsageError("no training examples");
  const a = identityAdapter(kind, model.config.dModel);
  const flat = flatParams(a);
  const st = adamInit(flat.length);
  const rng = new Rng(o.seed);
  let order: number[] = [];
  const losses: number[] = [];
  for (let step = 0; step < o.steps; step++) {
    if (order.length < o.batchSize) order = [...order, ...shuffled(data.length, rng)];
    const batch = order.splice(0, Math.min(o.batchSize, data.length)).map((i) => data[i]!);
    const { loss, grad } = await adapterLossAndGrad(model, a, p, batch);
    adamStep(flat, grad, st, { lr: o.lr });
    setFlatParams(a, flat);
    losses.push(loss);
    o.onStep?.(step, loss);
  }
  return { adapter: a, losses };
}

/** A seeded permutation of 0..n-1 (Fisher–Yates). */
export function shuffled(n: number, rng: Rng): number[] {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [p[i], p[j]] = [p[j]!, p[i]!];
  }
  return p;
}

/** The label-shuffled control's data: the same vectors with labels permuted (seeded, no label left in place when n > 1). */
export function shuffleLabels(data: readonly Example[], seed: number): Example[] {
  const rng = new Rng(seed);
  let p = shuffled(data.length, rng);
  for (let tries = 0; data.length > 1 && p.some((j, i) => j === i) && tries < 1000; tries++) p = shuffled(data.length, rng);
  return data.map((ex, i) => ({ vector: ex.vector, label: data[p[i]!]!.label }));
}

// ---------------------------------------------------------------------------------------------
// Scoring

/**
 * Log-likelihood (sum over the label's tokens, float64) of every candidate label given each
 * vector inserted through the adapter: scores[i][c]. Teacher-forced forward passes, one batch
 * of candidates per vector.
 */
export async function labelScores(model: Model, a: Adapter, p: SelfiePrompt, vectors: readonly Float32Array[], candidates: readonly string[]): Promise<number[][]> {
  const rows = candidates.map((c) => labelRow(model, p, c));
  const V = model.config.dVocab;
  const out: number[][] = [];
  for (const v of vectors) {
    const { logits } = await model.forward(rows.map((r) => ({ ids: r.ids })), { plan: insertPlan(p, adapt(a, v)), logits: "all" });
    out.push(rows.map((r, c) => {
      let ll = 0;
      r.targets.forEach((t, pos) => {
        if (t < 0) return;
        const row = logits[c]!.subarray(pos * V, (pos + 1) * V);
        let mx = -Infinity;
        for (let k = 0; k < V; k++) mx = Math.max(mx, row[k]!);
        let z = 0;
        for (let k = 0; k < V; k++) z += Math.exp(row[k]! - mx);
        ll += row[t]! - mx - Math.log(z);
      });
      return ll;
    }));
  }
  return out;
}

/** Rank of the true candidate (0 = best; ties count against it) per vector. */
export function ranks(scores: readonly number[][], truth: readonly number[]): number[] {
  return scores.map((s, i) => s.filter((x, c) => c !== truth[i] && x >= s[truth[i]!]!).length);
}

export interface Recall {
  k: number;
  hits: number;
  n: number;
  rate: Rate;
}

export function recallAt(rk: readonly number[], k: number): Recall {
  const hits = rk.filter((r) => r < k).length;
  return { k, hits, n: rk.length, rate: wilson(hits, rk.length) };
}

/** Greedy (or sampled, seeded) descriptions of each vector, and whether each names its label (findConcept: the word or its variants). */
export async function describeVectors(
  model: Model,
  a: Adapter,
  p: SelfiePrompt,
  vectors: readonly Float32Array[],
  o: { maxTokens: number; temperature?: number; seed?: number; labels?: readonly string[] },
): Promise<{ texts: string[]; hits: boolean[] | null }> {
  const texts: string[] = [];
  for (const [i, v] of vectors.entries()) {
    const r = await model.generate([{ ids: p.ids }], { maxTokens: o.maxTokens, plan: insertPlan(p, adapt(a, v)), temperature: o.temperature ?? 0, seed: (o.seed ?? 0) + i });
    texts.push(r.texts[0]!);
  }
  return { texts, hits: o.labels ? texts.map((t, i) => findConcept(t, o.labels![i]!) >= 0) : null };
}

// ---------------------------------------------------------------------------------------------
// Adapter files

export interface AdapterMeta {
  kind: AdapterKind;
  layer: number;
  /** sha256 of the model's weights (Model.weightsHash). */
  model: string;
  template: string;
  /** The vector recipe the adapter was trained on (JSON). */
  vectorRecipe: string;
}

export function saveAdapter(file: string, a: Adapter, meta: AdapterMeta): void {
  const t: Record<string, { data: Float32Array; shape: number[] }> = { b: { data: Float32Array.from(a.b), shape: [a.d] } };
  if (a.kind === "scalar") t.s = { data: Float32Array.from(a.s), shape: [1] };
  else t.W = { data: Float32Array.from(a.W), shape: [a.d, a.d] };
  writeSafetensors(file, t, { format: "selfscope-selfie-adapter", kind: meta.kind, layer: String(meta.layer), model: meta.model, template: meta.template, vector_recipe: meta.vectorRecipe, d_model: String(a.d) });
}

/**
 * Read an adapter and check it against the model it will run on: the weights' hash and, when
 * `layer` is given, the layer. Every mismatch is an error naming the file.
 */
export function loadAdapter(file: string, model: Model, o: { layer?: number } = {}): { adapter: Adapter; meta: AdapterMeta } {
  if (!fs.existsSync(file)) throw new UsageError(`adapter file ${file} does not exist (train one with selfscope selfie-train)`);
  let set;
  try {
    set = readSafetensorsHeader(file);
  } catch (e) {
    throw new UsageError(`adapter file ${file} is not a readable safetensors file: ${(e as Error).message}`);
  }
  const m = set.metadata;
  if (m.format !== "selfscope-selfie-adapter") throw new UsageError(`${file} is not a SelfIE adapter (no format=selfscope-selfie-adapter in its metadata); train one with selfscope selfie-train`);
  const kind = m.kind;
  if (kind !== "scalar" && kind !== "full") throw new UsageError(`${file}: unknown adapter kind ${JSON.stringify(kind)} (scalar or full)`);
  const layer = Number(m.layer);
  const meta: AdapterMeta = { kind, layer, model: m.model ?? "", template: m.template ?? "", vectorRecipe: m.vector_recipe ?? "" };
  const hash = model.weightsHash();
  if (meta.model !== hash) throw new UsageError(`${file} was trained on another model (weights sha256 ${meta.model.slice(0, 12)}…, this model ${hash.slice(0, 12)}…): train an adapter for ${model.files.path}`);
  if (o.layer !== undefined && o.layer !== layer) throw new UsageError(`${file} was trained on layer ${layer} vectors, not layer ${o.layer}: pass --layer ${layer} or train an adapter for layer ${o.layer}`);
  const d = model.config.dModel;
  const b = readStTensor(set, "b");
  const head = readStTensor(set, kind === "scalar" ? "s" : "W");
  if (b.data.length !== d || head.data.length !== (kind === "scalar" ? 1 : d * d)) throw new UsageError(`${file}: tensor shapes do not fit d_model ${d}`);
  const a = identityAdapter(kind, d);
  a.b.set(b.data);
  (kind === "scalar" ? a.s : a.W).set(head.data);
  return { adapter: a, meta };
}
