// A float64 reference forward pass for every family's quirks (GQA, qkv biases, per-head and
// whole-projection qk-norm, sandwich and post-only norms, (1 + w) RMSNorm, embedding scale,
// attention and final soft-capping, sliding-window layers with their own RoPE base, linear /
// "llama3" / per-frequency RoPE scaling, learned positions, LayerNorm). Deliberately naive: one
// sequence, no KV cache, plain loops, no code shared with the jax-js engine or src/engine/rope.ts;
// only the ModelConfig it reads and the canonical weight names come from src/. Reads and adds at
// the MLP half's sites (familyRef64Hooked) check the hook points that sit around the post-norms.
//
// `gelu: "ggml-f16"` reproduces llama.cpp's CPU GELU instead of the exact tanh formula: ggml's
// ggml_vec_gelu_f32 / ggml_vec_geglu_f32 (ggml/src/ggml-cpu/vec.h, GGML_GELU_FP16 defined) round
// the input to f16 and look the result up in a table of f16 values, gelu(x) = f16(gelu(f16(x)))
// for -10 < x < 10 (0 below, x above). That is a ~5e-4 relative error per activation, which is why
// GELU families cannot match llama.cpp to 1e-4 with an exact GELU.
import { f16round } from "@petamoriken/float16";
import type { ModelConfig, NormSpec } from "../../src/engine/config.js";
import type { HostModel } from "../../src/model/load.js";

export interface FamilyRefOptions {
  /** "exact": 0.5x(1 + tanh(...)) in float64 (transformers); "ggml-f16": llama.cpp's CPU table. */
  gelu?: "exact" | "ggml-f16";
}

type W = Map<string, Float64Array>;

function weights64(host: HostModel): W {
  const w: W = new Map();
  for (const [k, t] of host.weights) w.set(k, Float64Array.from(t.data));
  return w;
}

function get(w: W, k: string): Float64Array {
  const t = w.get(k);
  if (!t) throw new Error(`family-ref64: weight ${k} missing`);
  return t;
}

/** y = W x (+ b); W row-major [out, in]. */
function matvec(w: Float64Array, x: Float64Array, b?: Float64Array): Float64Array {
  const inp = x.length;
  const out = w.length / inp;
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = b ? b[o]! : 0;
    for (let i = 0; i < inp; i++) s += w[o * inp + i]! * x[i]!;
    y[o] = s;
  }
  return y;
}

function normVec(x: Float64Array, w: Float64Array, b: Float64Array | undefined, spec: NormSpec): Float64Array {
  const n = x.length;
  const y = new Float64Array(n);
  if (spec.kind === "rms") {
    let ms = 0;
    for (const v of x) ms += v * v;
    const r = 1 / Math.sqrt(ms / n + spec.eps);
    for (let i = 0; i < n; i++) y[i] = x[i]! * r * (w[i]! + spec.weightOffset);
    return y;
  }
  let mu = 0;
  for (const v of x) mu += v;
  mu /= n;
  let va = 0;
  for (const v of x) va += (v - mu) * (v - mu);
  const r = 1 / Math.sqrt(va / n + spec.eps);
  for (let i = 0; i < n; i++) y[i] = (x[i]! - mu) * r * w[i]! + (b ? b[i]! : 0);
  return y;
}

const geluTanh = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));

function ggmlGelu(x: number): number {
  if (x <= -10) return 0;
  if (x >= 10) return x;
  return f16round(geluTanh(f16round(x)));
}

/** Inverse RoPE frequencies per layer kind, from the config alone (re-derived, not src/engine/rope.ts). */
function invFreqs(c: ModelConfig, local: boolean): Float64Array {
  if (c.pos.kind !== "rope") return new Float64Array(0);
  const hd = c.dHead;
  const f = new Float64Array(hd / 2);
  const useLocal = local && c.pos.localTheta !== undefined;
  const theta = useLocal ? c.pos.localTheta! : c.pos.theta;
  for (let i = 0; i < hd / 2; i++) f[i] = Math.pow(theta, (-2 * i) / hd);
  if (useLocal) return f;
  const ff = c.pos.freqFactors;
  if (ff) for (let i = 0; i < hd / 2; i++) f[i]! /= ff[i]!;
  const s = c.pos.scaling;
  if (s.kind === "linear") for (let i = 0; i < hd / 2; i++) f[i]! /= s.factor;
  if (s.kind === "llama3") {
    // transformers _compute_llama3_parameters
    const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < hd / 2; i++) {
      const wavelen = (2 * Math.PI) / f[i]!;
      if (wavelen > lowWavelen) f[i] = f[i]! / s.factor;
      else if (wavelen >= highWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f[i] = (1 - smooth) * (f[i]! / s.factor) + smooth * f[i]!;
      }
    }
  }
  return f;
}

