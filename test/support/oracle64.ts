// The float64 oracle: one independent reference forward pass for every family, taking the same
// plans as the engines. Deliberately naive: one sequence, no KV cache (attention recomputed over
// every earlier position, O(T^2)), every op written as plain loops per position, so that it shares
// no code (and no bugs) with either engine backend, src/engine/schedule.ts or src/engine/rope.ts.
// Only types (the plan's PosSpec, ModelConfig, HostModel) are imported from src/.
//
// Quirks: pre / sandwich / post-only norms, RMSNorm with (1 + w), LayerNorm with bias, qk-norm per
// head and over the whole projection, GQA, q/k/v and all-linear biases, embedding scale, attention
// and final soft-capping, sliding-window layers with their own (unscaled) RoPE base, linear /
// llama3 / per-frequency RoPE scaling, learned positions, tied embeddings, gated and plain MLPs
// with silu / gelu_tanh / exact-erf gelu.
//
// Hook sites (TransformerLens names), in the order one block fires them:
//   hook_embed, hook_pos_embed (learned positions), then per block
//   hook_resid_pre, ln1.hook_normalized (the attention input: ln1(x), or a copy of x without a
//   pre-norm), attn.hook_q|k|v (after qk-norm, before RoPE), attn.hook_pattern (read-only,
//   [query, head, key]), attn.hook_z, attn.hook_result ([nHeads, dModel]: z_h·W_O[:, h]ᵀ per head,
//   before the sum, without the o bias, before ln1Post), hook_attn_out (ln1Post(Σ_h result_h + b_O)),
//   hook_resid_mid, ln2.hook_normalized, mlp.hook_pre, mlp.hook_post, mlp.hook_down (the down
//   projection incl. bias, before ln2Post), hook_mlp_out, hook_resid_post;
//   then ln_final.hook_normalized.
// Several ops at one site apply in plan order; a read records the value after them (reads ignore
// `rows`, as in the engines: every row is read).
//
// Ops (src/hooks/plan.ts): add x += scale·v; project x -= scale·(x·u)u with u = direction/|direction|
// (single-vector sites only); patch x = source[t] (source row-major [positions, ...feature] by
// absolute position t; a position in scope without a stored value is an error); ablate x = 0 or
// mean, restricted to `heads` on [heads, ...] sites. Scopes: "all", "prompt" (t < promptLen),
// "generated" (t >= promptLen), { from, to }, { marker, offset, to } (needs opts.text and
// opts.countPrefix: from = countPrefix(text before the marker) + offset).
//
// LoRA (opts.lora): y = x·(W + scale·B·A)ᵀ (+ bias) on the named linear layer, A [rank, in],
// B [out, rank]. On attn.o the per-head result includes the adapter's per-head share
// scale·B·(A[:, head h] z_h).
//
// `gelu: "ggml-f16"` reproduces llama.cpp's CPU GELU instead of the exact tanh formula: ggml's
// ggml_vec_gelu_f32 / ggml_vec_geglu_f32 (ggml/src/ggml-cpu/vec.h, GGML_GELU_FP16 defined) round
// the input to f16 and look the result up in a table of f16 values, gelu(x) = f16(gelu(f16(x)))
// for -10 < x < 10 (0 below, x above). That is a ~5e-4 relative error per activation, which is why
// GELU families cannot match llama.cpp to 1e-4 with an exact GELU. It applies to gelu_tanh MLPs.
import { f16round } from "@petamoriken/float16";
import type { PosSpec } from "../../src/hooks/plan.js";
import type { ModelConfig, NormSpec } from "../../src/engine/config.js";
import type { HostModel } from "../../src/model/load.js";

type Vec = ArrayLike<number>;
interface OracleBase {
  at: string;
  pos?: PosSpec;
  rows?: number[];
}
/** The engine's intervention shapes, with payloads widened to any numeric array (float64 for finite differences). */
export type OracleIntervention =
  | (OracleBase & { op: "read" })
  | (OracleBase & { op: "add"; vector: Vec; scale?: number })
  | (OracleBase & { op: "project"; direction: Vec; scale?: number })
  | (OracleBase & { op: "patch"; source: Vec })
  | (OracleBase & { op: "ablate"; mode: "zero" | "mean"; mean?: Vec; heads?: number[] });
export type OraclePlan = readonly OracleIntervention[];

/** The linear layers an adapter can sit on. */
export type LoraLinear = "attn.q" | "attn.k" | "attn.v" | "attn.o" | "mlp.gate" | "mlp.up" | "mlp.down";

