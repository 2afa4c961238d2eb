// Gradients on the CPU backend (grad.ts: lossAndGrad and jvpScale), against the weights the
// engine already holds. The forward is the engine's own (engine.ts runLayers / headRows: the
// schedule's steps), run in tape mode, where each step writes fresh buffers and records them;
// derivatives.ts has each step kind's VJP and JVP. Nothing here computes a forward value.
//
// Reverse mode with one checkpoint per block: a plain forward keeps only the residual stream
// entering each block (B·T·dModel floats per layer); the head runs in tape mode and gives the
// loss and its cotangent; then for each block from the last, the block is run again in tape mode
// from its checkpoint and its tape walked backwards. Memory: the checkpoints, one block's tape,
// the logits of the rows with targets, and transposition chunks (derivatives.ts). Compute: two
// forwards and one backward.
//
// Trainable parameters enter the forward as the engine's own mechanisms: a vector or scale at a
// site as an `add` op after the plan's ops there, an activation as a zero `add` (so the site is on
// the tape), a LoRA adapter as the engine's adapter term inside its linear step. Forward mode
// (jvpScale) runs each block in tape mode and pushes tangents forward along the tape.
import { UsageError } from "../../core/errors.js";
import { parseHook, type HookName } from "../../hooks/names.js";
import type { Intervention } from "../../hooks/plan.js";
import { ActivationCache } from "../cache.js";
import type { ModelConfig } from "../config.js";
import type { JvpRequest, JvpResult, LinearName, LossAndGradRequest, LossAndGradResult, TrainParam } from "../grad.js";
import { asRow, compileHost, featShapeOf, fullCtx, padShape, resolvePlan, scopeMask, type CallCtx, type HostOp, type Resolved } from "../plan.js";
import type { BlockNormName } from "../schedule.js";
import type { PrefixCounter, Row } from "../types.js";
import {
  adapterKey,
  actValue,
  addInto,
  attentionJvp,
  attentionVjp,
  crossEntropyVjp,
  linear,
  linearJvp,
  linearVjp,
  loraVjp,
  embedVjp,
  matmulTN,
  mlpActJvp,
  mlpActVjp,
  normJvp,
  normParamGrad,
  normVjp,
  ropeJvp,
  ropeVjp,
  scaleGrad,
  scaleTangent,
  siteOpsJvp,
  siteOpsVjp,
  vectorGrad,
  type AttnGeom,
  type LoraRef,
  type MatRef,
  type MatRuntime,
  type NormWeights,
} from "./derivatives.js";
import type { CpuBuf, LayerSpan, Tape, TapeEntry } from "./engine.js";

/** One block's weights as the derivatives read them (in place in the runtime's memory). */
export interface BlockRefs {
  /** q, k, v stacked [(H + 2K)·dHead, D]; gate and up stacked [2F, D] (gated) or up [F, D]. */
  qkv: MatRef;
  o: MatRef;
  up: MatRef;
  down: MatRef;
  norms: Partial<Record<BlockNormName | "qNorm" | "kNorm", NormWeights>>;
  /** Mixture of experts: the router [E, D] and per expert gate|up stacked [2F, D] and down [D, F]. */
  moe?: { router: MatRef; experts: { up: MatRef; down: MatRef }[] };
}

/** The block matrices (stacked as in BlockRefs) a weight delta sits in. */
export type DeltaMat = "qkv" | "o" | "up" | "down";
export type DeltaNorm = BlockNormName | "qNorm" | "kNorm" | "lnFinal";

/**
 * Where a weight a `delta` targets enters the pass (engine.ts deltaTarget), so the backward
 * knows which step's inputs and cotangents make its gradient.
 */
export type DeltaSite =
  /** Rows row0..row0+rows of a block's stacked matrix (all of its cols). */
  | { kind: "linear"; layer: number; mat: DeltaMat; row0: number; rows: number; cols: number }
  /** Entries row0..row0+rows of that matrix's bias. */
  | { kind: "bias"; layer: number; mat: DeltaMat; row0: number; rows: number }
  | { kind: "norm"; layer: number | null; norm: DeltaNorm; part: "weight" | "bias"; n: number }
  /** The token embedding [V, D] (with tied embeddings also the unembedding). */
  | { kind: "embed" }
  | { kind: "posEmbed" }
  | { kind: "unembed" };

/** What the gradient passes need from the engine (engine.ts gradHost()). */
export interface GradHost {
  readonly config: ModelConfig;
  readonly rt: MatRuntime;
  block(l: number): BlockRefs;
  readonly lnFinal: NormWeights;
  readonly unembed: MatRef;
  /** A KV cache of `cap` slots (a full pass from slot 0). */
  openKv(B: number, cap: number): unknown;
  /** runLayers over a span of blocks (or the embedding stage: from = to = 0, no x). Returns the residual's offset. */
  run(ctx: CallCtx, pad: number[], promptLen: number[], resolved: Resolved[], kv: unknown, cache: ActivationCache | null, tape: Tape | undefined, span: LayerSpan): number;
  /** The head in tape mode over every slot of x; logits for `logitRows` only. */
  head(x: number, ctx: CallCtx, promptLen: number[], resolved: Resolved[], cache: ActivationCache | null, tape: Tape, logitRows: number[]): void;
  /** RoPE cos/sin per slot, [R, dHead/2] each. */
  rope(pos: Int32Array, local: boolean): { cos: Float32Array; sin: Float32Array };
  /** Where a delta's weight sits (the engine has applied the deltas and checked their names). */
  deltaSite(name: string): DeltaSite;
}

/** A delta parameter's gradient accumulator, in the runtime's memory. */
interface DeltaGrad {
  site: DeltaSite;
  off: number;
  n: number;
}

const LINEARS: readonly LinearName[] = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"];

/** A site parameter of the request, located. */
interface SiteParam {
  index: number;
  p: Extract<TrainParam, { kind: "vector" | "scale" | "activation" }>;
  /** Per slot: the add's mask (vector, scale). */
  mask: Float32Array | null;
  F: number;
}

/** Key of a site within the call: the layer (or "e" embedding, "f" final) and the site name. */
const siteKey = (group: number | null | "final", site: string): string => `${group === null ? "e" : group}:${site}`;
const groupOf = (layer: number | null, site: string): number | null | "final" => (site === "ln_final.hook_normalized" ? "final" : layer);

/** Everything one gradient call shares: rows, plan, buffers sizes, views. */
class Pass {
  readonly c: ModelConfig;
  readonly rt: MatRuntime;
  readonly B: number;
  readonly T: number;
  readonly R: number;
  readonly pad: number[];
  readonly promptLen: number[];
  readonly ctx: CallCtx;
  resolved: Resolved[] = [];
  private compiled = new Map<number | null | "final", ReturnType<typeof compileHost>>();

  constructor(
    readonly host: GradHost,
    rows: (Row | number[])[],
  ) {
    this.c = host.config;
    this.rt = host.rt;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    this.B = B;
    this.T = T;
    this.R = B * T;
    this.pad = pad;
    this.promptLen = rs.map((r) => r.ids.length);
    this.ctx = fullCtx(rs, B, T, pad);
    this.rows = rs;
  }
  readonly rows: Row[];

  resolve(plan: readonly Intervention[], countPrefix: PrefixCounter | undefined): Resolved[] {
    this.resolved = resolvePlan(this.c, plan, this.rows, this.promptLen, countPrefix);
    this.compiled.clear();
    return this.resolved;
  }

  ops(group: number | null | "final", site: string): HostOp[] | undefined {
    let g = this.compiled.get(group);
    if (!g) this.compiled.set(group, (g = compileHost(this.resolved, this.ctx, this.promptLen, group)));
    return g.host.get(site);
  }

