// The engine-independent part of generate(): per-row sampling, stops and each decode step's positions.
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import type { ModelConfig } from "./config.js";
import { asRow, padShape, resolvePlan, type CallCtx, type Resolved } from "./plan.js";
import type { ActivationCache } from "./cache.js";
import type { GenerateOptions, GenerateResult, Row, SampleOptions } from "./types.js";

/** KV-cache capacities are rounded up to this many slots (fewer distinct shapes to compile). */
export const CAPACITY_BUCKET = 64;


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


