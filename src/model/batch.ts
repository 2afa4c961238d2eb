// Host-side batching shared by the engines: rows, left padding, positions, plan resolution and
// compilation into per-site host ops, attention masks, sampling. No device arrays here.
import { NumericalError, UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import { parseHook, type HookName } from "../hooks/names.js";
import { checkIntervention, patchOverrun, type Intervention, type Plan, type PosSpec } from "../hooks/plan.js";
import type { ModelConfig } from "./config.js";

/** Kinds of compiled site ops: add and project take per-row payloads, replace covers patch and ablate. */
export type OpKind = "add" | "project" | "replace";

/** KV-cache capacities are rounded up to this many slots (fewer distinct shapes to compile). */
export const CAPACITY_BUCKET = 64;

/** One row of a batch: token ids, plus the text they encode when markers must be resolved. */
export interface Row {
  ids: number[];
  /** Text the ids were made from (needed by { marker } positions). */
  text?: string;
}

/** Turns the text before a marker into its token count (the caller's tokenizer, same special-token handling). */
export type PrefixCounter = (textBefore: string) => number;

/** Activations read during a run: per hook, per row, row-major [positions, ...feature]. */
export class ActivationCache {
  /**
   * Per hook, per row: the pieces appended so far (one per decode step), joined on first get()
   * so a long generation that reads every step costs linear, not quadratic, copying.
   * Feature shapes are per row: attention patterns are [nHeads, T_b] for a ragged batch.
   */
  readonly entries = new Map<HookName, { parts: Float32Array[]; featShape: number[] }[]>();
  get(name: HookName, row = 0): { data: Float32Array; shape: number[] } {
    const e = this.entries.get(name);
    if (!e) throw new UsageError(`activation ${name} was not read in this run; add { op: "read", at: "${name}" } to the plan`);
    const r = e[row];
    if (!r) throw new UsageError(`activation ${name}: no row ${row}`);
    if (r.parts.length > 1) {
      const cat = new Float32Array(r.parts.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of r.parts) {
        cat.set(p, o);
        o += p.length;
      }
      r.parts = [cat];
    }
    const data = r.parts[0]!;
    const f = r.featShape.reduce((a, b) => a * b, 1);
    return { data, shape: [data.length / f, ...r.featShape] };
  }
  append(name: HookName, featShape: number[], row: number, data: Float32Array): void {
    let e = this.entries.get(name);
    if (!e) {
      e = [];
      this.entries.set(name, e);
    }
    const prev = e[row];
    if (!prev) e[row] = { parts: [data], featShape };
    else prev.parts.push(data);
  }
}

export interface ForwardOptions {
  plan?: Plan;
  /** Which logits to return: every position (default), the last only, or none. */
  logits?: "all" | "last" | "none";
  /** For { marker } positions. */
  countPrefix?: PrefixCounter;
}

export interface ForwardResult {
  /** Per row: [positions, dVocab] ("all") or [dVocab] ("last"). */
  logits: Float32Array[];
  cache: ActivationCache;
}

export interface SampleOptions {
  /** 0 = greedy (default). */
  temperature?: number;
  /** Keep the k best tokens (0 or absent: off). */
  topK?: number;
  /** Keep the shortest ranked prefix whose probability reaches p (1 or absent: off). */
  topP?: number;
  /** Keep tokens with probability >= minP times the best one's (0 or absent: off). */
  minP?: number;
  /** HF's repetition_penalty over the prompt and generated ids (1 or absent: off); applies when greedy too. */
  repetitionPenalty?: number;
  /** One seed, or one per row (a row's sample then does not depend on its batch mates). */
  seed?: number | number[];
}

export interface GenerateOptions extends SampleOptions {
  maxTokens: number;
  plan?: Plan;
  /** Stop tokens; default: the model's EOS ids. Pass [] to never stop early. */
  stop?: number[];
  countPrefix?: PrefixCounter;
  /** Called each time a step's logits reach the host: step 0 after the prompt, then once per token (progress, timing). */
  onStep?: (step: number) => void;
}

export interface GenerateResult {
  /** Generated ids per row (a stop token, when hit, is the last id). */
  tokens: number[][];
  stopReason: ("stop" | "length")[];
  cache: ActivationCache;
}

/** Internal: logits with NaN/Inf, caught by forward/generate and turned into a located NumericalError. */
export class NonFiniteLogits extends Error {
  constructor(
    readonly row: number,
    readonly value: number,
  ) {
    super("non-finite logits");
  }
}

/** An op compiled on the host, before its arrays are made (so same-kind ops can merge). */
export interface HostOp {
  kind: OpKind;
  v: Float32Array;
  vShape: number[];
  m: Float32Array;
  mShape: number[];
  rows: Set<number>;
}

/** Per-row position scope after resolution: [from, to) in absolute positions, or null (row untouched). */
export type Scope = { from: number; to: number } | null;

export interface Resolved {
  iv: Intervention;
  layer: number | null;
  site: string;
  featShape: number[];
  scopes: Scope[];
  /** Precomputed payload (scaled vector / unit direction / mean). */
  vec?: Float32Array;
}

/** Positions of one forward call: B rows × T slots, absolute position per slot (-1 = padding). */
export interface CallCtx {
  B: number;
  T: number;
  pos: Int32Array;
  /** Token id per slot (padding slots hold 0; they are masked). */
  ids: Int32Array;
}


export function featShapeOf(c: ModelConfig, site: string): number[] {
{
  switch (site) {
    case "attn.hook_q":
    case "attn.hook_z":
      return [c.nHeads, c.dHead];
    case "attn.hook_k":
    case "attn.hook_v":
      return [c.nKvHeads, c.dHead];
    case "mlp.hook_pre":
    case "mlp.hook_post":
      return [c.dMlp];
    case "attn.hook_pattern":
      return [c.nHeads];
    default:
      return [c.dModel];
  }
}
}

/**
 * Check and resolve a plan for one call. `fedBack`: generated tokens the call runs through the
 * model after the prompt (generate: maxTokens - 1; forward: 0), so row b runs positions
 * [0, promptLen[b] + fedBack).
 */
export function resolvePlan(c: ModelConfig, plan: Plan, rows: Row[], promptLen: number[], countPrefix: PrefixCounter | undefined, fedBack = 0): Resolved[] {
  return plan.map((iv, i) => {
    checkIntervention(iv, i);
    const { layer, site } = parseHook(iv.at, c.nLayers);
    if (site === "hook_pos_embed" && c.pos.kind !== "learned") throw new UsageError(`${iv.at}: this model has no learned position embedding`);
    const featShape = featShapeOf(c, site);
    const F = featShape.reduce((a, b) => a * b, 1);
    if (site === "attn.hook_pattern" && iv.op !== "read") throw new UsageError("attn.hook_pattern is read-only");
    const rowsSet = iv.rows ? new Set(iv.rows) : null;
    if (iv.rows?.some((r) => r < 0 || r >= rows.length)) throw new UsageError(`${iv.op} at ${iv.at}: rows ${iv.rows} out of range for a batch of ${rows.length}`);
    const scopes = rows.map((row, b) => (rowsSet && !rowsSet.has(b) ? null : scopeOf(iv.pos ?? "all", row, promptLen[b]!, countPrefix, iv.at)));
    const r: Resolved = { iv, layer, site, featShape, scopes };
    const need = (v: Float32Array, what: string) => {
      if (v.length !== F) throw new UsageError(`${iv.op} at ${iv.at}: ${what} has length ${v.length}, expected ${featShape.join("x")} = ${F}`);
      if (!v.every(Number.isFinite)) throw new NumericalError(`${iv.op} at ${iv.at}: ${what} contains NaN or Inf`);
    };
    if (iv.op === "add") {
      need(iv.vector, "vector");
      const s = iv.scale ?? 1;
      r.vec = iv.vector.map((x) => x * s);
      if (!r.vec.every(Number.isFinite)) throw new NumericalError(`add at ${iv.at}: vector × scale ${s} overflows float32`);
    } else if (iv.op === "project") {
      if (featShape.length !== 1) throw new UsageError(`project at ${iv.at}: only single-vector sites (resid, attn_out, mlp_out, mlp pre/post) take a direction`);
      need(iv.direction, "direction");
      let nrm = 0;
      for (const x of iv.direction) nrm += x * x;
      if (nrm === 0) throw new UsageError(`project at ${iv.at}: direction is zero`);
      if (iv.scale !== undefined && !Number.isFinite(iv.scale)) throw new NumericalError(`project at ${iv.at}: scale ${iv.scale} is not finite`);
      r.vec = iv.direction.map((x) => x / Math.sqrt(nrm));
    } else if (iv.op === "ablate") {
      if (iv.mode === "mean") {
        if (!iv.mean) throw new UsageError(`ablate mean at ${iv.at}: pass mean (the activation's mean, length ${F})`);
        need(iv.mean, "mean");
        r.vec = iv.mean;
      } else r.vec = new Float32Array(F);
      if (iv.heads) {
        if (featShape.length !== 2) throw new UsageError(`ablate at ${iv.at}: heads apply to attn.hook_q|k|v|z only`);
        if (iv.heads.some((h) => h < 0 || h >= featShape[0]!)) throw new UsageError(`ablate at ${iv.at}: heads ${iv.heads} out of range 0..${featShape[0]! - 1}`);
      }
    } else if (iv.op === "patch") {
      if (iv.source.length % F !== 0) throw new UsageError(`patch at ${iv.at}: source length ${iv.source.length} is not a multiple of ${F}`);
      if (rows.length > 1 && !iv.rows) throw new UsageError(`patch at ${iv.at}: in a batch, say which rows the source is for (rows: [b])`);
      const have = iv.source.length / F;
      scopes.forEach((s, b) => {
        const p = patchOverrun(s, promptLen[b]! + fedBack, have);
        if (p === null) return;
        const runs = fedBack > 0 ? `prompt and generated positions 0..${promptLen[b]! + fedBack - 1}` : `positions 0..${promptLen[b]! - 1}`;
        throw new UsageError(
          `patch at ${iv.at}: its scope reaches position ${p} of row ${b} (the call runs ${runs}) but the source holds positions 0..${have - 1} only; ` +
            `limit pos to { from, to: ${have} } or pass a source covering every position in scope`,
        );
      });
    }
    return r;
  });
}


/**
 * Compile the resolved plan into per-site host ops for one call and one group (a layer, the
 * embedding stage (null) or the final norm). Same-kind ops on disjoint rows merge into one.
 */
export function compileHost(resolved: Resolved[], ctx: CallCtx, promptLen: number[], group: number | null | "final"): { host: Map<string, HostOp[]>; reads: string[] } {
  const host = new Map<string, HostOp[]>();
  const reads = new Set<string>();
  const { B, T } = ctx;
  for (const r of resolved) {
    const inGroup = group === "final" ? r.site === "ln_final.hook_normalized" : group === null ? r.layer === null && r.site !== "ln_final.hook_normalized" : r.layer === group;
    if (!inGroup) continue;
    const iv = r.iv;
    if (iv.op === "read") {
      reads.add(r.site);
      continue;
    }
    const headMask = iv.op === "ablate" && iv.heads ? iv.heads : null;
    const maskShape = [B, T, ...(r.featShape.length === 2 ? [r.featShape[0]!, 1] : [1])];
    const m = scopeMask(r, ctx, promptLen, maskShape.slice(2), headMask);
    const rows = new Set(r.scopes.flatMap((s, b) => (s ? [b] : [])));
    const list = host.get(r.site) ?? [];
    host.set(r.site, list);
    if (iv.op === "add" || iv.op === "project") {
      // Per-row payload [B,1,...feat]: rows outside the scope get zeros (masked anyway).
      const F = r.vec!.length;
      // A weighted projection is the unit projection with its mask scaled.
      if (iv.op === "project" && iv.scale !== undefined) for (let i = 0; i < m.length; i++) m[i]! *= iv.scale;
      // A sweep puts one intervention per row: ops of one kind on disjoint rows merge into a
      // single op (sum of payloads and masks), so a batch of 32 steered rows costs one add.
      // Disjoint rows are still zero in the merged op, so merging writes only this op's rows.
      const last = list.at(-1);
      if (last && last.kind === iv.op && ![...rows].some((b) => last.rows.has(b))) {
        const per = m.length / B;
        for (const b of rows) {
          last.v.set(r.vec!, b * F);
          for (let i = b * per; i < (b + 1) * per; i++) last.m[i] = m[i]!;
          last.rows.add(b);
        }
      } else {
        const v = new Float32Array(B * F);
        for (const b of rows) v.set(r.vec!, b * F);
        list.push({ kind: iv.op, v, vShape: [B, 1, ...r.featShape], m, mShape: maskShape, rows });
      }
    } else if (iv.op === "ablate") {
      list.push({ kind: "replace", v: r.vec!, vShape: [1, 1, ...r.featShape], m, mShape: maskShape, rows });
    } else {
      const F = r.featShape.reduce((a, b) => a * b, 1);
      const src = iv.source;
      const v = new Float32Array(B * T * F);
      for (let b = 0; b < B; b++)
        for (let t = 0; t < T; t++) {
          const p = ctx.pos[b * T + t]!;
          if (p >= 0 && (p + 1) * F <= src.length) v.set(src.subarray(p * F, (p + 1) * F), (b * T + t) * F);
          else m.fill(0, (b * T + t) * (m.length / (B * T)), (b * T + t + 1) * (m.length / (B * T))); // padding, or out of scope (resolvePlan keeps scopes within the source)
        }
      list.push({ kind: "replace", v, vShape: [B, T, ...r.featShape], m, mShape: maskShape, rows });
    }
  }
  return { host, reads: [...reads].sort() };
}

// ---------------------------------------------------------------- host helpers

export function asRow(r: Row | number[]): Row {
  return Array.isArray(r) ? { ids: r } : r;
}

export function padShape(rows: Row[]): { B: number; T: number; pad: number[] } {
  if (rows.length === 0) throw new UsageError("empty batch");
  const T = Math.max(...rows.map((r) => r.ids.length));
  if (T === 0) throw new UsageError("every row is empty");
  return { B: rows.length, T, pad: rows.map((r) => T - r.ids.length) };
}

export function fullCtx(rows: Row[], B: number, T: number, pad: number[]): CallCtx {
  return sliceCtx(rows, pad, 0, T, B);
}

/** Slots start..start+n-1 of a left-padded batch. */
export function sliceCtx(rows: Row[], pad: number[], start: number, n: number, B = rows.length): CallCtx {
  const pos = new Int32Array(B * n);
  const ids = new Int32Array(B * n);
  for (let b = 0; b < B; b++)
    for (let t = 0; t < n; t++) {
      const p = start + t - pad[b]!;
      pos[b * n + t] = p;
      if (p >= 0) ids[b * n + t] = rows[b]!.ids[p]!;
    }
  return { B, T: n, pos, ids };
}

export function lastCtx(B: number, T: number, pad: number[]): CallCtx {
  const pos = new Int32Array(B);
  for (let b = 0; b < B; b++) pos[b] = T - 1 - pad[b]!;
  return { B, T: 1, pos, ids: new Int32Array(B) };
}

export function sliceRow(lg: Float32Array, b: number, T: number, pad: number, V: number): Float32Array {
  return lg.subarray((b * T + pad) * V, (b + 1) * T * V);
}

/**
 * mask[b, t, s]: key slot s visible to query slot t. Causal, never a padding key — except a
 * padding query sees itself, so no softmax row is all -inf (which would give NaN).
 */
export function attnMaskHost(ctx: CallCtx, pad: number[], S: number, slot0: number, window: number | undefined): Int32Array {
  const { B, T } = ctx;
  const m = new Int32Array(B * T * S);
  const w = window ?? Infinity;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++) {
      const qSlot = slot0 + t;
      // Slots and positions differ by the row's padding only, so slot distance = position distance.
      for (let s = Math.max(0, qSlot - w + 1); s <= qSlot; s++) if (s >= pad[b]! || s === qSlot) m[(b * T + t) * S + s] = 1;
    }
  return m;
}