  /** Floats of a named buffer. */
  size(name: CpuBuf): number {
    const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = this.c;
    const R = this.R;
    switch (name) {
      case "x":
      case "h":
      case "a":
      case "d":
        return R * D;
      case "q":
      case "z":
        return R * H * hd;
      case "k":
      case "v":
        return R * K * hd;
      case "pre":
      case "post":
        return R * F;
      case "rl":
      case "ew":
        return R * (this.c.mlp.kind === "moe" ? this.c.mlp.nExperts : 0);
      case "eo":
        return R * (this.c.mlp.kind === "moe" ? this.c.mlp.nExperts : 0) * D;
      case "qkv":
        return R * (H + 2 * K) * hd;
      case "up":
        return R * (this.c.mlp.kind === "gated" ? 2 * F : F);
      case "result":
        return R * H * D;
      case "logits":
        return 0;
    }
  }

  view(off: number, n: number): Float32Array {
    return this.rt.f32.subarray(off, off + n);
  }

  geom(l: number): AttnGeom {
    const c = this.c;
    return {
      B: this.B,
      T: this.T,
      H: c.nHeads,
      K: c.nKvHeads,
      hd: c.dHead,
      pad: this.pad,
      window: c.layerTypes[l] === "sliding" && c.slidingWindow !== undefined ? c.slidingWindow : Infinity,
      scale: c.attnScale,
      ...(c.attnSoftcap ? { softcap: c.attnSoftcap } : {}),
    };
  }

  private ropes = new Map<boolean, { cos: Float32Array; sin: Float32Array }>();
  rope(l: number): { cos: Float32Array; sin: Float32Array } {
    const local = this.c.layerTypes[l] === "sliding";
    let r = this.ropes.get(local);
    if (!r) this.ropes.set(local, (r = this.host.rope(this.ctx.pos, local)));
    return r;
  }
}

/** Per-buffer derivative arrays (cotangents or tangents) of one stage, in the runtime's memory; absent = zero. */
class Grads {
  private m = new Map<CpuBuf, number>();
  constructor(private readonly p: Pass) {}
  has(name: CpuBuf): boolean {
    return this.m.has(name);
  }
  /** The array (allocated as zeros when absent). */
  get(name: CpuBuf): number {
    let o = this.m.get(name);
    if (o === undefined) this.m.set(name, (o = this.p.rt.alloc(this.p.size(name))));
    return o;
  }
  /** The array or -1, removed (its buffer was overwritten by the step: earlier values have no derivative from here). */
  take(name: CpuBuf): number {
    const o = this.m.get(name);
    this.m.delete(name);
    return o ?? -1;
  }
  peek(name: CpuBuf): number {
    return this.m.get(name) ?? -1;
  }
  set(name: CpuBuf, off: number): void {
    this.m.set(name, off);
  }
  /** d[name] += the array at off (taking it over when absent). */
  add(name: CpuBuf, off: number): void {
    const cur = this.m.get(name);
    if (cur === undefined) this.m.set(name, off);
    else addInto(this.p.view(cur, this.p.size(name)), this.p.view(off, this.p.size(name)), this.p.size(name));
  }
  /** A fresh copy (tangents are never shared between buffers). */
  copy(off: number, name: CpuBuf): number {
    const o = this.p.rt.alloc(this.p.size(name));
    this.p.rt.f32.copyWithin(o, off, off + this.p.size(name));
    return o;
  }
}

function copyCols(f: Float32Array, src: number, ld: number, col0: number, dst: number, n: number, R: number, ldDst = n, add = false): void {
  for (let r = 0; r < R; r++) {
    if (!add) f.copyWithin(dst + r * ldDst, src + r * ld + col0, src + r * ld + col0 + n);
    else for (let i = 0; i < n; i++) f[dst + r * ldDst + i] = f[dst + r * ldDst + i]! + f[src + r * ld + col0 + i]!;
  }
}

/** The LoRA shape of a linear layer: [out, in]. */
function linearShape(c: ModelConfig, linear: LinearName): { in: number; out: number } {
  const q = c.nHeads * c.dHead, kv = c.nKvHeads * c.dHead;
  switch (linear) {
    case "attn.q":
      return { in: c.dModel, out: q };
    case "attn.k":
    case "attn.v":
      return { in: c.dModel, out: kv };
    case "attn.o":
      return { in: q, out: c.dModel };
    case "mlp.gate":
    case "mlp.up":
      return { in: c.dModel, out: c.dMlp };
    case "mlp.down":
      return { in: c.dMlp, out: c.dModel };
  }
}

/** Rows of a [R, F] array at `off`, one per batch row without padding slots. */
function perRow(p: Pass, off: number, F: number): Float32Array[] {
  const f = p.rt.f32;
  return Array.from({ length: p.B }, (_, b) => {
    const n = p.promptLen[b]!;
    const out = new Float32Array(n * F);
    if (off >= 0) out.set(f.subarray(off + (b * p.T + p.pad[b]!) * F, off + (b + 1) * p.T * F));
    return out;
  });
}

// ---------------------------------------------------------------- reverse mode

interface Adapter {
  ref: LoraRef;
  dA: number;
  dB: number;
}

