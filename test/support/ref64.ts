// An independent float64 reference forward pass over the canonical host weights, used as the
// oracle for the engine's numerics and interventions. Deliberately naive: one sequence, no KV
// cache (attention recomputed over all earlier positions, O(T^2)), every op written as plain
// loops per position, so that it shares no code (and no bugs) with the jax-js engine. Only the
// data types of the plan and the host weights are imported.
//
// Hook points and intervention semantics follow src/hooks/plan.ts:
//   hook_embed, hook_pos_embed, blocks.{i}.{hook_resid_pre, attn.hook_q|k|v (before RoPE),
//   attn.hook_pattern (read only), attn.hook_z, hook_attn_out, hook_resid_mid, mlp.hook_pre,
//   mlp.hook_post, mlp.hook_down, hook_mlp_out, hook_resid_post}, ln_final.hook_normalized.
// Several ops at one site apply in plan order; a read records the value after them.
import type { PosSpec } from "../../src/hooks/plan.js";
import type { ModelConfig, NormSpec } from "../../src/engine/config.js";
import type { HostModel } from "../../src/model/load.js";

type Vec = ArrayLike<number>;
interface RefBase {
  at: string;
  pos?: PosSpec;
  rows?: number[];
}
/** The engine's intervention shapes, with payloads widened to any numeric array (float64 for finite differences). */
export type RefIntervention =
  | (RefBase & { op: "read" })
  | (RefBase & { op: "add"; vector: Vec; scale?: number })
  | (RefBase & { op: "project"; direction: Vec })
  | (RefBase & { op: "patch"; source: Vec })
  | (RefBase & { op: "ablate"; mode: "zero" | "mean"; mean?: Vec; heads?: number[] });
export type RefPlan = readonly RefIntervention[];

export interface RefOptions {
  /** Positions < promptLen are "prompt", the rest "generated" (default: the whole sequence is prompt). */
  promptLen?: number;
  /** Batch row this sequence stands for: interventions whose `rows` omit it are skipped. Unset: `rows` is ignored. */
  row?: number;
  /** Compute logits for the last position only (greedy decoding). */
  lastOnly?: boolean;
}

/** Row-major [positions, ...feature]; attn.hook_pattern is [query, head, key] like the engine's cache. */
export interface RefRead {
  data: Float64Array;
  shape: number[];
}

export interface RefResult {
  /** [T][dVocab] (just the last position with lastOnly). */
  logits: Float64Array[];
  reads: Map<string, RefRead>;
}

// ---------------------------------------------------------------- weights in float64

interface Lin {
  w: Float64Array;
  b: Float64Array | null;
  out: number;
  inp: number;
}
interface Norm {
  w: Float64Array;
  b: Float64Array | null;
}
interface Block {
  ln1: Norm;
  q: Lin;
  k: Lin;
  v: Lin;
  o: Lin;
  ln2: Norm;
  gate: Lin | null;
  up: Lin;
  down: Lin;
}
interface Weights64 {
  c: ModelConfig;
  embed: Float64Array;
  posEmbed: Float64Array | null;
  blocks: Block[];
  lnFinal: Norm;
  unembed: Float64Array;
  /** RoPE inverse frequencies (float64), or null for learned positions. */
  invFreq: Float64Array | null;
}

// Converting once per host model: the float32 -> float64 widening is exact.
const converted = new WeakMap<HostModel, Weights64>();

/**
 * The reference implements the plain pre-norm transformer (Llama, GPT-2 and kin). Anything else
 * is refused rather than approximated, so the oracle can never silently pass a wrong engine.
 */
function assertSupported(c: ModelConfig): void {
  const no: string[] = [];
  if (c.blockNorm !== "pre") no.push(`blockNorm ${c.blockNorm}`);
  if (c.qkNorm.kind !== "none") no.push(`qkNorm ${c.qkNorm.kind}`);
  if (c.attnSoftcap !== undefined || c.finalSoftcap !== undefined) no.push("soft-capping");
  if (c.layerTypes.some((t) => t !== "full")) no.push("sliding-window layers");
  if (no.length > 0) throw new Error(`ref64 does not implement ${no.join(", ")} (${c.family})`);
}