export function scopeOf(spec: PosSpec, row: Row, promptLen: number, countPrefix: PrefixCounter | undefined, at: string): Scope {
  if (spec === "all") return { from: 0, to: Infinity };
  if (spec === "prompt") return { from: 0, to: promptLen };
  if (spec === "generated") return { from: promptLen, to: Infinity };
  if ("marker" in spec) {
    if (row.text === undefined || !countPrefix) throw new UsageError(`${at}: a { marker } position needs the row's text and a tokenizer`);
    const i = row.text.indexOf(spec.marker);
    if (i < 0) throw new UsageError(`${at}: marker ${JSON.stringify(spec.marker)} not found in the prompt text`);
    const from = countPrefix(row.text.slice(0, i)) + (spec.offset ?? 0);
    if (from < 0) throw new UsageError(`${at}: marker ${JSON.stringify(spec.marker)} with offset ${spec.offset} resolves before the first token`);
    return { from, to: spec.to ?? Infinity };
  }
  if (!(spec.from >= 0)) throw new UsageError(`${at}: position from=${spec.from} must be >= 0`);
  return { from: spec.from, to: spec.to ?? Infinity };
}

/** Float 0/1 mask [B*T*(heads)] for an intervention in a call. */
export function scopeMask(r: Resolved, ctx: CallCtx, _promptLen: number[], maskShape: number[], heads: number[] | null = null): Float32Array {
  const { B, T } = ctx;
  const N = maskShape.length === 2 ? maskShape[0]! : 1;
  const m = new Float32Array(B * T * N);
  for (let b = 0; b < B; b++) {
    const s = r.scopes[b];
    if (!s) continue;
    for (let t = 0; t < T; t++) {
      const p = ctx.pos[b * T + t]!;
      if (p < 0 || p < s.from || p >= s.to) continue;
      for (let h = 0; h < N; h++) if (!heads || heads.includes(h)) m[(b * T + t) * N + h] = 1;
    }
  }
  return m;
}