export function lossAndGrad(host: GradHost, rows: (Row | number[])[], req: LossAndGradRequest): LossAndGradResult {
  const p = new Pass(host, rows);
  const { c, rt, B, T, R, ctx, pad } = p;
  const D = c.dModel, V = c.dVocab;
  if (req.targets.length !== B) throw new UsageError(`lossAndGrad: targets has ${req.targets.length} rows for a batch of ${B}`);
  const logitRows: number[] = [];
  const targetIds: number[] = [];
  req.targets.forEach((ts, b) => {
    if (ts.length > p.promptLen[b]!) throw new UsageError(`lossAndGrad: row ${b} has ${ts.length} targets for ${p.promptLen[b]} tokens`);
    ts.forEach((t, i) => {
      if (t === -1) return;
      if (!(Number.isInteger(t) && t >= 0 && t < V)) throw new UsageError(`lossAndGrad: target ${t} (row ${b}, position ${i}) is not a token id in 0..${V - 1} or -1`);
      logitRows.push(b * T + pad[b]! + i);
      targetIds.push(t);
    });
  });
  if (logitRows.length === 0) throw new UsageError("lossAndGrad: no targets (every entry is -1)");
  if ((req.plan ?? []).some((iv) => iv.op === "read")) throw new UsageError("lossAndGrad: the plan cannot contain reads");

  // Site parameters become adds after the plan's ops; adapters go into the runtime's memory.
  const plan: Intervention[] = [...(req.plan ?? [])];
  const siteParams = new Map<string, SiteParam[]>();
  const paramAt: { param: SiteParam; ivIndex: number }[] = [];
  const adapters = new Map<string, LoraRef>();
  const adapterOf: (Adapter | null)[] = [];
  const mark = rt.mark();
  try {
    const deltaOf: (DeltaGrad | null)[] = [];
    req.params.forEach((prm, index) => {
      if (prm.kind === "delta") {
        const site = host.deltaSite(prm.name);
        const off = rt.alloc(prm.value.length);
        rt.f32.fill(0, off, off + prm.value.length);
        deltaOf.push({ site, off, n: prm.value.length });
        adapterOf.push(null);
        return;
      }
      deltaOf.push(null);
      if (prm.kind === "lora") {
        adapterOf.push(placeAdapter(p, prm, adapters, index));
        return;
      }
      adapterOf.push(null);
      const { layer, site } = parseHook(prm.at, c.nLayers);
      if (site === "attn.hook_pattern") throw new UsageError(`params[${index}]: attn.hook_pattern is read-only and has no gradient`);
      // Experts with weight 0 do not run, so d/dw_e is not computed for them: refuse rather than return 0.
      if (site === "mlp.hook_expert_weights") throw new UsageError(`params[${index}]: gradients at mlp.hook_expert_weights are not supported (unrouted experts are not run); take them at mlp.hook_router_logits or mlp.hook_expert_out`);
      const F = featShapeOf(c, site).reduce((a, b) => a * b, 1);
      const where = { at: prm.at, ...(prm.kind !== "activation" && prm.pos ? { pos: prm.pos } : {}), ...(prm.kind !== "activation" && prm.rows ? { rows: prm.rows } : {}) };
      let iv: Intervention;
      if (prm.kind === "vector") {
        if (prm.value.length !== F) throw new UsageError(`params[${index}] (vector at ${prm.at}): value has length ${prm.value.length}, expected ${F}`);
        iv = { op: "add", ...where, vector: prm.value };
      } else if (prm.kind === "scale") {
        if (prm.vector.length !== F) throw new UsageError(`params[${index}] (scale at ${prm.at}): vector has length ${prm.vector.length}, expected ${F}`);
        if (!Number.isFinite(prm.value)) throw new UsageError(`params[${index}] (scale at ${prm.at}): value ${prm.value} is not finite`);
        iv = { op: "add", ...where, vector: prm.vector, scale: prm.value };
      } else iv = { op: "add", at: prm.at, vector: new Float32Array(F) }; // puts the site on the tape; adds nothing
      const param: SiteParam = { index, p: prm, mask: null, F };
      paramAt.push({ param, ivIndex: plan.length });
      plan.push(iv);
      const key = siteKey(groupOf(layer, site), site);
      siteParams.set(key, [...(siteParams.get(key) ?? []), param]);
    });
    const resolved = p.resolve(plan, req.countPrefix);
    for (const { param, ivIndex } of paramAt) if (param.p.kind !== "activation") param.mask = scopeMask(resolved[ivIndex]!, ctx, p.promptLen, [1]);

    const grads: Float32Array[][] = req.params.map((prm) => (prm.kind === "vector" ? [new Float32Array(prm.value.length)] : prm.kind === "scale" ? [new Float32Array(1)] : []));
    const dg = deltaOf.filter((x): x is DeltaGrad => x !== null);
    const tiedEmbed = c.tieEmbeddings ? dg.find((x) => x.site.kind === "embed") : undefined;
    const acc64 = req.params.map((prm) => (prm.kind === "vector" ? new Float64Array(prm.value.length) : null));
    const scale64 = req.params.map(() => 0);
    const act: (Float32Array[] | null)[] = req.params.map(() => null);
    const atSite = (group: number | null | "final", site: string, d: number): void => {
      for (const sp of siteParams.get(siteKey(group, site)) ?? []) {
        const view = d >= 0 ? p.view(d, R * sp.F) : null;
        if (sp.p.kind === "vector") {
          if (view) vectorGrad(view, sp.mask!, R, sp.F, acc64[sp.index]!, true);
        } else if (sp.p.kind === "scale") {
          if (view) scale64[sp.index]! += scaleGrad(view, sp.mask!, sp.p.vector, R, sp.F);
        } else act[sp.index] = perRow(p, d, sp.F);
      }
    };

    // Forward: checkpoints of the residual entering each block (and leaving the last).
    const kv = host.openKv(B, T);
    const span = (from: number, to: number, x?: number): LayerSpan => ({ from, to, ...(x !== undefined ? { x } : {}), ...(adapters.size ? { adapters } : {}) });
    const xs = Array.from({ length: c.nLayers + 1 }, () => rt.alloc(R * D));
    {
      const m = rt.mark();
      const e = host.run(ctx, pad, p.promptLen, resolved, kv, null, undefined, span(0, 0));
      rt.f32.copyWithin(xs[0]!, e, e + R * D);
      rt.release(m);
    }
    for (let l = 0; l < c.nLayers; l++) {
      rt.f32.copyWithin(xs[l + 1]!, xs[l]!, xs[l]! + R * D);
      const m = rt.mark();
      const out = host.run(ctx, pad, p.promptLen, resolved, kv, null, undefined, span(l, l + 1, xs[l + 1]!));
      if (out !== xs[l + 1]) rt.f32.copyWithin(xs[l + 1]!, out, out + R * D);
      rt.release(m);
    }

    // The head: loss and the cotangent of the last residual.
    const dx = rt.alloc(R * D);
    let loss = 0;
    {
      const m = rt.mark();
      const tape: Tape = { entries: [] };
      host.head(xs[c.nLayers]!, ctx, p.promptLen, resolved, null, tape, logitRows);
      const d = new Grads(p);
      for (let i = tape.entries.length - 1; i >= 0; i--) {
        const { step, before, after } = tape.entries[i]!;
        if (step.kind === "unembed") {
          const n = logitRows.length;
          const lg = after.logits;
          loss = crossEntropyVjp(p.view(lg, n * V), targetIds, n, V, 1 / n, p.view(lg, n * V), c.finalSoftcap);
          if (!Number.isFinite(loss)) throw new UsageError(`lossAndGrad: the loss is ${loss} (non-finite logits; run forward() on these rows to locate the first bad activation)`);
          // dW_unembed += dlogitsᵀ·h over the target rows (tied: into the embedding's gradient).
          const un = tiedEmbed ?? dg.find((x) => x.site.kind === "unembed");
          if (un) {
            const hs = rt.alloc(n * D);
            logitRows.forEach((r, j) => rt.f32.copyWithin(hs + j * D, before.h + r * D, before.h + (r + 1) * D));
            matmulTN(rt, lg, V, hs, D, un.off, D, V, D, n, true);
          }
          const dhs = rt.alloc(n * D);
          linearVjp(rt, lg, V, host.unembed, dhs, D, n);
          const dh = d.get("h");
          const f = rt.f32;
          logitRows.forEach((r, j) => {
            for (let k = 0; k < D; k++) f[dh + r * D + k] = f[dh + r * D + k]! + f[dhs + j * D + k]!;
          });
        } else if (step.kind === "site") {
          const dh = d.peek("h");
          atSite("final", step.site, dh);
          const ops = p.ops("final", step.site);
          if (ops && dh >= 0) siteOpsVjp(ops, p.view(dh, R * D), R, T, D);
        } else if (step.kind === "finalNorm") {
          const dh = d.peek("h");
          if (dh >= 0) normParams(p, dg, null, "lnFinal", before.h, dh, R, D);
          if (dh >= 0) normVjp(c.norm, host.lnFinal, p.view(before.h, R * D), p.view(dh, R * D), p.view(dh, R * D), R, D);
          if (dh >= 0) rt.f32.copyWithin(dx, dh, dh + R * D);
        }
      }
      rt.release(m);
    }

    // Blocks, last to first: each re-run in tape mode from its checkpoint, its tape walked back.
    const need = Math.min(needsBlocks(p, siteParams, adapters), ...dg.map((x) => deltaLayer(x.site, c.nLayers)));
    for (let l = c.nLayers - 1; l >= need; l--) {
      const m = rt.mark();
      const tape: Tape = { entries: [] };
      host.run(ctx, pad, p.promptLen, resolved, kv, null, tape, span(l, l + 1, xs[l]!));
      const d = new Grads(p);
      d.set("x", d.copy(dx, "x"));
      for (let i = tape.entries.length - 1; i >= 0; i--) backStep(p, tape.entries[i]!, d, adapters, adapterOf, atSite, dg);
      const g = d.peek("x");
      if (g >= 0) rt.f32.copyWithin(dx, g, g + R * D);
      else rt.f32.fill(0, dx, dx + R * D);
      rt.release(m);
    }
    // The embedding stage, when a parameter sits there.
    if (need === 0 && ([...siteParams.keys()].some((k) => k.startsWith("e:")) || dg.some((x) => x.site.kind === "embed" || x.site.kind === "posEmbed"))) {
      const m = rt.mark();
      const tape: Tape = { entries: [] };
      host.run(ctx, pad, p.promptLen, resolved, kv, null, tape, span(0, 0));
      const d = new Grads(p);
      d.set("x", d.copy(dx, "x"));
      for (let i = tape.entries.length - 1; i >= 0; i--) backStep(p, tape.entries[i]!, d, adapters, adapterOf, atSite, dg);
      rt.release(m);
    }

    req.params.forEach((prm, i) => {
      if (prm.kind === "vector") grads[i]![0]!.set(acc64[i]!);
      else if (prm.kind === "scale") grads[i]![0]![0] = scale64[i]!;
      else if (prm.kind === "activation") grads[i] = act[i] ?? perRow(p, -1, featShapeOf(c, parseHook(prm.at, c.nLayers).site).reduce((a, b) => a * b, 1));
      else if (prm.kind === "delta") {
        const x = deltaOf[i]!;
        grads[i] = [rt.f32.slice(x.off, x.off + x.n)];
      }
      else {
        const a = adapterOf[i]!;
        grads[i] = [rt.f32.slice(a.dA, a.dA + prm.rank * a.ref.in), rt.f32.slice(a.dB, a.dB + a.ref.out * prm.rank)];
      }
    });
    return { loss, grads };
  } finally {
    rt.release(mark);
  }
}

