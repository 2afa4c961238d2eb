// The forward pass on @jax-js/jax. This file (with kv-cache handling in engine.ts) is the only
// place that manages jax-js reference counts. Rule: every function consumes the arrays passed to
// it; callers pass `.ref` (or `tree.ref`) to keep their own reference.
//
// A block is two jit'd halves, split at the attention output: inside one jit a matmul that reads
// the permuted einsum output runs ~12x slower (engine study, issue 4); jit outputs are contiguous.
import "../../core/polyfills.js";
import { jit, nn, numpy as np, type Array as JArray, type OwnedFunction } from "@jax-js/jax";
import type { BlockSite } from "../../hooks/names.js";
import type { ModelConfig, NormSpec } from "../config.js";

/** A weight matrix [out, in], split in row chunks when larger than the device's binding limit. */
export type Weight = JArray | JArray[];

export interface NormParams {
  weight: JArray;
  bias?: JArray;
}
export interface LinearParams {
  weight: Weight;
  bias?: JArray;
}
export interface BlockParams {
  /** Pre-norms (absent for OLMo 2's post-norm blocks) and post-norms (sandwich/post blocks). */
  ln1?: NormParams;
  ln1Post?: NormParams;
  attn: { q: LinearParams; k: LinearParams; v: LinearParams; o: LinearParams; qNorm?: NormParams; kNorm?: NormParams };
  ln2?: NormParams;
  ln2Post?: NormParams;
  mlp: { gate?: LinearParams; up: LinearParams; down: LinearParams };
}
export interface DeviceParams {
  blocks: BlockParams[];
  lnFinal: NormParams;
  unembed: Weight;
}

/** One compiled intervention at a site. Arrays are consumed by the layer function. */
export type { OpKind } from "../plan.js";
import type { OpKind } from "../plan.js";
/** Only arrays may be jit arguments, so an op's kind lives in the static LayerKey, not here. */
export interface SiteOp {
  /** add: vector [B,1|T,...feat] (scale folded in); project: unit [B,1,...feat]; replace: values. */
  v: JArray;
  /** add/project: float 0/1 [B,T,(heads,)1]; replace: bool, same shape. */
  m: JArray;
}
export type SiteOps = Partial<Record<string, SiteOp[]>>;
/** Static op kinds per site, in the same order as the SiteOps arrays. */
export type SiteKinds = ReadonlyMap<string, OpKind[]>;

/** The static (trace-time) description of a layer call: which ops at which sites, what to read. */
export interface LayerKey {
  ops: [site: string, kinds: OpKind[]][];
  reads: string[];
}

// ---------------------------------------------------------------- primitives

/** x @ wᵀ; f16-stored weights are widened inside the jit'd kernel (the activations stay f32). */
function matT(x: JArray, w: JArray): JArray {
  return np.dot(x, (w.dtype === np.float16 ? w.astype(np.float32) : w).transpose());
}

export function linear(x: JArray, p: LinearParams): JArray {
  const w = p.weight;
  let y: JArray;
  if (Array.isArray(w)) {
    // Row chunks: y = concat_c(x @ w_c^T). Each chunk stays under the binding limit.
    const parts = w.map((c, i) => matT(i < w.length - 1 ? x.ref : x, c));
    y = np.concatenate(parts, -1);
  } else y = matT(x, w);
  return p.bias ? y.add(p.bias) : y;
}

export function norm(x: JArray, p: NormParams, spec: NormSpec): JArray {
  if (spec.kind === "rms") {
    const ms = x.ref.mul(x.ref).mean(-1, { keepdims: true });
    const y = x.div(np.sqrt(ms.add(spec.eps)));
    return spec.weightOffset ? y.mul(p.weight.add(1)) : y.mul(p.weight);
  }
  const mu = x.ref.mean(-1, { keepdims: true });
  const xc = x.sub(mu);
  const v = xc.ref.mul(xc.ref).mean(-1, { keepdims: true });
  const y = xc.div(np.sqrt(v.add(spec.eps))).mul(p.weight);
  return p.bias ? y.add(p.bias) : y;
}