// ---------------------------------------------------------------- sampling

/**
 * The engine-independent part of generate(): the checks and shapes of the call, per-row
 * sampling and stop handling, and each decode step's positions. An engine prefills, then loops
 * `for (let st = d.next(logits); st; st = d.next(logits))` running one slot per row.
 */
export class Decoder {
  readonly rows: Row[];
  readonly B: number;
  readonly T: number;
  readonly pad: number[];
  readonly promptLen: number[];
  readonly resolved: Resolved[];
  /** KV-cache slots (capacity buckets keep the number of distinct shapes small). */
  readonly cap: number;
  readonly tokens: number[][];
  readonly stopReason: ("stop" | "length")[];
  private readonly done: boolean[];
  private readonly samplers: Sampler[];
  private readonly stop: Set<number>;
  private step = 0;

  constructor(
    c: ModelConfig,
    rows: (Row | number[])[],
    private readonly opts: GenerateOptions,
  ) {
    const rs = (this.rows = rows.map(asRow));
    if (rs.some((r) => r.ids.length === 0)) throw new UsageError("generate: every row needs at least one token (start from BOS)");
    const { B, T, pad } = padShape(rs);
    this.B = B;
    this.T = T;
    this.pad = pad;
    this.promptLen = rs.map((r) => r.ids.length);
    this.resolved = resolvePlan(c, opts.plan ?? [], rs, this.promptLen, opts.countPrefix, Math.max(0, opts.maxTokens - 1));
    if (this.resolved.some((r) => r.site === "attn.hook_pattern")) throw new UsageError("attn.hook_pattern can be read with forward(), not during generate()");
    this.cap = Math.ceil((T + opts.maxTokens) / CAPACITY_BUCKET) * CAPACITY_BUCKET;
    this.stop = new Set(opts.stop ?? c.eosTokenIds);
    const seed = opts.seed ?? 0;
    const seeds = Array.isArray(seed) ? seed : rs.map((_, b) => seed + b);
    if (seeds.length !== B) throw new UsageError(`generate: ${seeds.length} seeds for ${B} rows`);
    this.samplers = seeds.map((s) => new Sampler(opts, s));
    this.tokens = rs.map(() => []);
    this.done = rs.map(() => false);
    this.stopReason = rs.map(() => "length");
  }