/** The first block a delta's gradient needs the backward to visit (nLayers: the head's weights). */
function deltaLayer(s: DeltaSite, nLayers: number): number {
  switch (s.kind) {
    case "embed":
    case "posEmbed":
      return 0;
    case "unembed":
      return nLayers;
    case "norm":
      return s.layer ?? nLayers;
    default:
      return s.layer;
  }
}

/** dW (+= dyᵀ·x) of the linear deltas on block l's `mat`, from its step's cotangent dy [R, ldy] and input x [R, ldx]. */
function linearParams(p: Pass, dg: readonly DeltaGrad[], l: number, mat: DeltaMat, dy: number, lddy: number, x: number, ldx: number): void {
  for (const g of dg) {
    const s = g.site;
    if (s.kind === "linear" && s.layer === l && s.mat === mat) matmulTN(p.rt, dy + s.row0, lddy, x, ldx, g.off, s.cols, s.rows, s.cols, p.R, true);
    else if (s.kind === "bias" && s.layer === l && s.mat === mat) {
      const f = p.rt.f32;
      for (let r = 0; r < p.R; r++) for (let i = 0; i < s.rows; i++) f[g.off + i] = f[g.off + i]! + f[dy + r * lddy + s.row0 + i]!;
    }
  }
}

/** The gradients of a norm's weight and bias deltas from its input x and output cotangent dy ([rows, width]). */
function normParams(p: Pass, dg: readonly DeltaGrad[], l: number | null, norm: DeltaNorm, x: number, dy: number, rows: number, width: number): void {
  const w = dg.find((g) => g.site.kind === "norm" && g.site.layer === l && g.site.norm === norm && g.site.part === "weight");
  const b = dg.find((g) => g.site.kind === "norm" && g.site.layer === l && g.site.norm === norm && g.site.part === "bias");
  if (!w && !b) return;
  const n = rows * width;
  normParamGrad(p.c.norm, p.view(x, n), p.view(dy, n), rows, width, w ? p.view(w.off, width) : null, b ? p.view(b.off, width) : null);
}

/** The first block the backward must visit: 0 unless nothing (site parameter, adapter) sits before some layer. */
function needsBlocks(p: Pass, siteParams: Map<string, SiteParam[]>, adapters: Map<string, LoraRef>): number {
  let first = p.c.nLayers;
  for (const k of siteParams.keys()) {
    const g = k.slice(0, k.indexOf(":"));
    if (g === "e") return 0;
    if (g !== "f") first = Math.min(first, Number(g));
  }
  for (const k of adapters.keys()) first = Math.min(first, Number(k.slice(0, k.indexOf(":"))));
  return first;
}

/** Checks a LoRA parameter and copies A and B into the runtime's memory (with zeroed dA, dB). */
function placeAdapter(p: Pass, prm: Extract<TrainParam, { kind: "lora" }>, adapters: Map<string, LoraRef>, index: number): Adapter {
  const c = p.c;
  const where = `params[${index}] (lora on blocks.${prm.layer}.${prm.linear})`;
  if (!(Number.isInteger(prm.layer) && prm.layer >= 0 && prm.layer < c.nLayers)) throw new UsageError(`${where}: layer must be in 0..${c.nLayers - 1}`);
  if (!LINEARS.includes(prm.linear)) throw new UsageError(`${where}: linear must be one of ${LINEARS.join(", ")}`);
  if (c.mlp.kind === "moe" && prm.linear.startsWith("mlp.")) throw new UsageError(`${where}: adapters on a mixture-of-experts MLP are not supported (attention linears are)`);
  if (prm.linear === "mlp.gate" && c.mlp.kind !== "gated") throw new UsageError(`${where}: this model's MLP has no gate (use mlp.up)`);
  if (!(Number.isInteger(prm.rank) && prm.rank > 0)) throw new UsageError(`${where}: rank must be a positive integer`);
  const s = linearShape(c, prm.linear);
  if (prm.a.length !== prm.rank * s.in) throw new UsageError(`${where}: a has length ${prm.a.length}, expected rank·in = ${prm.rank}·${s.in}`);
  if (prm.b.length !== s.out * prm.rank) throw new UsageError(`${where}: b has length ${prm.b.length}, expected out·rank = ${s.out}·${prm.rank}`);
  if (!prm.a.every(Number.isFinite) || !prm.b.every(Number.isFinite)) throw new UsageError(`${where}: a or b contains NaN or Inf`);
  const key = adapterKey(prm.layer, prm.linear);
  if (adapters.has(key)) throw new UsageError(`${where}: two adapters on one linear layer; pass one`);
  const rt = p.rt;
  const a = rt.alloc(prm.a.length), b = rt.alloc(prm.b.length);
  rt.f32.set(prm.a, a);
  rt.f32.set(prm.b, b);
  const ref: LoraRef = { a, b, rank: prm.rank, in: s.in, out: s.out, scale: prm.scale ?? 1 };
  adapters.set(key, ref);
  return { ref, dA: rt.alloc(prm.a.length), dB: rt.alloc(prm.b.length) };
}