/** A low-rank adapter: W' = W + scale·B·A, A row-major [rank, in], B row-major [out, rank]. */
export interface OracleLora {
  layer: number;
  linear: LoraLinear;
  a: Vec;
  b: Vec;
  rank: number;
  /** Default 1. */
  scale?: number;
}

export interface OracleOptions {
  /** Positions < promptLen are "prompt", the rest "generated" (default: the whole sequence is prompt). */
  promptLen?: number;
  /** Batch row this sequence stands for: interventions whose `rows` omit it are skipped. Unset: `rows` is ignored. */
  row?: number;
  /** Compute logits (and ln_final) for the last position only (greedy decoding). */
  lastOnly?: boolean;
  /** The row's text and a prefix token counter, for { marker } scopes. */
  text?: string;
  countPrefix?: (prefix: string) => number;
  /** "exact" (default): gelu_tanh in float64 (transformers); "ggml-f16": llama.cpp's CPU table. */
  gelu?: "exact" | "ggml-f16";
  /** Low-rank adapters on linear layers. */
  lora?: readonly OracleLora[];
}

/** Row-major [positions, ...feature]; attn.hook_pattern is [query, head, key] like the engine's cache. */
export interface OracleRead {
  data: Float64Array;
  shape: number[];
}

export interface OracleResult {
  /** [T][dVocab] (just the last position with lastOnly). */
  logits: Float64Array[];
  reads: Map<string, OracleRead>;
}

/** Block sites in firing order (written out here, not imported, so the oracle stays independent). */
export const ORACLE_BLOCK_SITES = [
  "hook_resid_pre",
  "ln1.hook_normalized",
  "attn.hook_q",
  "attn.hook_k",
  "attn.hook_v",
  "attn.hook_pattern",
  "attn.hook_z",
  "attn.hook_result",
  "hook_attn_out",
  "hook_resid_mid",
  "ln2.hook_normalized",
  "mlp.hook_pre",
  "mlp.hook_post",
  "mlp.hook_down",
  "hook_mlp_out",
  "hook_resid_post",
] as const;
/** A mixture-of-experts block's MLP sites (instead of mlp.hook_pre / mlp.hook_post). */
export const ORACLE_MOE_SITES = ["mlp.hook_router_logits", "mlp.hook_expert_weights", "mlp.hook_expert_out"] as const;
const GLOBAL_SITES = new Set(["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"]);

/** Feature shape at a site: [heads, dHead] for q/k/v/z, [heads, dModel] for result, [heads] per key for the pattern, else a vector. */
export function oracleFeatShape(c: ModelConfig, site: string): number[] {
  if (site === "attn.hook_q" || site === "attn.hook_z") return [c.nHeads, c.dHead];
  if (site === "attn.hook_k" || site === "attn.hook_v") return [c.nKvHeads, c.dHead];
  if (site === "attn.hook_result") return [c.nHeads, c.dModel];
  if (site === "mlp.hook_pre" || site === "mlp.hook_post") return [c.dMlp];
  if (site === "attn.hook_pattern") return [c.nHeads];
  if (c.mlp.kind === "moe" && (site === "mlp.hook_router_logits" || site === "mlp.hook_expert_weights")) return [c.mlp.nExperts];
  if (c.mlp.kind === "moe" && site === "mlp.hook_expert_out") return [c.mlp.nExperts, c.dModel];
  return [c.dModel];
}

// ---------------------------------------------------------------- weights in float64

// The float32 -> float64 widening is exact; converted once per host model and tensor.
const converted = new WeakMap<HostModel, Map<string, Float64Array>>();

function weightGetter(host: HostModel): { get: (name: string) => Float64Array; opt: (name: string) => Float64Array | null } {
  let m = converted.get(host);
  if (!m) converted.set(host, (m = new Map()));
  const cache = m;
  const opt = (name: string): Float64Array | null => {
    const hit = cache.get(name);
    if (hit) return hit;
    const t = host.weights.get(name);
    if (!t) return null;
    const w = Float64Array.from(t.data);
    cache.set(name, w);
    return w;
  };
  const get = (name: string): Float64Array => {
    const w = opt(name);
    if (!w) throw new Error(`oracle64: weight ${name} missing`);
    return w;
  };
  return { get, opt };
}

interface Lora64 {
  a: Float64Array;
  b: Float64Array;
  rank: number;
  scale: number;
}
interface Lin {
  w: Float64Array;
  b: Float64Array | null;
  out: number;
  inp: number;
  lora: Lora64[];
}