/** Rotate-half RoPE on one head vector in place (HF layout; llama.cpp's adjacent pairs are the permuted layout). */
function ropeHead(v: Float64Array, off: number, hd: number, pos: number, inv: Float64Array): void {
  const h = hd / 2;
  for (let j = 0; j < h; j++) {
    const a = pos * inv[j]!;
    const c = Math.cos(a), s = Math.sin(a);
    const x1 = v[off + j]!, x2 = v[off + j + h]!;
    v[off + j] = x1 * c - x2 * s;
    v[off + j + h] = x2 * c + x1 * s;
  }
}

/**
 * Reads and adds at the [dModel] sites of the MLP half (TransformerLens names): hook_attn_out,
 * hook_resid_mid, mlp.hook_down (the down projection before any post-MLP norm), hook_mlp_out
 * (after it) and hook_resid_post. An add applies `scale · vector` at positions from..to-1; a read
 * records the value after the adds at that site.
 */
export type FamilyRefHook =
  | { op: "read"; at: string }
  | { op: "add"; at: string; vector: ArrayLike<number>; scale?: number; from?: number; to?: number };

const HOOKED_SITES = new Set(["hook_attn_out", "hook_resid_mid", "mlp.hook_down", "hook_mlp_out", "hook_resid_post"]);

export interface FamilyRefResult {
  /** [T][dVocab] */
  logits: Float64Array[];
  /** Per read hook: [T][dModel]. */
  reads: Map<string, Float64Array[]>;
}

/** Next-token logits after every position of `ids`: [T][dVocab]. */
export function familyRef64(host: HostModel, ids: readonly number[], opts: FamilyRefOptions = {}): Float64Array[] {
  return familyRef64Hooked(host, ids, [], opts).logits;
}