  /** Nothing to generate (maxTokens <= 0): skip the prefill. */
  get empty(): boolean {
    return this.opts.maxTokens <= 0;
  }

  /**
   * Sample every unfinished row from this step's logits [B, V] and record the tokens. Returns
   * the next decode call — one slot for every row (finished rows run along; their output is
   * ignored) — or null when every row has stopped.
   */
  next(logits: Float32Array): { ctx: CallCtx; slot: number } | null {
    const V = logits.length / this.B;
    const pen = (this.opts.repetitionPenalty ?? 1) !== 1;
    const ids = this.rows.map((r, b) => (this.done[b] ? 0 : this.samplers[b]!.sample(logits.subarray(b * V, (b + 1) * V), pen ? [...r.ids, ...this.tokens[b]!] : undefined)));
    ids.forEach((t, b) => {
      if (this.done[b]) return;
      this.tokens[b]!.push(t);
      if (this.stop.has(t)) {
        this.done[b] = true;
        this.stopReason[b] = "stop";
      } else if (this.tokens[b]!.length >= this.opts.maxTokens) this.done[b] = true;
    });
    if (this.done.every(Boolean)) return null;
    const slot = this.T + this.step++;
    const pos = new Int32Array(this.B);
    for (let b = 0; b < this.B; b++) pos[b] = slot - this.pad[b]!;
    return { ctx: { B: this.B, T: 1, pos, ids: Int32Array.from(ids) }, slot };
  }

