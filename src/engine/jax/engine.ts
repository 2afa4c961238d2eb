// The model runtime: host-side batching, positions, masks, interventions and the KV cache around
// the jit'd layer functions in transformer.ts. Public methods take and return host data
// (number[], Float32Array); jax-js arrays never leave this file and transformer.ts.
import "../../core/polyfills.js";
import { blockUntilReady, numpy as np, tree, valueAndGrad, type Array as JArray } from "@jax-js/jax";
import { UsageError } from "../../core/errors.js";
import { parseHook, type HookName } from "../../hooks/names.js";
import type { Intervention, Plan, PosSpec } from "../../hooks/plan.js";
import type { ActivationCache } from "../cache.js";
import { Driver, type LayerCall } from "../driver.js";
import { asRow, attnMaskHost, compileHost, featShapeOf, fullCtx, padShape, resolvePlan, scopeMask, type CallCtx, type Resolved } from "../plan.js";
import { type ForwardOptions, type ForwardResult, type GenerateOptions, type GenerateResult, type PrefixCounter, type Row } from "../types.js";

export { ActivationCache } from "../cache.js";
export { Sampler, argmax } from "../decode.js";
export { type ForwardOptions, type ForwardResult, type GenerateOptions, type GenerateResult, type PrefixCounter, type Row, type SampleOptions } from "../types.js";
import type { ModelConfig } from "../config.js";
import type { EngineModel, HostTensor } from "../weights.js";
import { ropeTables } from "../rope.js";
import { LayerFns, embedStage, head, splitOps, type BlockParams, type DeviceParams, type LayerKey, type OpKind, type Rot, type SiteOp, type SiteOps, type Weight } from "./transformer.js";

/** A trainable vector added at one site: `op.v` is a traced array inside valueAndGrad. */
interface TrainOp {
  layer: number | null;
  site: string;
  op: SiteOp;
}

export interface EngineOptions {
  /** Largest single device buffer; larger weights are split into row chunks. */
  maxBindingBytes?: number;
  /**
   * Storage of weight matrices. "f16" halves device memory on WebGPU (shader-f16); matmuls
   * widen to f32 as they load, and the residual stream, norms, logits and vectors stay f32.
   */
  weightDtype?: "f32" | "f16";
  /** Trace-compile the layer halves (default true). */
  jit?: boolean;
}

/** A generate call's KV cache: per layer k and v, [B, cap, nKvHeads, dHead]. */
interface JaxKv {
  cap: number;
  out: { k: JArray; v: JArray }[];
}

/** Elements of one prefill attention-score tensor (B·heads·chunk·cap) we allow at once. */
const PREFILL_BUDGET = 4 << 20;

export class Engine {
  readonly config: ModelConfig;
  private params: DeviceParams;
  private embed: HostTensor;
  private posEmbed: HostTensor | undefined;
  private fns: LayerFns;
  private disposed = false;

  constructor(host: EngineModel, opts: EngineOptions = {}) {
    this.config = host.config;
    const c = host.config;
    const max = opts.maxBindingBytes ?? Infinity;
    const w = (name: string) => {
      const t = host.weights.get(name);
      if (!t) throw new UsageError(`internal: weight ${name} missing after load`);
      return t;
    };
    const vec = (name: string) => np.array(w(name).data);
    const wd = opts.weightDtype ?? "f32";
    const mat = (name: string): Weight => toDevice(w(name), max, wd);
    const normP = (p: string) => ({ weight: vec(`${p}.weight`), ...(host.weights.has(`${p}.bias`) ? { bias: vec(`${p}.bias`) } : {}) });
    const optNorm = <K extends string>(key: K, p: string) => (host.weights.has(`${p}.weight`) ? ({ [key]: normP(p) } as Record<K, ReturnType<typeof normP>>) : {});
    const lin = (p: string) => ({ weight: mat(`${p}.weight`), ...(host.weights.has(`${p}.bias`) ? { bias: vec(`${p}.bias`) } : {}) });
    const blocks: BlockParams[] = [];
    for (let i = 0; i < c.nLayers; i++) {
      const b = `blocks.${i}`;
      blocks.push({
        ...optNorm("ln1", `${b}.ln1`),
        ...optNorm("ln1Post", `${b}.ln1Post`),
        attn: { q: lin(`${b}.attn.q`), k: lin(`${b}.attn.k`), v: lin(`${b}.attn.v`), o: lin(`${b}.attn.o`), ...optNorm("qNorm", `${b}.attn.qNorm`), ...optNorm("kNorm", `${b}.attn.kNorm`) },
        ...optNorm("ln2", `${b}.ln2`),
        ...optNorm("ln2Post", `${b}.ln2Post`),
        mlp: { ...(c.mlp.kind === "gated" ? { gate: lin(`${b}.mlp.gate`) } : {}), up: lin(`${b}.mlp.up`), down: lin(`${b}.mlp.down`) },
      });
    }
    this.embed = w("embed.weight");
    this.posEmbed = host.weights.get("posEmbed.weight");
    this.params = {
      blocks,
      lnFinal: normP("lnFinal"),
      unembed: toDevice(c.tieEmbeddings ? this.embed : w("unembed.weight"), max, wd),
    };
    this.fns = new LayerFns(c, opts.jit ?? true);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    tree.dispose(this.params as never);
    this.fns.dispose();
  }