/** familyRef64 with reads and adds at the MLP half's sites (FamilyRefHook). */
export function familyRef64Hooked(host: HostModel, ids: readonly number[], hooks: readonly FamilyRefHook[], opts: FamilyRefOptions = {}): FamilyRefResult {
  const c = host.config;
  for (const h of hooks) {
    const m = /^blocks\.(\d+)\.(.+)$/.exec(h.at);
    if (!m || !HOOKED_SITES.has(m[2]!) || Number(m[1]) >= c.nLayers) throw new Error(`family-ref64: unsupported hook ${h.at}`);
    if (h.op === "add" && h.vector.length !== c.dModel) throw new Error(`family-ref64: add at ${h.at} needs ${c.dModel} values`);
  }
  const reads = new Map<string, Float64Array[]>();
  // Apply the adds at `name` to x (a fresh array) at position t, then record it if read.
  const hook = (name: string, x: Float64Array, t: number): Float64Array => {
    for (const h of hooks) {
      if (h.at !== name || h.op !== "add" || t < (h.from ?? 0) || t >= (h.to ?? Infinity)) continue;
      const s = h.scale ?? 1;
      for (let i = 0; i < x.length; i++) x[i] = x[i]! + s * h.vector[i]!;
    }
    if (hooks.some((h) => h.at === name && h.op === "read")) {
      const r = reads.get(name) ?? [];
      r[t] = Float64Array.from(x);
      reads.set(name, r);
    }
    return x;
  };
  const w = weights64(host);
  const opt = (k: string) => w.get(k);
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dVocab: V } = c;
  const T = ids.length;
  const act = (x: number): number => {
    if (c.mlp.act === "silu") return x / (1 + Math.exp(-x));
    if (c.mlp.act === "gelu_tanh") return opts.gelu === "ggml-f16" ? ggmlGelu(x) : geluTanh(x);
    throw new Error("family-ref64: exact-erf GELU is not implemented");
  };
  const embed = get(w, "embed.weight");
  let xs: Float64Array[] = ids.map((id, t) => {
    const x = new Float64Array(D);
    for (let i = 0; i < D; i++) x[i] = embed[id * D + i]! * c.embedScale;
    const pe = opt("posEmbed.weight");
    if (pe) for (let i = 0; i < D; i++) x[i]! += pe[t * D + i]!;
    return x;
  });
  const invGlobal = invFreqs(c, false);
  const invLocal = invFreqs(c, true);
  for (let l = 0; l < c.nLayers; l++) {
    const p = `blocks.${l}`;
    const n = (name: string, x: Float64Array) => normVec(x, get(w, `${p}.${name}.weight`), opt(`${p}.${name}.bias`), c.norm);
    const sliding = c.layerTypes[l] === "sliding";
    const inv = sliding ? invLocal : invGlobal;
    const qs: Float64Array[] = [], ks: Float64Array[] = [], vs: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const h = opt(`${p}.ln1.weight`) ? n("ln1", xs[t]!) : xs[t]!;
      let q = matvec(get(w, `${p}.attn.q.weight`), h, opt(`${p}.attn.q.bias`));
      let k = matvec(get(w, `${p}.attn.k.weight`), h, opt(`${p}.attn.k.bias`));
      const v = matvec(get(w, `${p}.attn.v.weight`), h, opt(`${p}.attn.v.bias`));
      if (c.qkNorm.kind === "full") {
        q = normVec(q, get(w, `${p}.attn.qNorm.weight`), undefined, c.norm);
        k = normVec(k, get(w, `${p}.attn.kNorm.weight`), undefined, c.norm);
      } else if (c.qkNorm.kind === "head") {
        const perHead = (x: Float64Array, nh: number, wn: Float64Array) => {
          const out = new Float64Array(x.length);
          for (let i = 0; i < nh; i++) out.set(normVec(x.subarray(i * hd, (i + 1) * hd), wn, undefined, c.norm), i * hd);
          return out;
        };
        q = perHead(q, H, get(w, `${p}.attn.qNorm.weight`));
        k = perHead(k, K, get(w, `${p}.attn.kNorm.weight`));
      }
      if (c.pos.kind === "rope") {
        for (let i = 0; i < H; i++) ropeHead(q, i * hd, hd, t, inv);
        for (let i = 0; i < K; i++) ropeHead(k, i * hd, hd, t, inv);
      }
      qs.push(q);
      ks.push(k);
      vs.push(v);
    }
    const next: Float64Array[] = [];
    for (let t = 0; t < T; t++) {
      const z = new Float64Array(H * hd);
      for (let i = 0; i < H; i++) {
        const kv = Math.floor(i / (H / K));
        const s: number[] = [];
        for (let u = 0; u <= t; u++) {
          if (sliding && c.slidingWindow !== undefined && t - u >= c.slidingWindow) {
            s.push(-Infinity);
            continue;
          }
          let d = 0;
          for (let j = 0; j < hd; j++) d += qs[t]![i * hd + j]! * ks[u]![kv * hd + j]!;
          d *= c.attnScale;
          if (c.attnSoftcap) d = c.attnSoftcap * Math.tanh(d / c.attnSoftcap);
          s.push(d);
        }
        const m = Math.max(...s);
        const e = s.map((x) => Math.exp(x - m));
        const sum = e.reduce((a, b) => a + b, 0);
        for (let u = 0; u <= t; u++) for (let j = 0; j < hd; j++) z[i * hd + j]! += (e[u]! / sum) * vs[u]![kv * hd + j]!;
      }
      let attnOut = matvec(get(w, `${p}.attn.o.weight`), z, opt(`${p}.attn.o.bias`));
      if (opt(`${p}.ln1Post.weight`)) attnOut = n("ln1Post", attnOut);
      attnOut = hook(`${p}.hook_attn_out`, attnOut, t);
      const mid = hook(`${p}.hook_resid_mid`, xs[t]!.map((x, i) => x + attnOut[i]!), t);
      const h = opt(`${p}.ln2.weight`) ? n("ln2", mid) : mid;
      let hidden: Float64Array;
      if (c.mlp.kind === "gated") {
        const g = matvec(get(w, `${p}.mlp.gate.weight`), h, opt(`${p}.mlp.gate.bias`));
        const up = matvec(get(w, `${p}.mlp.up.weight`), h, opt(`${p}.mlp.up.bias`));
        hidden = g.map((x, i) => act(x) * up[i]!);
      } else {
        hidden = matvec(get(w, `${p}.mlp.up.weight`), h, opt(`${p}.mlp.up.bias`)).map(act);
      }
      let mlpOut = hook(`${p}.mlp.hook_down`, matvec(get(w, `${p}.mlp.down.weight`), hidden, opt(`${p}.mlp.down.bias`)), t);
      if (opt(`${p}.ln2Post.weight`)) mlpOut = n("ln2Post", mlpOut);
      mlpOut = hook(`${p}.hook_mlp_out`, mlpOut, t);
      next.push(hook(`${p}.hook_resid_post`, mid.map((x, i) => x + mlpOut[i]!), t));
    }
    xs = next;
  }
  const unembed = c.tieEmbeddings ? embed : get(w, "unembed.weight");
  const logits = xs.map((x) => {
    const h = normVec(x, get(w, "lnFinal.weight"), opt("lnFinal.bias"), c.norm);
    const l = matvec(unembed, h);
    if (c.finalSoftcap) for (let i = 0; i < V; i++) l[i] = c.finalSoftcap * Math.tanh(l[i]! / c.finalSoftcap);
    return l;
  });
  return { logits, reads };
}

/** n greedy tokens after `prompt` (full recomputation per step; fixtures are tiny). */
export function familyRef64Greedy(host: HostModel, prompt: readonly number[], n: number, opts: FamilyRefOptions = {}): number[] {
  const seq = [...prompt];
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const rows = familyRef64(host, seq, opts);
    const last = rows[rows.length - 1]!;
    let best = 0;
    for (let j = 1; j < last.length; j++) if (last[j]! > last[best]!) best = j;
    out.push(best);
    seq.push(best);
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