  /** Steps decoded so far (for GenerateOptions.onStep). */
  get steps(): number {
    return this.step;
  }

  result(cache: ActivationCache): GenerateResult {
    return { tokens: this.tokens, stopReason: this.stopReason, cache };
  }
}

/**
 * Greedy / temperature / top-k / top-p / min-p sampling with a per-row seeded generator, in HF
 * `generate`'s order: repetition penalty on the raw logits, then temperature, top-k, top-p, min-p.
 * Candidates are ranked by (logit descending, index ascending); top-k keeps exactly k of them (HF keeps
 * every token tied with the k-th). Only the ranked prefix a draw needs is sorted (partial selection):
 * a token costs O(V) plus O(m log m) for the m candidates it reaches, never a sort of the vocabulary.
 */
export class Sampler {
  private rng: Rng;
  private idx = new Int32Array(0);
  private scratch = new Float32Array(0);
  constructor(
    private o: SampleOptions,
    seed: number,
  ) {
    this.rng = new Rng(seed);
  }
  /** `context`: the ids so far (prompt and generated), needed only for a repetition penalty. */
  sample(logits: Float32Array, context?: ArrayLike<number>): number {
    const c = this.candidates(logits, context);
    if (!c) return argmax(this.penalized(logits, context));
    const { idx, k, x, z, need } = c;
    if (c.kept !== null) {
      const n = c.kept;
      let z2 = 0;
      for (let r = 0; r < n; r++) z2 += x(r) / z;
      let u = this.rng.next();
      for (let r = 0; r < n; r++) {
        u -= x(r) / z / z2;
        if (u < 0) return idx[r]!;
      }
      return idx[n - 1]!;
    }
    let u = this.rng.next();
    for (let r = 0; r < k; r++) {
      need(r);
      u -= x(r) / z;
      if (u < 0) return idx[r]!;
    }
    need(k - 1);
    return idx[k - 1]!;
  }

