// The model runtime: host-side batching, positions, masks, interventions and the KV cache around
// the jit'd layer functions in transformer.ts. Public methods take and return host data
// (number[], Float32Array); jax-js arrays never leave this file and transformer.ts.
import "../core/polyfills.js";
import { blockUntilReady, numpy as np, tree, valueAndGrad, type Array as JArray } from "@jax-js/jax";
import { NumericalError, UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import { parseHook, type HookName } from "../hooks/names.js";
import type { Intervention, Plan, PosSpec } from "../hooks/plan.js";
import type { ModelConfig } from "./config.js";
import type { HostModel, HostTensor } from "./load.js";
import { ropeTables } from "./rope.js";
import { LayerFns, embedStage, head, splitOps, type BlockParams, type DeviceParams, type LayerKey, type OpKind, type Rot, type SiteOp, type SiteOps, type Weight } from "./transformer.js";

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
  /** Feature shapes are per row: attention patterns are [nHeads, T_b] for a ragged batch. */
  readonly entries = new Map<HookName, { data: Float32Array; featShape: number[] }[]>();
  get(name: HookName, row = 0): { data: Float32Array; shape: number[] } {
    const e = this.entries.get(name);
    if (!e) throw new UsageError(`activation ${name} was not read in this run; add { op: "read", at: "${name}" } to the plan`);
    const r = e[row];
    if (!r) throw new UsageError(`activation ${name}: no row ${row}`);
    const f = r.featShape.reduce((a, b) => a * b, 1);
    return { data: r.data, shape: [r.data.length / f, ...r.featShape] };
  }
  append(name: HookName, featShape: number[], row: number, data: Float32Array): void {
    let e = this.entries.get(name);
    if (!e) {
      e = [];
      this.entries.set(name, e);
    }
    const prev = e[row];
    if (!prev) e[row] = { data, featShape };
    else {
      const cat = new Float32Array(prev.data.length + data.length);
      cat.set(prev.data);
      cat.set(data, prev.data.length);
      e[row] = { data: cat, featShape };
    }
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
  topK?: number;
  topP?: number;
  /** One seed, or one per row (a row's sample then does not depend on its batch mates). */
  seed?: number | number[];
}

export interface GenerateOptions extends SampleOptions {
  maxTokens: number;
  plan?: Plan;
  /** Stop tokens; default: the model's EOS ids. Pass [] to never stop early. */
  stop?: number[];
  countPrefix?: PrefixCounter;
}

export interface GenerateResult {
  /** Generated ids per row (a stop token, when hit, is the last id). */
  tokens: number[][];
  stopReason: ("stop" | "length")[];
  cache: ActivationCache;
}

/** Internal: logits with NaN/Inf, caught by forward/generate and turned into a located NumericalError. */
class NonFiniteLogits extends Error {
  constructor(
    readonly row: number,
    readonly value: number,
  ) {
    super("non-finite logits");
  }
}

/** An op compiled on the host, before its arrays are made (so same-kind ops can merge). */
interface HostOp {
  kind: OpKind;
  v: Float32Array;
  vShape: number[];
  m: Float32Array;
  mShape: number[];
  rows: Set<number>;
}

/** A trainable vector added at one site: `op.v` is a traced array inside valueAndGrad. */
interface TrainOp {
  layer: number | null;
  site: string;
  op: SiteOp;
}

/** Per-row position scope after resolution: [from, to) in absolute positions, or null (row untouched). */
type Scope = { from: number; to: number } | null;

interface Resolved {
  iv: Intervention;
  layer: number | null;
  site: string;
  featShape: number[];
  scopes: Scope[];
  /** Precomputed payload (scaled vector / unit direction / mean). */
  vec?: Float32Array;
}

/** Positions of one forward call: B rows × T slots, absolute position per slot (-1 = padding). */
interface CallCtx {
  B: number;
  T: number;
  pos: Int32Array;
  /** Token id per slot (padding slots hold 0; they are masked). */
  ids: Int32Array;
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

const CAPACITY_BUCKET = 64;
/** Elements of one prefill attention-score tensor (B·heads·chunk·cap) we allow at once. */
const PREFILL_BUDGET = 4 << 20;

export class Engine {
  readonly config: ModelConfig;
  private params: DeviceParams;
  private embed: HostTensor;
  private posEmbed: HostTensor | undefined;
  private fns: LayerFns;
  private disposed = false;

  constructor(host: HostModel, opts: EngineOptions = {}) {
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

  /** Full forward pass (no KV cache) over a left-padded batch. */
  async forward(rows: (Row | number[])[], opts: ForwardOptions = {}): Promise<ForwardResult> {
    try {
      return await this.forwardUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) throw await this.diagnose(rows.map(asRow)[e.row]!, opts, e);
      throw e;
    }
  }

  private async forwardUnchecked(rows: (Row | number[])[], opts: ForwardOptions): Promise<ForwardResult> {
    this.live();
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const resolved = this.resolve(opts.plan ?? [], rs, promptLen, opts.countPrefix);
    const ctx = fullCtx(rs, B, T, pad);
    const cache = new ActivationCache();
    const x = this.runLayers(ctx, pad, promptLen, resolved, null, cache, null);
    const mode = opts.logits ?? "all";
    if (mode === "none") {
      x.dispose();
      await this.flushReads();
      return { logits: [], cache };
    }
    const last = mode === "last";
    const xs = last ? x.slice([], [-1]).reshape([B, 1, this.config.dModel]) : x;
    const lg = await this.headToHost(xs, last ? lastCtx(B, T, pad) : ctx, promptLen, resolved, cache);
    const logits = rs.map((_, b) => (last ? lg.subarray(b * this.config.dVocab, (b + 1) * this.config.dVocab) : sliceRow(lg, b, T, pad[b]!, this.config.dVocab)));
    return { logits: logits.map((l) => l.slice()), cache };
  }

  /** Generate with a KV cache; rows may have different lengths and different interventions. */
  async generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    try {
      return await this.generateUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) {
        const r = rows.map(asRow)[e.row]!;
        // Locate the first bad activation over the prompt (the row's own interventions apply).
        const plan = (opts.plan ?? []).filter((iv) => !iv.rows || iv.rows.includes(e.row)).map((iv) => ({ ...iv, rows: [0] }));
        throw await this.diagnose(r, { plan, ...(opts.countPrefix ? { countPrefix: opts.countPrefix } : {}) }, e);
      }
      throw e;
    }
  }

  /**
   * Re-run one row reading every block-boundary site and name the first that holds NaN/Inf
   * (NaN in weights, or an intervention scale that overflowed), so the error says where.
   */
  private async diagnose(row: Row, opts: ForwardOptions, e: NonFiniteLogits): Promise<NumericalError> {
    const c = this.config;
    const sites: HookName[] = ["hook_embed"];
    for (let l = 0; l < c.nLayers; l++) for (const s of ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"] as const) sites.push(`blocks.${l}.${s}`);
    const plan: Intervention[] = [...(opts.plan ?? []).map((iv) => ({ ...iv, rows: [0] })), ...sites.map((at) => ({ op: "read" as const, at }))];
    let where = "the final norm or unembedding";
    try {
      const { cache } = await this.forwardUnchecked([row], { ...opts, plan, logits: "none" });
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

  private async generateUnchecked(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    this.live();
    const c = this.config;
    const rs = rows.map(asRow);
    if (rs.some((r) => r.ids.length === 0)) throw new UsageError("generate: every row needs at least one token (start from BOS)");
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const resolved = this.resolve(opts.plan ?? [], rs, promptLen, opts.countPrefix);
    if (resolved.some((r) => r.site === "attn.hook_pattern")) throw new UsageError("attn.hook_pattern can be read with forward(), not during generate()");
    const cap = Math.ceil((T + opts.maxTokens) / CAPACITY_BUCKET) * CAPACITY_BUCKET;
    const stop = new Set(opts.stop ?? c.eosTokenIds);
    const seed = opts.seed ?? 0;
    const seeds = Array.isArray(seed) ? seed : rs.map((_, b) => seed + b);
    if (seeds.length !== B) throw new UsageError(`generate: ${seeds.length} seeds for ${B} rows`);
    const samplers = seeds.map((s) => new Sampler(opts, s));
    const cache = new ActivationCache();
    const tokens: number[][] = rs.map(() => []);
    const done = rs.map(() => false);
    const stopReason: ("stop" | "length")[] = rs.map(() => "length");
    if (opts.maxTokens <= 0) return { tokens, stopReason, cache };

    // Prefill in chunks through the cache path: attention memory is B·heads·chunk·cap, not B·heads·T².
    const kv: { k: JArray; v: JArray }[] = this.emptyCache(B, cap);
    const chunk = Math.max(16, Math.floor(PREFILL_BUDGET / (B * c.nHeads * cap)));
    let logits: Float32Array = new Float32Array(0);
    for (let start = 0; start < T; start += chunk) {
      const n = Math.min(chunk, T - start);
      const ctx = sliceCtx(rs, pad, start, n);
      const x = this.runLayers(ctx, pad, promptLen, resolved, { cap, out: kv, slot0: start }, cache, null);
      if (start + n < T) {
        // jax-js dispatches lazily: without a sync point every chunk's intermediates would be
        // alive at once when the logits are finally read.
        await blockUntilReady([x, ...kv] as never);
        x.dispose();
        continue;
      }
      const xl = x.slice([], [-1]).reshape([B, 1, c.dModel]);
      logits = await this.headToHost(xl, lastCtx(B, T, pad), promptLen, resolved, cache);
    }
    try {
      for (let step = 0; ; step++) {
        const next = rs.map((_, b) => (done[b] ? 0 : samplers[b]!.sample(logits.subarray(b * c.dVocab, (b + 1) * c.dVocab))));
        next.forEach((t, b) => {
          if (done[b]) return;
          tokens[b]!.push(t);
          if (stop.has(t)) {
            done[b] = true;
            stopReason[b] = "stop";
          } else if (tokens[b]!.length >= opts.maxTokens) done[b] = true;
        });
        if (done.every(Boolean)) break;
        // Decode one slot for every row (finished rows run along; their output is ignored).
        const slot = T + step;
        const pos = new Int32Array(B);
        for (let b = 0; b < B; b++) pos[b] = slot - pad[b]!;
        const ctx: CallCtx = { B, T: 1, pos, ids: Int32Array.from(next) };
        const xs = this.runLayers(ctx, pad, promptLen, resolved, { cap, out: kv, slot0: slot }, cache, null);
        logits = await this.headToHost(xs, ctx, promptLen, resolved, cache);
      }
    } finally {
      tree.dispose(kv as never);
    }
    return { tokens, stopReason, cache };
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
    const feat = this.featShape(site);
    if (feat.length !== 1 || train.value.length !== feat[0]) throw new UsageError(`lossAndGrad: ${train.at} takes a vector of length ${feat.join("x")}`);
    const probe: Intervention = { op: "add", at: train.at, vector: train.value, ...(train.pos ? { pos: train.pos } : {}) };
    const [r] = this.resolve([probe], rs, promptLen, opts.countPrefix);
    // Other interventions (e.g. a concept injection during training) apply as constants.
    const resolvedPlan = this.resolve(opts.plan ?? [], rs, promptLen, opts.countPrefix);
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

  private live(): void {
    if (this.disposed) throw new UsageError("this model was disposed");
  }

  featShape(site: string): number[] {
    const c = this.config;
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

  private resolve(plan: Plan, rows: Row[], promptLen: number[], countPrefix: PrefixCounter | undefined): Resolved[] {
    return plan.map((iv) => {
      const { layer, site } = parseHook(iv.at, this.config.nLayers);
      if (site === "hook_pos_embed" && this.config.pos.kind !== "learned") throw new UsageError(`${iv.at}: this model has no learned position embedding`);
      const featShape = this.featShape(site);
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
      }
      return r;
    });
  }

  /** Compile the resolved plan into per-layer site ops for one call. Arrays are fresh (consumed downstream). */
  private compile(resolved: Resolved[], ctx: CallCtx, promptLen: number[], group: number | null | "final"): { ops: SiteOps; kinds: Map<string, OpKind[]>; reads: string[] } {
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
        const v = new Float32Array(B * F);
        for (const b of rows) v.set(r.vec!, b * F);
        // A weighted projection is the unit projection with its mask scaled.
        if (iv.op === "project" && iv.scale !== undefined) for (let i = 0; i < m.length; i++) m[i]! *= iv.scale;
        // A sweep puts one intervention per row: ops of one kind on disjoint rows merge into a
        // single op (sum of payloads and masks), so a batch of 32 steered rows costs one add.
        const last = list.at(-1);
        if (last && last.kind === iv.op && ![...rows].some((b) => last.rows.has(b))) {
          for (let i = 0; i < v.length; i++) last.v[i]! += v[i]!;
          for (let i = 0; i < m.length; i++) last.m[i]! += m[i]!;
          for (const b of rows) last.rows.add(b);
        } else list.push({ kind: iv.op, v, vShape: [B, 1, ...r.featShape], m, mShape: maskShape, rows });
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
            else m.fill(0, (b * T + t) * (m.length / (B * T)), (b * T + t + 1) * (m.length / (B * T))); // beyond the stored activation: keep the live value
          }
        list.push({ kind: "replace", v, vShape: [B, T, ...r.featShape], m, mShape: maskShape, rows });
      }
    }
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
    return { ops, kinds, reads: [...reads].sort() };
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

  /** Append the trainable add (its vector is a traced array) to a layer's compiled ops. */
  /** A zeroed KV cache [B, cap, nKvHeads, dHead] per layer. */
  private emptyCache(B: number, cap: number): { k: JArray; v: JArray }[] {
    const c = this.config;
    return Array.from({ length: c.nLayers }, () => ({ k: np.zeros([B, cap, c.nKvHeads, c.dHead]), v: np.zeros([B, cap, c.nKvHeads, c.dHead]) }));
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
    for (let i = 0; i < out.length; i++) {
      if (!Number.isFinite(out[i]!)) throw new NonFiniteLogits(Math.floor(i / c.dVocab / ctx.T), out[i]!);
    }
    return out;
  }
}

// ---------------------------------------------------------------- host helpers

function asRow(r: Row | number[]): Row {
  return Array.isArray(r) ? { ids: r } : r;
}

function padShape(rows: Row[]): { B: number; T: number; pad: number[] } {
  if (rows.length === 0) throw new UsageError("empty batch");
  const T = Math.max(...rows.map((r) => r.ids.length));
  if (T === 0) throw new UsageError("every row is empty");
  return { B: rows.length, T, pad: rows.map((r) => T - r.ids.length) };
}

function fullCtx(rows: Row[], B: number, T: number, pad: number[]): CallCtx {
  return sliceCtx(rows, pad, 0, T, B);
}

/** Slots start..start+n-1 of a left-padded batch. */
function sliceCtx(rows: Row[], pad: number[], start: number, n: number, B = rows.length): CallCtx {
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

function lastCtx(B: number, T: number, pad: number[]): CallCtx {
  const pos = new Int32Array(B);
  for (let b = 0; b < B; b++) pos[b] = T - 1 - pad[b]!;
  return { B, T: 1, pos, ids: new Int32Array(B) };
}

function sliceRow(lg: Float32Array, b: number, T: number, pad: number, V: number): Float32Array {
  return lg.subarray((b * T + pad) * V, (b + 1) * T * V);
}

/**
 * mask[b, t, s]: key slot s visible to query slot t. Causal, never a padding key — except a
 * padding query sees itself, so no softmax row is all -inf (which would give NaN).
 */
function attnMask(ctx: CallCtx, pad: number[], S: number, slot0: number, window: number | undefined): JArray {
  const { B, T } = ctx;
  const m = new Int32Array(B * T * S);
  const w = window ?? Infinity;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++) {
      const qSlot = slot0 + t;
      // Slots and positions differ by the row's padding only, so slot distance = position distance.
      for (let s = Math.max(0, qSlot - w + 1); s <= qSlot; s++) if (s >= pad[b]! || s === qSlot) m[(b * T + t) * S + s] = 1;
    }
  return np.array(m, { dtype: np.bool }).reshape([B, T, S]);
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

function scopeOf(spec: PosSpec, row: Row, promptLen: number, countPrefix: PrefixCounter | undefined, at: string): Scope {
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
function scopeMask(r: Resolved, ctx: CallCtx, _promptLen: number[], maskShape: number[], heads: number[] | null = null): Float32Array {
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

/** Greedy / temperature / top-k / top-p sampling with a per-row seeded generator. */
export class Sampler {
  private rng: Rng;
  constructor(
    private o: SampleOptions,
    seed: number,
  ) {
    this.rng = new Rng(seed);
  }
  sample(logits: Float32Array): number {
    const temp = this.o.temperature ?? 0;
    if (temp <= 0) return argmax(logits);
    const V = logits.length;
    let idx = [...Array(V).keys()];
    idx.sort((a, b) => logits[b]! - logits[a]! || a - b);
    if (this.o.topK && this.o.topK > 0) idx = idx.slice(0, this.o.topK);
    const mx = logits[idx[0]!]!;
    let p = idx.map((i) => Math.exp((logits[i]! - mx) / temp));
    let z = p.reduce((a, b) => a + b, 0);
    p = p.map((x) => x / z);
    const topP = this.o.topP ?? 1;
    if (topP < 1) {
      let cum = 0;
      let keep = 0;
      while (keep < p.length && cum < topP) cum += p[keep++]!;
      idx = idx.slice(0, keep);
      p = p.slice(0, keep);
      z = p.reduce((a, b) => a + b, 0);
      p = p.map((x) => x / z);
    }
    let u = this.rng.next();
    for (let i = 0; i < p.length; i++) {
      u -= p[i]!;
      if (u < 0) return idx[i]!;
    }
    return idx[p.length - 1]!;
  }
}

export function argmax(x: Float32Array): number {
  let bi = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[bi]!) bi = i;
  return bi;
}