function weights64(host: HostModel): Weights64 {
  const hit = converted.get(host);
  if (hit) return hit;
  const c = host.config;
  assertSupported(c);
  const get = (name: string): Float64Array => {
    const t = host.weights.get(name);
    if (!t) throw new Error(`ref64: weight ${name} missing`);
    return Float64Array.from(t.data);
  };
  const opt = (name: string): Float64Array | null => (host.weights.has(name) ? get(name) : null);
  const lin = (p: string, out: number, inp: number): Lin => {
    const w = get(`${p}.weight`);
    if (w.length !== out * inp) throw new Error(`ref64: ${p}.weight has ${w.length} values, expected ${out}x${inp}`);
    return { w, b: opt(`${p}.bias`), out, inp };
  };
  const norm = (p: string): Norm => ({ w: get(`${p}.weight`), b: opt(`${p}.bias`) });
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
  const blocks: Block[] = [];
  for (let i = 0; i < c.nLayers; i++) {
    const b = `blocks.${i}`;
    blocks.push({
      ln1: norm(`${b}.ln1`),
      q: lin(`${b}.attn.q`, H * hd, D),
      k: lin(`${b}.attn.k`, K * hd, D),
      v: lin(`${b}.attn.v`, K * hd, D),
      o: lin(`${b}.attn.o`, D, H * hd),
      ln2: norm(`${b}.ln2`),
      gate: c.mlp.kind === "gated" ? lin(`${b}.mlp.gate`, F, D) : null,
      up: lin(`${b}.mlp.up`, F, D),
      down: lin(`${b}.mlp.down`, D, F),
    });
  }
  const embed = get("embed.weight");
  const w: Weights64 = {
    c,
    embed,
    posEmbed: c.pos.kind === "learned" ? get("posEmbed.weight") : null,
    blocks,
    lnFinal: norm("lnFinal"),
    unembed: c.tieEmbeddings ? embed : get("unembed.weight"),
    invFreq: invFreq64(c),
  };
  converted.set(host, w);
  return w;
}

/** inv_freq[i] = theta^(-2i/dHead), with llama.cpp freq factors and HF's linear / llama3 rescaling, in float64. */
function invFreq64(c: ModelConfig): Float64Array | null {
  if (c.pos.kind !== "rope") return null;
  const dim = c.dHead;
  const f = new Float64Array(dim / 2);
  for (let i = 0; i < f.length; i++) f[i] = Math.pow(c.pos.theta, -(2 * i) / dim);
  const ff = c.pos.freqFactors;
  if (ff) for (let i = 0; i < f.length; i++) f[i] = f[i]! / (ff[i] ?? 1);
  const s = c.pos.scaling;
  if (s.kind === "linear") for (let i = 0; i < f.length; i++) f[i] = f[i]! / s.factor;
  else if (s.kind === "llama3") {
    const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < f.length; i++) {
      const fr = f[i]!;
      const wavelen = (2 * Math.PI) / fr;
      if (wavelen < highWavelen) continue; // high frequencies unchanged
      if (wavelen > lowWavelen) f[i] = fr / s.factor;
      else {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f[i] = (1 - smooth) * (fr / s.factor) + smooth * fr;
      }
    }
  }
  return f;
}

// ---------------------------------------------------------------- primitives (float64)

function linear(l: Lin, x: Float64Array): Float64Array {
  const y = new Float64Array(l.out);
  for (let o = 0; o < l.out; o++) {
    let s = l.b ? l.b[o]! : 0;
    const r = o * l.inp;
    for (let i = 0; i < l.inp; i++) s += l.w[r + i]! * x[i]!;
    y[o] = s;
  }
  return y;
}

