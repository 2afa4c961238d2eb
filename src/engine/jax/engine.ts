// The model runtime: host-side batching, positions, masks, interventions and the KV cache around
// the jit'd layer functions in transformer.ts (which interpret the block schedule); gradients and
// forward-mode derivatives (src/engine/grad.ts) by jax-js's valueAndGrad and jvp over the same
// pass. Public methods take and return host data (number[], Float32Array); jax-js arrays never
// leave this file and transformer.ts.
import "../../core/polyfills.js";
import { blockUntilReady, jvp, numpy as np, tree, valueAndGrad, type Array as JArray } from "@jax-js/jax";
import { NumericalError, UsageError } from "../../core/errors.js";
import { parseHook, type HookName } from "../../hooks/names.js";
import type { Intervention, Plan, PosSpec } from "../../hooks/plan.js";
import { ActivationCache } from "../cache.js";
import { Driver, type LayerCall } from "../driver.js";
import { trainableWeights, type JvpRequest, type JvpResult, type LinearName, type LossAndGradRequest, type LossAndGradResult, type TrainParam } from "../grad.js";
import { asRow, attnMaskHost, compileHost, featShapeOf, fullCtx, padShape, resolvePlan, scopeMask, type CallCtx, type Resolved } from "../plan.js";
import { type ForwardOptions, type ForwardResult, type GenerateOptions, type GenerateResult, type PrefixCounter, type Row } from "../types.js";

export { ActivationCache } from "../cache.js";
export { Sampler, argmax } from "../decode.js";
export { type ForwardOptions, type ForwardResult, type GenerateOptions, type GenerateResult, type PrefixCounter, type Row, type SampleOptions } from "../types.js";
import type { ModelConfig } from "../config.js";
import type { EngineModel, HostTensor } from "../weights.js";
import { ropeTables } from "../rope.js";
import {
  LayerFns,
  embedStage,
  halfParams,
  halvesOf,
  head,
  splitOps,
  type Adapters,
  type BlockParams,
  type DeviceParams,
  type Env,
  type KV,
  type LayerKey,
  type LinearParams,
  type NormName,
  type NormParams,
  type OpKind,
  type Rot,
  type SiteOp,
  type SiteOps,
  type Weight,
} from "./transformer.js";

/** An add whose payload is traced (a trained vector or scale, an activation's zero probe, the JVP's scaled vector). */
interface TrainOp {
  /** The layer, or null for the embedding stage and the final norm (told apart by site). */
  layer: number | null;
  site: string;
  op: SiteOp;
}

/** What a differentiated pass adds to the plan: traced adds at sites, adapters per layer. */
interface Train {
  ops: TrainOp[];
  lora: Map<number, Adapters>;
  /** Full-weight deltas by canonical name: the pass uses W + delta (row chunks as the device weight's). */
  deltas?: Map<string, JArray[]>;
}

/** Where a call's reads go: the activation cache (forward, generate) or a traced output (jvp). */
type ReadSink = (reads: Record<string, JArray>, layer: number | null) => void;