/** The VJP of one tape entry: cotangents of its outputs (taken) to cotangents of its inputs (added). */
function backStep(
  p: Pass,
  e: TapeEntry,
  d: Grads,
  adapters: Map<string, LoraRef>,
  adapterOf: (Adapter | null)[],
  atSite: (group: number | null | "final", site: string, d: number) => void,
  dg: readonly DeltaGrad[],
): void {
  const { c, rt, R, T } = p;
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
  const { layer: l, step, before } = e;
  const W = l === null ? null : p.host.block(l);
  const lora = (linear: LinearName): Adapter | null => {
    if (l === null) return null;
    const ref = adapters.get(adapterKey(l, linear));
    return ref ? adapterOf.find((a) => a?.ref === ref)! : null;
  };
  const loraBack = (linear: LinearName, x: number, ldx: number, dy: number, lddy: number, dx: number, lddx: number): void => {
    const a = lora(linear);
    if (a) loraVjp(rt, a.ref, x, ldx, dy, lddy, R, a.dA, a.dB, dx, lddx);
  };
  switch (step.kind) {
    case "site": {
      const group = groupOf(l, step.site);
      const off = d.peek(step.buf);
      atSite(group, step.site, off);
      const ops = p.ops(group, step.site);
      const Fall = featShapeOf(c, step.site).reduce((a, b) => a * b, 1);
      if (ops && off >= 0) siteOpsVjp(ops, p.view(off, R * Fall), R, T, Fall);
      return;
    }
    case "embed": {
      // The table's gradient (a delta on embed.weight): a scatter-add of dx into the rows of the ids.
      const g = d.take("x");
      const t = dg.find((x) => x.site.kind === "embed");
      if (g >= 0 && t) embedVjp(p.view(g, R * D), p.ctx.ids, p.ctx.pos, R, D, c.embedScale, p.view(t.off, t.n));
      return;
    }
    case "posEmbed": {
      const g = d.take("a");
      const t = dg.find((x) => x.site.kind === "posEmbed");
      if (g >= 0 && t) {
        const f = rt.f32;
        for (let r = 0; r < R; r++) {
          const pos = p.ctx.pos[r]!;
          if (pos >= 0) for (let i = 0; i < D; i++) f[t.off + pos * D + i] = f[t.off + pos * D + i]! + f[g + r * D + i]!;
        }
      }
      return;
    }
    case "residual": {
      const g = d.peek("x");
      if (g >= 0) d.add(step.src, d.copy(g, "x"));
      return;
    }
    case "copy": {
      const g = d.take(step.dst);
      if (g >= 0) d.add(step.src, g);
      return;
    }
    case "norm": {
      const g = d.take(step.dst);
      if (g < 0) return;
      const n = R * D;
      normParams(p, dg, l, step.weight, before[step.src], g, R, D);
      if (step.src === step.dst) {
        normVjp(c.norm, W!.norms[step.weight]!, p.view(before[step.src], n), p.view(g, n), p.view(g, n), R, D);
        d.set(step.src, g);
      } else {
        const dsrc = d.get(step.src);
        normVjp(c.norm, W!.norms[step.weight]!, p.view(before[step.src], n), p.view(g, n), p.view(dsrc, n), R, D, true);
      }
      return;
    }
    case "qkv": {
      const gq = d.take("q"), gk = d.take("k"), gv = d.take("v");
      d.take("qkv");
      if (gq < 0 && gk < 0 && gv < 0) return;
      const qkvW = (H + 2 * K) * hd;
      const g = rt.alloc(R * qkvW);
      const dh = d.get("h");
      const f = rt.f32;
      if (gq >= 0) copyCols(f, gq, H * hd, 0, g, H * hd, R, qkvW);
      if (gk >= 0) copyCols(f, gk, K * hd, 0, g + H * hd, K * hd, R, qkvW);
      if (gv >= 0) copyCols(f, gv, K * hd, 0, g + (H + K) * hd, K * hd, R, qkvW);
      linearVjp(rt, g, qkvW, W!.qkv, dh, D, R, true);
      linearParams(p, dg, l!, "qkv", g, qkvW, before.h, D);
      loraBack("attn.q", before.h, D, g, qkvW, dh, D);
      loraBack("attn.k", before.h, D, g + H * hd, qkvW, dh, D);
      loraBack("attn.v", before.h, D, g + (H + K) * hd, qkvW, dh, D);
      return;
    }
    case "qkNorm": {
      const full = c.qkNorm.kind === "full";
      for (const [name, heads, w] of [["q", H, "qNorm"], ["k", K, "kNorm"]] as const) {
        const g = d.peek(name);
        if (g < 0) continue;
        const n = R * heads * hd;
        normParams(p, dg, l, w, before[name], g, full ? R : R * heads, full ? heads * hd : hd);
        normVjp(c.norm, W!.norms[w]!, p.view(before[name], n), p.view(g, n), p.view(g, n), full ? R : R * heads, full ? heads * hd : hd);
      }
      return;
    }
    case "rope": {
      const { cos, sin } = p.rope(l!);
      for (const [name, heads] of [["q", H], ["k", K]] as const) {
        const g = d.peek(name);
        if (g >= 0) ropeVjp(p.view(g, R * heads * hd), p.view(g, R * heads * hd), cos, sin, R, heads, hd);
      }
      return;
    }
    case "attend": {
      const gz = d.take("z");
      if (gz < 0) return;
      const dq = rt.alloc(p.size("q")), dk = rt.alloc(p.size("k")), dv = rt.alloc(p.size("v"));
      attentionVjp(rt, p.geom(l!), before.q, before.k, before.v, gz, dq, dk, dv);
      d.add("q", dq);
      d.add("k", dk);
      d.add("v", dv);
      return;
    }
    case "oProj": {
      const ga = d.take("a");
      if (ga < 0) return;
      const dz = d.get("z");
      linearVjp(rt, ga, D, W!.o, dz, H * hd, R, true);
      linearParams(p, dg, l!, "o", ga, D, before.z, H * hd);
      loraBack("attn.o", before.z, H * hd, ga, D, dz, H * hd);
      return;
    }
    case "heads": {
      const gr = d.take("result");
      if (gr < 0) return;
      const dz = d.get("z");
      const a = lora("attn.o");
      // dW_O's columns of head hh: result_hᵀ's cotangent times z_h (the o bias is in sumHeads).
      const od = dg.find((x) => x.site.kind === "linear" && x.site.layer === l && x.site.mat === "o");
      for (let hh = 0; hh < H; hh++) {
        if (od) matmulTN(rt, gr + hh * D, H * D, before.z + hh * hd, H * hd, od.off + hh * hd, H * hd, D, hd, R, true);
        linearVjp(rt, gr + hh * D, H * D, { off: W!.o.off + hh * hd, rows: D, cols: hd, ld: H * hd }, dz + hh * hd, H * hd, R, true);
        // The adapter's per-head share: A's columns of head hh.
        if (a) loraVjp(rt, { ...a.ref, a: a.ref.a + hh * hd, lda: H * hd, in: hd }, before.z + hh * hd, H * hd, gr + hh * D, H * D, R, a.dA + hh * hd, a.dB, dz + hh * hd, H * hd);
      }
      return;
    }
    case "sumHeads": {
      const ga = d.take("a");
      if (ga < 0) return;
      const gr = d.get("result");
      for (const x of dg) if (x.site.kind === "bias" && x.site.layer === l && x.site.mat === "o") linearParams(p, [x], l, "o", ga, D, -1, 0);
      const f = rt.f32;
      for (let r = 0; r < R; r++)
        for (let hh = 0; hh < H; hh++) {
          const o = gr + (r * H + hh) * D;
          for (let i = 0; i < D; i++) f[o + i] = f[o + i]! + f[ga + r * D + i]!;
        }
      return;
    }
    case "mlpIn": {
      const gated = c.mlp.kind === "gated";
      const upW = gated ? 2 * F : F;
      let gu = d.take("up");
      const gp = d.take("pre");
      if (gu < 0 && gp < 0) return;
      if (gu < 0) gu = rt.alloc(R * upW);
      // The gate (gated) or the whole product (plain) was read through pre.
      if (gp >= 0) copyCols(rt.f32, gp, F, 0, gu, F, R, upW, true);
      const dh = d.get("h");
      linearVjp(rt, gu, upW, W!.up, dh, D, R, true);
      linearParams(p, dg, l!, "up", gu, upW, before.h, D);
      if (gated) loraBack("mlp.gate", before.h, D, gu, upW, dh, D);
      loraBack("mlp.up", before.h, D, gated ? gu + F : gu, upW, dh, D);
      return;
    }
    case "mlpAct": {
      const g = d.take("post");
      if (g < 0) return;
      const gated = c.mlp.kind === "gated";
      const dpre = d.get("pre");
      const f = rt.f32;
      if (gated) {
        const dup = d.get("up");
        const g2 = rt.f32;
        mlpActVjp(c.mlp.act, { R, F, ldPre: F, ldUp: 2 * F }, g2.subarray(before.pre, before.pre + R * F), g2.subarray(before.up + F, before.up + 2 * R * F), g2.subarray(g, g + R * F), g2.subarray(dpre, dpre + R * F), g2.subarray(dup + F, dup + 2 * R * F), true);
      } else mlpActVjp(c.mlp.act, { R, F, ldPre: F }, f.subarray(before.pre, before.pre + R * F), null, f.subarray(g, g + R * F), f.subarray(dpre, dpre + R * F), null, true);
      return;
    }
    case "down": {
      const gd = d.take("d");
      if (gd < 0) return;
      const dpost = d.get("post");
      linearVjp(rt, gd, D, W!.down, dpost, F, R, true);
      linearParams(p, dg, l!, "down", gd, D, before.post, F);
      loraBack("mlp.down", before.post, F, gd, D, dpost, F);
      return;
    }
    case "route": {
      const g = d.take("rl");
      if (g >= 0) linearVjp(rt, g, W!.moe!.router.rows, W!.moe!.router, d.get("h"), D, R, true);
      return;
    }
    case "select": {
      const g = d.take("ew");
      if (g >= 0) selectVjp(p, before.rl, e.after.ew, g, d.get("rl"));
      return;
    }
    case "experts":
    case "expertOut": {
      const per = step.kind === "expertOut";
      const g = d.take(per ? "eo" : "d");
      if (g >= 0) expertsVjp(p, W!.moe!.experts, before.h, before.ew, g, per, d.get("h"), d.get("ew"));
      return;
    }
    case "sumExperts": {
      // d = Σ_e eo_e: every expert's output gets d's cotangent.
      const g = d.take("d");
      if (g < 0) return;
      const geo = d.get("eo");
      const E = W!.moe!.experts.length;
      const f = rt.f32;
      for (let r = 0; r < R; r++)
        for (let x = 0; x < E; x++) {
          const o = geo + (r * E + x) * D;
          for (let i = 0; i < D; i++) f[o + i] = f[o + i]! + f[g + r * D + i]!;
        }
      return;
    }
    case "finalNorm":
    case "unembed":
      throw new UsageError("internal: head steps in a block tape");
  }
}