/** y = W x (+ b) (+ Σ scale·B(A x)). */
function linear(l: Lin, x: Float64Array): Float64Array {
  const y = new Float64Array(l.out);
  for (let o = 0; o < l.out; o++) {
    let s = l.b ? l.b[o]! : 0;
    const r = o * l.inp;
    for (let i = 0; i < l.inp; i++) s += l.w[r + i]! * x[i]!;
    y[o] = s;
  }
  for (const ad of l.lora) {
    const ax = new Float64Array(ad.rank);
    for (let k = 0; k < ad.rank; k++) {
      let s = 0;
      for (let i = 0; i < l.inp; i++) s += ad.a[k * l.inp + i]! * x[i]!;
      ax[k] = s;
    }
    for (let o = 0; o < l.out; o++) {
      let s = 0;
      for (let k = 0; k < ad.rank; k++) s += ad.b[o * ad.rank + k]! * ax[k]!;
      y[o] = y[o]! + ad.scale * s;
    }
  }
  return y;
}

function normalize(spec: NormSpec, w: Float64Array, b: Float64Array | null, x: Float64Array): Float64Array {
  const n = x.length;
  if (w.length !== n) throw new Error(`oracle64: norm weight has ${w.length} values for a vector of ${n}`);
  const y = new Float64Array(n);
  if (spec.kind === "rms") {
    let ss = 0;
    for (let i = 0; i < n; i++) ss += x[i]! * x[i]!;
    const r = 1 / Math.sqrt(ss / n + spec.eps);
    for (let i = 0; i < n; i++) y[i] = x[i]! * r * (spec.weightOffset + w[i]!);
    return y;
  }
  let mu = 0;
  for (let i = 0; i < n; i++) mu += x[i]!;
  mu /= n;
  let v = 0;
  for (let i = 0; i < n; i++) v += (x[i]! - mu) ** 2;
  const r = 1 / Math.sqrt(v / n + spec.eps);
  for (let i = 0; i < n; i++) y[i] = (x[i]! - mu) * r * w[i]! + (b ? b[i]! : 0);
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

const geluTanh = (x: number): number => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));

function ggmlGelu(x: number): number {
  if (x <= -10) return 0;
  if (x >= 10) return x;
  return f16round(geluTanh(f16round(x)));
}

function activation(c: ModelConfig, gelu: OracleOptions["gelu"]): (x: number) => number {
  const act = c.mlp.act;
  if (act === "silu") return (x) => x / (1 + Math.exp(-x));
  if (act === "gelu_tanh") return gelu === "ggml-f16" ? ggmlGelu : geluTanh;
  return (x) => 0.5 * x * (1 + erf(x / Math.SQRT2));
}