  /** The tokens a draw can return, best first (one, the argmax, when greedy). Draws nothing from the generator. */
  support(logits: Float32Array, context?: ArrayLike<number>): number[] {
    const c = this.candidates(logits, context);
    if (!c) return [argmax(this.penalized(logits, context))];
    const n = c.kept ?? c.k;
    c.need(n - 1);
    return Array.from(c.idx.subarray(0, n));
  }

  private penalized(logits: Float32Array, context?: ArrayLike<number>): Float32Array {
    const penalty = this.o.repetitionPenalty ?? 1;
    return penalty !== 1 && context ? this.penalize(logits, context, penalty) : logits;
  }

  /**
   * Rank the candidates lazily: idx[0, sorted) is ranked, idx[sorted, k) holds the rest of the top k
   * unordered, and need(r) ranks on to r. `kept`: the prefix top-p / min-p keep (null: neither is on).
   */
  private candidates(logitsIn: Float32Array, context?: ArrayLike<number>) {
    const temp = this.o.temperature ?? 0;
    if (temp <= 0) return null;
    const logits = this.penalized(logitsIn, context);
    const V = logits.length;
    if (this.idx.length !== V) this.idx = new Int32Array(V);
    const idx = this.idx;
    for (let i = 0; i < V; i++) idx[i] = i;
    const k = this.o.topK && this.o.topK > 0 ? Math.min(this.o.topK, V) : V;
    const mx = logits[argmax(logits)]!;
    const x = (r: number) => Math.exp((logits[idx[r]!]! - mx) / temp);
    let sorted = 0;
    let chunk = 256;
    const need = (r: number) => {
      while (r >= sorted) {
        const m = Math.min(chunk, k - sorted);
        if (m < k - sorted) selectTop(logits, idx, sorted, k, m);
        sortRange(logits, idx, sorted, sorted + m);
        sorted += m;
        chunk *= 2;
      }
    };
    let z = 0;
    if (k < V) {
      selectTop(logits, idx, 0, V, k);
      sortRange(logits, idx, 0, k);
      sorted = k;
      for (let r = 0; r < k; r++) z += x(r);
    } else for (let i = 0; i < V; i++) z += Math.exp((logits[i]! - mx) / temp);
    const topP = this.o.topP ?? 1;
    const minP = this.o.minP ?? 0;
    let kept: number | null = null;
    if (topP < 1 || minP > 0) {
      // Both keep a prefix of the ranking: top-p the shortest reaching mass topP, min-p those with
      // p >= minP * p(best); the draw renormalises over what is kept.
      let keep = 0;
      let cum = 0;
      need(0);
      const pMin = minP * (x(0) / z);
      while (keep < k) {
        need(keep);
        const p = x(keep) / z;
        if (cum >= topP || p < pMin) break;
        cum += p;
        keep++;
      }
      kept = Math.max(1, keep);
    }
    return { idx, k, x, z, need, kept };
  }