/**
 * VJP of the routing weights (schedule.ts "select"): S = the experts the forward routed to (ew ≠ 0
 * as select wrote it). Renormalised: w_j = softmax over S, drl_j = w_j (g_j − Σ_S g_e w_e) on S.
 * Not renormalised: w_j = p_j = softmax over all, drl_j = [j ∈ S] g_j p_j − p_j Σ_S g_e p_e.
 */
function selectVjp(p: Pass, rl: number, ew: number, g: number, drl: number): void {
  const m = p.c.mlp;
  if (m.kind !== "moe") throw new UsageError("internal: select on a dense MLP");
  const E = m.nExperts;
  const f = p.rt.f32;
  const pr = new Float64Array(E);
  for (let r = 0; r < p.R; r++) {
    let mx = -Infinity;
    for (let e = 0; e < E; e++) mx = Math.max(mx, f[rl + r * E + e]!);
    let z = 0;
    for (let e = 0; e < E; e++) z += pr[e] = Math.exp(f[rl + r * E + e]! - mx);
    const inS = (e: number) => f[ew + r * E + e] !== 0;
    let zs = 0;
    for (let e = 0; e < E; e++) if (inS(e)) zs += pr[e]!;
    const div = m.normTopK ? zs : z;
    let dot = 0;
    for (let e = 0; e < E; e++) if (inS(e)) dot += f[g + r * E + e]! * (pr[e]! / div);
    for (let j = 0; j < E; j++) {
      const w = pr[j]! / div;
      const v = m.normTopK ? (inS(j) ? w * (f[g + r * E + j]! - dot) : 0) : (inS(j) ? f[g + r * E + j]! * w : 0) - w * dot;
      f[drl + r * E + j] = f[drl + r * E + j]! + v;
    }
  }
}

/**
 * VJP of the experts (schedule.ts "experts", or its per-expert form): each routed expert runs again
 * on its rows (none of its internals is on the tape), then dew_e = ⟨g, y_e⟩ and the expert's own
 * VJP (w_e·g through down, the gated activation and gate|up) adds into dh. `per`: g is [R, E, D].
 */
function expertsVjp(p: Pass, experts: { up: MatRef; down: MatRef }[], h: number, ew: number, g: number, per: boolean, dh: number, dew: number): void {
  const { c, rt, R } = p;
  const D = c.dModel, F = c.dMlp, E = experts.length, act = c.mlp.act;
  for (let e = 0; e < E; e++) {
    const rows: number[] = [];
    for (let r = 0; r < R; r++) if (rt.f32[ew + r * E + e] !== 0) rows.push(r);
    const n = rows.length;
    if (n === 0) continue;
    const mk = rt.mark();
    const x = rt.alloc(n * D), up = rt.alloc(n * 2 * F), post = rt.alloc(n * F), y = rt.alloc(n * D), gy = rt.alloc(n * D), dpost = rt.alloc(n * F), dup = rt.alloc(n * 2 * F), dx = rt.alloc(n * D);
    const f = rt.f32;
    rows.forEach((r, i) => f.copyWithin(x + i * D, h + r * D, h + (r + 1) * D));
    linear(rt, x, D, experts[e]!.up, up, 2 * F, n);
    for (let i = 0; i < n; i++) for (let j = 0; j < F; j++) f[post + i * F + j] = actValue(f[up + i * 2 * F + j]!, act) * f[up + i * 2 * F + F + j]!;
    linear(rt, post, F, experts[e]!.down, y, D, n);
    rows.forEach((r, i) => {
      const go = per ? g + (r * E + e) * D : g + r * D;
      const w = f[ew + r * E + e]!;
      let s = 0;
      for (let j = 0; j < D; j++) {
        s += f[go + j]! * f[y + i * D + j]!;
        f[gy + i * D + j] = w * f[go + j]!;
      }
      f[dew + r * E + e] = f[dew + r * E + e]! + s;
    });
    linearVjp(rt, gy, D, experts[e]!.down, dpost, F, n);
    mlpActVjp(act, { R: n, F, ldPre: 2 * F, ldUp: 2 * F }, f.subarray(up, up + n * 2 * F), f.subarray(up + F, up + n * 2 * F), f.subarray(dpost, dpost + n * F), f.subarray(dup, dup + n * 2 * F), f.subarray(dup + F, dup + n * 2 * F));
    linearVjp(rt, dup, 2 * F, experts[e]!.up, dx, D, n);
    rows.forEach((r, i) => {
      for (let j = 0; j < D; j++) f[dh + r * D + j] = f[dh + r * D + j]! + f[dx + i * D + j]!;
    });
    rt.release(mk);
  }
}


// ---------------------------------------------------------------- forward mode

