// The forward pass on @jax-js/jax: an interpreter of the block schedule (src/engine/schedule.ts).
// Each half of a block, the embedding stage and the head walk their steps at trace time; every
// step kind has one implementation below (STEPS, EMBED_STEPS, HEAD_STEPS) and there is no block
// semantics outside them. This file (with kv-cache handling in engine.ts) is the only place that
// manages jax-js reference counts. Rule: every function consumes the arrays passed to it; callers
// pass `.ref` (or `tree.ref`) to keep their own reference. Inside a half, named buffers live in an
// environment that owns one reference each; a step borrows (`.ref`) what it reads and the
// environment drops each buffer after its last use (a liveness pass over the steps).
//
// A block is two jit'd halves, split at `schedule.split` (the attention output): inside one jit a
// matmul that reads the permuted einsum output runs ~12x slower (engine study, issue 4); jit
// outputs are contiguous.
import "../../core/polyfills.js";
import { jit, nn, numpy as np, tree, type Array as JArray, type OwnedFunction } from "@jax-js/jax";
import type { ModelConfig, NormSpec } from "../config.js";
import type { LinearName } from "../grad.js";
import type { OpKind } from "../plan.js";
import { scheduleOf, type BlockNormName, type EmbedStep, type HeadStep, type Step } from "../schedule.js";

export type { OpKind } from "../plan.js";

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
/** The norms a block may hold (weights blocks.{i}.{name}). */
export type NormName = BlockNormName | "attn.qNorm" | "attn.kNorm";
/** A mixture of experts' matrices, every expert stacked: gate and up [E, F, D], down [E, D, F]. */
export interface ExpertParams {
  gate: JArray;
  up: JArray;
  down: JArray;
}
export type ParamName = LinearName | NormName | "mlp.router" | "mlp.experts";
/** One block's weights, keyed as their names below blocks.{i} (absent: the block has no such norm / gate). */
export type BlockParams = { [K in LinearName]?: LinearParams } & { [K in NormName]?: NormParams } & { "mlp.router"?: LinearParams; "mlp.experts"?: ExpertParams };
/**
 * A low-rank adapter on one linear layer: y += (x·Aᵀ)·Bᵀ. `b` already carries the adapter's
 * scale (folded in by the caller outside the jit, so a gradient with respect to B is exact).
 */
export interface Adapter {
  a: JArray;
  b: JArray;
}
export type Adapters = { [K in LinearName]?: Adapter };
/** What one jit'd half receives: the weights its steps use and the adapters on its linears. */
export type HalfParams = BlockParams & { lora?: Adapters };
export interface DeviceParams {
  blocks: BlockParams[];
  lnFinal: NormParams;
  unembed: Weight;
}

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

/** The static (trace-time) description of a layer call: which ops at which sites, what to read, which linears carry adapters. */
export interface LayerKey {
  ops: [site: string, kinds: OpKind[]][];
  reads: string[];
  lora?: LinearName[];
}

/** The static part of a call: reads and op kinds per site. */
export interface Static {
  readSet: ReadonlySet<string>;
  kinds: SiteKinds;
}

/** RoPE tables [B,T,1,dHead]; empty for learned-position models (an empty object is a valid JsTree). */
export type Rot = { cos?: JArray; sin?: JArray };
export type KV = { k: JArray; v: JArray };
/** Cache write of a call: wm [1,cap,1,1] bool (the call's slots), place [cap,T] one-hot. */
export type KvWrite = { wm: JArray; place: JArray };
/** Named buffers crossing a jit boundary (the residual stream x, and z between the halves). */
export type Env = Record<string, JArray>;

// ---------------------------------------------------------------- primitives

/** w as f32: f16-stored weights are widened inside the jit'd kernel (the activations stay f32). */
function f32(w: JArray): JArray {
  return w.dtype === np.float16 ? w.astype(np.float32) : w;
}

/** x @ wᵀ. */
function matT(x: JArray, w: JArray): JArray {
  return np.dot(x, f32(w).transpose());
}