  /** HF's RepetitionPenaltyLogitsProcessor: every id seen so far has its logit divided by the penalty (multiplied when negative). */
  private penalize(logits: Float32Array, context: ArrayLike<number>, penalty: number): Float32Array {
    if (this.scratch.length !== logits.length) this.scratch = new Float32Array(logits.length);
    const s = this.scratch;
    s.set(logits);
    for (let i = 0; i < context.length; i++) {
      const t = context[i]!;
      if (t < 0 || t >= s.length) continue;
      const l = logits[t]!;
      s[t] = l < 0 ? l * penalty : l / penalty;
    }
    return s;
  }
}

/** a ranks before b: higher logit, then lower index (a total order, so selections are deterministic). */
function before(l: Float32Array, a: number, b: number): boolean {
  const x = l[a]!, y = l[b]!;
  return x > y || (x === y && a < b);
}

function sortRange(l: Float32Array, idx: Int32Array, lo: number, hi: number): void {
  idx.subarray(lo, hi).sort((a, b) => (l[a]! > l[b]! ? -1 : l[a]! < l[b]! ? 1 : a - b));
}

/**
 * Reorder idx[lo, hi) so that its m best-ranked entries come first (unordered): quickselect with a
 * median-of-three pivot, expected O(hi - lo); a sort of what is left if it degenerates.
 */