function normalize(spec: NormSpec, p: Norm, x: Float64Array): Float64Array {
  const n = x.length;
  const y = new Float64Array(n);
  if (spec.kind === "rms") {
    let ss = 0;
    for (let i = 0; i < n; i++) ss += x[i]! * x[i]!;
    const r = 1 / Math.sqrt(ss / n + spec.eps);
    for (let i = 0; i < n; i++) y[i] = x[i]! * r * (spec.weightOffset + p.w[i]!);
    return y;
  }
  let mu = 0;
  for (let i = 0; i < n; i++) mu += x[i]!;
  mu /= n;
  let v = 0;
  for (let i = 0; i < n; i++) v += (x[i]! - mu) ** 2;
  const r = 1 / Math.sqrt(v / n + spec.eps);
  for (let i = 0; i < n; i++) y[i] = (x[i]! - mu) * r * p.w[i]! + (p.b ? p.b[i]! : 0);
  return y;
}

/** erf in float64: Maclaurin series for |x| < 3, continued fraction for erfc beyond. */
function erf(x: number): number {
  const a = Math.abs(x);
  if (a < 3) {
    let term = a;
    let sum = a;
    for (let n = 1; n < 100; n++) {
      term *= (-a * a) / n;
      const add = term / (2 * n + 1);
      sum += add;
      if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
    }
    return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...)))), evaluated bottom-up.
  let f = a;
  for (let k = 60; k >= 1; k--) f = a + k / 2 / f;
  const erfc = Math.exp(-a * a) / Math.sqrt(Math.PI) / f;
  return Math.sign(x) * (1 - erfc);
}

function activate(kind: ModelConfig["mlp"]["act"], x: number): number {
  if (kind === "silu") return x / (1 + Math.exp(-x));
  if (kind === "gelu_tanh") return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
  return 0.5 * x * (1 + erf(x / Math.SQRT2));
}

/** Rotate-half RoPE in place on `nHeads` heads of `x`, for absolute position `pos`. */
function rope(x: Float64Array, nHeads: number, hd: number, invFreq: Float64Array, pos: number): void {
  const half = invFreq.length; // = hd / 2
  for (let h = 0; h < nHeads; h++) {
    const o = h * hd;
    for (let j = 0; j < half; j++) {
      const ang = pos * invFreq[j]!;
      const c = Math.cos(ang);
      const s = Math.sin(ang);
      const x1 = x[o + j]!;
      const x2 = x[o + j + half]!;
      x[o + j] = x1 * c - x2 * s;
      x[o + j + half] = x2 * c + x1 * s;
    }
  }
}

// ---------------------------------------------------------------- interventions

const BLOCK_SITES = new Set([
  "hook_resid_pre",
  "attn.hook_q",
  "attn.hook_k",
  "attn.hook_v",
  "attn.hook_pattern",
  "attn.hook_z",
  "hook_attn_out",
  "hook_resid_mid",
  "mlp.hook_pre",
  "mlp.hook_post",
  "mlp.hook_down",
  "hook_mlp_out",
  "hook_resid_post",
]);
const GLOBAL_SITES = new Set(["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"]);

interface Op {
  iv: RefIntervention;
  from: number;
  to: number;
  /** add: vector*scale; project: unit direction; ablate: replacement values. */
  vec: Float64Array | null;
}

/** Feature shape at a site: [heads, dHead] for q/k/v/z, [heads] per key for the pattern, else a vector. */
function siteShape(c: ModelConfig, site: string): number[] {
  if (site === "attn.hook_q" || site === "attn.hook_z") return [c.nHeads, c.dHead];
  if (site === "attn.hook_k" || site === "attn.hook_v") return [c.nKvHeads, c.dHead];
  if (site === "mlp.hook_pre" || site === "mlp.hook_post") return [c.dMlp];
  if (site === "attn.hook_pattern") return [c.nHeads];
  return [c.dModel];
}