function act(x: JArray, a: ModelConfig["mlp"]["act"]): JArray {
  if (a === "silu") return nn.silu(x);
  if (a === "gelu_tanh") return nn.gelu(x, { approximate: true });
  return nn.gelu(x, { approximate: false });
}

/** cap · tanh(x / cap) (Gemma 2 soft-capping). */
function softcap(x: JArray, cap: number): JArray {
  return np.tanh(x.div(cap)).mul(cap);
}

/** Optional qk-norm: per head (norm over dHead) or over the whole projection; returns [B,T,N,dHead]. */
function qkNormed(y: JArray, w: NormParams | undefined, c: ModelConfig, shape: number[]): JArray {
  if (!w || c.qkNorm.kind === "none") return y.reshape(shape);
  if (c.qkNorm.kind === "full") return norm(y, w, c.norm).reshape(shape);
  return norm(y.reshape(shape), w, c.norm);
}

/** rotate-half RoPE. x [B,T,N,hd]; cos, sin [B,T,1,hd]. */
function rope(x: JArray, cos: JArray, sin: JArray): JArray {
  const [x1, x2] = np.split(x.ref, 2, -1) as [JArray, JArray];
  return x.mul(cos).add(np.concatenate([x2.neg(), x1], -1).mul(sin));
}

/** Apply the interventions compiled for `site`, then record a read if asked. */
export interface Static {
  readSet: ReadonlySet<string>;
  kinds: SiteKinds;
}

function site(x: JArray, name: string, ops: SiteOps, reads: Record<string, JArray>, st: Static): JArray {
  const kinds = st.kinds.get(name) ?? [];
  (ops[name] ?? []).forEach((op, i) => {
    const kind = kinds[i];
    if (kind === "add") x = x.add(op.m.mul(op.v));
    else if (kind === "project") {
      const coef = x.ref.mul(op.v.ref).sum(-1, { keepdims: true });
      x = x.sub(op.m.mul(coef).mul(op.v));
    } else x = np.where(op.m, op.v, x);
  });
  if (st.readSet.has(name)) reads[name] = x.ref;
  return x;
}

// ---------------------------------------------------------------- the two block halves

/** RoPE tables [B,T,1,dHead]; empty for learned-position models (an empty object is a valid JsTree). */
export type Rot = { cos?: JArray; sin?: JArray };
export type AttnParams = Pick<BlockParams, "ln1"> & { attn: Omit<BlockParams["attn"], "o"> };
export type MlpParams = Pick<BlockParams, "ln1Post" | "ln2" | "ln2Post" | "mlp"> & { o: LinearParams };
type AttnIn = [p: AttnParams, x: JArray, rot: Rot, mask: JArray, ops: SiteOps];