  // ------------------------------------------------------------ public entry points

  private readonly driver = new Driver<JArray, JaxKv>(this);

  /** Forward pass over a left-padded batch (one piece, no KV cache). */
  forward(rows: (Row | number[])[], opts: ForwardOptions = {}): Promise<ForwardResult> {
    return this.driver.forward(rows, opts);
  }

  /** Generate with a KV cache; rows may have different lengths and different interventions. */
  generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    return this.driver.generate(rows, opts);
  }

  // ------------------------------------------------------------ the Backend the driver runs

  live(): void {
    if (this.disposed) throw new UsageError("this model was disposed");
  }

  /** Prefill chunks through the cache path: attention memory is B·heads·chunk·cap, not B·heads·T². */
  prefillChunk(B: number, _T: number, cap: number): number {
    return Math.max(16, Math.floor(PREFILL_BUDGET / (B * this.config.nHeads * cap)));
  }

  /** A zeroed cache [B, cap, nKvHeads, dHead] per layer; a forward pass runs in one piece without one. */
  openKv(B: number, cap: number, forward: boolean): JaxKv | null {
    if (forward) return null;
    const c = this.config;
    return { cap, out: Array.from({ length: c.nLayers }, () => ({ k: np.zeros([B, cap, c.nKvHeads, c.dHead]), v: np.zeros([B, cap, c.nKvHeads, c.dHead]) })) };
  }

  closeKv(kv: JaxKv | null): void {
    if (kv) tree.dispose(kv.out as never);
  }

  mark(): number {
    return 0;
  }

  release(): void {}

  layers(call: LayerCall, kv: JaxKv | null, slot0: number): JArray {
    return this.runLayers(call.ctx, call.pad, call.promptLen, call.resolved, kv ? { cap: kv.cap, out: kv.out, slot0 } : null, call.cache, null);
  }

  head(x: JArray, which: "all" | "last", call: LayerCall, headCtx: CallCtx): Promise<Float32Array> {
    const xs = which === "last" ? x.slice([], [-1]).reshape([call.ctx.B, 1, this.config.dModel]) : x;
    return this.headToHost(xs, headCtx, call.promptLen, call.resolved, call.cache);
  }

  /**
   * jax-js dispatches lazily: without a sync point every prefill chunk's intermediates would be
   * alive at once when the logits are finally read.
   */
  async drop(x: JArray, kv: JaxKv | null): Promise<void> {
    await blockUntilReady([x, ...(kv?.out ?? [])] as never);
    x.dispose();
    await this.flushReads();
  }

  /**
   * Loss and gradient with respect to a vector added at one hook (the trained-bias and adapter
   * experiments). Loss = mean cross-entropy of `targets` (per row, per position; -1 = ignore).
   */
  async lossAndGrad(
    rows: (Row | number[])[],
    targets: number[][],
    train: { at: HookName; pos?: PosSpec; value: Float32Array },
    opts: { plan?: Plan; countPrefix?: PrefixCounter } = {},
  ): Promise<{ loss: number; grad: Float32Array }> {
    this.live();
    const c = this.config;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const { layer, site } = parseHook(train.at, c.nLayers);
    const feat = featShapeOf(c, site);
    if (feat.length !== 1 || train.value.length !== feat[0]) throw new UsageError(`lossAndGrad: ${train.at} takes a vector of length ${feat.join("x")}`);
    const probe: Intervention = { op: "add", at: train.at, vector: train.value, ...(train.pos ? { pos: train.pos } : {}) };
    const [r] = resolvePlan(this.config, [probe], rs, promptLen, opts.countPrefix);
    // Other interventions (e.g. a concept injection during training) apply as constants.
    const resolvedPlan = resolvePlan(this.config, opts.plan ?? [], rs, promptLen, opts.countPrefix);
    if (resolvedPlan.some((x) => x.iv.op === "read")) throw new UsageError("lossAndGrad: the plan cannot contain reads");
    const ctx = fullCtx(rs, B, T, pad);
    // Target weights folded with 1/n on the host: loss = -sum(w * logsoftmax(logits)).
    let n = 0;
    targets.forEach((ts, b) => ts.forEach((t, i) => { if (t >= 0) { n++; if (i >= rs[b]!.ids.length) throw new UsageError("lossAndGrad: more targets than tokens"); } }));
    if (n === 0) throw new UsageError("lossAndGrad: no targets");
    const wt = new Float32Array(B * T * c.dVocab);
    targets.forEach((ts, b) => ts.forEach((t, i) => { if (t >= 0) wt[(b * T + pad[b]! + i) * c.dVocab + t] = 1 / n; }));
    const mask = scopeMask(r!, ctx, promptLen, [1]);
    const f = (v: JArray): JArray => {
      const trainOp: TrainOp = { layer, site, op: { v: v.reshape([1, 1, feat[0]!]), m: np.array(mask).reshape([B, T, 1]) } };
      const x = this.runLayers(ctx, pad, promptLen, resolvedPlan, null, null, trainOp);
      const [chunks] = head(c, { readSet: new Set(), kinds: new Map() }, tree.ref(this.params.lnFinal as never) as never, refWeight(this.params.unembed), x, {});
      const logits = chunks.length === 1 ? chunks[0]! : np.concatenate(chunks, -1);
      const lsm = logits.sub(logsumexp(logits.ref));
      return lsm.mul(np.array(wt).reshape([B, T, c.dVocab])).sum().neg();
    };
    const [loss, grad] = valueAndGrad(f)(np.array(train.value));
    const lossV = (await loss.data())[0]!;
    const g = new Float32Array(await grad.data());
    return { loss: lossV, grad: g };
  }

  // ------------------------------------------------------------ internals

  featShape(site: string): number[] {
    return featShapeOf(this.config, site);
  }

  /** Compile the resolved plan into per-layer site ops for one call. Arrays are fresh (consumed downstream). */
  private compile(resolved: Resolved[], ctx: CallCtx, promptLen: number[], group: number | null | "final"): { ops: SiteOps; kinds: Map<string, OpKind[]>; reads: string[] } {
    const { host, reads } = compileHost(resolved, ctx, promptLen, group);
    const ops: SiteOps = {};
    const kinds = new Map<string, OpKind[]>();
    for (const [site, list] of host) {
      if (list.length === 0) continue;
      ops[site] = list.map((o) => ({
        v: np.array(o.v).reshape(o.vShape),
        m: o.kind === "replace" ? boolArr(o.m, o.mShape) : np.array(o.m).reshape(o.mShape),
      }));
      kinds.set(site, list.map((o) => o.kind));
    }
    return { ops, kinds, reads };
  }


  /** Store reads (device arrays [B,T,...]) into the cache, dropping padding. */
  private async collect(reads: Record<string, JArray>, layer: number | null, ctx: CallCtx, cache: ActivationCache | null): Promise<void> {
    for (const [s, a] of Object.entries(reads)) {
      const name = (layer === null ? s : `blocks.${layer}.${s}`) as HookName;
      const shape = a.shape;
      const data = await a.data();
      if (!cache) continue;
      const { B, T } = ctx;
      if (s === "attn.hook_pattern") {
        // [B,H,T,T] (full calls only) -> per row [T_b, H, T_b] without padding slots.
        const [, H] = shape as [number, number];
        for (let b = 0; b < B; b++) {
          const n = ctx.pos.subarray(b * T, (b + 1) * T).filter((p) => p >= 0).length;
          const first = T - n;
          const out = new Float32Array(n * H * n);
          for (let t = 0; t < n; t++)
            for (let h = 0; h < H; h++)
              out.set(data.subarray(((b * H + h) * T + first + t) * T + first, ((b * H + h) * T + first + t) * T + T), (t * H + h) * n);
          cache.append(name, [H, n], b, out);
        }
        continue;
      }
      const F = shape.slice(2).reduce((x, y) => x * y, 1);
      for (let b = 0; b < B; b++) {
        const keep: number[] = [];
        for (let t = 0; t < T; t++) if (ctx.pos[b * T + t]! >= 0) keep.push(t);
        const out = new Float32Array(keep.length * F);
        keep.forEach((t, i) => out.set(data.subarray((b * T + t) * F, (b * T + t + 1) * F), i * F));
        cache.append(name, shape.slice(2) as number[], b, out);
      }
    }
  }

  // Reads are issued while later layers are dispatched and awaited before results are returned.
  private pendingReads: Promise<void>[] = [];
  private async flushReads(): Promise<void> {
    const p = this.pendingReads;
    this.pendingReads = [];
    await Promise.all(p);
  }

  /**
   * Embedding + all blocks for one call. With `kvc`, the call's T slots start at cache slot
   * `kvc.slot0` (a prefill chunk or one decode step) and their k/v are written into the cache.
   * Returns the residual stream [B,T,D].
   */
  private runLayers(
    ctx: CallCtx,
    pad: number[],
    promptLen: number[],
    resolved: Resolved[],
    kvc: { cap: number; out: { k: JArray; v: JArray }[]; slot0: number } | null,
    cache: ActivationCache | null,
    trainOp: TrainOp | null,
  ): JArray {
    const c = this.config;
    const { B, T } = ctx;
    const D = c.dModel;
    // Embedding lookup on the host: the table never needs a device copy (unless tied).
    const tok = new Float32Array(B * T * D);
    const posE = this.posEmbed ? new Float32Array(B * T * D) : null;
    for (let b = 0; b < B; b++)
      for (let t = 0; t < T; t++) {
        const p = ctx.pos[b * T + t]!;
        if (p < 0) continue;
        const id = ctx.ids[b * T + t]!;
        if (!(id >= 0 && id < c.dVocab)) throw new UsageError(`token id ${id} is outside the vocabulary (0..${c.dVocab - 1})`);
        const e = this.embed.data.subarray(id * D, (id + 1) * D);
        const o = (b * T + t) * D;
        if (c.embedScale === 1) tok.set(e, o);
        else for (let i = 0; i < D; i++) tok[o + i] = e[i]! * c.embedScale;
        if (posE) {
          if (p >= c.nCtx) throw new UsageError(`position ${p} exceeds the model's context of ${c.nCtx}`);
          posE.set(this.posEmbed!.data.subarray(p * D, (p + 1) * D), o);
        }
      }
    const emb = this.compile(resolved, ctx, promptLen, null);
    this.addTrain(emb, trainOp, null);
    const [x0, er] = embedStage({ readSet: new Set(emb.reads), kinds: emb.kinds }, np.array(tok).reshape([B, T, D]), posE ? np.array(posE).reshape([B, T, D]) : null, emb.ops);
    this.pendingReads.push(this.collect(er, null, ctx, cache));
    let x = x0;

    // RoPE tables and masks per layer type (sliding layers: own window, maybe their own theta).
    const types = [...new Set(c.layerTypes)];
    const rots = new Map<string, Rot>();
    const masks = new Map<string, JArray>();
    const S = kvc ? kvc.cap : T;
    for (const ty of types) {
      const rot: Rot = {};
      if (c.pos.kind === "rope") {
        const { cos, sin } = ropeTables(c, ctx.pos, B, T, ty === "sliding");
        rot.cos = np.array(cos).reshape([B, T, 1, c.dHead]);
        rot.sin = np.array(sin).reshape([B, T, 1, c.dHead]);
      }
      rots.set(ty, rot);
      masks.set(ty, attnMask(ctx, pad, S, kvc?.slot0 ?? 0, ty === "sliding" ? c.slidingWindow : undefined));
    }
    // Cache writes: slots slot0..slot0+T-1. One slot broadcasts through `where`; a chunk is first
    // placed into capacity-sized arrays by a one-hot [cap, T] matrix (exact: 1·x + 0).
    let wm: JArray | null = null;
    let place: JArray | null = null;
    if (kvc) {
      const w = new Int32Array(kvc.cap);
      w.fill(1, kvc.slot0, kvc.slot0 + T);
      wm = np.array(w, { dtype: np.bool }).reshape([1, kvc.cap, 1, 1]);
      const P = new Float32Array(kvc.cap * T);
      for (let t = 0; t < T; t++) P[(kvc.slot0 + t) * T + t] = 1;
      place = np.array(P).reshape([kvc.cap, T]);
    }
    for (let l = 0; l < c.nLayers; l++) {
      const compiled = this.compile(resolved, ctx, promptLen, l);
      this.addTrain(compiled, trainOp, l);
      const { ops, kinds, reads } = compiled;
      const key: LayerKey = { ops: [...kinds.entries()], reads };
      const fns = this.fns.get(key);
      const [opsA, opsM] = splitOps(ops);
      const p = this.params.blocks[l]!;
      const { o, ...attnRest } = p.attn;
      const pa = tree.ref({ ...(p.ln1 ? { ln1: p.ln1 } : {}), attn: attnRest } as never) as never;
      const pm = tree.ref({ o, ...(p.ln1Post ? { ln1Post: p.ln1Post } : {}), ...(p.ln2 ? { ln2: p.ln2 } : {}), ...(p.ln2Post ? { ln2Post: p.ln2Post } : {}), mlp: p.mlp } as never) as never;
      const ty = c.layerTypes[l]!;
      const rotRef = tree.ref(rots.get(ty)! as never) as unknown as Rot;
      const mask = masks.get(ty)!;
      let z: JArray, kvOut: { k: JArray; v: JArray }, ra: Record<string, JArray>;
      if (kvc) {
        [x, z, kvOut, ra] = fns.step(pa, x, rotRef, mask.ref, opsA, kvc.out[l]!, { wm: wm!.ref, place: place!.ref });
        kvc.out[l] = kvOut;
      } else {
        [x, z, kvOut, ra] = fns.full(pa, x, rotRef, mask.ref, opsA);
        tree.dispose(kvOut as never);
      }
      let rm: Record<string, JArray>;
      [x, rm] = fns.mlp(pm, x, z, opsM);
      this.pendingReads.push(this.collect({ ...ra, ...rm }, l, ctx, cache));
    }
    tree.dispose([...rots.values()] as never);
    for (const m of masks.values()) m.dispose();
    wm?.dispose();
    place?.dispose();
    return x;
  }

  private addTrain(c: { ops: SiteOps; kinds: Map<string, OpKind[]> }, trainOp: TrainOp | null, layer: number | null): void {
    if (!trainOp || trainOp.layer !== layer || trainOp.site === "ln_final.hook_normalized") return;
    (c.ops[trainOp.site] ??= []).push(trainOp.op);
    c.kinds.set(trainOp.site, [...(c.kinds.get(trainOp.site) ?? []), "add"]);
  }

  /** ln_final + unembedding for a call; returns logits [B*T*V] on the host. */
  private async headToHost(x: JArray, ctx: CallCtx, promptLen: number[], resolved: Resolved[], cache: ActivationCache): Promise<Float32Array> {
    const c = this.config;
    const { ops, kinds, reads: readList } = this.compile(resolved, ctx, promptLen, "final");
    const [chunks, reads] = head(c, { readSet: new Set(readList), kinds }, tree.ref(this.params.lnFinal as never) as never, refWeight(this.params.unembed), x, ops);
    await this.collect(reads, null, ctx, cache);
    await this.flushReads();
    const rowsN = ctx.B * ctx.T;
    const out = new Float32Array(rowsN * c.dVocab);
    let off = 0;
    for (const ch of chunks) {
      const w = ch.shape.at(-1)!;
      const d = await ch.data();
      for (let r = 0; r < rowsN; r++) out.set(d.subarray(r * w, (r + 1) * w), r * c.dVocab + off);
      off += w;
    }
    return out;
  }
}