export function jvpScale(host: GradHost, rows: (Row | number[])[], req: JvpRequest): JvpResult {
  const p = new Pass(host, rows);
  const { c, rt, B, T, R, ctx, pad } = p;
  const D = c.dModel;
  const wrtIv = req.plan[req.wrt];
  if (!wrtIv || wrtIv.op !== "add") throw new UsageError(`jvpScale: wrt ${req.wrt} must index an add in the plan (${req.plan.length} interventions)`);
  const readSites = new Map<string, HookName>();
  for (const at of req.reads) {
    const { layer, site } = parseHook(at, c.nLayers);
    if (site === "attn.hook_pattern") throw new UsageError(`jvpScale: ${at} is not supported (the derivative of attention patterns is not computed)`);
    readSites.set(siteKey(groupOf(layer, site), site), at);
  }
  // Reads for the values; zero adds put each read site on the tape (they add nothing).
  const plan: Intervention[] = [
    ...req.plan,
    ...req.reads.map((at): Intervention => ({ op: "read", at })),
    ...req.reads.map((at): Intervention => ({ op: "add", at, vector: new Float32Array(featShapeOf(c, parseHook(at, c.nLayers).site).reduce((a, b) => a * b, 1)) })),
  ];
  const resolved = p.resolve(plan, req.countPrefix);
  const wrt = resolved[req.wrt]!;
  const wrtGroup = groupOf(wrt.layer, wrt.site);
  const wrtMask = scopeMask(wrt, ctx, p.promptLen, [1]);
  const wrtVec = (wrtIv as Extract<Intervention, { op: "add" }>).vector;
  const tangents = new Map<HookName, Float32Array[]>();
  const cache = new ActivationCache();

  const atSite = (group: number | null | "final", site: string, buf: CpuBuf, t: Grads): void => {
    const Fall = featShapeOf(c, site).reduce((a, b) => a * b, 1);
    if (group === wrtGroup && site === wrt.site) {
      // The site's ops one intervention at a time, so the scale's term enters in plan order.
      const off = t.get(buf);
      resolved.forEach((r, i) => {
        if (groupOf(r.layer, r.site) !== group || r.site !== site || r.iv.op === "read") return;
        if (i === req.wrt) scaleTangent(p.view(off, R * Fall), wrtMask, wrtVec, R, Fall);
        else {
          const ops = compileHost([r], ctx, p.promptLen, group).host.get(site);
          if (ops) siteOpsJvp(ops, p.view(off, R * Fall), R, T, Fall);
        }
      });
    } else {
      const off = t.peek(buf);
      const ops = p.ops(group, site);
      if (ops && off >= 0) siteOpsJvp(ops, p.view(off, R * Fall), R, T, Fall);
    }
    const read = readSites.get(siteKey(group, site));
    if (read) tangents.set(read, perRow(p, t.peek(buf), Fall));
  };

  const mark = rt.mark();
  try {
    const kv = host.openKv(B, T);
    const x = rt.alloc(R * D), tx = rt.alloc(R * D);
    let txLive = false;
    const stage = (from: number, to: number, first: boolean): void => {
      const m = rt.mark();
      const tape: Tape = { entries: [] };
      const out = host.run(ctx, pad, p.promptLen, resolved, kv, cache, tape, { from, to, ...(first ? {} : { x }) });
      const t = new Grads(p);
      if (txLive) t.set("x", t.copy(tx, "x"));
      for (const e of tape.entries) fwdStep(p, e, t, atSite);
      rt.f32.copyWithin(x, out, out + R * D);
      const g = t.peek("x");
      txLive = g >= 0;
      if (txLive) rt.f32.copyWithin(tx, g, g + R * D);
      rt.release(m);
    };
    stage(0, 0, true);
    for (let l = 0; l < c.nLayers; l++) stage(l, l + 1, false);
    if (readSites.has(siteKey("final", "ln_final.hook_normalized"))) {
      const m = rt.mark();
      const tape: Tape = { entries: [] };
      host.head(x, ctx, p.promptLen, resolved, cache, tape, []);
      const t = new Grads(p);
      if (txLive) t.set("h", t.copy(tx, "x"));
      for (const e of tape.entries) {
        if (e.step.kind === "finalNorm") {
          const th = t.take("h");
          if (th >= 0) {
            normJvp(c.norm, host.lnFinal, p.view(e.before.h, R * D), p.view(th, R * D), p.view(th, R * D), R, D);
            t.set("h", th);
          }
        } else if (e.step.kind === "site") atSite("final", e.step.site, "h", t);
      }
      rt.release(m);
    }
  } finally {
    rt.release(mark);
  }
  const values = new Map<HookName, Float32Array[]>();
  for (const at of req.reads) values.set(at, Array.from({ length: B }, (_, b) => cache.get(at, b).data));
  return { values, tangents };
}

/**
 * The JVP of one tape entry: tangents of its inputs to a fresh tangent of its outputs (absent in,
 * absent out). A JvpRequest carries no adapters, so the linear steps are the weights' alone.
 */
function fwdStep(p: Pass, e: TapeEntry, t: Grads, atSite: (group: number | null | "final", site: string, buf: CpuBuf, t: Grads) => void): void {
  const { c, rt, R } = p;
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
  const { layer: l, step, before } = e;
  const W = l === null ? null : p.host.block(l);
  const fresh = (name: CpuBuf): number => rt.alloc(p.size(name));
  switch (step.kind) {
    case "site":
      atSite(groupOf(l, step.site), step.site, step.buf, t);
      return;
    case "embed":
      t.take("x");
      return;
    case "posEmbed":
      t.take("a");
      return;
    case "residual": {
      const ts = t.peek(step.src);
      if (ts < 0) return;
      const tx = t.peek("x");
      t.set("x", tx >= 0 ? t.copy(tx, "x") : fresh("x"));
      addInto(p.view(t.peek("x"), R * D), p.view(ts, R * D), R * D);
      return;
    }
    case "copy": {
      const ts = t.peek(step.src);
      t.take(step.dst);
      if (ts >= 0) t.set(step.dst, t.copy(ts, step.dst));
      return;
    }
    case "norm": {
      const ts = t.peek(step.src);
      t.take(step.dst);
      if (ts < 0) return;
      const o = fresh(step.dst);
      normJvp(c.norm, W!.norms[step.weight]!, p.view(before[step.src], R * D), p.view(ts, R * D), p.view(o, R * D), R, D);
      t.set(step.dst, o);
      return;
    }
    case "qkv": {
      const th = t.peek("h");
      for (const n of ["q", "k", "v", "qkv"] as const) t.take(n);
      if (th < 0) return;
      const qkvW = (H + 2 * K) * hd;
      const g = fresh("qkv");
      linearJvp(rt, th, D, W!.qkv, g, qkvW, R);
      const f = rt.f32;
      const q = fresh("q"), k = fresh("k"), v = fresh("v");
      copyCols(f, g, qkvW, 0, q, H * hd, R);
      copyCols(f, g, qkvW, H * hd, k, K * hd, R);
      copyCols(f, g, qkvW, (H + K) * hd, v, K * hd, R);
      t.set("q", q);
      t.set("k", k);
      t.set("v", v);
      return;
    }
    case "qkNorm": {
      const full = c.qkNorm.kind === "full";
      for (const [name, heads, w] of [["q", H, "qNorm"], ["k", K, "kNorm"]] as const) {
        const g = t.take(name);
        if (g < 0) continue;
        const n = R * heads * hd;
        const o = fresh(name);
        normJvp(c.norm, W!.norms[w]!, p.view(before[name], n), p.view(g, n), p.view(o, n), full ? R : R * heads, full ? heads * hd : hd);
        t.set(name, o);
      }
      return;
    }
    case "rope": {
      const { cos, sin } = p.rope(l!);
      for (const [name, heads] of [["q", H], ["k", K]] as const) {
        const g = t.take(name);
        if (g < 0) continue;
        const o = fresh(name);
        ropeJvp(p.view(g, R * heads * hd), p.view(o, R * heads * hd), cos, sin, R, heads, hd);
        t.set(name, o);
      }
      return;
    }
    case "attend": {
      t.take("z");
      if (!t.has("q") && !t.has("k") && !t.has("v")) return;
      const z = fresh("z");
      attentionJvp(rt, p.geom(l!), before.q, before.k, before.v, t.get("q"), t.get("k"), t.get("v"), z);
      t.set("z", z);
      return;
    }
    case "oProj": {
      const tz = t.peek("z");
      t.take("a");
      if (tz < 0) return;
      const a = fresh("a");
      linearJvp(rt, tz, H * hd, W!.o, a, D, R);
      t.set("a", a);
      return;
    }
    case "heads": {
      const tz = t.peek("z");
      t.take("result");
      if (tz < 0) return;
      const res = fresh("result");
      for (let hh = 0; hh < H; hh++) linearJvp(rt, tz + hh * hd, H * hd, { off: W!.o.off + hh * hd, rows: D, cols: hd, ld: H * hd }, res + hh * D, H * D, R);
      t.set("result", res);
      return;
    }
    case "sumHeads": {
      const tr = t.peek("result");
      t.take("a");
      if (tr < 0) return;
      const a = fresh("a");
      const f = rt.f32;
      for (let r = 0; r < R; r++)
        for (let hh = 0; hh < H; hh++) for (let i = 0; i < D; i++) f[a + r * D + i] = f[a + r * D + i]! + f[tr + (r * H + hh) * D + i]!;
      t.set("a", a);
      return;
    }
    case "mlpIn": {
      const th = t.peek("h");
      t.take("up");
      t.take("pre");
      if (th < 0) return;
      const gated = c.mlp.kind === "gated";
      const upW = gated ? 2 * F : F;
      const up = fresh("up");
      linearJvp(rt, th, D, W!.up, up, upW, R);
      t.set("up", up);
      const pre = fresh("pre");
      copyCols(rt.f32, up, upW, 0, pre, F, R);
      t.set("pre", pre);
      return;
    }
    case "mlpAct": {
      const tp = t.peek("pre"), tu = t.peek("up");
      t.take("post");
      if (tp < 0 && tu < 0) return;
      const gated = c.mlp.kind === "gated";
      const post = fresh("post");
      const tpre = t.get("pre");
      const f = rt.f32;
      mlpActJvp(
        c.mlp.act,
        { R, F, ldPre: F, ...(gated ? { ldUp: 2 * F } : {}) },
        f.subarray(before.pre, before.pre + R * F),
        gated ? f.subarray(before.up + F, before.up + 2 * R * F) : null,
        f.subarray(tpre, tpre + R * F),
        gated && tu >= 0 ? f.subarray(tu + F, tu + 2 * R * F) : null,
        f.subarray(post, post + R * F),
      );
      t.set("post", post);
      return;
    }
    case "down": {
      const tp = t.peek("post");
      t.take("d");
      if (tp < 0) return;
      const o = fresh("d");
      linearJvp(rt, tp, F, W!.down, o, D, R);
      t.set("d", o);
      return;
    }
    case "route": {
      const th = t.peek("h");
      t.take("rl");
      if (th < 0) return;
      const o = fresh("rl");
      linearJvp(rt, th, D, W!.moe!.router, o, W!.moe!.router.rows, R);
      t.set("rl", o);
      return;
    }
    case "select": {
      const tr = t.peek("rl");
      t.take("ew");
      if (tr < 0) return;
      const o = fresh("ew");
      selectJvp(p, before.rl, e.after.ew, tr, o);
      t.set("ew", o);
      return;
    }
    case "experts":
    case "expertOut": {
      const per = step.kind === "expertOut";
      const th = t.peek("h"), tw = t.peek("ew");
      t.take(per ? "eo" : "d");
      if (th < 0 && tw < 0) return;
      const o = fresh(per ? "eo" : "d");
      rt.f32.fill(0, o, o + p.size(per ? "eo" : "d"));
      expertsJvp(p, W!.moe!.experts, before.h, before.ew, th, tw, o, per);
      t.set(per ? "eo" : "d", o);
      return;
    }
    case "sumExperts": {
      const te = t.peek("eo");
      t.take("d");
      if (te < 0) return;
      const o = fresh("d");
      const E = W!.moe!.experts.length;
      const f = rt.f32;
      for (let r = 0; r < R; r++)
        for (let i = 0; i < D; i++) {
          let sum = 0;
          for (let x = 0; x < E; x++) sum += f[te + (r * E + x) * D + i]!;
          f[o + r * D + i] = sum;
        }
      t.set("d", o);
      return;
    }
    case "finalNorm":
    case "unembed":
      throw new UsageError("internal: head steps in a block tape");
  }
}