function scopeOf(pos: PosSpec, promptLen: number): [number, number] {
  if (pos === "all") return [0, Infinity];
  if (pos === "prompt") return [0, promptLen];
  if (pos === "generated") return [promptLen, Infinity];
  if ("marker" in pos) throw new Error("ref64: resolve { marker } scopes to { from } in the test");
  return [pos.from, pos.to ?? Infinity];
}

/** Validate and group the plan by hook name. */
function prepare(c: ModelConfig, plan: RefPlan, promptLen: number, row: number | undefined): { ops: Map<string, Op[]>; reads: Set<string> } {
  const ops = new Map<string, Op[]>();
  const reads = new Set<string>();
  for (const iv of plan) {
    const m = /^blocks\.(\d+)\.(.+)$/.exec(iv.at);
    const site = m ? m[2]! : iv.at;
    if (m ? !BLOCK_SITES.has(site) || Number(m[1]) >= c.nLayers : !GLOBAL_SITES.has(site)) throw new Error(`ref64: bad hook ${iv.at}`);
    if (row !== undefined && iv.rows && !iv.rows.includes(row)) continue;
    if (iv.op === "read") {
      reads.add(iv.at);
      continue;
    }
    const shape = siteShape(c, site);
    const F = shape.reduce((a, b) => a * b, 1);
    const [from, to] = scopeOf(iv.pos ?? "all", promptLen);
    const need = (v: Vec): Float64Array => {
      if (v.length !== F) throw new Error(`ref64: ${iv.op} at ${iv.at} needs ${F} values, got ${v.length}`);
      return Float64Array.from(v);
    };
    let vec: Float64Array | null = null;
    if (iv.op === "add") {
      const s = iv.scale ?? 1;
      vec = need(iv.vector).map((x) => x * s);
    } else if (iv.op === "project") {
      vec = need(iv.direction);
      let n = 0;
      for (const x of vec) n += x * x;
      const inv = 1 / Math.sqrt(n);
      vec = vec.map((x) => x * inv);
    } else if (iv.op === "ablate") {
      vec = iv.mode === "zero" ? new Float64Array(F) : need(iv.mean ?? []);
    }
    const list = ops.get(iv.at) ?? [];
    list.push({ iv, from, to, vec });
    ops.set(iv.at, list);
  }
  return { ops, reads };
}

/** Apply the ops at hook `name` to the activation `x` of position `t` (in place). */
function applyOps(list: Op[] | undefined, x: Float64Array, t: number, headSize: number): void {
  for (const op of list ?? []) {
    if (t < op.from || t >= op.to) continue;
    const iv = op.iv;
    const F = x.length;
    if (iv.op === "add") for (let i = 0; i < F; i++) x[i] = x[i]! + op.vec![i]!;
    else if (iv.op === "project") {
      let d = 0;
      for (let i = 0; i < F; i++) d += x[i]! * op.vec![i]!;
      for (let i = 0; i < F; i++) x[i] = x[i]! - d * op.vec![i]!;
    } else if (iv.op === "patch") {
      // Source is [positions, feat] by absolute position; positions past its end keep their value.
      if ((t + 1) * F <= iv.source.length) for (let i = 0; i < F; i++) x[i] = iv.source[t * F + i]!;
    } else if (iv.op === "ablate") {
      const heads = iv.heads ?? null;
      for (let i = 0; i < F; i++) if (!heads || heads.includes(Math.floor(i / headSize))) x[i] = op.vec![i]!;
    }
  }
}

// ---------------------------------------------------------------- the forward pass