/** Upload a matrix, as f16 if asked (converted on the device), in row chunks under the binding limit. */
function toDevice(t: HostTensor, maxBytes: number, dtype: "f32" | "f16" = "f32"): Weight {
  const elem = dtype === "f16" ? 2 : 4;
  const up = (data: Float32Array, shape: number[]) => {
    const a = np.array(data).reshape(shape);
    return dtype === "f16" ? a.astype(np.float16) : a;
  };
  if (t.data.length * elem <= maxBytes || t.shape.length !== 2) return up(t.data, t.shape);
  const [rows, cols] = t.shape as [number, number];
  const per = Math.max(1, Math.floor(maxBytes / (cols * Math.max(elem, 4)))); // the f32 staging copy must fit too
  const chunks: JArray[] = [];
  for (let r = 0; r < rows; r += per) {
    const n = Math.min(per, rows - r);
    chunks.push(up(t.data.slice(r * cols, (r + n) * cols), [n, cols]));
  }
  return chunks;
}

function refWeight(w: Weight): Weight {
  return Array.isArray(w) ? w.map((c) => c.ref) : w.ref;
}

function boolArr(m: Float32Array, shape: number[]): JArray {
  return np.array(Int32Array.from(m, (x) => (x ? 1 : 0)), { dtype: np.bool }).reshape(shape);
}

function logsumexp(x: JArray): JArray {
  const mx = x.ref.max(-1, { keepdims: true });
  return np.log(np.exp(x.sub(mx.ref)).sum(-1, { keepdims: true })).add(mx);
}



function attnMask(ctx: CallCtx, pad: number[], S: number, slot0: number, window: number | undefined): JArray {
  return np.array(attnMaskHost(ctx, pad, S, slot0, window), { dtype: np.bool }).reshape([ctx.B, ctx.T, S]);
}