const LINEARS: readonly LinearName[] = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"];
const NORMS: readonly NormName[] = ["ln1", "ln1Post", "ln2", "ln2Post", "attn.qNorm", "attn.kNorm"];

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
  out: KV[];
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
  /** The weights' store (trainableWeights reads names and shapes for deltas). */
  private readonly host: EngineModel;
  private trainable: ReturnType<typeof trainableWeights> | undefined;

  constructor(host: EngineModel, opts: EngineOptions = {}) {
    this.config = host.config;
    this.host = host;
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
    const normP = (p: string): NormParams => ({ weight: vec(`${p}.weight`), ...(host.weights.has(`${p}.bias`) ? { bias: vec(`${p}.bias`) } : {}) });
    const lin = (p: string): LinearParams => ({ weight: mat(`${p}.weight`), ...(host.weights.has(`${p}.bias`) ? { bias: vec(`${p}.bias`) } : {}) });
    const blocks: BlockParams[] = [];
    for (let i = 0; i < c.nLayers; i++) {
      const b = `blocks.${i}`;
      const bp: BlockParams = {};
      for (const n of NORMS) if (host.weights.has(`${b}.${n}.weight`)) bp[n] = normP(`${b}.${n}`);
      for (const n of LINEARS) if (host.weights.has(`${b}.${n}.weight`)) bp[n] = lin(`${b}.${n}`);
      if (c.mlp.kind === "moe") {
        bp["mlp.router"] = lin(`${b}.mlp.router`);
        // Every expert's matrix stacked into one array (the dense einsum in transformer.ts).
        const stack = (which: "gate" | "up" | "down") => {
          const parts = Array.from({ length: (c.mlp as { nExperts: number }).nExperts }, (_, e) => w(`${b}.mlp.experts.${e}.${which}.weight`));
          const [r, k] = parts[0]!.shape as [number, number];
          if (parts.length * r * k * 4 > max) throw new UsageError(`blocks.${i}: the stacked ${which} matrices of ${parts.length} experts (${((parts.length * r * k * 4) / 2 ** 20).toFixed(0)} MiB) exceed this device's largest buffer; run this model on the cpu device`);
          const data = new Float32Array(parts.length * r * k);
          parts.forEach((t, e) => data.set(t.data, e * r * k));
          const a = np.array(data).reshape([parts.length, r, k]);
          return wd === "f16" ? a.astype(np.float16) : a;
        };
        bp["mlp.experts"] = { gate: stack("gate"), up: stack("up"), down: stack("down") };
      }
      blocks.push(bp);
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
    return this.runLayers(call.ctx, call.pad, call.promptLen, call.resolved, kv ? { cap: kv.cap, out: kv.out, slot0 } : null, this.cacheSink(call.ctx, call.cache), null);
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
   * Loss and gradients (src/engine/grad.ts): loss = mean over the targets of -log p(target);
   * gradients with respect to every TrainParam, all traced in one pass by jax-js's valueAndGrad.
   * Params enter the pass as interventions whose payloads are the traced arrays: a vector or a
   * scale is an `add` at its site, an activation is an added zero tensor [B,T,...feature] (so its
   * gradient is the gradient with respect to the activation there, after the plan's own ops at
   * that site), a LoRA is an adapter on its linear layer. The plan applies as constants.
   *
   * The older form `lossAndGrad(rows, targets, { at, pos, value }, { plan })` trains one vector
   * and returns `{ loss, grad }`.
   */
  async lossAndGrad(rows: (Row | number[])[], req: LossAndGradRequest): Promise<LossAndGradResult>;
  async lossAndGrad(
    rows: (Row | number[])[],
    targets: number[][],
    train: { at: HookName; pos?: PosSpec; value: Float32Array },
    opts?: { plan?: Plan; countPrefix?: PrefixCounter },
  ): Promise<{ loss: number; grad: Float32Array }>;
  async lossAndGrad(
    rows: (Row | number[])[],
    a: LossAndGradRequest | number[][],
    train?: { at: HookName; pos?: PosSpec; value: Float32Array },
    opts: { plan?: Plan; countPrefix?: PrefixCounter } = {},
  ): Promise<LossAndGradResult | { loss: number; grad: Float32Array }> {
    if (!Array.isArray(a)) return this.lossAndGradReq(rows, a);
    if (!train) throw new UsageError("lossAndGrad(rows, targets, train): pass the trained vector { at, value }");
    const r = await this.lossAndGradReq(rows, {
      targets: a,
      params: [{ kind: "vector", at: train.at, ...(train.pos ? { pos: train.pos } : {}), value: train.value }],
      ...(opts.plan ? { plan: opts.plan } : {}),
      ...(opts.countPrefix ? { countPrefix: opts.countPrefix } : {}),
    });
    return { loss: r.loss, grad: r.grads[0]![0]! };
  }

  private async lossAndGradReq(rows: (Row | number[])[], req: LossAndGradRequest): Promise<LossAndGradResult> {
    this.live();
    const c = this.config;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    if (req.params.length === 0) throw new UsageError("lossAndGrad: no params to differentiate (params is empty)");
    // Other interventions (e.g. a concept injection during training) apply as constants.
    const resolved = resolvePlan(c, req.plan ?? [], rs, promptLen, req.countPrefix);
    if (resolved.some((x) => x.iv.op === "read")) throw new UsageError("lossAndGrad: the plan cannot contain reads");
    const ctx = fullCtx(rs, B, T, pad);
    if (req.targets.length !== B) throw new UsageError(`lossAndGrad: targets has ${req.targets.length} rows for a batch of ${B}`);
    // Target weights folded with 1/n on the host: loss = -sum(w * logsoftmax(logits)).
    let n = 0;
    req.targets.forEach((ts, b) =>
      ts.forEach((t, i) => {
        if (t < 0) return;
        if (i >= rs[b]!.ids.length) throw new UsageError("lossAndGrad: more targets than tokens");
        if (!(Number.isInteger(t) && t < c.dVocab)) throw new UsageError(`lossAndGrad: target ${t} (row ${b}, position ${i}) is outside the vocabulary (0..${c.dVocab - 1})`);
        n++;
      }),
    );
    if (n === 0) throw new UsageError("lossAndGrad: no targets");
    const wt = new Float32Array(B * T * c.dVocab);
    req.targets.forEach((ts, b) => ts.forEach((t, i) => { if (t >= 0) wt[(b * T + pad[b]! + i) * c.dVocab + t] = 1 / n; }));
    const bound = req.params.map((p, i) => this.bindParam(p, i, rs, ctx, promptLen, req.countPrefix));
    const loras = new Set<string>();
    for (const p of req.params)
      if (p.kind === "lora") {
        const k = `${p.layer}.${p.linear}`;
        if (loras.has(k)) throw new UsageError(`lossAndGrad: two adapters on blocks.${p.layer}.${p.linear}; give one (its rank can be larger)`);
        loras.add(k);
      } else if (p.kind === "delta") {
        if (loras.has(`delta:${p.name}`)) throw new UsageError(`lossAndGrad: two deltas on one weight (${p.name}); pass one`);
        loras.add(`delta:${p.name}`);
      }
    const f = (ps: JArray[][]): JArray => {
      const train: Train = { ops: [], lora: new Map() };
      ps.forEach((arrs, i) => bound[i]!.install(arrs, train));
      const x = this.runLayers(ctx, pad, promptLen, resolved, null, (r) => tree.dispose(r as never), train);
      const logits = this.headTraced(x, ctx, promptLen, resolved, train, (r) => tree.dispose(r as never));
      disposeTrain(train);
      const lsm = logits.ref.sub(logsumexp(logits));
      return lsm.mul(np.array(wt).reshape([B, T, c.dVocab])).sum().neg();
    };
    const [loss, grads] = valueAndGrad(f)(bound.map((b) => b.primals()));
    const lossV = (await loss.data())[0]!;
    const out: Float32Array[][] = [];
    for (const [i, g] of grads.entries()) out.push(await bound[i]!.result(g));
    return { loss: lossV, grads: out };
  }

  /**
   * Forward-mode derivative of reads with respect to the scale α of the add plan[wrt] (the
   * steering attribution's d(activation)/dα), by jax-js's jvp: the add's payload is traced as
   * α·vector with tangent 1. Returns each read's value and derivative per row.
   */
  async jvpScale(rows: (Row | number[])[], req: JvpRequest): Promise<JvpResult> {
    this.live();
    const c = this.config;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const iv = req.plan[req.wrt];
    if (!iv) throw new UsageError(`jvpScale: wrt ${req.wrt} is not an index of the plan (0..${req.plan.length - 1})`);
    if (iv.op !== "add") throw new UsageError(`jvpScale: plan[${req.wrt}] is a ${iv.op}; the derivative is with respect to the scale of an add`);
    if (req.plan.some((x) => x.op === "read")) throw new UsageError("jvpScale: list the sites to differentiate in reads, not as read ops in the plan");
    if (req.reads.length === 0) throw new UsageError("jvpScale: reads is empty (name the sites whose derivative you want)");
    for (const r of req.reads) {
      const { site } = parseHook(r, c.nLayers);
      if (site === "hook_pos_embed" && c.pos.kind !== "learned") throw new UsageError(`${r}: this model has no learned position embedding`);
    }
    const readPlan: Intervention[] = [...new Set(req.reads)].map((at) => ({ op: "read", at }));
    const all = resolvePlan(c, [...req.plan, ...readPlan], rs, promptLen, req.countPrefix);
    const target = all[req.wrt]!;
    const resolved = all.filter((_, i) => i !== req.wrt);
    const ctx = fullCtx(rs, B, T, pad);
    const alpha = iv.scale ?? 1;
    const maskShape = [B, T, ...(target.featShape.length === 2 ? [target.featShape[0]!, 1] : [1])];
    const mask = scopeMask(target, ctx, promptLen, maskShape.slice(2));
    const needHead = resolved.some((r) => r.site === "ln_final.hook_normalized") || target.site === "ln_final.hook_normalized";
    const g = (s: JArray): Env => {
      const out: Env = {};
      const sink: ReadSink = (reads, layer) => {
        for (const [k, a] of Object.entries(reads)) out[layer === null ? k : `blocks.${layer}.${k}`] = a;
      };
      const op: SiteOp = { v: np.array(iv.vector).reshape([1, 1, ...target.featShape]).mul(s), m: np.array(mask).reshape(maskShape) };
      const train: Train = { ops: [{ layer: target.layer, site: target.site, op }], lora: new Map() };
      const x = this.runLayers(ctx, pad, promptLen, resolved, null, sink, train);
      if (needHead) this.headTraced(x, ctx, promptLen, resolved, train, sink).dispose();
      else x.dispose();
      disposeTrain(train);
      return out;
    };
    const [vals, tans] = jvp(g, [np.array([alpha])], [np.array([1])]);
    const values = new Map<HookName, Float32Array[]>();
    const tangents = new Map<HookName, Float32Array[]>();
    for (const name of new Set(req.reads)) {
      const { site } = parseHook(name, c.nLayers);
      const v = vals[name];
      const t = tans[name];
      if (!v || !t) throw new Error(`internal: jvpScale read ${name} was not produced`);
      values.set(name, rowsOf(site, v.shape, await v.data(), ctx).rows);
      tangents.set(name, rowsOf(site, t.shape, await t.data(), ctx).rows);
    }
    return { values, tangents };
  }

  /** A TrainParam checked against the model and the batch: its primal arrays, how it enters the pass, its gradient on the host. */
  private bindParam(p: TrainParam, i: number, rs: Row[], ctx: CallCtx, promptLen: number[], countPrefix: PrefixCounter | undefined): BoundParam {
    const c = this.config;
    const what = `lossAndGrad: params[${i}] (${p.kind})`;
    if (p.kind === "delta") return this.bindDelta(p, what);
    if (p.kind === "lora") {
      if (!(Number.isInteger(p.layer) && p.layer >= 0 && p.layer < c.nLayers)) throw new UsageError(`${what}: layer ${p.layer} out of range 0..${c.nLayers - 1}`);
      if (!LINEARS.includes(p.linear)) throw new UsageError(`${what}: linear ${String(p.linear)} is not one of ${LINEARS.join(", ")}`);
      const w = this.params.blocks[p.layer]![p.linear];
      if (!w) throw new UsageError(`${what}: this model has no ${p.linear} (a plain MLP has no gate)`);
      const [out, inp] = linearShape(c, p.linear);
      if (!(Number.isInteger(p.rank) && p.rank >= 1)) throw new UsageError(`${what}: rank ${p.rank} must be a positive integer`);
      if (p.a.length !== p.rank * inp) throw new UsageError(`${what}: a has length ${p.a.length}, expected rank × in = ${p.rank} × ${inp}`);
      if (p.b.length !== out * p.rank) throw new UsageError(`${what}: b has length ${p.b.length}, expected out × rank = ${out} × ${p.rank}`);
      if (![...p.a, ...p.b].every(Number.isFinite)) throw new NumericalError(`${what}: a or b contains NaN or Inf`);
      const scale = p.scale ?? 1;
      if (!Number.isFinite(scale)) throw new NumericalError(`${what}: scale ${scale} is not finite`);
      return {
        primals: () => [np.array(p.a).reshape([p.rank, inp]), np.array(p.b).reshape([out, p.rank])],
        install: ([a, b], t) => {
          const ads = t.lora.get(p.layer) ?? {};
          ads[p.linear] = { a: a!, b: b!.mul(scale) };
          t.lora.set(p.layer, ads);
        },
        result: async ([da, db]) => [new Float32Array(await da!.data()), new Float32Array(await db!.data())],
      };
    }
    const { layer, site } = parseHook(p.at, c.nLayers);
    if (site === "attn.hook_pattern") throw new UsageError(`${what}: ${p.at} is read-only (the attention pattern takes no additions)`);
    if (site === "hook_pos_embed" && c.pos.kind !== "learned") throw new UsageError(`${p.at}: this model has no learned position embedding`);
    const feat = featShapeOf(c, site);
    const F = feat.reduce((x, y) => x * y, 1);
    const { B, T } = ctx;
    const maskShape = [B, T, ...(feat.length === 2 ? [feat[0]!, 1] : [1])];
    if (p.kind === "activation") {
      return {
        primals: () => [np.zeros([B, T, ...feat])],
        install: ([z], t) => t.ops.push({ layer, site, op: { v: z!, m: np.ones(maskShape) } }),
        result: async ([g]) => rowsOf(site, g!.shape, await g!.data(), ctx).rows,
      };
    }
    const payload = p.kind === "vector" ? p.value : p.vector;
    if (payload.length !== F) throw new UsageError(`lossAndGrad: ${p.at} takes a vector of length ${F} (${feat.join("x")}); ${p.kind === "vector" ? "value" : "vector"} has length ${payload.length}`);
    // The param's scope (pos, rows) resolves like an add in a plan.
    const probe: Intervention = { op: "add", at: p.at, vector: payload, ...(p.pos ? { pos: p.pos } : {}), ...(p.rows ? { rows: p.rows } : {}) };
    const [r] = resolvePlan(c, [probe], rs, promptLen, countPrefix);
    const mask = scopeMask(r!, ctx, promptLen, maskShape.slice(2));
    const m = () => np.array(mask).reshape(maskShape);
    if (p.kind === "vector") {
      return {
        primals: () => [np.array(p.value)],
        install: ([v], t) => t.ops.push({ layer, site, op: { v: v!.reshape([1, 1, ...feat]), m: m() } }),
        result: async ([g]) => [new Float32Array(await g!.data())],
      };
    }
    if (!Number.isFinite(p.value)) throw new NumericalError(`${what}: value ${p.value} is not finite`);
    return {
      primals: () => [np.array([p.value])],
      install: ([s], t) => t.ops.push({ layer, site, op: { v: np.array(p.vector).reshape([1, 1, ...feat]).mul(s!), m: m() } }),
      result: async ([g]) => [new Float32Array(await g!.data())],
    };
  }

  /**
   * A full-weight delta: one primal per row chunk of the device weight (so W + delta is formed
   * chunk by chunk, never joined), the gradient joined on the host.
   */
  private bindDelta(p: Extract<TrainParam, { kind: "delta" }>, what: string): BoundParam {
    const valid = (this.trainable ??= trainableWeights(this.host));
    const tw = valid.find((w) => w.name === p.name);
    if (!tw) throw new UsageError(`${what}: unknown weight "${p.name}"; this model's trainable weights are ${valid.map((w) => w.name).join(", ")}`);
    const n = tw.shape.reduce((a, b) => a * b, 1);
    if (p.value.length !== n) throw new UsageError(`${what} on ${p.name}: value has length ${p.value.length}, expected ${n} ([${tw.shape.join(", ")}])`);
    if (!p.value.every(Number.isFinite)) throw new NumericalError(`${what} on ${p.name}: value contains NaN or Inf`);
    const dev = this.deviceWeight(p.name);
    const chunks = dev ? (Array.isArray(dev) ? dev : [dev]) : null;
    if (chunks?.some((cw) => cw.dtype !== np.float32)) throw new UsageError(`${what} on ${p.name}: the weight is stored as ${String(chunks[0]!.dtype)} on the device; deltas need f32 weights (load with weights: "f32")`);
    const cols = tw.shape.length === 2 ? tw.shape[1]! : n;
    const rowsOf = chunks && tw.shape.length === 2 ? chunks.map((cw) => cw.shape[0]!) : [tw.shape[0]!];
    return {
      primals: () => {
        let r = 0;
        return rowsOf.map((rows) => {
          const a = np.array(p.value.slice(r * cols, (r + rows) * cols)).reshape(tw.shape.length === 2 ? [rows, cols] : [rows]);
          r += rows;
          return a;
        });
      },
      install: (arrs, t) => {
        (t.deltas ??= new Map()).set(p.name, arrs);
      },
      result: async (gs) => {
        const out = new Float32Array(n);
        let o = 0;
        for (const g of gs) {
          const d = await g.data();
          out.set(d, o);
          o += d.length;
        }
        return [out];
      },
    };
  }

  /** The device array a weight lives in (undefined: host only, the untied embedding table and learned positions). */
  private deviceWeight(name: string): Weight | JArray | undefined {
    if (name === "lnFinal.weight") return this.params.lnFinal.weight;
    if (name === "lnFinal.bias") return this.params.lnFinal.bias;
    if (name === "unembed.weight" || (name === "embed.weight" && this.config.tieEmbeddings)) return this.params.unembed;
    const m = /^blocks\.(\d+)\.(.+)\.(weight|bias)$/.exec(name);
    if (!m) return undefined;
    const bp = this.params.blocks[Number(m[1])]! as Record<string, LinearParams | NormParams | undefined>;
    const e = bp[m[2]!];
    return m[3] === "weight" ? e?.weight : e?.bias;
  }

  /** A block's (or the head's) params with the pass's deltas added: fresh arrays for the changed entries, listed in `made` for disposal. */
  private withDeltas<P extends Record<string, unknown>>(prefix: string, base: P, deltas: Map<string, JArray[]> | undefined, made: JArray[]): P {
    if (!deltas) return base;
    const out: Record<string, unknown> = { ...base };
    for (const [key, entry] of Object.entries(base)) {
      if (!entry || typeof entry !== "object" || !("weight" in entry)) continue;
      const e = entry as { weight: Weight; bias?: JArray };
      const dw = deltas.get(`${prefix}${key}.weight`), db = deltas.get(`${prefix}${key}.bias`);
      if (!dw && !db) continue;
      const next: { weight: Weight; bias?: JArray } = { ...e };
      if (dw) next.weight = addWeight(e.weight, dw, made);
      if (db && e.bias) next.bias = addWeight(e.bias, db, made) as JArray;
      out[key] = next;
    }
    return out as P;
  }

  // ------------------------------------------------------------ internals

  featShape(site: string): number[] {
    return featShapeOf(this.config, site);
  }

  /**
   * Compile the resolved plan into site ops for one call and group (a layer, the embedding stage
   * (null) or the final norm), with the traced adds of `train` after the plan's own at each site.
   * Arrays are fresh (consumed downstream).
   */
  private compile(resolved: Resolved[], ctx: CallCtx, promptLen: number[], group: number | null | "final", train: Train | null): { ops: SiteOps; kinds: Map<string, OpKind[]>; reads: string[] } {
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
    for (const t of train?.ops ?? []) {
      const final = t.site === "ln_final.hook_normalized";
      if (group === "final" ? !final : final || t.layer !== group) continue;
      (ops[t.site] ??= []).push({ v: t.op.v.ref, m: t.op.m.ref });
      kinds.set(t.site, [...(kinds.get(t.site) ?? []), "add"]);
    }
    return { ops, kinds, reads };
  }

  /** A sink storing reads (device arrays [B,T,...]) into the cache, dropping padding; awaited at flushReads. */
  private cacheSink(ctx: CallCtx, cache: ActivationCache): ReadSink {
    return (reads, layer) => this.pendingReads.push(this.collect(reads, layer, ctx, cache));
  }

  private async collect(reads: Record<string, JArray>, layer: number | null, ctx: CallCtx, cache: ActivationCache): Promise<void> {
    for (const [s, a] of Object.entries(reads)) {
      const name = (layer === null ? s : `blocks.${layer}.${s}`) as HookName;
      const shape = a.shape;
      const { feats, rows } = rowsOf(s, shape, await a.data(), ctx);
      rows.forEach((r, b) => cache.append(name, feats[b]!, b, r));
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
   * Reads go to `sink`; `train` adds traced ops and adapters. Returns the residual stream [B,T,D].
   */
  private runLayers(
    ctx: CallCtx,
    pad: number[],
    promptLen: number[],
    resolved: Resolved[],
    kvc: { cap: number; out: KV[]; slot0: number } | null,
    sink: ReadSink,
    train: Train | null,
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
    const emb = this.compile(resolved, ctx, promptLen, null, train);
    let tokA = np.array(tok).reshape([B, T, D]);
    let posA = posE ? np.array(posE).reshape([B, T, D]) : null;
    // Deltas on the tables: their rows gathered by one-hot products (traced, so the gradient is the scatter-add).
    const gather = (chunks: JArray[], index: (r: number) => number, scale: number): JArray => {
      let sum: JArray | null = null;
      let row0 = 0;
      for (const dch of chunks) {
        const n = dch.shape[0]!;
        const oh = new Float32Array(B * T * n);
        for (let r = 0; r < B * T; r++) {
          const i = ctx.pos[r]! < 0 ? -1 : index(r) - row0;
          if (i >= 0 && i < n) oh[r * n + i] = scale;
        }
        const part = np.matmul(np.array(oh).reshape([B * T, n]), dch.ref);
        sum = sum ? sum.add(part) : part;
        row0 += n;
      }
      return sum!.reshape([B, T, D]);
    };
    const de = train?.deltas?.get("embed.weight");
    if (de) tokA = tokA.add(gather(de, (r) => ctx.ids[r]!, c.embedScale));
    const dp = train?.deltas?.get("posEmbed.weight");
    if (dp && posA) posA = posA.add(gather(dp, (r) => ctx.pos[r]!, 1));
    const [x0, er] = embedStage(c, { readSet: new Set(emb.reads), kinds: emb.kinds }, { tok: tokA, pos: posA }, emb.ops);
    sink(er, null);
    let env: Env = { x: x0 };

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
    const [attnHalf, mlpHalf] = halvesOf(c);
    for (let l = 0; l < c.nLayers; l++) {
      const { ops, kinds, reads } = this.compile(resolved, ctx, promptLen, l, train);
      const lora = train?.lora.get(l);
      const key: LayerKey = { ops: [...kinds.entries()], reads, ...(lora ? { lora: (Object.keys(lora) as LinearName[]).sort() } : {}) };
      const fns = this.fns.get(key);
      const [opsA, opsM] = splitOps(c, ops);
      const made: JArray[] = [];
      const p = this.withDeltas(`blocks.${l}.`, this.params.blocks[l]!, train?.deltas, made);
      const pa = halfParams(attnHalf, p, lora);
      const pm = halfParams(mlpHalf, p, lora);
      tree.dispose(made as never);
      const ty = c.layerTypes[l]!;
      const rotRef = tree.ref(rots.get(ty)! as never) as unknown as Rot;
      const mask = masks.get(ty)!;
      let ra: Record<string, JArray>;
      if (kvc) {
        let kvOut: KV;
        [env, kvOut, ra] = fns.step(pa, env, rotRef, mask.ref, opsA, kvc.out[l]!, { wm: wm!.ref, place: place!.ref });
        kvc.out[l] = kvOut;
      } else [env, ra] = fns.full(pa, env, rotRef, mask.ref, opsA);
      let rm: Record<string, JArray>;
      [env, rm] = fns.mlp(pm, env, opsM);
      sink({ ...ra, ...rm }, l);
    }
    tree.dispose([...rots.values()] as never);
    for (const m of masks.values()) m.dispose();
    wm?.dispose();
    place?.dispose();
    return env.x!;
  }

  private headParams(train: Train | null = null) {
    const d = train?.deltas;
    const ln = this.params.lnFinal;
    const made: JArray[] = [];
    // The head consumes its params: untouched entries are referenced once more, sums are fresh.
    const dw = d?.get("lnFinal.weight"), db = d?.get("lnFinal.bias");
    const lnFinal: NormParams = {
      weight: dw ? (addWeight(ln.weight, dw, made) as JArray) : ln.weight.ref,
      ...(ln.bias ? { bias: db ? (addWeight(ln.bias, db, made) as JArray) : ln.bias.ref } : {}),
    };
    const ud = d?.get(this.config.tieEmbeddings ? "embed.weight" : "unembed.weight");
    const unembed = ud ? addWeight(this.params.unembed, ud, made) : refWeight(this.params.unembed);
    return { lnFinal, unembed };
  }

  /** The head inside a traced pass: logits [B,T,V] (vocab chunks joined). */
  private headTraced(x: JArray, ctx: CallCtx, promptLen: number[], resolved: Resolved[], train: Train | null, sink: ReadSink): JArray {
    const { ops, kinds, reads } = this.compile(resolved, ctx, promptLen, "final", train);
    const [chunks, r] = head(this.config, { readSet: new Set(reads), kinds }, this.headParams(train), x, ops);
    sink(r, null);
    return chunks.length === 1 ? chunks[0]! : np.concatenate(chunks, -1);
  }

  /** ln_final + unembedding for a call; returns logits [B*T*V] on the host. */
  private async headToHost(x: JArray, ctx: CallCtx, promptLen: number[], resolved: Resolved[], cache: ActivationCache): Promise<Float32Array> {
    const c = this.config;
    const { ops, kinds, reads: readList } = this.compile(resolved, ctx, promptLen, "final", null);
    const [chunks, reads] = head(c, { readSet: new Set(readList), kinds }, this.headParams(), x, ops);
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

/** A TrainParam bound to a call: its primal arrays (fresh each call), how its traced arrays enter the pass, its gradient on the host. */
interface BoundParam {
  primals(): JArray[];
  install(traced: JArray[], train: Train): void;
  result(grads: JArray[]): Promise<Float32Array[]>;
}

/** Release what a traced pass's Train still holds (each op and adapter was referenced by its users). */
function disposeTrain(t: Train): void {
  tree.dispose([t.ops.map((o) => o.op), [...t.lora.values()], [...(t.deltas?.values() ?? [])]] as never);
}

/** W + delta chunk by chunk (each referenced once more; the sums listed in `made`). */
function addWeight(w: Weight | JArray, d: JArray[], made: JArray[]): Weight {
  const ws = Array.isArray(w) ? w : [w];
  const sums = ws.map((cw, i) => cw.ref.add(d[i]!.ref));
  made.push(...sums);
  return Array.isArray(w) ? sums : sums[0]!;
}

/** [out, in] of a block's linear layer. */
function linearShape(c: ModelConfig, name: LinearName): [number, number] {
  const q = c.nHeads * c.dHead;
  const kv = c.nKvHeads * c.dHead;
  switch (name) {
    case "attn.q":
      return [q, c.dModel];
    case "attn.k":
    case "attn.v":
      return [kv, c.dModel];
    case "attn.o":
      return [c.dModel, q];
    case "mlp.gate":
    case "mlp.up":
      return [c.dMlp, c.dModel];
    case "mlp.down":
      return [c.dModel, c.dMlp];
  }
}

/**
 * A device array [B,T,...feature] of one site as host rows without padding slots:
 * [positions, ...feature] per row; attn.hook_pattern [B,H,T,T] (full calls) as [T_b, H, T_b].
 * `feats[b]` is row b's feature shape as the activation cache stores it.
 */
function rowsOf(site: string, shape: readonly number[], data: ArrayLike<number> & { subarray(a: number, b: number): ArrayLike<number> }, ctx: CallCtx): { rows: Float32Array[]; feats: number[][] } {
  const { B, T } = ctx;
  const rows: Float32Array[] = [];
  const feats: number[][] = [];
  if (site === "attn.hook_pattern") {
    const H = shape[1]!;
    for (let b = 0; b < B; b++) {
      const n = ctx.pos.subarray(b * T, (b + 1) * T).filter((p) => p >= 0).length;
      const first = T - n;
      const out = new Float32Array(n * H * n);
      for (let t = 0; t < n; t++)
        for (let h = 0; h < H; h++) out.set(data.subarray(((b * H + h) * T + first + t) * T + first, ((b * H + h) * T + first + t) * T + T), (t * H + h) * n);
      rows.push(out);
      feats.push([H, n]);
    }
    return { rows, feats };
  }
  const F = shape.slice(2).reduce((x, y) => x * y, 1);
  for (let b = 0; b < B; b++) {
    const keep: number[] = [];
    for (let t = 0; t < T; t++) if (ctx.pos[b * T + t]! >= 0) keep.push(t);
    const out = new Float32Array(keep.length * F);
    keep.forEach((t, i) => out.set(data.subarray((b * T + t) * F, (b * T + t + 1) * F), i * F));
    rows.push(out);
    feats.push(shape.slice(2) as number[]);
  }
  return { rows, feats };
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