function attnHalf(
  c: ModelConfig,
  st: Static,
  [p, x, rot, mask, ops]: AttnIn,
  kvIn: { k: JArray; v: JArray } | null,
  write: { wm: JArray; place: JArray } | null,
): [JArray, JArray, { k: JArray; v: JArray }, Record<string, JArray>] {
  const [B, T] = x.shape as [number, number];
  const { nHeads: H, nKvHeads: K, dHead: hd } = c;
  const reads: Record<string, JArray> = {};
  x = site(x, "hook_resid_pre", ops, reads, st);
  const h = p.ln1 ? norm(x.ref, p.ln1, c.norm) : x.ref;
  let q = qkNormed(linear(h.ref, p.attn.q), p.attn.qNorm, c, [B, T, H, hd]);
  let k = qkNormed(linear(h.ref, p.attn.k), p.attn.kNorm, c, [B, T, K, hd]);
  q = site(q, "attn.hook_q", ops, reads, st);
  k = site(k, "attn.hook_k", ops, reads, st);
  const v = site(linear(h, p.attn.v).reshape([B, T, K, hd]), "attn.hook_v", ops, reads, st);
  if (rot.cos && rot.sin) {
    q = rope(q, rot.cos.ref, rot.sin.ref);
    k = rope(k, rot.cos, rot.sin);
  }
  let kAll: JArray, vAll: JArray, kvOut: { k: JArray; v: JArray };
  if (kvIn === null || write === null) {
    kAll = k.ref;
    vAll = v.ref;
    kvOut = { k, v };
  } else {
    // No dynamic_update_slice in jax-js: write new slots with `where` over the capacity. A single
    // slot broadcasts; a chunk is first placed at its slots by the one-hot [cap, T] matrix.
    if (T > 1) {
      k = np.einsum("st,btkh->bskh", write.place.ref, k);
      const vp = np.einsum("st,btkh->bskh", write.place, v);
      kAll = np.where(write.wm.ref, k, kvIn.k);
      vAll = np.where(write.wm, vp, kvIn.v);
    } else {
      write.place.dispose();
      kAll = np.where(write.wm.ref, k, kvIn.k);
      vAll = np.where(write.wm, v, kvIn.v);
    }
    kvOut = { k: kAll.ref, v: vAll.ref };
  }
  // Grouped-query attention without materialising repeated K/V heads.
  const S = kAll.shape[1]!;
  const G = H / K;
  const qg = q.reshape([B, T, K, G, hd]);
  let s = np.einsum("btkgh,bskh->bkgts", qg, kAll).mul(c.attnScale);
  if (c.attnSoftcap) s = softcap(s, c.attnSoftcap);
  s = np.where(mask.reshape([B, 1, 1, T, S]), s, -Infinity);
  const pr = nn.softmax(s, -1);
  if (st.readSet.has("attn.hook_pattern")) {
    reads["attn.hook_pattern"] = pr.ref.reshape([B, H, T, S]);
  }
  const z = np.einsum("bkgts,bskh->btkgh", pr, vAll).reshape([B, T, H, hd]);
  return [x, z, kvOut, reads];
}

function mlpHalf(
  c: ModelConfig,
  st: Static,
  p: MlpParams,
  x: JArray,
  z: JArray,
  ops: SiteOps,
): [JArray, Record<string, JArray>] {
  const [B, T] = x.shape as [number, number];
  const reads: Record<string, JArray> = {};
  z = site(z, "attn.hook_z", ops, reads, st);
  let attnOut = linear(z.reshape([B, T, c.nHeads * c.dHead]), p.o);
  if (p.ln1Post) attnOut = norm(attnOut, p.ln1Post, c.norm);
  attnOut = site(attnOut, "hook_attn_out", ops, reads, st);
  x = site(x.add(attnOut), "hook_resid_mid", ops, reads, st);
  const h = p.ln2 ? norm(x.ref, p.ln2, c.norm) : x.ref;
  let hidden: JArray;
  if (c.mlp.kind === "gated") {
    const gate = site(linear(h.ref, p.mlp.gate!), "mlp.hook_pre", ops, reads, st);
    hidden = act(gate, c.mlp.act).mul(linear(h, p.mlp.up));
  } else {
    hidden = act(site(linear(h, p.mlp.up), "mlp.hook_pre", ops, reads, st), c.mlp.act);
  }
  hidden = site(hidden, "mlp.hook_post", ops, reads, st);
  // mlp.hook_down is the down projection before any post-MLP norm (protocol §7.1's bias site).
  let mlpOut = site(linear(hidden, p.mlp.down), "mlp.hook_down", ops, reads, st);
  if (p.ln2Post) mlpOut = norm(mlpOut, p.ln2Post, c.norm);
  mlpOut = site(mlpOut, "hook_mlp_out", ops, reads, st);
  x = site(x.add(mlpOut), "hook_resid_post", ops, reads, st);
  return [x, reads];
}

const ATTN_SITES: ReadonlySet<string> = new Set<BlockSite>(["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern"]);