/** JVP of "select" (see selectVjp): tw_j = w_j (t_j − Σ_S w_e t_e) renormalised, p_j (t_j − Σ_all p_e t_e) not, on S; 0 off S. */
function selectJvp(p: Pass, rl: number, ew: number, tr: number, o: number): void {
  const m = p.c.mlp;
  if (m.kind !== "moe") throw new UsageError("internal: select on a dense MLP");
  const E = m.nExperts;
  const f = p.rt.f32;
  const pr = new Float64Array(E);
  for (let r = 0; r < p.R; r++) {
    let mx = -Infinity;
    for (let e = 0; e < E; e++) mx = Math.max(mx, f[rl + r * E + e]!);
    let z = 0;
    for (let e = 0; e < E; e++) z += pr[e] = Math.exp(f[rl + r * E + e]! - mx);
    const inS = (e: number) => f[ew + r * E + e] !== 0;
    let zs = 0;
    for (let e = 0; e < E; e++) if (inS(e)) zs += pr[e]!;
    const div = m.normTopK ? zs : z;
    let mean = 0;
    for (let e = 0; e < E; e++) if (!m.normTopK || inS(e)) mean += (pr[e]! / div) * f[tr + r * E + e]!;
    for (let j = 0; j < E; j++) f[o + r * E + j] = inS(j) ? (pr[j]! / div) * (f[tr + r * E + j]! - mean) : 0;
  }
}

/**
 * JVP of the experts: per expert, over the rows whose weight or weight tangent is not 0, its forward
 * (y_e) and its tangent along th (t_y_e) are computed; out[r] += tw_e·y_e + w_e·t_y_e.
 */
function expertsJvp(p: Pass, experts: { up: MatRef; down: MatRef }[], h: number, ew: number, th: number, tw: number, out: number, per: boolean): void {
  const { c, rt, R } = p;
  const D = c.dModel, F = c.dMlp, E = experts.length, act = c.mlp.act;
  for (let e = 0; e < E; e++) {
    const rows: number[] = [];
    for (let r = 0; r < R; r++) if (rt.f32[ew + r * E + e] !== 0 || (tw >= 0 && rt.f32[tw + r * E + e] !== 0)) rows.push(r);
    const n = rows.length;
    if (n === 0) continue;
    const mk = rt.mark();
    const x = rt.alloc(n * D), up = rt.alloc(n * 2 * F), post = rt.alloc(n * F), y = rt.alloc(n * D);
    const f = rt.f32;
    rows.forEach((r, i) => f.copyWithin(x + i * D, h + r * D, h + (r + 1) * D));
    linear(rt, x, D, experts[e]!.up, up, 2 * F, n);
    for (let i = 0; i < n; i++) for (let j = 0; j < F; j++) f[post + i * F + j] = actValue(f[up + i * 2 * F + j]!, act) * f[up + i * 2 * F + F + j]!;
    linear(rt, post, F, experts[e]!.down, y, D, n);
    let ty = -1;
    if (th >= 0) {
      const tx = rt.alloc(n * D), tup = rt.alloc(n * 2 * F), tpost = rt.alloc(n * F);
      ty = rt.alloc(n * D);
      rows.forEach((r, i) => f.copyWithin(tx + i * D, th + r * D, th + (r + 1) * D));
      linearJvp(rt, tx, D, experts[e]!.up, tup, 2 * F, n);
      mlpActJvp(act, { R: n, F, ldPre: 2 * F, ldUp: 2 * F }, f.subarray(up, up + n * 2 * F), f.subarray(up + F, up + n * 2 * F), f.subarray(tup, tup + n * 2 * F), f.subarray(tup + F, tup + n * 2 * F), f.subarray(tpost, tpost + n * F));
      linearJvp(rt, tpost, F, experts[e]!.down, ty, D, n);
    }
    rows.forEach((r, i) => {
      const w = f[ew + r * E + e]!, dw = tw >= 0 ? f[tw + r * E + e]! : 0;
      const o = per ? out + (r * E + e) * D : out + r * D;
      for (let j = 0; j < D; j++) f[o + j] = f[o + j]! + dw * f[y + i * D + j]! + (ty >= 0 ? w * f[ty + i * D + j]! : 0);
    });
    rt.release(mk);
  }
}