function selectTop(l: Float32Array, idx: Int32Array, lo: number, hi: number, m: number): void {
  const t = lo + m;
  let a = lo, b = hi - 1;
  let budget = 2 * Math.ceil(Math.log2(hi - lo + 1)) + 16;
  const swap = (i: number, j: number) => {
    const v = idx[i]!;
    idx[i] = idx[j]!;
    idx[j] = v;
  };
  while (b > a) {
    if (budget-- === 0) return sortRange(l, idx, a, b + 1);
    const mid = (a + b) >>> 1;
    if (before(l, idx[mid]!, idx[a]!)) swap(a, mid);
    if (before(l, idx[b]!, idx[a]!)) swap(a, b);
    if (before(l, idx[b]!, idx[mid]!)) swap(mid, b);
    swap(mid, b);
    const pv = idx[b]!;
    let s = a;
    for (let i = a; i < b; i++) if (before(l, idx[i]!, pv)) swap(i, s++);
    swap(s, b);
    if (s === t) return;
    if (s < t) a = s + 1;
    else b = s - 1;
  }
}

export function argmax(x: Float32Array): number {
  let bi = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[bi]!) bi = i;
  return bi;
}


/**
 * Re-run one row reading every block-boundary site and name the first that holds NaN/Inf
 * (NaN in weights, or an intervention scale that overflowed), so the error says where.
 */
export async function locateNonFinite(
  c: ModelConfig,
  forward: (rows: Row[], opts: ForwardOptions) => Promise<ForwardResult>,
  row: Row,
  opts: ForwardOptions,
  e: NonFiniteLogits,
): Promise<NumericalError> {
  const sites: HookName[] = ["hook_embed"];
  for (let l = 0; l < c.nLayers; l++) for (const s of ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"] as const) sites.push(`blocks.${l}.${s}`);
  const plan: Intervention[] = [...(opts.plan ?? []).map((iv) => ({ ...iv, rows: [0] })), ...sites.map((at) => ({ op: "read" as const, at }))];
  let where = "the final norm or unembedding";
  try {
    const { cache } = await forward([row], { ...opts, plan, logits: "none" });
    for (const at of sites) {
      const { data, shape } = cache.get(at);
      const i = data.findIndex((x) => !Number.isFinite(x));
      if (i >= 0) {
        where = `${at} (position ${Math.floor(i / (shape[1] ?? 1))}, value ${data[i]})`;
        break;
      }
    }
  } catch {
    where = "(could not re-run to locate it)";
  }
  return new NumericalError(
    `non-finite logits (${e.value}) in batch row ${e.row}: the first non-finite activation is at ${where}; ` +
      `check the model file for NaN/Inf weights and any intervention vector or scale`,
  );
}

/** Rows whose plan applies to batch row `row`, renumbered as row 0 (to re-run that row alone). */
export function planForRow(plan: Plan, row: number): Intervention[] {
  return plan.filter((iv) => !iv.rows || iv.rows.includes(row)).map((iv) => ({ ...iv, rows: [0] }));
}