/** Split a layer's ops between the two halves (by site). */
export function splitOps(ops: SiteOps): [SiteOps, SiteOps] {
  const a: SiteOps = {};
  const m: SiteOps = {};
  for (const [k, v] of Object.entries(ops)) (ATTN_SITES.has(k) ? a : m)[k] = v;
  return [a, m];
}

type LayerFn = OwnedFunction<(...args: never[]) => unknown>;

/**
 * Compiled layer functions, memoised by the static key (ops per site and reads). jit itself
 * caches per input shape, so changing a vector's values or a scale never re-traces.
 */
export class LayerFns {
  private cache = new Map<string, { full: LayerFn; step: LayerFn; mlp: LayerFn }>();
  constructor(
    private c: ModelConfig,
    private useJit = true,
  ) {}

  get(key: LayerKey) {
    const id = JSON.stringify(key);
    let fns = this.cache.get(id);
    if (!fns) {
      const c = this.c;
      const st: Static = { readSet: new Set(key.reads), kinds: new Map(key.ops) };
      const J = <F extends (...a: never[]) => unknown>(f: F) => (this.useJit ? (jit(f as never) as unknown as LayerFn) : (f as unknown as LayerFn));
      fns = {
        full: J((p: AttnIn[0], x: JArray, rot: Rot, mask: JArray, ops: SiteOps) => attnHalf(c, st, [p, x, rot, mask, ops], null, null)),
        step: J((p: AttnIn[0], x: JArray, rot: Rot, mask: JArray, ops: SiteOps, kv: { k: JArray; v: JArray }, write: { wm: JArray; place: JArray }) =>
          attnHalf(c, st, [p, x, rot, mask, ops], kv, write),
        ),
        mlp: J((p: MlpParams, x: JArray, z: JArray, ops: SiteOps) => mlpHalf(c, st, p, x, z, ops)),
      };
      this.cache.set(id, fns);
    }
    return fns as unknown as {
      full: (...a: [AttnIn[0], JArray, Rot, JArray, SiteOps]) => [JArray, JArray, { k: JArray; v: JArray }, Record<string, JArray>];
      step: (...a: [AttnIn[0], JArray, Rot, JArray, SiteOps, { k: JArray; v: JArray }, { wm: JArray; place: JArray }]) => [JArray, JArray, { k: JArray; v: JArray }, Record<string, JArray>];
      mlp: (...a: [MlpParams, JArray, JArray, SiteOps]) => [JArray, Record<string, JArray>];
    };
  }

  dispose(): void {
    for (const f of this.cache.values()) for (const g of Object.values(f)) (g as { dispose?: () => void }).dispose?.();
    this.cache.clear();
  }
}

/** Final norm + unembedding, with ln_final.hook_normalized ops/reads. Returns logits per vocab chunk. */
export function head(c: ModelConfig, st: Static, lnFinal: NormParams, unembed: Weight, x: JArray, ops: SiteOps): [JArray[], Record<string, JArray>] {
  const reads: Record<string, JArray> = {};
  const h = site(norm(x, lnFinal, c.norm), "ln_final.hook_normalized", ops, reads, st);
  const chunks = Array.isArray(unembed) ? unembed : [unembed];
  const out = chunks.map((w, i) => {
    const l = matT(i < chunks.length - 1 ? h.ref : h, w);
    return c.finalSoftcap ? softcap(l, c.finalSoftcap) : l;
  });
  return [out, reads];
}

/** Embedding-stage sites (hook_embed, hook_pos_embed): resid_pre of block 0 = embed + pos. */
export function embedStage(st: Static, tok: JArray, pos: JArray | null, ops: SiteOps): [JArray, Record<string, JArray>] {
  const reads: Record<string, JArray> = {};
  let x = site(tok, "hook_embed", ops, reads, st);
  if (pos) x = x.add(site(pos, "hook_pos_embed", ops, reads, st));
  return [x, reads];
}