/** x·Wᵀ (+ bias) (+ (x·Aᵀ)·Bᵀ). Consumes x, p's arrays and the adapter's. */
function linear(x: JArray, p: LinearParams, ad?: Adapter): JArray {
  const w = p.weight;
  const low = ad ? matT(matT(x.ref, ad.a), ad.b) : null;
  let y: JArray;
  if (Array.isArray(w)) {
    // Row chunks: y = concat_c(x @ w_c^T). Each chunk stays under the binding limit.
    const parts = w.map((c, i) => matT(i < w.length - 1 ? x.ref : x, c));
    y = np.concatenate(parts, -1);
  } else y = matT(x, w);
  if (p.bias) y = y.add(p.bias);
  return low ? y.add(low) : y;
}

function norm(x: JArray, p: NormParams, spec: NormSpec): JArray {
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

/** rotate-half RoPE. x [B,T,N,hd]; cos, sin [B,T,1,hd]. */
function rope(x: JArray, cos: JArray, sin: JArray): JArray {
  const [x1, x2] = np.split(x.ref, 2, -1) as [JArray, JArray];
  return x.mul(cos).add(np.concatenate([x2.neg(), x1], -1).mul(sin));
}

/** Apply the ops compiled for `name` to x (consumed), then record a read if asked. Borrows the ops. */
function applySite(x: JArray, name: string, ops: SiteOps, reads: Record<string, JArray>, st: Static): JArray {
  const kinds = st.kinds.get(name) ?? [];
  (ops[name] ?? []).forEach((op, i) => {
    const kind = kinds[i];
    if (kind === "add") x = x.add(op.m.ref.mul(op.v.ref));
    else if (kind === "project") {
      const coef = x.ref.mul(op.v.ref).sum(-1, { keepdims: true });
      x = x.sub(op.m.ref.mul(coef).mul(op.v.ref));
    } else x = np.where(op.m.ref, op.v.ref, x);
  });
  if (st.readSet.has(name)) reads[name] = x.ref;
  return x;
}

// ---------------------------------------------------------------- the interpreter

/** What a half-block call was given. */
interface Call {
  c: ModelConfig;
  st: Static;
  /** A half's weights, or the head's. */
  p: HalfParams & Partial<HeadParams>;
  ops: SiteOps;
  B: number;
  T: number;
  rot?: Rot;
  mask?: JArray;
  /** The KV cache and the call's write into it (cached calls only). */
  kv?: KV;
  write?: KvWrite;
}

/** Internal errors: the schedule and its implementation disagree (never bad user input). */
const internal = (what: string) => new Error(`internal: ${what}`);

/**
 * One traced half-block (or embedding stage, or head): the environment of named buffers, the
 * reads recorded and the KV cache written. Steps borrow everything they read (`.ref`); `finish`
 * releases what the call was given.
 */
class Exec {
  readonly env = new Map<string, JArray>();
  readonly reads: Record<string, JArray> = {};
  kvOut: KV | null = null;
  constructor(readonly k: Call) {}

  get c(): ModelConfig {
    return this.k.c;
  }
  /** A buffer, borrowed. */
  get(b: string): JArray {
    const a = this.env.get(b);
    if (!a) throw internal(`block buffer ${b} is empty`);
    return a.ref;
  }
  /** Store a buffer (owned), dropping what it held. */
  set(b: string, a: JArray): void {
    this.env.get(b)?.dispose();
    this.env.set(b, a);
  }
  /** Drop every buffer not in `live`. */
  keep(live: ReadonlySet<string>): void {
    for (const [b, a] of this.env)
      if (!live.has(b)) {
        a.dispose();
        this.env.delete(b);
      }
  }
  /** Apply a site's ops and reads. */
  site(name: string, x: JArray): JArray {
    return applySite(x, name, this.k.ops, this.reads, this.k.st);
  }
  /** Whether the plan touches a site in this call (ops or a read). */
  touches(name: string): boolean {
    return this.k.st.kinds.has(name) || this.k.st.readSet.has(name);
  }
  normP(name: NormName): NormParams {
    const p = this.k.p[name];
    if (!p) throw internal(`the schedule's norm ${name} has no weights`);
    return tree.ref(p as never) as unknown as NormParams;
  }
  linear(x: JArray, name: LinearName): JArray {
    const p = this.k.p[name];
    if (!p) throw internal(`the schedule's linear ${name} has no weights`);
    const ad = this.k.p.lora?.[name];
    return linear(x, tree.ref(p as never) as unknown as LinearParams, ad ? (tree.ref(ad as never) as unknown as Adapter) : undefined);
  }
  /** Release the call's inputs (each step borrowed what it used). */
  finish(): void {
    const { p, ops, rot, mask, kv, write } = this.k;
    tree.dispose([p, ops, rot ?? {}, kv ?? {}, write ?? {}] as never);
    mask?.dispose();
  }
}

type Impl<S extends { kind: string }> = { [K in S["kind"]]: (e: Exec, s: Extract<S, { kind: K }>) => void };

/** One implementation per block step kind (src/engine/schedule.ts documents each). */
const STEPS: Impl<Step> = {
  site: (e, s) => e.set(s.buf, e.site(s.site, e.get(s.buf))),
  norm: (e, s) => e.set(s.dst, norm(e.get(s.src), e.normP(s.weight), e.c.norm)),
  copy: (e, s) => e.set(s.dst, e.get(s.src)),
  qkv: (e) => {
    const { c } = e;
    const { B, T } = e.k;
    const h = e.get("h");
    e.set("q", e.linear(h.ref, "attn.q").reshape([B, T, c.nHeads, c.dHead]));
    e.set("k", e.linear(h.ref, "attn.k").reshape([B, T, c.nKvHeads, c.dHead]));
    e.set("v", e.linear(h, "attn.v").reshape([B, T, c.nKvHeads, c.dHead]));
  },
  qkNorm: (e) => {
    const { c } = e;
    const { B, T } = e.k;
    const one = (buf: "q" | "k", w: NormName, N: number) => {
      const y = e.get(buf);
      // Per head: over dHead; "full" (OLMo 2): over the whole projection.
      e.set(buf, c.qkNorm.kind === "full" ? norm(y.reshape([B, T, N * c.dHead]), e.normP(w), c.norm).reshape([B, T, N, c.dHead]) : norm(y, e.normP(w), c.norm));
    };
    one("q", "attn.qNorm", c.nHeads);
    one("k", "attn.kNorm", c.nKvHeads);
  },
  rope: (e) => {
    const { cos, sin } = e.k.rot ?? {};
    if (!cos || !sin) throw internal("a rope step without RoPE tables");
    e.set("q", rope(e.get("q"), cos.ref, sin.ref));
    e.set("k", rope(e.get("k"), cos.ref, sin.ref));
  },
  attend: (e, s) => {
    const { c } = e;
    const { B, T, mask, kv, write } = e.k;
    if (!mask) throw internal("an attend step without a mask");
    const { nHeads: H, nKvHeads: K, dHead: hd } = c;
    const q = e.get("q");
    let kAll: JArray, vAll: JArray;
    if (!kv || !write) {
      kAll = e.get("k");
      vAll = e.get("v");
    } else {
      // No dynamic_update_slice in jax-js: write new slots with `where` over the capacity. A single
      // slot broadcasts; a chunk is first placed at its slots by the one-hot [cap, T] matrix.
      let k = e.get("k");
      let v = e.get("v");
      if (T > 1) {
        k = np.einsum("st,btkh->bskh", write.place.ref, k);
        v = np.einsum("st,btkh->bskh", write.place.ref, v);
      }
      kAll = np.where(write.wm.ref, k, kv.k.ref);
      vAll = np.where(write.wm.ref, v, kv.v.ref);
      e.kvOut = { k: kAll.ref, v: vAll.ref };
    }
    // Grouped-query attention without materialising repeated K/V heads.
    const S = kAll.shape[1]!;
    const qg = q.reshape([B, T, K, H / K, hd]);
    let sc = np.einsum("btkgh,bskh->bkgts", qg, kAll).mul(c.attnScale);
    if (c.attnSoftcap) sc = softcap(sc, c.attnSoftcap);
    sc = np.where(mask.ref.reshape([B, 1, 1, T, S]), sc, -Infinity);
    const pr = nn.softmax(sc, -1);
    if (e.k.st.readSet.has(s.pattern)) e.reads[s.pattern] = pr.ref.reshape([B, H, T, S]);
    e.set("z", np.einsum("bkgts,bskh->btkgh", pr, vAll).reshape([B, T, H, hd]));
  },
  oProj: (e, s) => {
    const { c } = e;
    const { B, T } = e.k;
    const z = e.get("z");
    if (!e.touches(s.result)) {
      e.set("a", e.linear(z.reshape([B, T, c.nHeads * c.dHead]), "attn.o"));
      return;
    }
    // Per-head outputs result_h = z_h·W_o[:, h]ᵀ [B,T,H,D] (no bias), then their sum + b_o.
    const o = e.k.p["attn.o"];
    if (!o) throw internal("the schedule's linear attn.o has no weights");
    const perHead = (w: JArray, rows: number) => np.einsum("bthe,dhe->bthd", z.ref, f32(w.ref).reshape([rows, c.nHeads, c.dHead]));
    const chunks = Array.isArray(o.weight) ? o.weight : [o.weight];
    let r = chunks.length === 1 ? perHead(chunks[0]!, chunks[0]!.shape[0]!) : np.concatenate(chunks.map((w) => perHead(w, w.shape[0]!)), -1);
    const ad = e.k.p.lora?.["attn.o"];
    if (ad) {
      // The adapter's share per head: (z_h·A[:, h]ᵀ)·Bᵀ.
      const rank = ad.a.shape[0]!;
      const u = np.einsum("bthe,rhe->bthr", z.ref, ad.a.ref.reshape([rank, c.nHeads, c.dHead]));
      r = r.add(np.einsum("bthr,dr->bthd", u, ad.b.ref));
    }
    z.dispose();
    r = e.site(s.result, r);
    const a = r.sum(2);
    e.set("a", o.bias ? a.add(o.bias.ref) : a);
  },
  mlpIn: (e) => {
    const h = e.get("h");
    if (e.c.mlp.kind === "gated") {
      e.set("pre", e.linear(h.ref, "mlp.gate"));
      e.set("up", e.linear(h, "mlp.up"));
    } else e.set("pre", e.linear(h, "mlp.up"));
  },
  mlpAct: (e) => {
    const a = act(e.get("pre"), e.c.mlp.act);
    e.set("post", e.c.mlp.kind === "gated" ? a.mul(e.get("up")) : a);
  },
  down: (e) => e.set("d", e.linear(e.get("post"), "mlp.down")),
  residual: (e, s) => e.set("x", e.get("x").add(e.get(s.src))),
  // Mixture of experts, computed densely: every expert runs on every row (E/topK times the work of
  // the cpu engine's routed rows) and is weighted by ew, 0 for experts not routed to.
  route: (e) => {
    const p = e.k.p["mlp.router"];
    if (!p) throw internal("the schedule's router has no weights");
    e.set("rl", linear(e.get("h"), tree.ref(p as never) as unknown as LinearParams));
  },
  select: (e) => {
    const m = e.c.mlp;
    if (m.kind !== "moe") throw internal("select on a dense MLP");
    const p = nn.softmax(e.get("rl"), -1);
    // The top-k by repeated argmax (ties: the lower index, as the cpu engine's stable order).
    let rest = p.ref;
    let mask = np.zerosLike(p.ref);
    for (let k = 0; k < m.topK; k++) {
      const hot = nn.oneHot(np.argmax(rest.ref, -1), m.nExperts);
      mask = mask.add(hot.ref);
      rest = np.where(hot.astype(np.bool), -Infinity, rest);
    }
    rest.dispose();
    const w = p.mul(mask);
    e.set("ew", m.normTopK ? w.ref.div(w.sum(-1, { keepdims: true })) : w);
  },
  experts: (e, s) => {
    const x = e.k.p["mlp.experts"];
    if (!x) throw internal("the schedule's experts have no weights");
    const h = e.get("h");
    const pre = np.einsum("btd,efd->btef", h.ref, f32(x.gate.ref));
    const up = np.einsum("btd,efd->btef", h, f32(x.up.ref));
    const y = np.einsum("btef,edf->bted", act(pre, e.c.mlp.act).mul(up), f32(x.down.ref));
    const ew = e.get("ew");
    if (!e.touches(s.out)) {
      e.set("d", np.einsum("bte,bted->btd", ew, y));
      return;
    }
    const eo = e.site(s.out, y.mul(ew.reshape([...ew.shape, 1])));
    e.set("d", eo.sum(2));
  },
};

/** Buffers a step reads and writes ("up": the gated MLP's up projection, private to mlpIn/mlpAct). */
function io(s: Step, c: ModelConfig): [reads: string[], writes: string[]] {
  switch (s.kind) {
    case "site":
      return [[s.buf], [s.buf]];
    case "norm":
    case "copy":
      return [[s.src], [s.dst]];
    case "qkv":
      return [["h"], ["q", "k", "v"]];
    case "qkNorm":
    case "rope":
      return [["q", "k"], ["q", "k"]];
    case "attend":
      return [["q", "k", "v"], ["z"]];
    case "oProj":
      return [["z"], ["a"]];
    case "mlpIn":
      return [["h"], c.mlp.kind === "gated" ? ["pre", "up"] : ["pre"]];
    case "mlpAct":
      return [c.mlp.kind === "gated" ? ["pre", "up"] : ["pre"], ["post"]];
    case "down":
      return [["post"], ["d"]];
    case "route":
      return [["h"], ["rl"]];
    case "select":
      return [["rl"], ["ew"]];
    case "experts":
      return [["h", "ew"], ["d"]];
    case "residual":
      return [["x", s.src], ["x"]];
  }
}

/** The weights a step uses. */
function paramsOf(s: Step, c: ModelConfig): ParamName[] {
  switch (s.kind) {
    case "norm":
      return [s.weight];
    case "qkv":
      return ["attn.q", "attn.k", "attn.v"];
    case "qkNorm":
      return ["attn.qNorm", "attn.kNorm"];
    case "oProj":
      return ["attn.o"];
    case "mlpIn":
      return c.mlp.kind === "gated" ? ["mlp.gate", "mlp.up"] : ["mlp.up"];
    case "down":
      return ["mlp.down"];
    case "route":
      return ["mlp.router"];
    case "experts":
      return ["mlp.experts"];
    default:
      return [];
  }
}

/** The sites a step fires (its own, or those inside it). */
function sitesOf(s: Step): string[] {
  if (s.kind === "site") return [s.site];
  if (s.kind === "attend") return [s.pattern];
  if (s.kind === "oProj") return [s.result];
  if (s.kind === "experts") return [s.out];
  return [];
}

/** One half of a block, analysed once per config: steps, buffers live after each, weights, sites. */
export interface Half {
  steps: readonly Step[];
  /** Buffers the half starts with and ends with. */
  inputs: readonly string[];
  outputs: readonly string[];
  liveAfter: ReadonlySet<string>[];
  params: readonly ParamName[];
  sites: ReadonlySet<string>;
}

const halvesMemo = new WeakMap<ModelConfig, [Half, Half]>();

/** The block's two halves (split at schedule.split) with their liveness: the residual stream x is the block's only input and output. */
export function halvesOf(c: ModelConfig): [Half, Half] {
  let h = halvesMemo.get(c);
  if (h) return h;
  const s = scheduleOf(c);
  const analyse = (steps: readonly Step[], outputs: ReadonlySet<string>): Half => {
    const liveAfter: Set<string>[] = new Array<Set<string>>(steps.length);
    let live = new Set(outputs);
    for (let i = steps.length - 1; i >= 0; i--) {
      liveAfter[i] = live;
      const [r, w] = io(steps[i]!, c);
      live = new Set([...live].filter((b) => !w.includes(b)));
      for (const b of r) live.add(b);
    }
    return {
      steps,
      inputs: [...live].sort(),
      outputs: [...outputs].sort(),
      liveAfter,
      params: [...new Set(steps.flatMap((st) => paramsOf(st, c)))],
      sites: new Set(steps.flatMap(sitesOf)),
    };
  };
  const mlp = analyse(s.block.slice(s.split), new Set(["x"]));
  const attn = analyse(s.block.slice(0, s.split), new Set(mlp.inputs));
  if (attn.inputs.join() !== "x") throw internal(`the block reads ${attn.inputs.join(", ")} before writing them`);
  h = [attn, mlp];
  halvesMemo.set(c, h);
  return h;
}

/** Run a half's steps over `env` (consumed); returns its output buffers. */
function runHalf(half: Half, e: Exec, env: Env): Env {
  for (const [b, a] of Object.entries(env)) e.set(b, a);
  half.steps.forEach((s, i) => {
    (STEPS[s.kind] as (e: Exec, s: Step) => void)(e, s);
    e.keep(half.liveAfter[i]!);
  });
  const out: Env = {};
  for (const b of half.outputs) out[b] = e.get(b);
  e.keep(new Set());
  e.finish();
  return out;
}

/** Split a layer's ops between the two halves (by the half whose steps fire the site). */
export function splitOps(c: ModelConfig, ops: SiteOps): [SiteOps, SiteOps] {
  const [attn] = halvesOf(c);
  const a: SiteOps = {};
  const m: SiteOps = {};
  for (const [k, v] of Object.entries(ops)) (attn.sites.has(k) ? a : m)[k] = v;
  return [a, m];
}

/** The weights (and adapters) of `half` from a block's, each referenced once more. */
export function halfParams(half: Half, p: BlockParams, lora: Adapters | undefined): HalfParams {
  const out: HalfParams = {};
  const o = out as Record<string, unknown>;
  for (const name of half.params) {
    const w = p[name];
    if (w) o[name] = tree.ref(w as never);
  }
  if (lora) {
    const mine: Adapters = {};
    for (const [name, ad] of Object.entries(lora) as [LinearName, Adapter][]) if ((half.params as readonly string[]).includes(name)) mine[name] = tree.ref(ad as never) as unknown as Adapter;
    if (Object.keys(mine).length > 0) out.lora = mine;
  }
  return out;
}

type LayerFn = OwnedFunction<(...args: never[]) => unknown>;
type Full = (p: HalfParams, env: Env, rot: Rot, mask: JArray, ops: SiteOps) => [Env, Record<string, JArray>];
type Cached = (p: HalfParams, env: Env, rot: Rot, mask: JArray, ops: SiteOps, kv: KV, write: KvWrite) => [Env, KV, Record<string, JArray>];
type Mlp = (p: HalfParams, env: Env, ops: SiteOps) => [Env, Record<string, JArray>];

/**
 * Compiled layer functions, memoised by the static key (ops per site, reads, adapters). jit
 * itself caches per input shape, so changing a vector's values or a scale never re-traces.
 */
export class LayerFns {
  private cache = new Map<string, { full: LayerFn; step: LayerFn; mlp: LayerFn }>();
  constructor(
    private c: ModelConfig,
    private useJit = true,
  ) {}

  get(key: LayerKey): { full: Full; step: Cached; mlp: Mlp } {
    const id = JSON.stringify(key);
    let fns = this.cache.get(id);
    if (!fns) {
      const c = this.c;
      const [attn, mlp] = halvesOf(c);
      const st: Static = { readSet: new Set(key.reads), kinds: new Map(key.ops) };
      const J = <F extends (...a: never[]) => unknown>(f: F) => (this.useJit ? (jit(f as never) as unknown as LayerFn) : (f as unknown as LayerFn));
      const shape = (env: Env) => env.x!.shape as [number, number, number];
      const full: Full = (p, env, rot, mask, ops) => {
        const [B, T] = shape(env);
        const e = new Exec({ c, st, p, ops, B, T, rot, mask });
        return [runHalf(attn, e, env), e.reads];
      };
      const step: Cached = (p, env, rot, mask, ops, kv, write) => {
        const [B, T] = shape(env);
        const e = new Exec({ c, st, p, ops, B, T, rot, mask, kv, write });
        const out = runHalf(attn, e, env);
        if (!e.kvOut) throw internal("a cached call wrote no KV cache");
        return [out, e.kvOut, e.reads];
      };
      const m: Mlp = (p, env, ops) => {
        const [B, T] = shape(env);
        const e = new Exec({ c, st, p, ops, B, T });
        return [runHalf(mlp, e, env), e.reads];
      };
      fns = { full: J(full), step: J(step), mlp: J(m) };
      this.cache.set(id, fns);
    }
    return fns as unknown as { full: Full; step: Cached; mlp: Mlp };
  }

  dispose(): void {
    for (const f of this.cache.values()) for (const g of Object.values(f)) (g as { dispose?: () => void }).dispose?.();
    this.cache.clear();
  }
}

// ---------------------------------------------------------------- embedding stage and head

/** The embedding stage's inputs: the looked-up (and scaled) token embeddings and, for learned positions, the position embeddings. */
export interface EmbedIn {
  tok: JArray;
  pos: JArray | null;
}

const EMBED_STEPS: Impl<EmbedStep> = {
  embed: (e) => e.set("x", e.get("tok")),
  posEmbed: (e) => e.set("a", e.get("pos")),
  site: (e, s) => e.set(s.buf, e.site(s.site, e.get(s.buf))),
  residual: (e, s) => e.set("x", e.get("x").add(e.get(s.src))),
};

/** The embedding stage (schedule.embed): resid_pre of block 0. Consumes its inputs. */
export function embedStage(c: ModelConfig, st: Static, input: EmbedIn, ops: SiteOps): [JArray, Record<string, JArray>] {
  const [B, T] = input.tok.shape as [number, number];
  const e = new Exec({ c, st, p: {}, ops, B, T });
  e.set("tok", input.tok);
  if (input.pos) e.set("pos", input.pos);
  for (const s of scheduleOf(c).embed) (EMBED_STEPS[s.kind] as (e: Exec, s: EmbedStep) => void)(e, s);
  const x = e.get("x");
  e.keep(new Set());
  e.finish();
  return [x, e.reads];
}

/** The head's weights. */
export interface HeadParams {
  lnFinal: NormParams;
  unembed: Weight;
}

const HEAD_STEPS: Impl<HeadStep> = {
  finalNorm: (e) => {
    const p = e.k.p.lnFinal;
    if (!p) throw internal("a head without lnFinal");
    e.set("h", norm(e.get("x"), tree.ref(p as never) as unknown as NormParams, e.c.norm));
  },
  site: (e, s) => e.set(s.buf, e.site(s.site, e.get(s.buf))),
  unembed: (e) => {
    const { c } = e;
    const w = e.k.p.unembed;
    if (!w) throw internal("a head without an unembedding");
    const chunks = Array.isArray(w) ? w : [w];
    const h = e.get("h");
    chunks.forEach((u, i) => {
      const l = matT(i < chunks.length - 1 ? h.ref : h, u.ref);
      e.set(`logits${i}`, c.finalSoftcap ? softcap(l, c.finalSoftcap) : l);
    });
  },
};

/** The head (schedule.head): final norm and unembedding. Returns logits per vocab chunk [B,T,V_c]. Consumes x and p. */
export function head(c: ModelConfig, st: Static, p: HeadParams, x: JArray, ops: SiteOps): [JArray[], Record<string, JArray>] {
  const [B, T] = x.shape as [number, number];
  const e = new Exec({ c, st, p, ops, B, T });
  e.set("x", x);
  for (const s of scheduleOf(c).head) (HEAD_STEPS[s.kind] as (e: Exec, s: HeadStep) => void)(e, s);
  const n = Array.isArray(p.unembed) ? p.unembed.length : 1;
  const out = Array.from({ length: n }, (_, i) => e.get(`logits${i}`));
  e.keep(new Set());
  e.finish();
  return [out, e.reads];
}