/** Forward one sequence in float64 with the plan applied; returns logits and the reads. */
export function ref64Forward(host: HostModel, ids: readonly number[], plan: RefPlan = [], opts: RefOptions = {}): RefResult {
  const W = weights64(host);
  const c = W.c;
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dVocab: V } = c;
  const T = ids.length;
  const { ops, reads } = prepare(c, plan, opts.promptLen ?? T, opts.row);
  const recorded = new Map<string, Float64Array[]>();
  // Run the ops of one hook at position t, then record the result if it is read.
  const hook = (name: string, x: Float64Array, t: number, headSize = x.length): Float64Array => {
    applyOps(ops.get(name), x, t, headSize);
    if (reads.has(name)) {
      const r = recorded.get(name) ?? [];
      r[t] = Float64Array.from(x);
      recorded.set(name, r);
    }
    return x;
  };

  const xs: Float64Array[] = [];
  for (let t = 0; t < T; t++) {
    const id = ids[t]!;
    if (!(id >= 0 && id < V)) throw new Error(`ref64: token ${id} outside the vocabulary`);
    const x = hook("hook_embed", W.embed.slice(id * D, (id + 1) * D).map((v) => v * c.embedScale), t);
    if (W.posEmbed) {
      if (t >= c.nCtx) throw new Error(`ref64: position ${t} beyond nCtx ${c.nCtx}`);
      const pe = hook("hook_pos_embed", W.posEmbed.slice(t * D, (t + 1) * D), t);
      for (let i = 0; i < D; i++) x[i] = x[i]! + pe[i]!;
    }
    xs.push(x);
  }

  const G = H / K;
  for (let l = 0; l < c.nLayers; l++) {
    const B = W.blocks[l]!;
    const p = `blocks.${l}.`;
    const qs: Float64Array[] = [];
    const ks: Float64Array[] = [];
    const vs: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const x = hook(p + "hook_resid_pre", xs[t]!, t);
      const h = normalize(c.norm, B.ln1, x);
      const q = hook(p + "attn.hook_q", linear(B.q, h), t, hd);
      const k = hook(p + "attn.hook_k", linear(B.k, h), t, hd);
      const v = hook(p + "attn.hook_v", linear(B.v, h), t, hd);
      if (W.invFreq) {
        // Hooks see q/k before RoPE (as in TransformerLens' llama); rotate copies.
        qs.push(q.slice());
        ks.push(k.slice());
        rope(qs[t]!, H, hd, W.invFreq, t);
        rope(ks[t]!, K, hd, W.invFreq, t);
      } else {
        qs.push(q);
        ks.push(k);
      }
      vs.push(v);
    }
    const readPattern = reads.has(p + "attn.hook_pattern");
    const pattern = readPattern ? new Float64Array(T * H * T) : null;
    for (let t = 0; t < T; t++) {
      // Causal attention of query t over keys 0..t; query head h reads kv head floor(h / G).
      const z = new Float64Array(H * hd);
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / G);
        const sc = new Float64Array(t + 1);
        let mx = -Infinity;
        for (let s = 0; s <= t; s++) {
          let d = 0;
          for (let j = 0; j < hd; j++) d += qs[t]![h * hd + j]! * ks[s]![kh * hd + j]!;
          sc[s] = d * c.attnScale;
          mx = Math.max(mx, sc[s]!);
        }
        let sum = 0;
        for (let s = 0; s <= t; s++) {
          sc[s] = Math.exp(sc[s]! - mx);
          sum += sc[s]!;
        }
        for (let s = 0; s <= t; s++) {
          const a = sc[s]! / sum;
          if (pattern) pattern[(t * H + h) * T + s] = a;
          for (let j = 0; j < hd; j++) z[h * hd + j] = z[h * hd + j]! + a * vs[s]![kh * hd + j]!;
        }
      }
      const zz = hook(p + "attn.hook_z", z, t, hd);
      const ao = hook(p + "hook_attn_out", linear(B.o, zz), t);
      const x = xs[t]!;
      for (let i = 0; i < D; i++) x[i] = x[i]! + ao[i]!;
      hook(p + "hook_resid_mid", x, t);
      const h2 = normalize(c.norm, B.ln2, x);
      let hidden: Float64Array;
      if (B.gate) {
        const pre = hook(p + "mlp.hook_pre", linear(B.gate, h2), t);
        const up = linear(B.up, h2);
        hidden = pre.map((g, i) => activate(c.mlp.act, g) * up[i]!);
      } else {
        const pre = hook(p + "mlp.hook_pre", linear(B.up, h2), t);
        hidden = pre.map((u) => activate(c.mlp.act, u));
      }
      hidden = hook(p + "mlp.hook_post", hidden, t);
      // Pre-norm only (checked above): the down projection is what the MLP adds, so hook_down then hook_mlp_out.
      const mo = hook(p + "hook_mlp_out", hook(p + "mlp.hook_down", linear(B.down, hidden), t), t);
      for (let i = 0; i < D; i++) x[i] = x[i]! + mo[i]!;
      hook(p + "hook_resid_post", x, t);
    }
    if (pattern) recorded.set(p + "attn.hook_pattern", [pattern]);
  }

  const logits: Float64Array[] = [];
  const unembed: Lin = { w: W.unembed, b: null, out: V, inp: D };
  for (let t = opts.lastOnly ? T - 1 : 0; t < T; t++) {
    const h = hook("ln_final.hook_normalized", normalize(c.norm, W.lnFinal, xs[t]!), t);
    logits.push(linear(unembed, h));
  }

  const out = new Map<string, RefRead>();
  for (const name of reads) {
    const per = recorded.get(name);
    if (!per) continue; // e.g. ln_final with lastOnly before the last position
    const site = /^blocks\.\d+\.(.+)$/.exec(name)?.[1] ?? name;
    if (site === "attn.hook_pattern") {
      out.set(name, { data: per[0]!, shape: [T, H, T] });
      continue;
    }
    const feat = siteShape(c, site);
    const F = feat.reduce((a, b) => a * b, 1);
    const present = per.filter((x): x is Float64Array => x !== undefined);
    const data = new Float64Array(present.length * F);
    present.forEach((x, i) => data.set(x, i * F));
    out.set(name, { data, shape: [present.length, ...feat] });
  }
  return { logits, reads: out };
}