/** inv_freq[i] = theta^(-2i/dHead); global layers get llama.cpp freq factors and linear / llama3 rescaling, local ones their own base unscaled. */
function invFreq64(c: ModelConfig, local: boolean): Float64Array | null {
  if (c.pos.kind !== "rope") return null;
  const dim = c.dHead;
  const f = new Float64Array(dim / 2);
  const useLocal = local && c.pos.localTheta !== undefined;
  const theta = useLocal ? c.pos.localTheta! : c.pos.theta;
  for (let i = 0; i < f.length; i++) f[i] = Math.pow(theta, -(2 * i) / dim);
  if (useLocal) return f;
  const ff = c.pos.freqFactors;
  if (ff) for (let i = 0; i < f.length; i++) f[i] = f[i]! / (ff[i] ?? 1);
  const s = c.pos.scaling;
  if (s.kind === "linear") for (let i = 0; i < f.length; i++) f[i] = f[i]! / s.factor;
  else if (s.kind === "llama3") {
    // transformers' _compute_llama3_parameters
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

/** Rotate-half RoPE in place on `nHeads` heads of `x`, for absolute position `pos`. */
function rope(x: Float64Array, nHeads: number, hd: number, invFreq: Float64Array, pos: number): void {
  const half = invFreq.length; // = hd / 2
  for (let h = 0; h < nHeads; h++) {
    const o = h * hd;
    for (let j = 0; j < half; j++) {
      const ang = pos * invFreq[j]!;
      const cs = Math.cos(ang);
      const sn = Math.sin(ang);
      const x1 = x[o + j]!;
      const x2 = x[o + j + half]!;
      x[o + j] = x1 * cs - x2 * sn;
      x[o + j + half] = x2 * cs + x1 * sn;
    }
  }
}

// ---------------------------------------------------------------- interventions

interface Op {
  iv: OracleIntervention;
  from: number;
  to: number;
  /** add: vector·scale; project: unit direction; ablate: replacement values. */
  vec: Float64Array | null;
  /** Values per head on [heads, ...] sites (for `heads`), else the feature size. */
  headSize: number;
}

function scopeOf(iv: OracleIntervention, promptLen: number, opts: OracleOptions): [number, number] {
  const pos = iv.pos ?? "all";
  if (pos === "all") return [0, Infinity];
  if (pos === "prompt") return [0, promptLen];
  if (pos === "generated") return [promptLen, Infinity];
  if ("marker" in pos) {
    if (opts.text === undefined || !opts.countPrefix) throw new Error(`oracle64: ${iv.at}: a { marker } scope needs opts.text and opts.countPrefix`);
    const i = opts.text.indexOf(pos.marker);
    if (i < 0) throw new Error(`oracle64: ${iv.at}: marker ${JSON.stringify(pos.marker)} not in the text`);
    const from = opts.countPrefix(opts.text.slice(0, i)) + (pos.offset ?? 0);
    if (from < 0) throw new Error(`oracle64: ${iv.at}: marker scope starts before the first token`);
    return [from, pos.to ?? Infinity];
  }
  return [pos.from, pos.to ?? Infinity];
}

/** Validate and group the plan by hook name. */
function prepare(c: ModelConfig, plan: OraclePlan, promptLen: number, opts: OracleOptions): { ops: Map<string, Op[]>; reads: Set<string> } {
  const ops = new Map<string, Op[]>();
  const reads = new Set<string>();
  for (const iv of plan) {
    const m = /^blocks\.(\d+)\.(.+)$/.exec(iv.at);
    const site = m ? m[2]! : iv.at;
    const moe = c.mlp.kind === "moe";
    const blockSites: readonly string[] = moe ? [...ORACLE_BLOCK_SITES.filter((x) => x !== "mlp.hook_pre" && x !== "mlp.hook_post"), ...ORACLE_MOE_SITES] : ORACLE_BLOCK_SITES;
    const known = m ? blockSites.includes(site) && Number(m[1]) < c.nLayers : GLOBAL_SITES.has(site);
    if (!known) throw new Error(`oracle64: bad hook ${iv.at}`);
    if (site === "hook_pos_embed" && c.pos.kind !== "learned") throw new Error(`oracle64: ${iv.at}: the model has no learned positions`);
    if (iv.op === "read") {
      reads.add(iv.at);
      continue;
    }
    if (site === "attn.hook_pattern") throw new Error("oracle64: attn.hook_pattern is read-only");
    if (opts.row !== undefined && iv.rows && !iv.rows.includes(opts.row)) continue;
    const shape = oracleFeatShape(c, site);
    const F = shape.reduce((a, b) => a * b, 1);
    const [from, to] = scopeOf(iv, promptLen, opts);
    const need = (v: Vec, what: string): Float64Array => {
      if (v.length !== F) throw new Error(`oracle64: ${iv.op} at ${iv.at}: ${what} needs ${F} values, got ${v.length}`);
      return Float64Array.from(v);
    };
    let vec: Float64Array | null = null;
    if (iv.op === "add") {
      const s = iv.scale ?? 1;
      vec = need(iv.vector, "vector").map((x) => x * s);
    } else if (iv.op === "project") {
      if (shape.length !== 1) throw new Error(`oracle64: project at ${iv.at}: only single-vector sites take a direction`);
      vec = need(iv.direction, "direction");
      let n = 0;
      for (const x of vec) n += x * x;
      const inv = 1 / Math.sqrt(n);
      vec = vec.map((x) => x * inv);
    } else if (iv.op === "ablate") {
      if (iv.mode === "mean" && !iv.mean) throw new Error(`oracle64: ablate mean at ${iv.at} needs mean`);
      vec = iv.mode === "zero" ? new Float64Array(F) : need(iv.mean!, "mean");
      if (iv.heads && shape.length !== 2) throw new Error(`oracle64: ablate at ${iv.at}: heads apply to [heads, ...] sites only`);
    } else if (iv.source.length % F !== 0) throw new Error(`oracle64: patch at ${iv.at}: source length ${iv.source.length} is not a multiple of ${F}`);
    const list = ops.get(iv.at) ?? [];
    list.push({ iv, from, to, vec, headSize: shape.length === 2 ? shape[1]! : F });
    ops.set(iv.at, list);
  }
  return { ops, reads };
}

/** Apply the ops of one hook to the activation `x` of position `t` (in place). */
function applyOps(list: Op[] | undefined, x: Float64Array, t: number): void {
  for (const op of list ?? []) {
    if (t < op.from || t >= op.to) continue;
    const iv = op.iv;
    const F = x.length;
    const u = op.vec;
    if (iv.op === "add") for (let i = 0; i < F; i++) x[i] = x[i]! + u![i]!;
    else if (iv.op === "project") {
      let d = 0;
      for (let i = 0; i < F; i++) d += x[i]! * u![i]!;
      const k = (iv.scale ?? 1) * d;
      for (let i = 0; i < F; i++) x[i] = x[i]! - k * u![i]!;
    } else if (iv.op === "patch") {
      if ((t + 1) * F > iv.source.length) throw new Error(`oracle64: patch at ${iv.at}: position ${t} is in scope but the source holds ${iv.source.length / F} positions`);
      for (let i = 0; i < F; i++) x[i] = iv.source[t * F + i]!;
    } else if (iv.op === "ablate") {
      const heads = iv.heads ?? null;
      for (let i = 0; i < F; i++) if (!heads || heads.includes(Math.floor(i / op.headSize))) x[i] = u![i]!;
    }
  }
}

// ---------------------------------------------------------------- the forward pass

interface BlockW {
  ln1: { w: Float64Array; b: Float64Array | null } | null;
  ln1Post: { w: Float64Array; b: Float64Array | null } | null;
  ln2: { w: Float64Array; b: Float64Array | null } | null;
  ln2Post: { w: Float64Array; b: Float64Array | null } | null;
  qNorm: Float64Array | null;
  kNorm: Float64Array | null;
  q: Lin;
  k: Lin;
  v: Lin;
  o: Lin;
  gate: Lin | null;
  up: Lin;
  down: Lin;
  /** Mixture of experts: the router and each expert's gate/up/down (the dense gate/up/down are unused). */
  router: Lin | null;
  experts: { gate: Lin; up: Lin; down: Lin }[];
}

function blockWeights(host: HostModel, l: number, lora: readonly OracleLora[]): BlockW {
  const c = host.config;
  const { get, opt } = weightGetter(host);
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
  const p = `blocks.${l}`;
  const lin = (name: LoraLinear, out: number, inp: number): Lin => {
    const w = get(`${p}.${name}.weight`);
    if (w.length !== out * inp) throw new Error(`oracle64: ${p}.${name}.weight has ${w.length} values, expected ${out}x${inp}`);
    const ads: Lora64[] = [];
    for (const ad of lora) {
      if (ad.layer !== l || ad.linear !== name) continue;
      if (ad.a.length !== ad.rank * inp || ad.b.length !== out * ad.rank) throw new Error(`oracle64: lora on ${p}.${name}: a must be ${ad.rank}x${inp}, b ${out}x${ad.rank}`);
      ads.push({ a: Float64Array.from(ad.a), b: Float64Array.from(ad.b), rank: ad.rank, scale: ad.scale ?? 1 });
    }
    return { w, b: opt(`${p}.${name}.bias`), out, inp, lora: ads };
  };
  const norm = (name: string) => ({ w: get(`${p}.${name}.weight`), b: opt(`${p}.${name}.bias`) });
  const pre = c.blockNorm !== "post";
  const post = c.blockNorm !== "pre";
  return {
    ln1: pre ? norm("ln1") : null,
    ln1Post: post ? norm("ln1Post") : null,
    ln2: pre ? norm("ln2") : null,
    ln2Post: post ? norm("ln2Post") : null,
    qNorm: c.qkNorm.kind !== "none" ? get(`${p}.attn.qNorm.weight`) : null,
    kNorm: c.qkNorm.kind !== "none" ? get(`${p}.attn.kNorm.weight`) : null,
    q: lin("attn.q", H * hd, D),
    k: lin("attn.k", K * hd, D),
    v: lin("attn.v", K * hd, D),
    o: lin("attn.o", D, H * hd),
    gate: c.mlp.kind === "gated" ? lin("mlp.gate", F, D) : null,
    ...(c.mlp.kind === "moe"
      ? {
          up: { w: new Float64Array(0), b: null, out: 0, inp: 0, lora: [] },
          down: { w: new Float64Array(0), b: null, out: 0, inp: 0, lora: [] },
          router: { w: get(`${p}.mlp.router.weight`), b: null, out: c.mlp.nExperts, inp: D, lora: [] },
          experts: Array.from({ length: c.mlp.nExperts }, (_, e) => {
            const ex = (w: string, out: number, inp: number): Lin => ({ w: get(`${p}.mlp.experts.${e}.${w}.weight`), b: null, out, inp, lora: [] });
            return { gate: ex("gate", F, D), up: ex("up", F, D), down: ex("down", D, F) };
          }),
        }
      : { up: lin("mlp.up", F, D), down: lin("mlp.down", D, F), router: null, experts: [] }),
  };
}

/** qk-norm on a [heads·dHead] projection: per head (RMS over dHead) or over the whole vector. */
function qkNorm(c: ModelConfig, w: Float64Array, x: Float64Array, nHeads: number): Float64Array {
  if (c.qkNorm.kind === "full") return normalize(c.norm, w, null, x);
  const hd = c.dHead;
  const out = new Float64Array(x.length);
  for (let h = 0; h < nHeads; h++) out.set(normalize(c.norm, w, null, x.subarray(h * hd, (h + 1) * hd)), h * hd);
  return out;
}

/** Forward one sequence in float64 with the plan applied; returns logits and the reads. */
export function oracleForward(host: HostModel, ids: readonly number[], plan: OraclePlan = [], opts: OracleOptions = {}): OracleResult {
  const c = host.config;
  const { get, opt } = weightGetter(host);
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dVocab: V } = c;
  const T = ids.length;
  const lora = opts.lora ?? [];
  for (const ad of lora) if (!(ad.layer >= 0 && ad.layer < c.nLayers) || (ad.linear === "mlp.gate" && c.mlp.kind !== "gated")) throw new Error(`oracle64: no ${ad.linear} in layer ${ad.layer}`);
  const { ops, reads } = prepare(c, plan, opts.promptLen ?? T, opts);
  const act = activation(c, opts.gelu);
  const recorded = new Map<string, Float64Array[]>();
  // Run the ops of one hook at position t, then record the result if it is read.
  const hook = (name: string, x: Float64Array, t: number): Float64Array => {
    applyOps(ops.get(name), x, t);
    if (reads.has(name)) {
      const r = recorded.get(name) ?? [];
      r[t] = Float64Array.from(x);
      recorded.set(name, r);
    }
    return x;
  };

  const embed = get("embed.weight");
  const posEmbed = c.pos.kind === "learned" ? get("posEmbed.weight") : null;
  const xs: Float64Array[] = [];
  for (let t = 0; t < T; t++) {
    const id = ids[t]!;
    if (!(Number.isInteger(id) && id >= 0 && id < V)) throw new Error(`oracle64: token ${id} outside the vocabulary`);
    const x = hook("hook_embed", embed.slice(id * D, (id + 1) * D).map((v) => v * c.embedScale), t);
    if (posEmbed) {
      if (t >= c.nCtx) throw new Error(`oracle64: position ${t} beyond nCtx ${c.nCtx}`);
      const pe = hook("hook_pos_embed", posEmbed.slice(t * D, (t + 1) * D), t);
      for (let i = 0; i < D; i++) x[i] = x[i]! + pe[i]!;
    }
    xs.push(x);
  }

  const G = H / K;
  const invGlobal = invFreq64(c, false);
  const invLocal = invFreq64(c, true);
  for (let l = 0; l < c.nLayers; l++) {
    const B = blockWeights(host, l, lora);
    const p = `blocks.${l}.`;
    const sliding = c.layerTypes[l] === "sliding";
    const window = sliding && c.slidingWindow !== undefined ? c.slidingWindow : Infinity;
    const inv = sliding ? invLocal : invGlobal;
    const qs: Float64Array[] = [];
    const ks: Float64Array[] = [];
    const vs: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const x = hook(p + "hook_resid_pre", xs[t]!, t);
      // Without a pre-norm (OLMo 2) the attention input is a copy of x: ops on it never touch x.
      const h = hook(p + "ln1.hook_normalized", B.ln1 ? normalize(c.norm, B.ln1.w, B.ln1.b, x) : Float64Array.from(x), t);
      let q = linear(B.q, h);
      let k = linear(B.k, h);
      const v = linear(B.v, h);
      if (B.qNorm && B.kNorm) {
        q = qkNorm(c, B.qNorm, q, H);
        k = qkNorm(c, B.kNorm, k, K);
      }
      hook(p + "attn.hook_q", q, t);
      hook(p + "attn.hook_k", k, t);
      hook(p + "attn.hook_v", v, t);
      // Hooks see q/k before RoPE (as in TransformerLens' llama); rotate copies.
      const qr = q.slice();
      const kr = k.slice();
      if (inv) {
        rope(qr, H, hd, inv, t);
        rope(kr, K, hd, inv, t);
      }
      qs.push(qr);
      ks.push(kr);
      vs.push(v);
    }
    const pattern = reads.has(p + "attn.hook_pattern") ? new Float64Array(T * H * T) : null;
    for (let t = 0; t < T; t++) {
      // Causal attention of query t over keys max(0, t - window + 1)..t; query head h reads kv head floor(h / G).
      const z = new Float64Array(H * hd);
      const s0 = Math.max(0, t - window + 1);
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / G);
        const sc = new Float64Array(t + 1);
        let mx = -Infinity;
        for (let s = s0; s <= t; s++) {
          let d = 0;
          for (let j = 0; j < hd; j++) d += qs[t]![h * hd + j]! * ks[s]![kh * hd + j]!;
          d *= c.attnScale;
          if (c.attnSoftcap) d = c.attnSoftcap * Math.tanh(d / c.attnSoftcap);
          sc[s] = d;
          mx = Math.max(mx, d);
        }
        let sum = 0;
        for (let s = s0; s <= t; s++) {
          sc[s] = Math.exp(sc[s]! - mx);
          sum += sc[s]!;
        }
        for (let s = s0; s <= t; s++) {
          const a = sc[s]! / sum;
          if (pattern) pattern[(t * H + h) * T + s] = a;
          for (let j = 0; j < hd; j++) z[h * hd + j] = z[h * hd + j]! + a * vs[s]![kh * hd + j]!;
        }
      }
      hook(p + "attn.hook_z", z, t);
      // Per-head results z_h·W_O[:, h]ᵀ (plus each adapter's per-head share), then their sum + b_O.
      const result = new Float64Array(H * D);
      for (let h = 0; h < H; h++) {
        const zh = z.subarray(h * hd, (h + 1) * hd);
        for (let o = 0; o < D; o++) {
          let s = 0;
          const r = o * H * hd + h * hd;
          for (let j = 0; j < hd; j++) s += B.o.w[r + j]! * zh[j]!;
          result[h * D + o] = s;
        }
        for (const ad of B.o.lora) {
          const az = new Float64Array(ad.rank);
          for (let k = 0; k < ad.rank; k++) {
            let s = 0;
            for (let j = 0; j < hd; j++) s += ad.a[k * H * hd + h * hd + j]! * zh[j]!;
            az[k] = s;
          }
          for (let o = 0; o < D; o++) {
            let s = 0;
            for (let k = 0; k < ad.rank; k++) s += ad.b[o * ad.rank + k]! * az[k]!;
            result[h * D + o] = result[h * D + o]! + ad.scale * s;
          }
        }
      }
      hook(p + "attn.hook_result", result, t);
      let a: Float64Array = new Float64Array(D);
      for (let o = 0; o < D; o++) {
        let s = B.o.b ? B.o.b[o]! : 0;
        for (let h = 0; h < H; h++) s += result[h * D + o]!;
        a[o] = s;
      }
      if (B.ln1Post) a = normalize(c.norm, B.ln1Post.w, B.ln1Post.b, a);
      hook(p + "hook_attn_out", a, t);
      const x = xs[t]!;
      for (let i = 0; i < D; i++) x[i] = x[i]! + a[i]!;
      hook(p + "hook_resid_mid", x, t);
      const h2 = hook(p + "ln2.hook_normalized", B.ln2 ? normalize(c.norm, B.ln2.w, B.ln2.b, x) : Float64Array.from(x), t);
      let hidden: Float64Array;
      if (c.mlp.kind === "moe") {
        // Router softmax, top-k (ties: lower index), optional renormalisation; experts with weight 0 skipped.
        const { nExperts: E, topK, normTopK } = c.mlp;
        const rl = hook(p + "mlp.hook_router_logits", linear(B.router!, h2), t);
        const mx = Math.max(...rl);
        const pr = rl.map((v) => Math.exp(v - mx));
        const z = pr.reduce((a, b) => a + b, 0);
        const top = Array.from({ length: E }, (_, e) => e).sort((a, b) => pr[b]! - pr[a]! || a - b).slice(0, topK);
        const kept = top.reduce((a, e) => a + pr[e]!, 0);
        const w = new Float64Array(E);
        for (const e of top) w[e] = pr[e]! / (normTopK ? kept : z);
        hook(p + "mlp.hook_expert_weights", w, t);
        const outs = new Float64Array(E * D);
        for (let e = 0; e < E; e++) {
          if (w[e] === 0) continue;
          const X = B.experts[e]!;
          const g = linear(X.gate, h2), u = linear(X.up, h2);
          const y = linear(X.down, g.map((v, i) => act(v) * u[i]!));
          for (let i = 0; i < D; i++) outs[e * D + i] = w[e]! * y[i]!;
        }
        hook(p + "mlp.hook_expert_out", outs, t);
        const sum = new Float64Array(D);
        for (let e = 0; e < E; e++) for (let i = 0; i < D; i++) sum[i] = sum[i]! + outs[e * D + i]!;
        let d = hook(p + "mlp.hook_down", sum, t);
        if (B.ln2Post) d = normalize(c.norm, B.ln2Post.w, B.ln2Post.b, d);
        hook(p + "hook_mlp_out", d, t);
        for (let i = 0; i < D; i++) x[i] = x[i]! + d[i]!;
        hook(p + "hook_resid_post", x, t);
        continue;
      }
      if (B.gate) {
        const pre = hook(p + "mlp.hook_pre", linear(B.gate, h2), t);
        const up = linear(B.up, h2);
        hidden = pre.map((g, i) => act(g) * up[i]!);
      } else {
        const pre = hook(p + "mlp.hook_pre", linear(B.up, h2), t);
        hidden = pre.map(act);
      }
      hook(p + "mlp.hook_post", hidden, t);
      let d = hook(p + "mlp.hook_down", linear(B.down, hidden), t);
      if (B.ln2Post) d = normalize(c.norm, B.ln2Post.w, B.ln2Post.b, d);
      hook(p + "hook_mlp_out", d, t);
      for (let i = 0; i < D; i++) x[i] = x[i]! + d[i]!;
      hook(p + "hook_resid_post", x, t);
    }
    if (pattern) recorded.set(p + "attn.hook_pattern", [pattern]);
  }

  const logits: Float64Array[] = [];
  const unembed: Lin = { w: c.tieEmbeddings ? embed : get("unembed.weight"), b: null, out: V, inp: D, lora: [] };
  const lnF = { w: get("lnFinal.weight"), b: opt("lnFinal.bias") };
  for (let t = opts.lastOnly ? T - 1 : 0; t < T; t++) {
    const h = hook("ln_final.hook_normalized", normalize(c.norm, lnF.w, lnF.b, xs[t]!), t);
    const lg = linear(unembed, h);
    const cap = c.finalSoftcap;
    if (cap) for (let i = 0; i < V; i++) lg[i] = cap * Math.tanh(lg[i]! / cap);
    logits.push(lg);
  }

  const out = new Map<string, OracleRead>();
  for (const name of reads) {
    const per = recorded.get(name);
    if (!per) continue;
    const site = /^blocks\.\d+\.(.+)$/.exec(name)?.[1] ?? name;
    if (site === "attn.hook_pattern") {
      out.set(name, { data: per[0]!, shape: [T, H, T] });
      continue;
    }
    const feat = oracleFeatShape(c, site);
    const F = feat.reduce((a, b) => a * b, 1);
    // ln_final with lastOnly has the last position only.
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
export function oracleGreedy(host: HostModel, prompt: readonly number[], n: number, plan: OraclePlan = [], opts: Omit<OracleOptions, "promptLen" | "lastOnly"> = {}): number[] {
  const ids = [...prompt];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const { logits } = oracleForward(host, ids, plan, { ...opts, promptLen: prompt.length, lastOnly: true });
    const next = argmax64(logits[0]!);
    out.push(next);
    ids.push(next);
  }
  return out;
}

/** log-softmax of one row, in float64. */
export function logSoftmax(row: ArrayLike<number>): Float64Array {
  let m = -Infinity;
  for (let i = 0; i < row.length; i++) m = Math.max(m, row[i]!);
  let s = 0;
  for (let i = 0; i < row.length; i++) s += Math.exp(row[i]! - m);
  const l = Math.log(s) + m;
  return Float64Array.from({ length: row.length }, (_, i) => row[i]! - l);
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