/** First index of the maximum (ties go to the lower id, like the engine's argmax). */
export function argmax64(x: ArrayLike<number>): number {
  let bi = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[bi]!) bi = i;
  return bi;
}

/**
 * Greedy decoding by recomputing the whole sequence each step (no cache). Positions >= the
 * prompt length are "generated" for the plan's scopes.
 */
export function ref64Greedy(host: HostModel, prompt: readonly number[], n: number, plan: RefPlan = [], opts: Omit<RefOptions, "promptLen" | "lastOnly"> = {}): number[] {
  const ids = [...prompt];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const { logits } = ref64Forward(host, ids, plan, { ...opts, promptLen: prompt.length, lastOnly: true });
    const next = argmax64(logits[0]!);
    out.push(next);
    ids.push(next);
  }
  return out;
}

/** Sum of -log softmax(logits[i])[targets[i]] over targets >= 0, and how many there were. */
export function crossEntropySum(logits: readonly Float64Array[], targets: readonly number[]): { sum: number; n: number } {
  let sum = 0;
  let n = 0;
  targets.forEach((y, i) => {
    if (y < 0) return;
    const z = logits[i];
    if (!z) throw new Error(`crossEntropy: no logits for position ${i}`);
    let mx = -Infinity;
    for (const v of z) mx = Math.max(mx, v);
    let s = 0;
    for (const v of z) s += Math.exp(v - mx);
    sum += Math.log(s) + mx - z[y]!;
    n++;
  });
  return { sum, n };
}

/** Mean cross-entropy of `targets` (targets[i] is predicted by logits[i]; -1 = ignored). */
export function crossEntropy(logits: readonly Float64Array[], targets: readonly number[]): number {
  const { sum, n } = crossEntropySum(logits, targets);
  return sum / n;
}

/** Logits [T][V] flattened to one row-major array, for comparison with the engine's output. */
export function flat(rows: readonly Float64Array[]): Float64Array {
  const n = rows.reduce((a, r) => a + r.length, 0);
  const out = new Float64Array(n);
  let o = 0;
  for (const r of rows) {
    out.set(r, o);
    o += r.length;
  }
  return out;
}
