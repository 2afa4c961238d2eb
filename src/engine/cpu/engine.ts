// selfscope's own CPU engine: the forward pass written out by hand over one WebAssembly memory,
// with every matrix product in our Wasm SIMD kernels (kernels.ts) on a thread pool (runtime.ts)
// and the light per-token work (norms, RoPE, softmax, activations, interventions) in plain
// TypeScript. It computes exactly what the jax-js engine computes (same plan semantics, same
// hook names, same left-padded batches) — the tests hold both to the same references — but
// without jax-js's per-kernel dispatch: a decode step is ~6 kernel calls per block.
//
// Memory is stack-scoped: weights are allocated once; a call marks the stack, allocates its
// activations (and, for generate, its KV cache), and releases them when it returns.
//
// Past one wasm32 memory (4 GiB): the layers are split into segments, each a runtime with its own
// memory (and thread pool) holding its blocks' weights, KV cache and activations; an untied
// embedding lives in segment 0, the head (and a tied embedding) in the last, and only the residual
// stream [rows, dModel] is copied at a segment boundary. `this.rt` is the segment the pass is in (planSegments below).
import { UsageError } from "../../core/errors.js";
import type { HookName } from "../../hooks/names.js";
import type { ActivationCache } from "../cache.js";
import { Driver, type LayerCall } from "../driver.js";
import { compileHost, featShapeOf, type CallCtx, type HostOp, type Resolved } from "../plan.js";
import type { ForwardOptions, ForwardResult, GenerateOptions, GenerateResult, Row } from "../types.js";
import type { Activation, ModelConfig, NormSpec } from "../config.js";
import { isLazy, type EngineModel, type QuantReadIo, type QuantType } from "../weights.js";
import { ropeInvFreq } from "../rope.js";
import { scheduleOf, type Buf, type EmbedStep, type HeadStep, type Step } from "../schedule.js";
import { trainableWeights, type JvpRequest, type JvpResult, type LinearName, type LossAndGradRequest, type LossAndGradResult } from "../grad.js";
import { jvpScale, lossAndGrad, type DeltaSite, type GradHost } from "./backprop.js";
import { MAX_Q8_K, QUANT_BLOCK, quantBytes } from "./qkernels.js";
import { adapterKey, erf, loraApply, type LoraRef } from "./derivatives.js";
import { elementwise, type Elementwise } from "./elementwise.js";
import type { AttentionTask, Gemm, QGemm } from "./runtime.js";

/** What the engine needs from the kernel runtime (runtime.ts). */
export interface KernelRuntime {
  readonly threads: number;
  /** The kernels' instruction sets, e.g. "wasm-simd128+relaxed-madd+relaxed-dot" (runtime.ts). */
  readonly simd: string;
  readonly memory: WebAssembly.Memory;
  readonly f32: Float32Array;
  alloc(nFloats: number): number;
  mark(): number;
  release(mark: number): void;
  gemm(g: Gemm): void;
  qgemm(g: QGemm): void;
  dequantRows(type: QuantType, wq: number, ws: number, rows: number, K: number, dst: number): void;
  /** The loader's stage and Wasm repacks in this memory (runtime.ts); without it the loader repacks in JavaScript. */
  quantReadIo?(): QuantReadIo;
  /** prefault: the fresh part's page faults taken by every thread first (runtime.ts). */
  allocBytes(bytes: number, prefault?: boolean): number;
  gemmBatch(list: Gemm[]): void;
  attention(list: AttentionTask[]): void;
  gatedRows(g: number, ldg: number, u: number, ldu: number, out: number, ldo: number, R: number, F: number, act: "silu" | "gelu_tanh"): void;
  rmsnormRows(src: number, dst: number, w: number, R: number, D: number, eps: number, offset: 0 | 1): void;
  dispose(): Promise<void>;
}

interface Norm {
  weight: Float32Array;
  bias?: Float32Array;
  /** The weight in the runtime's memory too (for the Wasm RMSNorm kernel). */
  off: number;
}
/**
 * A weight matrix in Wasm memory, [rows, cols] row-major: f32 at `off`, or (weights "native")
 * quantized rows (qkernels.ts; wq, ws byte offsets) with `off` -1.
 */
interface Mat {
  off: number;
  rows: number;
  cols: number;
  q?: { type: QuantType; wq: number; ws: number };
  /**
   * Stacked matrices of different quantized types, in row order (e.g. a Q4_K_M file's Q4_K q and k
   * with a Q6_K v): each part multiplies into its own columns of Y. `off` is -1, `q` unset.
   */
  parts?: Mat[];
}

/**
 * How the CPU engine stores matrix weights: all f32, or the tensors it can compute on natively
 * (qkernels.ts) kept in their format; "native-int8" also quantizes the activations of Q4_K, Q5_K
 * and Q6_K products per 256 values (llama.cpp's q8_K dot) and of Q8_0 ones at decode sizes per 32
 * with f16 scales (its q8_0): faster, no longer the f32 path's result.
 */
export type CpuWeights = "f32" | "native" | "native-int8";
interface Block {
  ln1?: Norm;
  ln1Post?: Norm;
  ln2?: Norm;
  ln2Post?: Norm;
  qNorm?: Norm;
  kNorm?: Norm;
  /** q, k and v stacked: [(H + 2K)·dHead, D]. */
  qkv: Mat;
  qkvBias?: Float32Array;
  o: Mat;
  oBias?: Float32Array;
  /** Gated MLPs: gate and up stacked [2F, D]; plain MLPs: up [F, D]. Absent in a mixture of experts. */
  up?: Mat;
  upBias?: Float32Array;
  down?: Mat;
  downBias?: Float32Array;
  /** Mixture of experts: the router [nExperts, D] and per expert its gate and up stacked [2F, D] and down [D, F]. */
  moe?: { router: Mat; experts: { up: Mat; down: Mat }[] };
}

/** Elements of one attention-score buffer (rows·heads·queries·keys) held at once. */
const SCORE_BUDGET = 4 << 20;
/** Rows (batch rows × slots) of one prefill chunk in generate(): enough for full-speed matmuls. */
const ROW_BUDGET = 128;

export class CpuEngine {
  readonly config: ModelConfig;
  private blocks: Block[] = [];
  private embed: Mat;
  private posEmbed: Mat | undefined;
  private unembed: Mat;
  private lnFinal: Norm;
  /** RoPE cos/sin per position, [pos, dHead/2], grown on demand; one per theta (local layers). */
  private rope = new Map<boolean, { cos: Float32Array; sin: Float32Array; n: number }>();
  private disposed = false;
  /** One kernel runtime (one Wasm memory) per segment; `cur` is the one the pass is in. */
  private readonly rts: KernelRuntime[];
  private readonly ews: Elementwise[];
  private cur = 0;
  /** Each layer's segment, and the head's (final norm, unembedding). */
  private readonly layerSeg: number[];
  private readonly headSeg: number;
  private readonly embedSeg: number;
  /** mark() results: every segment's stack top. */
  private readonly marks: number[][] = [];
  /** Canonical names of the weights this engine holds (the targets a delta can name). */
  private readonly names = new Set<string>();
  /** When set, every site a call passes is appended here in order (the schedule conformance test). */
  siteTrace: string[] | null = null;

  /** Copies the weights into the runtime's memory one tensor at a time (a lazy EngineModel then never holds them all). */
  private nQuantized = 0;
  /** Quantized products with int8 activations where runtime.qgemm has them (weights "native-int8"). */
  private readonly int8: boolean;
  /** Matrices held quantized (weights "native"); 0 with f32 weights and after materializeF32. */
  get quantizedMats(): number {
    return this.nQuantized;
  }

  /** The runtime of the segment the pass is in. */
  get rt(): KernelRuntime {
    return this.rts[this.cur]!;
  }
  private get ew(): Elementwise {
    return this.ews[this.cur]!;
  }
  /** The kernels' instruction sets (for benchmark records). */
  get simd(): string {
    return this.rts[0]!.simd;
  }
  /** Wasm memories the weights are split across (1 unless they exceed `segmentBytes`). */
  get segments(): number {
    return this.rts.length;
  }

  /**
   * `rt`: one runtime, or one per segment (planSegments(host, weights, opts.segmentBytes).n of
   * them; CpuEngine.create makes them).
   */
  constructor(host: EngineModel, rt: KernelRuntime | readonly KernelRuntime[], weights: CpuWeights = "f32", opts: { segmentBytes?: number } = {}) {
    const c = (this.config = host.config);
    this.int8 = weights === "native-int8";
    const plan = planSegments(host, weights, opts.segmentBytes);
    const rts = Array.isArray(rt) ? [...(rt as readonly KernelRuntime[])] : [rt as KernelRuntime];
    if (rts.length !== plan.n) throw new UsageError(`this model's weights (${(plan.bytes / 2 ** 30).toFixed(2)} GiB) need ${plan.n} Wasm memories of at most ${(plan.budget / 2 ** 30).toFixed(2)} GiB, but ${rts.length} runtime(s) were passed: create the engine with CpuEngine.create`);
    this.rts = rts;
    this.ews = rts.map((r) => elementwise(r.memory, r.memory.buffer instanceof SharedArrayBuffer));
    this.layerSeg = plan.layerSeg;
    this.headSeg = plan.headSeg;
    this.embedSeg = plan.embedSeg;
    const get = (name: string) => {
      const t = host.weights.get(name);
      if (!t) throw new UsageError(`internal: weight ${name} missing after load`);
      return t;
    };
    const opt = (name: string) => (host.weights.has(name) ? get(name).data : undefined);
    for (const t of trainableWeights(host)) this.names.add(t.name);
    // Shapes from the header when the weights are lazy (a get() would read the tensor).
    const lazy = isLazy(host.weights) ? host.weights : null;
    const shapeOf = (name: string) => (lazy ? lazy.shapeOf(name) : host.weights.get(name)?.shape);
    const norm = (p: string): Norm | undefined => {
      const w = opt(`${p}.weight`);
      if (!w) return undefined;
      const off = this.rt.alloc(w.length);
      this.rt.f32.set(w, off);
      const b = opt(`${p}.bias`);
      return b ? { weight: w, bias: b, off } : { weight: w, off };
    };
    /** Stack matrices with the same column count into one [Σrows, cols] matrix. */
    const mat = (...names: string[]): Mat => {
      const cols = shapeOf(names[0]!)![1]!;
      const rowsOf = names.map((n) => shapeOf(n)![0]!);
      const rows = rowsOf.reduce((a, b) => a + b, 0);
      const types = nativeTypes(host, weights, names);
      if (types && lazy?.readQuantInto && new Set(types).size > 1) {
        // Mixed types: one part per matrix, each quantized in its own format or f32 (a type the
        // kernels lack); the stack counts as one quantized matrix.
        const parts = names.map((n) => mat(n));
        this.nQuantized -= parts.filter((m) => m.q).length - 1;
        return { off: -1, rows, cols, parts };
      }
      const type = types?.[0] ?? null;
      if (type && lazy?.readQuantInto) {
        const rt = this.rt;
        const total = quantBytes(type, rows, cols);
        // Page faults first, on every thread: then the read and repack write into present pages.
        const wq = rt.allocBytes(total.wq, true);
        const ws = rt.allocBytes(total.ws, true);
        let r = 0;
        names.forEach((n, i) => {
          const nr = rowsOf[i]!;
          const at = quantBytes(type, r, cols), size = quantBytes(type, nr, cols);
          const u8 = new Uint8Array(rt.memory.buffer);
          lazy.readQuantInto!(n, u8.subarray(wq + at.wq, wq + at.wq + size.wq), u8.subarray(ws + at.ws, ws + at.ws + size.ws), rt.quantReadIo?.());
          r += nr;
        });
        this.nQuantized++;
        return { off: -1, rows, cols, q: { type, wq, ws } };
      }
      const rt = this.rt;
      const off = rt.alloc(rows * cols);
      let r = 0;
      for (const n of names) {
        const nr = rowsOf[names.indexOf(n)]!;
        // A lazy F32 weight goes from the file straight into our memory (no host copy).
        const dst = rt.f32.subarray(off + r * cols, off + (r + nr) * cols);
        if (lazy) lazy.readInto(n, dst);
        else dst.set(get(n).data);
        r += nr;
      }
      return { off, rows, cols };
    };
    const bias = (...names: string[]): Float32Array | undefined => {
      const parts = names.map(opt);
      if (parts.every((p) => p === undefined)) return undefined;
      const rows = names.map((n) => shapeOf(n.replace(/\.bias$/, ".weight"))![0]!);
      const out = new Float32Array(rows.reduce((a, b) => a + b, 0));
      let o = 0;
      parts.forEach((p, i) => {
        if (p) out.set(p, o);
        o += rows[i]!;
      });
      return out;
    };
    for (let i = 0; i < c.nLayers; i++) {
      this.cur = this.layerSeg[i]!;
      const b = `blocks.${i}`;
      const qkvNames = ["q", "k", "v"].map((x) => `${b}.attn.${x}`);
      const upNames = c.mlp.kind === "gated" ? [`${b}.mlp.gate`, `${b}.mlp.up`] : [`${b}.mlp.up`];
      const blk: Block = {
        qkv: mat(...qkvNames.map((n) => `${n}.weight`)),
        o: mat(`${b}.attn.o.weight`),
      };
      if (c.mlp.kind === "moe") {
        const experts = Array.from({ length: c.mlp.nExperts }, (_, e) => ({
          up: mat(`${b}.mlp.experts.${e}.gate.weight`, `${b}.mlp.experts.${e}.up.weight`),
          down: mat(`${b}.mlp.experts.${e}.down.weight`),
        }));
        blk.moe = { router: mat(`${b}.mlp.router.weight`), experts };
      } else {
        blk.up = mat(...upNames.map((n) => `${n}.weight`));
        blk.down = mat(`${b}.mlp.down.weight`);
      }
      const set = <K extends keyof Block>(k: K, v: Block[K] | undefined) => {
        if (v !== undefined) blk[k] = v;
      };
      set("ln1", norm(`${b}.ln1`));
      set("ln1Post", norm(`${b}.ln1Post`));
      set("ln2", norm(`${b}.ln2`));
      set("ln2Post", norm(`${b}.ln2Post`));
      set("qNorm", norm(`${b}.attn.qNorm`));
      set("kNorm", norm(`${b}.attn.kNorm`));
      set("qkvBias", bias(...qkvNames.map((n) => `${n}.bias`)));
      set("oBias", bias(`${b}.attn.o.bias`));
      set("upBias", bias(...upNames.map((n) => `${n}.bias`)));
      set("downBias", bias(`${b}.mlp.down.bias`));
      this.blocks.push(blk);
    }
    this.cur = this.embedSeg;
    this.embed = mat("embed.weight");
    if (host.weights.has("posEmbed.weight")) this.posEmbed = mat("posEmbed.weight");
    this.cur = this.headSeg;
    // A tied embedding is held once (planSegments puts it in the head's memory when the model is split).
    this.unembed = c.tieEmbeddings ? this.embed : mat("unembed.weight");
    this.lnFinal = norm("lnFinal")!;
    this.cur = 0;
  }

  /**
   * An engine on a kernel runtime of its own (`threads` including the calling one; default every
   * core). The runtime is imported here, on demand: it needs node:worker_threads, and this module
   * stays importable in a browser bundle.
   */
  static async create(host: EngineModel, opts: { threads?: number; weights?: CpuWeights; segmentBytes?: number } = {}): Promise<CpuEngine> {
    const { CpuRuntime } = await import("./runtime.js");
    const weights = opts.weights ?? "f32";
    const { n } = planSegments(host, weights, opts.segmentBytes);
    const rts: KernelRuntime[] = [];
    try {
      for (let i = 0; i < n; i++) rts.push(await CpuRuntime.create(opts.threads !== undefined ? { threads: opts.threads } : {}));
      return new CpuEngine(host, rts, weights, opts.segmentBytes !== undefined ? { segmentBytes: opts.segmentBytes } : {});
    } catch (e) {
      await Promise.all(rts.map((r) => r.dispose()));
      throw e;
    }
  }

  /** Frees the memory and stops the worker threads (they never keep the process alive). */
  dispose(): void {
    void this.close();
  }

  /** dispose(), awaiting the workers' exit. */
  async close(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await Promise.all(this.rts.map((r) => r.dispose()));
  }

  featShape(site: string): number[] {
    return featShapeOf(this.config, site);
  }

  // ------------------------------------------------------------ public entry points

  private readonly driver = new Driver<number, KvCache>(this);

  forward(rows: (Row | number[])[], opts: ForwardOptions = {}): Promise<ForwardResult> {
    return this.driver.forward(rows, opts);
  }

  generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    return this.driver.generate(rows, opts);
  }

  /**
   * The mean cross-entropy of `req.targets` and its gradient with respect to `req.params`
   * (grad.ts), against the weights this engine holds (backprop.ts: tape-mode forward, per-step VJPs).
   */
  async lossAndGrad(rows: (Row | number[])[], req: LossAndGradRequest): Promise<LossAndGradResult> {
    this.live();
    this.unsplit("gradients (lossAndGrad)");
    this.materializeF32();
    // Deltas are added to the weights in our memory for this (synchronous) call and the exact
    // previous values put back after it, so no other call ever sees them.
    const restore: (() => void)[] = [];
    const seen = new Set<string>();
    try {
      req.params.forEach((prm, i) => {
        if (prm.kind !== "delta") return;
        const t = this.deltaTarget(prm.name);
        if (!t) throw new UsageError(`params[${i}] (delta): unknown weight "${prm.name}"; this model's trainable weights are ${[...this.names].join(", ")}`);
        if (seen.has(prm.name)) throw new UsageError(`params[${i}] (delta on ${prm.name}): two deltas on one weight; pass one`);
        seen.add(prm.name);
        const n = t.shape.reduce((a, b) => a * b, 1);
        if (prm.value.length !== n) throw new UsageError(`params[${i}] (delta on ${prm.name}): value has length ${prm.value.length}, expected ${n} ([${t.shape.join(", ")}])`);
        if (!prm.value.every(Number.isFinite)) throw new UsageError(`params[${i}] (delta on ${prm.name}): value contains NaN or Inf`);
        restore.push(t.apply(prm.value));
      });
      return Promise.resolve(lossAndGrad(this.gradHost(), rows, req));
    } finally {
      for (const r of restore.reverse()) r();
    }
  }

  /**
   * Where canonical weight `name` lives in this engine: its shape, its site for the backward, and
   * how to add a delta to it (returning the undo). Stacked matrices (q/k/v, gate/up) take the
   * delta on their rows; norm weights are swapped for a new array (the host copy may be the
   * model's own) and written to our memory too (the RMSNorm kernel reads that copy).
   */
  private deltaTarget(name: string): { shape: number[]; site: DeltaSite; apply(v: Float32Array): () => void } | undefined {
    if (!this.names.has(name)) return undefined;
    this.requireF32(`a weight delta on ${name}`);
    const c = this.config;
    const { nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
    const gated = c.mlp.kind === "gated";
    const addMat = (off: number, v: Float32Array): (() => void) => {
      const saved = this.rt.f32.slice(off, off + v.length);
      const f = this.rt.f32;
      for (let i = 0; i < v.length; i++) f[off + i] = f[off + i]! + v[i]!;
      return () => this.rt.f32.set(saved, off);
    };
    const addHost = (arr: Float32Array, o: number, v: Float32Array): (() => void) => {
      const saved = arr.slice(o, o + v.length);
      for (let i = 0; i < v.length; i++) arr[o + i] = arr[o + i]! + v[i]!;
      return () => arr.set(saved, o);
    };
    const swapNorm = (n: Norm, part: "weight" | "bias", v: Float32Array): (() => void) => {
      const old = n[part]!;
      const neu = Float32Array.from(old, (x, i) => x + v[i]!);
      n[part] = neu;
      if (part === "weight") this.rt.f32.set(neu, n.off);
      return () => {
        n[part] = old;
        if (part === "weight") this.rt.f32.set(old, n.off);
      };
    };
    const whole = (m: Mat, site: DeltaSite) => ({ shape: [m.rows, m.cols], site, apply: (v: Float32Array) => addMat(m.off, v) });
    if (name === "embed.weight") return whole(this.embed, { kind: "embed" });
    if (name === "posEmbed.weight") return whole(this.posEmbed!, { kind: "posEmbed" });
    if (name === "unembed.weight") return whole(this.unembed, { kind: "unembed" });
    const normOf = (n: Norm, layer: number | null, norm: Extract<DeltaSite, { kind: "norm" }>["norm"], part: "weight" | "bias") => ({
      shape: [n[part]!.length],
      site: { kind: "norm" as const, layer, norm, part, n: n[part]!.length },
      apply: (v: Float32Array) => swapNorm(n, part, v),
    });
    const fin = /^lnFinal\.(weight|bias)$/.exec(name);
    if (fin) return normOf(this.lnFinal, null, "lnFinal", fin[1] as "weight" | "bias");
    const m = /^blocks\.(\d+)\.(.+)\.(weight|bias)$/.exec(name);
    if (!m) return undefined;
    const l = Number(m[1]);
    const blk = this.blocks[l]!;
    const what = m[2]!, part = m[3] as "weight" | "bias";
    const norms: Record<string, "ln1" | "ln1Post" | "ln2" | "ln2Post" | "qNorm" | "kNorm"> = { ln1: "ln1", ln1Post: "ln1Post", ln2: "ln2", ln2Post: "ln2Post", "attn.qNorm": "qNorm", "attn.kNorm": "kNorm" };
    const nk = norms[what];
    if (nk) return normOf(blk[nk]!, l, nk, part);
    // [mat, first row, rows] of each linear in the stacked matrices.
    const rowsOf: Record<string, ["qkv" | "o" | "up" | "down", number, number]> = {
      "attn.q": ["qkv", 0, H * hd],
      "attn.k": ["qkv", H * hd, K * hd],
      "attn.v": ["qkv", (H + K) * hd, K * hd],
      "attn.o": ["o", 0, c.dModel],
      "mlp.gate": ["up", 0, F],
      "mlp.up": ["up", gated ? F : 0, F],
      "mlp.down": ["down", 0, c.dModel],
    };
    const r = rowsOf[what];
    if (!r) return undefined;
    const [mat, row0, rows] = r;
    const M = blk[mat];
    if (!M) return undefined;
    if (part === "weight") return { shape: [rows, M.cols], site: { kind: "linear", layer: l, mat, row0, rows, cols: M.cols }, apply: (v) => addMat(M.off + row0 * M.cols, v) };
    const bias = blk[`${mat}Bias` as const]!;
    return { shape: [rows], site: { kind: "bias", layer: l, mat, row0, rows }, apply: (v) => addHost(bias, row0, v) };
  }

  /** Reads and their derivative with respect to the scale of `req.plan[req.wrt]` (grad.ts; forward mode). */
  async jvpScale(rows: (Row | number[])[], req: JvpRequest): Promise<JvpResult> {
    this.live();
    this.unsplit("forward-mode derivatives (jvpScale)");
    this.materializeF32();
    return Promise.resolve(jvpScale(this.gradHost(), rows, req));
  }

  /** Derivatives run over one memory (backprop.ts's tape lives there). */
  private unsplit(what: string): void {
    if (this.rts.length > 1) throw new UsageError(`${what}: this model is split across ${this.rts.length} Wasm memories (its weights exceed one), and derivatives run on one memory only so far; use a smaller model or its quantized GGUF (weights kept in their format), or the webgpu device`);
  }

  /** What backprop.ts needs: the weights in place, the tape-mode forward and the head. */
  private gradHost(): GradHost {
    this.requireF32("a gradient or forward-mode derivative");
    const norms = (b: Block) => {
      const out: ReturnType<GradHost["block"]>["norms"] = {};
      for (const k of ["ln1", "ln1Post", "ln2", "ln2Post", "qNorm", "kNorm"] as const) {
        const n = b[k];
        if (n) out[k] = n.bias ? { weight: n.weight, bias: n.bias } : { weight: n.weight };
      }
      return out;
    };
    return {
      config: this.config,
      rt: this.rt,
      block: (l) => {
        const b = this.blocks[l]!;
        // A mixture of experts has no dense up/down (its steps never read them).
        return { qkv: b.qkv, o: b.o, up: b.up ?? b.o, down: b.down ?? b.o, norms: norms(b), ...(b.moe ? { moe: b.moe } : {}) };
      },
      lnFinal: this.lnFinal.bias ? { weight: this.lnFinal.weight, bias: this.lnFinal.bias } : { weight: this.lnFinal.weight },
      unembed: this.unembed,
      openKv: (B, cap) => this.openKv(B, cap),
      run: (ctx, pad, promptLen, resolved, kv, cache, tape, span) => this.runLayers(ctx, pad, promptLen, resolved, kv as KvCache, 0, cache, tape, span),
      head: (x, ctx, promptLen, resolved, cache, tape, logitRows) => {
        this.headRows(x, Array.from({ length: ctx.B * ctx.T }, (_, r) => r), ctx, promptLen, resolved, cache, true, tape, logitRows);
      },
      rope: (pos, local) => this.ropeFor(pos, local),
      deltaSite: (name) => this.deltaTarget(name)!.site,
    };
  }

  // ------------------------------------------------------------ the Backend the driver runs

  live(): void {
    if (this.disposed) throw new UsageError("this model was disposed");
  }

  /** Slots per prefill chunk: activations are B·chunk rows and the score buffer B·heads·chunk·keys (keys: the T prompt slots). */
  prefillChunk(B: number, keys: number): number {
    return Math.max(1, Math.min(Math.floor(ROW_BUDGET / B), Math.floor(SCORE_BUDGET / (B * this.config.nHeads * keys))));
  }

  /** KV cache for B rows of `cap` slots, per layer: K as [B, nKv, cap, dHead], V transposed [B, nKv, dHead, cap]. */
  openKv(B: number, cap: number): KvCache {
    const c = this.config;
    const n = B * c.nKvHeads * cap * c.dHead;
    const layers = Array.from({ length: c.nLayers }, (_, l) => {
      const rt = this.rts[this.layerSeg[l]!]!;
      return { k: rt.alloc(n), v: rt.alloc(n) };
    });
    return { cap, layers };
  }

  /** The cache lives on the call's stack: released with it. */
  closeKv(): void {}

  mark(): number {
    this.marks.push(this.rts.map((r) => r.mark()));
    return this.marks.length - 1;
  }

  release(mark: number): void {
    const m = this.marks[mark];
    if (!m) throw new Error(`internal: release(${mark}) of a mark that is not live`);
    this.rts.forEach((r, i) => r.release(m[i]!));
    this.marks.length = mark;
  }

  layers(call: LayerCall, kv: KvCache | null, slot0: number): number {
    return this.runLayers(call.ctx, call.pad, call.promptLen, call.resolved, kv!, slot0, call.cache);
  }

  head(x: number, which: "all" | "last", call: LayerCall, headCtx: CallCtx, view: boolean): Float32Array {
    const { B, T } = call.ctx;
    const sel = which === "all" ? Array.from({ length: B * T }, (_, r) => r) : Array.from({ length: B }, (_, b) => b * T + T - 1);
    return this.headRows(x, sel, headCtx, call.promptLen, call.resolved, call.cache, view);
  }

  drop(): void {}

  // ------------------------------------------------------------ the forward pass

  /**
   * Embedding and every block for one call whose T slots per row start at cache slot `slot0`:
   * the schedule's steps (schedule.ts) in order, each implemented below over named buffers.
   * Writes the call's k/v into `kv`. Returns the offset of the residual stream [B·T, D].
   *
   * Buffers are allocated once per call and reused by every block. With a `tape` (gradients),
   * every step writes fresh buffers instead, and the tape keeps each step's buffers before and
   * after it, so a backward pass can walk the same steps in reverse over saved activations.
   */
  private runLayers(ctx: CallCtx, pad: number[], promptLen: number[], resolved: Resolved[], kv: KvCache, slot0: number, cache: ActivationCache | null, tape?: Tape, span?: LayerSpan): number {
    const c = this.config;
    const { B, T } = ctx;
    const R = B * T;
    const S = slot0 + T; // keys visible to this call: every slot up to its last query
    const sched = scheduleOf(c);
    const size = this.bufSizes(R);
    const pairs = Math.max(1, Math.min(B * c.nHeads, Math.floor(SCORE_BUDGET / (T * S))));
    // The call's buffers, score scratch and RoPE rows, in each segment it enters.
    const perSeg = new Map<number, { base: CpuBufs; sc: number; rope: Map<string, { cos: number; sin: number }> }>();
    const enter = (seg: number) => {
      this.cur = seg;
      let st = perSeg.get(seg);
      if (!st) {
        const b = {} as CpuBufs;
        // With a tape every step allocates its own outputs: no shared buffers.
        for (const k of Object.keys(size) as CpuBuf[]) b[k] = k === "result" || k === "eo" || k === "logits" || tape ? -1 : this.rt.alloc(size[k]);
        st = { base: b, sc: this.rt.alloc(pairs * T * S), rope: this.ropeRows(ctx) };
        perSeg.set(seg, st);
      }
      return st;
    };
    // The embedding runs in its own memory; layer 0's boundary copy (below) moves its rows on.
    const first = span?.x !== undefined ? this.layerSeg[span.from ?? 0]! : this.embedSeg;
    let seg = enter(first);
    const call: Call = {
      ctx,
      pad,
      slot0,
      S,
      kv,
      sc: seg.sc,
      pairs,
      pattern: resolved.some((r) => r.site === "attn.hook_pattern") ? new Float32Array(B * c.nHeads * T * S) : null,
      rope: seg.rope,
      cache,
      promptLen,
      tape: tape ?? null,
      adapters: span?.adapters ?? null,
      ...(this.siteTrace ? { fired: this.siteTrace } : {}),
    };
    let x: number;
    if (span?.x !== undefined) x = span.x;
    else {
      const e = compileHost(resolved, ctx, promptLen, null);
      const ebufs = { ...seg.base };
      for (const st of sched.embed) this.embedStep(st, ebufs, call, e);
      x = ebufs.x;
    }
    const to = span?.to ?? c.nLayers;
    for (let l = span?.from ?? 0; l < to; l++) {
      if (this.layerSeg[l] !== this.cur) {
        // A segment boundary: the residual stream is all that crosses.
        const from = this.rt;
        seg = enter(this.layerSeg[l]!);
        call.sc = seg.sc;
        call.rope = seg.rope;
        x = this.crossTo(from, x, R * c.dModel, seg.base.x);
      }
      const g = compileHost(resolved, ctx, promptLen, l);
      // Each block starts from the call's buffers (a copy step may have aliased one) and the residual so far.
      const bufs: CpuBufs = { ...seg.base, x };
      for (const st of sched.block) this.step(st, l, bufs, call, g);
      x = bufs.x;
    }
    if (to === c.nLayers && this.cur !== this.headSeg) {
      const from = this.rt;
      this.cur = this.headSeg;
      x = this.crossTo(from, x, R * c.dModel, -1);
    }
    return x;
  }

  /** Copies n floats at x in runtime `from` into the current segment (into `dst`, or a new buffer if -1). */
  private crossTo(from: KernelRuntime, x: number, n: number, dst: number): number {
    const o = dst >= 0 ? dst : this.rt.alloc(n);
    this.rt.f32.set(from.f32.subarray(x, x + n), o);
    return o;
  }

  /** Floats of each named buffer for R rows. */
  private bufSizes(R: number): Record<CpuBuf, number> {
    const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F, mlp } = this.config;
    const moe = mlp.kind === "moe";
    const E = moe ? mlp.nExperts : 0;
    // A mixture of experts keeps no dense hidden state (its experts' live on the step's own stack).
    const Fd = moe ? 0 : F;
    return { logits: 0, x: R * D, h: R * D, q: R * H * hd, k: R * K * hd, v: R * K * hd, z: R * H * hd, a: R * D, pre: R * Fd, post: R * Fd, d: R * D, qkv: R * (H + 2 * K) * hd, up: R * (mlp.kind === "gated" ? 2 * F : Fd), result: R * H * D, rl: R * E, ew: R * E, eo: R * E * D };
  }

  /**
   * The buffer a step writes `name` into: the current one, or with a tape a fresh one (the
   * tape's earlier entries keep the old). `keep` copies the current contents (in-place ops).
   */
  private out(bufs: CpuBufs, name: CpuBuf, call: Call, keep = false): number {
    if (!call.tape && bufs[name] >= 0) return bufs[name];
    const R = call.ctx.B * call.ctx.T;
    const n = this.bufSizes(R)[name];
    const o = this.rt.alloc(n);
    if (keep && bufs[name] >= 0) this.rt.f32.copyWithin(o, bufs[name], bufs[name] + n);
    return (bufs[name] = o);
  }

  private record(call: Call, layer: number | null, step: TapeStep, before: CpuBufs, after: CpuBufs): void {
    call.tape?.entries.push({ layer, step, before, after: { ...after } });
  }

  /** The embedding stage's steps (schedule.embed). */
  private embedStep(st: EmbedStep, bufs: CpuBufs, call: Call, g: Compiled): void {
    const c = this.config;
    const { ctx } = call;
    const R = ctx.B * ctx.T;
    const D = c.dModel;
    const before = call.tape ? { ...bufs } : bufs;
    const fx = this.rt.f32;
    switch (st.kind) {
      case "embed": {
        const x = this.out(bufs, "x", call);
        for (let r = 0; r < R; r++) {
          const p = ctx.pos[r]!;
          if (p < 0) continue;
          const id = ctx.ids[r]!;
          if (!(id >= 0 && id < c.dVocab)) throw new UsageError(`token id ${id} is outside the vocabulary (0..${c.dVocab - 1})`);
          const eq = this.embed.q;
          if (eq) {
            // One row of a quantized embedding (tied or not), dequantized in place.
            const at = quantBytes(eq.type, id, D);
            this.rt.dequantRows(eq.type, eq.wq + at.wq, eq.ws + at.ws, 1, D, x + r * D);
            const f = this.rt.f32;
            if (c.embedScale !== 1) for (let i = 0; i < D; i++) f[x + r * D + i] = f[x + r * D + i]! * c.embedScale;
            continue;
          }
          const src = this.embed.off + id * D;
          if (c.embedScale === 1) fx.copyWithin(x + r * D, src, src + D);
          else for (let i = 0; i < D; i++) fx[x + r * D + i] = fx[src + i]! * c.embedScale;
        }
        break;
      }
      case "posEmbed": {
        const a = this.out(bufs, "a", call);
        for (let r = 0; r < R; r++) {
          const p = ctx.pos[r]!;
          if (p < 0) continue;
          if (p >= c.nCtx) throw new UsageError(`position ${p} exceeds the model's context of ${c.nCtx}`);
          fx.copyWithin(a + r * D, this.posEmbed!.off + p * D, this.posEmbed!.off + (p + 1) * D);
        }
        break;
      }
      case "site":
        this.siteStep(st.site, null, st.buf, [D], bufs, call, g);
        return;
      case "residual": {
        const x = this.out(bufs, "x", call, true);
        this.ew.add(x, bufs[st.src], R * D);
        break;
      }
    }
    this.record(call, null, st, before, bufs);
  }

  /** Apply a site's ops to a buffer (a fresh copy with a tape) and record its read. */
  private siteStep(site: string, layer: number | null, buf: CpuBuf, feat: number[], bufs: CpuBufs, call: Call, g: Compiled): void {
    const touched = g.host.has(site);
    const before = call.tape ? { ...bufs } : bufs;
    const prev = bufs[buf];
    // A buffer aliasing the residual (a copy step's) is copied before ops write it.
    if (touched && buf !== "x" && prev === bufs.x) bufs[buf] = -1;
    const off = touched ? this.out(bufs, buf, call, true) : bufs[buf];
    if (touched && prev !== off && prev === bufs.x) this.rt.f32.copyWithin(off, prev, prev + this.bufSizes(call.ctx.B * call.ctx.T)[buf]);
    this.site(site, layer, off, feat, g.host, g.reads, call.ctx, call.cache);
    call.fired?.push(layer === null ? site : `blocks.${layer}.${site}`);
    if (touched) this.record(call, layer, { kind: "site", site, buf } as TapeStep, before, bufs);
  }

  /** One step of block `l` (schedule.ts says what each kind computes). */
  private step(st: Step, l: number, bufs: CpuBufs, call: Call, g: Compiled): void {
    const c = this.config;
    const rt = this.rt;
    const { ctx } = call;
    const { B, T } = ctx;
    const R = B * T;
    const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F } = c;
    const p = this.blocks[l]!;
    const touched = (site: string) => g.host.has(site) || g.reads.includes(site);
    // Only a tape keeps the buffers before each step (they are never overwritten then).
    const before = call.tape ? { ...bufs } : bufs;
    switch (st.kind) {
      case "site":
        this.siteStep(st.site, l, st.buf, featShapeOf(c, st.site), bufs, call, g);
        return;
      case "norm": {
        const src = bufs[st.src];
        this.norm(src, this.out(bufs, st.dst, call), R, D, p[st.weight]!);
        break;
      }
      case "copy":
        // Without a pre-norm the input is x itself: an alias (a site with ops on it copies first, see siteStep).
        bufs[st.dst] = bufs[st.src];
        break;
      case "qkv": {
        const qkvW = (H + 2 * K) * hd;
        const qkv = this.out(bufs, "qkv", call);
        this.linear(bufs.h, D, R, p.qkv, p.qkvBias, qkv);
        this.adapt(call, l, "attn.q", bufs.h, D, R, qkv, qkvW);
        this.adapt(call, l, "attn.k", bufs.h, D, R, qkv + H * hd, qkvW);
        this.adapt(call, l, "attn.v", bufs.h, D, R, qkv + (H + K) * hd, qkvW);
        // q, k and v out of the fused product into their own rows (hooks see [R, heads, dHead]).
        const fx = rt.f32;
        copyCols(fx, qkv, qkvW, 0, this.out(bufs, "q", call), H * hd, R);
        copyCols(fx, qkv, qkvW, H * hd, this.out(bufs, "k", call), K * hd, R);
        copyCols(fx, qkv, qkvW, (H + K) * hd, this.out(bufs, "v", call), K * hd, R);
        break;
      }
      case "qkNorm": {
        const full = c.qkNorm.kind === "full";
        const q0 = bufs.q, k0 = bufs.k;
        this.norm(q0, this.out(bufs, "q", call), full ? R : R * H, full ? H * hd : hd, p.qNorm!);
        this.norm(k0, this.out(bufs, "k", call), full ? R : R * K, full ? K * hd : hd, p.kNorm!);
        break;
      }
      case "rope": {
        const rot = call.rope.get(c.layerTypes[l]!)!;
        const q = this.out(bufs, "q", call, true), k = this.out(bufs, "k", call, true);
        this.ew.rope(q, rot.cos, rot.sin, R, H, hd);
        this.ew.rope(k, rot.cos, rot.sin, R, K, hd);
        break;
      }
      case "attend": {
        const L = call.kv.layers[l]!;
        this.writeCache(bufs.k, bufs.v, L, call.kv.cap, B, T, call.slot0);
        this.attention(bufs.q, L, call.kv.cap, this.out(bufs, "z", call), call.sc, call.pairs, ctx, call.pad, call.slot0, c.layerTypes[l] === "sliding", call.pattern);
        if (call.pattern && g.reads.includes(st.pattern) && call.cache) this.readPattern(call.pattern, l, ctx, call.S, call.cache);
        call.fired?.push(`blocks.${l}.${st.pattern}`);
        break;
      }
      case "oProj": {
        if (!touched(st.result)) {
          const a = this.out(bufs, "a", call);
          this.linear(bufs.z, H * hd, R, p.o, p.oBias, a);
          this.adapt(call, l, "attn.o", bufs.z, H * hd, R, a, D);
          call.fired?.push(`blocks.${l}.${st.result}`);
          break;
        }
        // Per-head outputs result[r, h] = z[r, h]·W_O[:, h]ᵀ ([R, H, D]), the site, then their sum (+ bias).
        const res = this.out(bufs, "result", call);
        const list = this.gemmList("heads", H);
        const wo = this.f32Mat(p.o);
        for (let hh = 0; hh < H; hh++) setGemm(list[hh]!, bufs.z + hh * hd, H * hd, wo.off + hh * hd, H * hd, res + hh * D, H * D, R, D, hd);
        rt.gemmBatch(list);
        // An adapter on o adds its per-head share scale·(z_h·A[:, h]ᵀ)·Bᵀ to each head's result.
        const ad = call.adapters?.get(adapterKey(l, "attn.o"));
        if (ad) for (let hh = 0; hh < H; hh++) this.loraTerm({ ...ad, a: ad.a + hh * hd, lda: H * hd, in: hd }, bufs.z + hh * hd, H * hd, R, res + hh * D, H * D);
        this.record(call, l, { kind: "heads" }, before, bufs);
        this.siteStep(st.result, l, "result", [H, D], bufs, call, g);
        const before2 = call.tape ? { ...bufs } : bufs;
        const a = this.out(bufs, "a", call);
        const fx = rt.f32;
        const rs = bufs.result;
        for (let r = 0; r < R; r++)
          for (let i = 0; i < D; i++) {
            let sum = p.oBias ? p.oBias[i]! : 0;
            for (let hh = 0; hh < H; hh++) sum += fx[rs + (r * H + hh) * D + i]!;
            fx[a + r * D + i] = sum;
          }
        this.record(call, l, { kind: "sumHeads" }, before2, bufs);
        return;
      }
      case "route":
        this.matmul(bufs.h, D, R, p.moe!.router, this.out(bufs, "rl", call), p.moe!.router.rows);
        break;
      case "select":
        this.selectExperts(bufs.rl, this.out(bufs, "ew", call), R);
        break;
      case "experts": {
        const E = p.moe!.experts.length;
        const per = touched(st.out);
        // Per-expert outputs [R, E, D] when the plan touches them (their sum is d), else straight into d.
        const dst = per ? this.out(bufs, "eo", call) : this.out(bufs, "d", call);
        rt.f32.fill(0, dst, dst + (per ? R * E * D : R * D));
        this.runExperts(p.moe!.experts, bufs.h, bufs.ew, R, dst, per);
        if (!per) {
          call.fired?.push(`blocks.${l}.${st.out}`);
          break;
        }
        this.record(call, l, { kind: "expertOut" }, before, bufs);
        this.siteStep(st.out, l, "eo", [E, D], bufs, call, g);
        const before2 = call.tape ? { ...bufs } : bufs;
        const d = this.out(bufs, "d", call);
        const fx = rt.f32, eo = bufs.eo;
        for (let r = 0; r < R; r++)
          for (let i = 0; i < D; i++) {
            // In f32 and expert order, as runExperts accumulates d when the site is untouched.
            let sum = 0;
            for (let e = 0; e < E; e++) sum = Math.fround(sum + fx[eo + (r * E + e) * D + i]!);
            fx[d + r * D + i] = sum;
          }
        this.record(call, l, { kind: "sumExperts" }, before2, bufs);
        return;
      }
      case "mlpIn": {
        const up = this.out(bufs, "up", call);
        this.linear(bufs.h, D, R, p.up!, p.upBias, up);
        const upW = c.mlp.kind === "gated" ? 2 * F : F;
        if (c.mlp.kind === "gated") this.adapt(call, l, "mlp.gate", bufs.h, D, R, up, upW);
        this.adapt(call, l, "mlp.up", bufs.h, D, R, c.mlp.kind === "gated" ? up + F : up, upW);
        // Gated: the gate is copied out of the fused [gate | up] product only when mlp.hook_pre
        // is touched (or for erf GELU, which has no fused kernel); mlpAct then reads it in place.
        if (c.mlp.kind === "plain") bufs.pre = up; // [R, F] already
        else if (touched("mlp.hook_pre") || c.mlp.act === "gelu" || call.tape) copyCols(rt.f32, up, 2 * F, 0, this.out(bufs, "pre", call), F, R);
        else bufs.pre = -1;
        break;
      }
      case "mlpAct": {
        // Plain MLPs activate in place (a fresh buffer with a tape).
        if (c.mlp.kind === "plain" && !call.tape) bufs.post = bufs.pre;
        const post = this.out(bufs, "post", call);
        const up = bufs.up;
        if (c.mlp.kind === "gated") {
          if (c.mlp.act === "gelu") {
            rt.f32.copyWithin(post, bufs.pre, bufs.pre + R * F);
            gatedAct(rt.f32, post, up, R, F, c.mlp.act);
          } else if (bufs.pre >= 0) rt.gatedRows(bufs.pre, F, up + F, 2 * F, post, F, R, F, c.mlp.act);
          else rt.gatedRows(up, 2 * F, up + F, 2 * F, post, F, R, F, c.mlp.act);
        } else {
          if (post !== bufs.pre) rt.f32.copyWithin(post, bufs.pre, bufs.pre + R * F);
          if (c.mlp.act === "gelu_tanh") this.ew.geluTanh(post, R * F);
          else actInPlace(rt.f32, post, R * F, c.mlp.act);
        }
        break;
      }
      case "down": {
        const d = this.out(bufs, "d", call);
        this.linear(bufs.post, F, R, p.down!, p.downBias, d);
        this.adapt(call, l, "mlp.down", bufs.post, F, R, d, D);
        break;
      }
      case "residual": {
        const x = this.out(bufs, "x", call, true);
        this.ew.add(x, bufs[st.src], R * D);
        break;
      }
    }
    this.record(call, l, st, before, bufs);
  }

  /**
   * Routing weights ew [R, E] from router logits rl [R, E] (schedule.ts "select"): softmax in
   * float64, the topK largest (ties: lower index) kept, renormalised when the model says so.
   */
  private selectExperts(rl: number, ew: number, R: number): void {
    const m = this.config.mlp;
    if (m.kind !== "moe") throw new Error("internal: select on a dense MLP");
    const { nExperts: E, topK, normTopK } = m;
    const f = this.rt.f32;
    const p = new Float64Array(E);
    const order = Array.from({ length: E }, (_, e) => e);
    for (let r = 0; r < R; r++) {
      let mx = -Infinity;
      for (let e = 0; e < E; e++) mx = Math.max(mx, f[rl + r * E + e]!);
      let z = 0;
      for (let e = 0; e < E; e++) z += p[e] = Math.exp(f[rl + r * E + e]! - mx);
      order.sort((a, b) => p[b]! - p[a]! || a - b);
      let kept = 0;
      for (let k = 0; k < topK; k++) kept += p[order[k]!]!;
      const div = normTopK ? kept : z;
      f.fill(0, ew + r * E, ew + (r + 1) * E);
      for (let k = 0; k < topK; k++) f[ew + r * E + order[k]!] = p[order[k]!]! / div;
    }
  }

  /**
   * Σ_e ew_e · expert_e(h) for R rows: each expert runs once on the rows that route to it (weight
   * not 0), gathered into a block, through the same matmuls as a dense MLP (f32 or quantized).
   * `per`: write the weighted output of expert e for row r at dst + (r·E + e)·D, else add into dst + r·D.
   */
  private runExperts(experts: { up: Mat; down: Mat }[], h: number, ew: number, R: number, dst: number, per: boolean): void {
    const c = this.config;
    const { dModel: D, dMlp: F } = c;
    const act = c.mlp.act;
    const E = experts.length;
    const rt = this.rt;
    for (let e = 0; e < E; e++) {
      const rows: number[] = [];
      for (let r = 0; r < R; r++) if (rt.f32[ew + r * E + e] !== 0) rows.push(r);
      const n = rows.length;
      if (n === 0) continue;
      const mk = rt.mark();
      const x = rt.alloc(n * D), up = rt.alloc(n * 2 * F), post = rt.alloc(n * F), y = rt.alloc(n * D);
      const f = rt.f32;
      rows.forEach((r, i) => f.copyWithin(x + i * D, h + r * D, h + (r + 1) * D));
      this.matmul(x, D, n, experts[e]!.up, up, 2 * F);
      if (act === "gelu") {
        copyCols(f, up, 2 * F, 0, post, F, n);
        gatedAct(f, post, up, n, F, act);
      } else rt.gatedRows(up, 2 * F, up + F, 2 * F, post, F, n, F, act);
      this.matmul(post, F, n, experts[e]!.down, y, D);
      rows.forEach((r, i) => {
        const w = f[ew + r * E + e]!;
        const o = per ? dst + (r * E + e) * D : dst + r * D;
        // w·y rounded to f32 first, so a sum of the per-expert outputs (the site) is the same bits.
        for (let j = 0; j < D; j++) f[o + j] = f[o + j]! + Math.fround(w * f[y + i * D + j]!);
      });
      rt.release(mk);
    }
  }

  /** Adds the call's adapter on `linear` of layer l, if any, to y (rows ldy apart): y += scale·(x·Aᵀ)·Bᵀ. */
  private adapt(call: Call, l: number, linear: LinearName, x: number, ldx: number, R: number, y: number, ldy: number): void {
    const ad = call.adapters?.get(adapterKey(l, linear));
    if (ad) this.loraTerm(ad, x, ldx, R, y, ldy);
  }

  private loraTerm(ad: LoraRef, x: number, ldx: number, R: number, y: number, ldy: number): void {
    const m = this.rt.mark();
    loraApply(this.rt, ad, x, ldx, R, this.rt.alloc(R * ad.rank), this.rt.alloc(R * ad.rank), y, ldy);
    this.rt.release(m);
  }

  /** RoPE cos/sin rows for the call's positions, per layer type, in our memory for the RoPE kernel. */
  private ropeRows(ctx: CallCtx): Map<string, { cos: number; sin: number }> {
    const c = this.config;
    const out = new Map<string, { cos: number; sin: number }>();
    if (c.pos.kind !== "rope") return out;
    for (const ty of new Set(c.layerTypes)) {
      const t = this.ropeFor(ctx.pos, ty === "sliding");
      const cos = this.rt.alloc(t.cos.length), sin = this.rt.alloc(t.sin.length);
      this.rt.f32.set(t.cos, cos);
      this.rt.f32.set(t.sin, sin);
      out.set(ty, { cos, sin });
    }
    return out;
  }

  /** Normalise R rows of width D (RMSNorm in Wasm; LayerNorm, GPT-2 only, on the host). */
  private norm(src: number, dst: number, R: number, D: number, p: Norm): void {
    const spec = this.config.norm;
    if (spec.kind === "rms") this.rt.rmsnormRows(src, dst, p.off, R, D, spec.eps, spec.weightOffset);
    else normRows(this.rt.f32, src, dst, R, D, p, spec);
  }

  /** Write this call's k [R, nKv, dHead] and v into cache slots slot0.. (V transposed). */
  private writeCache(kb: number, vb: number, L: { k: number; v: number }, cap: number, B: number, T: number, slot0: number): void {
    const { nKvHeads: K, dHead: hd } = this.config;
    const f = this.rt.f32;
    for (let b = 0; b < B; b++)
      for (let t = 0; t < T; t++) {
        const s = slot0 + t;
        const r = b * T + t;
        for (let kh = 0; kh < K; kh++) {
          const src = kb + (r * K + kh) * hd;
          f.copyWithin(L.k + ((b * K + kh) * cap + s) * hd, src, src + hd);
          this.ew.scatter(vb + (r * K + kh) * hd, L.v + (b * K + kh) * hd * cap + s, hd, cap);
        }
      }
  }

  /** Y[R, N] = X[R, K]·Wᵀ (+ bias). */
  private linear(x: number, ldx: number, R: number, w: Mat, bias: Float32Array | undefined, y: number): void {
    this.matmul(x, ldx, R, w, y, w.rows);
    if (bias) {
      const fx = this.rt.f32;
      const N = w.rows;
      for (let r = 0; r < R; r++) for (let n = 0; n < N; n++) fx[y + r * N + n] = fx[y + r * N + n]! + bias[n]!;
    }
  }

  /** Y[R, rows] (rows ldy apart) = X·Wᵀ on f32 or quantized weights. */
  private matmul(x: number, ldx: number, R: number, w: Mat, y: number, ldy: number): void {
    if (w.parts) {
      let r = 0;
      for (const p of w.parts) {
        this.matmul(x, ldx, R, p, y + r, ldy);
        r += p.rows;
      }
      return;
    }
    if (w.q) this.rt.qgemm({ type: w.q.type, x, ldx, wq: w.q.wq, ws: w.q.ws, y, ldy, M: R, N: w.rows, K: w.cols, ...(this.int8 ? { int8: true } : {}) });
    else this.rt.gemm({ x, ldx, w: w.off, ldw: w.cols, y, ldy, M: R, N: w.rows, K: w.cols });
  }

  /**
   * An f32 copy of a quantized matrix, allocated on the current stack (per-head outputs need
   * column slices); f32 matrices as they are. The values are ggml's dequantization, bit for bit.
   */
  private f32Mat(w: Mat): Mat {
    if (!w.q && !w.parts) return w;
    const off = this.rt.alloc(w.rows * w.cols);
    let r = 0;
    for (const p of w.parts ?? [w]) {
      const at = off + r * w.cols;
      if (p.q) this.rt.dequantRows(p.q.type, p.q.wq, p.q.ws, p.rows, p.cols, at);
      else this.rt.f32.copyWithin(at, p.off, p.off + p.rows * p.cols);
      r += p.rows;
    }
    return { off, rows: w.rows, cols: w.cols };
  }

  /** Gradients and weight deltas need f32 weights in place (materializeF32 runs first). */
  private requireF32(what: string): void {
    if (this.quantizedMats > 0) throw new Error(`internal: ${what} on quantized weights (materializeF32 was not called)`);
  }

  /**
   * Gradients, forward-mode derivatives and weight deltas work on f32 weights in place: on their
   * first use, every quantized matrix gets an f32 copy (its exact dequantized values) that replaces it
   * for good. Memory grows by the f32 size (the quantized bytes stay: the allocator is a stack);
   * results are those of an f32 load. Must run before a call takes its stack mark.
   */
  private materializeF32(): void {
    if (this.quantizedMats === 0) return;
    const seen = new Set<Mat>();
    const mats = this.blocks.flatMap((b) => [b.qkv, b.o, b.up, b.down, b.moe?.router, ...(b.moe?.experts.flatMap((x) => [x.up, x.down]) ?? [])]);
    for (const m of [...mats, this.embed, this.unembed]) {
      if (!(m?.q || m?.parts) || seen.has(m)) continue;
      seen.add(m);
      m.off = this.f32Mat(m).off;
      delete m.q;
      delete m.parts;
    }
    this.nQuantized = 0;
  }

  /** Grouped-query attention for every (row, head) pair, in groups that fit the score buffer. */
  private attention(q: number, L: { k: number; v: number }, cap: number, z: number, sc: number, pairs: number, ctx: CallCtx, pad: number[], slot0: number, sliding: boolean, pattern: Float32Array | null): void {
    const c = this.config;
    const { B, T } = ctx;
    const { nHeads: H, nKvHeads: K, dHead: hd } = c;
    const G = H / K;
    const S = slot0 + T;
    const window = sliding && c.slidingWindow !== undefined ? c.slidingWindow : Infinity;
    for (let p0 = 0; p0 < B * H; p0 += pairs) {
      const p1 = Math.min(B * H, p0 + pairs);
      // The argument objects are reused across layers and steps (a 64-row decode step would
      // otherwise make ~18k short-lived objects).
      if (!pattern && !c.attnSoftcap) {
        // Scores, softmax and values of each pair in one task, pairs spread over the threads.
        const tasks = this.attentionList(p1 - p0);
        for (let pi = p0; pi < p1; pi++) {
          const b = Math.floor(pi / H), hh = pi % H, kh = Math.floor(hh / G);
          const a = tasks[pi - p0]!;
          a.q = q + (b * T * H + hh) * hd;
          a.ldq = H * hd;
          a.k = L.k + (b * K + kh) * cap * hd;
          a.v = L.v + (b * K + kh) * hd * cap;
          a.ldv = cap;
          a.scores = sc + (pi - p0) * T * S;
          a.z = z + (b * T * H + hh) * hd;
          a.T = T;
          a.S = S;
          a.hd = hd;
          a.slot0 = slot0;
          a.pad = pad[b]!;
          a.window = window;
          a.scale = c.attnScale;
        }
        this.rt.attention(tasks);
        continue;
      }
      // Attention patterns read, or a score softcap (Gemma 2): softmax on this thread.
      const scores = this.gemmList("scores", p1 - p0);
      const values = this.gemmList("values", p1 - p0);
      for (let pi = p0; pi < p1; pi++) {
        const b = Math.floor(pi / H), hh = pi % H, kh = Math.floor(hh / G);
        const s = sc + (pi - p0) * T * S;
        setGemm(scores[pi - p0]!, q + (b * T * H + hh) * hd, H * hd, L.k + (b * K + kh) * cap * hd, hd, s, S, T, S, hd);
        setGemm(values[pi - p0]!, s, S, L.v + (b * K + kh) * hd * cap, cap, z + (b * T * H + hh) * hd, H * hd, T, hd, S);
      }
      this.rt.gemmBatch(scores);
      const fx = this.rt.f32;
      for (let pi = p0; pi < p1; pi++) {
        const b = Math.floor(pi / H);
        const base = sc + (pi - p0) * T * S;
        for (let t = 0; t < T; t++) {
          const qSlot = slot0 + t;
          const row = base + t * S;
          // Visible keys: causal, within the window, never a padding key — but a padding query
          // sees itself, so no row is empty.
          const lo = Math.max(pad[b]!, qSlot - window + 1);
          const from = lo <= qSlot ? lo : qSlot;
          if (!c.attnSoftcap) this.ew.softmax(row, S, from, qSlot, c.attnScale);
          else softcapSoftmax(fx, row, S, from, qSlot, c.attnScale, c.attnSoftcap);
          if (pattern) pattern.set(fx.subarray(row, row + S), ((b * H + (pi % H)) * T + t) * S);
        }
      }
      this.rt.gemmBatch(values);
    }
  }

  // Argument objects reused across layers and steps (the same array while the count stays the same).
  private lists = {
    heads: [] as Gemm[],
    scores: [] as Gemm[],
    values: [] as Gemm[],
    attention: [] as AttentionTask[],
  };
  private gemmList(which: "heads" | "scores" | "values", n: number): Gemm[] {
    return (this.lists[which] = resized(this.lists[which], n, () => ({ x: 0, ldx: 0, w: 0, ldw: 0, y: 0, ldy: 0, M: 0, N: 0, K: 0 })));
  }
  private attentionList(n: number): AttentionTask[] {
    return (this.lists.attention = resized(this.lists.attention, n, () => ({ q: 0, ldq: 0, k: 0, v: 0, ldv: 0, scores: 0, z: 0, T: 0, S: 0, hd: 0, slot0: 0, pad: 0, window: 0, scale: 0 })));
  }

  /**
   * Final norm + unembedding for the selected rows of x; returns logits [sel, V] on the host.
   * `ctx` describes the selected slots (B rows × ctx.T each, in order), for ln_final ops.
   */
  private headRows(x: number, sel: number[], ctx: CallCtx, promptLen: number[], resolved: Resolved[], cache: ActivationCache | null, view = false, tape?: Tape, logitRows?: number[]): Float32Array {
    const c = this.config;
    // x is in the head's segment (runLayers moved it there).
    this.cur = this.headSeg;
    const rt = this.rt;
    const D = c.dModel, V = c.dVocab;
    const n = sel.length;
    const bufs = { h: rt.alloc(n * D) } as CpuBufs;
    sel.forEach((r, i) => rt.f32.copyWithin(bufs.h + i * D, x + r * D, x + (r + 1) * D));
    const fin = compileHost(resolved, ctx, promptLen, "final");
    let lg = -1;
    for (const st of scheduleOf(c).head) {
      const before = { ...bufs };
      if (st.kind === "finalNorm") {
        const src = bufs.h;
        if (tape) bufs.h = rt.alloc(n * D);
        this.norm(src, bufs.h, n, D, this.lnFinal);
      } else if (st.kind === "site") {
        if (tape && fin.host.has(st.site)) {
          const o = rt.alloc(n * D);
          rt.f32.copyWithin(o, bufs.h, bufs.h + n * D);
          bufs.h = o;
        }
        this.site(st.site, null, bufs.h, [D], fin.host, fin.reads, ctx, cache);
        this.siteTrace?.push(st.site);
      } else {
        // `logitRows` (a loss): logits of those rows of h only, gathered first.
        let hs = bufs.h;
        const m = logitRows ? logitRows.length : n;
        if (logitRows) {
          hs = rt.alloc(m * D);
          const f = rt.f32;
          logitRows.forEach((r, i) => f.copyWithin(hs + i * D, bufs.h + r * D, bufs.h + (r + 1) * D));
        }
        lg = rt.alloc(m * V);
        this.matmul(hs, D, m, this.unembed, lg, V);
        const cap = c.finalSoftcap;
        const f = rt.f32;
        if (cap) for (let i = lg; i < lg + m * V; i++) f[i] = Math.tanh(f[i]! / cap) * cap;
      }
      tape?.entries.push({ layer: null, step: st, before, after: { ...bufs, ...(lg >= 0 ? { logits: lg } : {}) } });
    }
    const fx = rt.f32;
    // generate() samples straight from our memory (valid until the next step allocates): no
    // host copy of B·V floats per token.
    const nl = logitRows ? logitRows.length : n;
    const out = view ? fx.subarray(lg, lg + nl * V) : fx.slice(lg, lg + nl * V);
    return out;
  }

  /**
   * Apply the compiled ops for `site` to the activation at `off` ([B·T, ...feat]), then record a
   * read of it (dropping padding slots) when the plan asks.
   */
  private site(site: string, layer: number | null, off: number, feat: number[], ops: Map<string, HostOp[]>, reads: string[], ctx: CallCtx, cache: ActivationCache | null): void {
    const list = ops.get(site);
    const Fall = feat.reduce((a, b) => a * b, 1);
    const R = ctx.B * ctx.T;
    if (list) for (const op of list) this.applyOp(off, R, ctx.T, Fall, op);
    if (cache && reads.includes(site)) {
      const fx = this.rt.f32;
      const name = (layer === null ? site : `blocks.${layer}.${site}`) as HookName;
      const { B, T } = ctx;
      for (let b = 0; b < B; b++) {
        const keep: number[] = [];
        for (let t = 0; t < T; t++) if (ctx.pos[b * T + t]! >= 0) keep.push(t);
        const out = new Float32Array(keep.length * Fall);
        keep.forEach((t, i) => out.set(fx.subarray(off + (b * T + t) * Fall, off + (b * T + t + 1) * Fall), i * Fall));
        cache.append(name, feat, b, out);
      }
    }
  }

  /** One compiled site op on [R, ...feat] at `off` (the host form of transformer.ts's `site`). */
  private applyOp(off: number, R: number, T: number, Fall: number, op: HostOp): void {
    const N = op.mShape.length === 4 ? op.mShape[2]! : 1;
    const Fh = Fall / N;
    const m = op.m, v = op.v;
    if (op.kind === "replace") {
      const f = this.rt.f32;
      const shared = op.vShape[0] === 1 && op.vShape[1] === 1; // ablate: one vector for every row ([1, 1, feat])
      const perSlot = op.vShape[1] !== 1; // patch: [B, T, feat]
      for (let r = 0; r < R; r++)
        for (let hh = 0; hh < N; hh++) {
          if (m[r * N + hh] === 0) continue;
          const b = Math.floor(r / T);
          const vo = shared ? hh * Fh : perSlot ? r * Fall + hh * Fh : b * Fall + hh * Fh;
          f.set(v.subarray(vo, vo + Fh), off + r * Fall + hh * Fh);
        }
      return;
    }
    // add / project: the per-row payload [B, feat] goes into our memory for the Wasm kernels.
    const vp = this.rt.alloc(v.length);
    this.rt.f32.set(v, vp);
    for (let r = 0; r < R; r++) {
      const b = Math.floor(r / T);
      for (let hh = 0; hh < N; hh++) {
        const mv = m[r * N + hh]!;
        if (mv === 0) continue;
        const base = off + r * Fall + hh * Fh;
        if (op.kind === "add") this.ew.axpy(base, vp + b * Fall + hh * Fh, Fh, mv);
        else {
          // x - (m·(x·u))·u, rounded as jax-js does it: coef in f32, then m·coef in f32.
          const coef = this.ew.dot(base, vp + b * Fall, Fh);
          this.ew.axpy(base, vp + b * Fall, Fh, -Math.fround(mv * coef));
        }
      }
    }
  }

  /** attn.hook_pattern [B,H,T,S] of a full pass -> per row [n, H, n] without padding slots. */
  private readPattern(pattern: Float32Array, layer: number, ctx: CallCtx, S: number, cache: ActivationCache): void {
    const { B, T } = ctx;
    const H = this.config.nHeads;
    for (let b = 0; b < B; b++) {
      let n = 0;
      for (let t = 0; t < T; t++) if (ctx.pos[b * T + t]! >= 0) n++;
      const first = T - n;
      const out = new Float32Array(n * H * n);
      for (let t = 0; t < n; t++)
        for (let hh = 0; hh < H; hh++) out.set(pattern.subarray(((b * H + hh) * T + first + t) * S + first, ((b * H + hh) * T + first + t) * S + first + n), (t * H + hh) * n);
      cache.append(`blocks.${layer}.attn.hook_pattern`, [H, n], b, out);
    }
  }

  /** cos/sin rows for the call's positions: [B·T, dHead/2] each (padding slots use position 0). */
  private ropeFor(pos: Int32Array, local: boolean): { cos: Float32Array; sin: Float32Array } {
    const c = this.config;
    const half = c.dHead / 2;
    let max = 0;
    for (const p of pos) if (p > max) max = p;
    let tab = this.rope.get(local);
    if (!tab || tab.n <= max) {
      // Angles in float64, rounded once to f32 (as rope.ts does for the jax-js engine).
      const inv = ropeInvFreq(c, local);
      const n = Math.max(max + 1, 2 * (tab?.n ?? 0), 256);
      const cos = new Float32Array(n * half), sin = new Float32Array(n * half);
      for (let p = 0; p < n; p++)
        for (let j = 0; j < half; j++) {
          const a = p * inv[j]!;
          cos[p * half + j] = Math.cos(a);
          sin[p * half + j] = Math.sin(a);
        }
      tab = { cos, sin, n };
      this.rope.set(local, tab);
    }
    const cos = new Float32Array(pos.length * half), sin = new Float32Array(pos.length * half);
    for (let i = 0; i < pos.length; i++) {
      const p = Math.max(0, pos[i]!);
      cos.set(tab.cos.subarray(p * half, (p + 1) * half), i * half);
      sin.set(tab.sin.subarray(p * half, (p + 1) * half), i * half);
    }
    return { cos, sin };
  }
}

interface KvCache {
  cap: number;
  layers: { k: number; v: number }[];
}

/** The schedule's buffers plus the backend's own: the fused qkv and gate|up products, per-head o-proj outputs. */
export type CpuBuf = Buf | "qkv" | "up" | "result" | "eo" | "logits";
/** Offsets of a call's named buffers in the runtime's memory (-1: not materialised). */
export type CpuBufs = Record<CpuBuf, number>;
/** A tape entry's step: a schedule step, or the two halves of an oProj whose per-head results are materialised. */
export type TapeStep = Step | EmbedStep | HeadStep | { kind: "heads" } | { kind: "sumHeads" } | { kind: "expertOut" } | { kind: "sumExperts" } | { kind: "site"; site: string; buf: CpuBuf };
export interface TapeEntry {
  layer: number | null;
  step: TapeStep;
  /** Buffers before and after the step: with a tape no step overwrites a buffer, so both stay valid. */
  before: CpuBufs;
  after: CpuBufs;
}
export interface Tape {
  entries: TapeEntry[];
}

/** Part of a call (gradients run blocks one at a time): blocks from..to-1, starting from residual `x` (else the embedding first). */
export interface LayerSpan {
  from: number;
  to: number;
  x?: number;
  adapters?: Map<string, LoraRef>;
}

/** Weight bytes one Wasm memory holds by default (the rest of its 4 GiB: KV cache, activations, scratch). */
export const SEGMENT_BYTES = 3.5 * 2 ** 30;

/**
 * The type each matrix of a stack is held in: its file's quantized type when the engine computes on
 * it natively (K a multiple of its block), else null (f32); null overall with f32 weights.
 */
function nativeTypes(host: EngineModel, weights: CpuWeights, names: string[]): (QuantType | null)[] | null {
  const lazy = isLazy(host.weights) ? host.weights : null;
  if (weights === "f32" || names[0] === "posEmbed.weight" || !lazy?.quantOf) return null;
  return names.map((n) => {
    const type = lazy.quantOf!(n);
    const cols = lazy.shapeOf(n)?.[1];
    return !type || cols === undefined || cols % QUANT_BLOCK[type] !== 0 || cols > MAX_Q8_K ? null : type;
  });
}

export interface SegmentPlan {
  /** Wasm memories (kernel runtimes). */
  n: number;
  layerSeg: number[];
  headSeg: number;
  /** The memory holding the embedding (the head's, when it is tied). */
  embedSeg: number;
  /** Weight bytes in all, and the most one memory takes. */
  bytes: number;
  budget: number;
}

/**
 * Which Wasm memory holds each layer: one when the weights fit `budget` bytes; else the fewest
 * memories that hold the layers in order, balanced (the smallest per-memory load that needs no
 * more) so each keeps about the same room for its KV cache. An untied embedding goes with layer 0;
 * the final norm and unembedding, and a tied embedding (held once), with the last layer or in one
 * more memory after it.
 */
export function planSegments(host: EngineModel, weights: CpuWeights, budget = SEGMENT_BYTES): SegmentPlan {
  const c = host.config;
  const w = host.weights;
  const shapeOf = (name: string): number[] => {
    const sh = isLazy(w) ? w.shapeOf(name) : w.get(name)?.shape;
    if (!sh) throw new UsageError(`internal: weight ${name} missing after load`);
    return [...sh];
  };
  const has = (name: string) => w.has(name);
  const matBytes = (...names: string[]) => {
    const cols = shapeOf(names[0]!)[1] ?? 1;
    const rows = names.reduce((a, n) => a + (shapeOf(n)[0] ?? 1), 0);
    const types = nativeTypes(host, weights, names);
    if (!types || types.every((t) => t === null)) return rows * cols * 4 + 64;
    return names.reduce((a, n, i) => {
      const t = types[i];
      const r = shapeOf(n)[0] ?? 1;
      if (!t) return a + r * cols * 4 + 64;
      const q = quantBytes(t, r, cols);
      return a + q.wq + q.ws + 128;
    }, 0);
  };
  const normBytes = (p: string) => (has(`${p}.weight`) ? c.dModel * 4 + 64 : 0);
  const block = (i: number) => {
    const b = `blocks.${i}`;
    let n = matBytes(...["q", "k", "v"].map((x) => `${b}.attn.${x}.weight`)) + matBytes(`${b}.attn.o.weight`);
    if (c.mlp.kind === "moe") {
      n += matBytes(`${b}.mlp.router.weight`);
      for (let e = 0; e < c.mlp.nExperts; e++) n += matBytes(`${b}.mlp.experts.${e}.gate.weight`, `${b}.mlp.experts.${e}.up.weight`) + matBytes(`${b}.mlp.experts.${e}.down.weight`);
    } else n += matBytes(...(c.mlp.kind === "gated" ? [`${b}.mlp.gate.weight`, `${b}.mlp.up.weight`] : [`${b}.mlp.up.weight`])) + matBytes(`${b}.mlp.down.weight`);
    for (const k of ["ln1", "ln1Post", "ln2", "ln2Post", "attn.qNorm", "attn.kNorm"]) n += normBytes(`${b}.${k}`);
    return n;
  };
  const embed = matBytes("embed.weight") + (has("posEmbed.weight") ? matBytes("posEmbed.weight") : 0);
  const unembed = c.tieEmbeddings ? 0 : matBytes("unembed.weight");
  const head = unembed + normBytes("lnFinal");
  const blocks = Array.from({ length: c.nLayers }, (_, i) => block(i));
  const bytes = embed + head + blocks.reduce((a, b) => a + b, 0);
  if (bytes <= budget) return { n: 1, layerSeg: blocks.map(() => 0), headSeg: 0, embedSeg: 0, bytes, budget };
  // A tied embedding lives once, with the head that reads it as the unembedding: the lookup runs there
  // and its rows cross to layer 0's memory like any residual.
  const front = c.tieEmbeddings ? 0 : embed;
  const back = head + (c.tieEmbeddings ? embed : 0);
  const gib = (x: number) => (x / 2 ** 30).toFixed(2);
  if (Math.max(...blocks) > budget) throw new UsageError(`a single block of this model needs more than one Wasm memory (${gib(Math.max(...blocks))} GiB per block, at most ${gib(budget)} GiB per memory)`);
  if (Math.max(front, back) > budget) throw new UsageError(`this model's ${front > budget ? "embedding" : "unembedding (with its final norm)"} alone needs ${gib(Math.max(front, back))} GiB, more than one Wasm memory holds (${gib(budget)} GiB)`);
  // Fill memories in layer order up to `cap` each; the head (and a tied embedding) joins the last
  // block's memory when it fits, else takes one more.
  const pack = (cap: number) => {
    const layerSeg: number[] = [];
    let seg = 0;
    let load = front;
    for (const b of blocks) {
      if (load + b > cap && load > 0) {
        seg++;
        load = 0;
      }
      layerSeg.push(seg);
      load += b;
    }
    const headSeg = load + back > cap ? seg + 1 : seg;
    return { layerSeg, headSeg, n: headSeg + 1 };
  };
  // The fewest memories, then the smallest per-memory load that still needs no more (bisection on
  // the cap), so every memory keeps about the same room for its KV cache.
  const fewest = pack(budget).n;
  let lo = Math.max(front, back, ...blocks), hi = budget;
  for (let i = 0; i < 50 && hi - lo > 1; i++) {
    const mid = (lo + hi) / 2;
    if (pack(mid).n <= fewest) hi = mid;
    else lo = mid;
  }
  const best = pack(hi);
  return { n: best.n, layerSeg: best.layerSeg, headSeg: best.headSeg, embedSeg: c.tieEmbeddings ? best.headSeg : 0, bytes, budget };
}

/** One call's state for the step implementations. */
interface Call {
  ctx: CallCtx;
  pad: number[];
  slot0: number;
  /** Keys visible to the call. */
  S: number;
  kv: KvCache;
  /** The attention score buffer (pairs·T·S floats) and how many (row, head) pairs it holds. */
  sc: number;
  pairs: number;
  pattern: Float32Array | null;
  rope: Map<string, { cos: number; sin: number }>;
  cache: ActivationCache | null;
  promptLen: number[];
  tape: Tape | null;
  /** Low-rank adapters on linear layers (key adapterKey(layer, linear)), in the runtime's memory. */
  adapters: Map<string, LoraRef> | null;
  /** Sites in the order they fired (the conformance test's view), when tracing. */
  fired?: string[];
}

type Compiled = ReturnType<typeof compileHost>;

function setGemm(g: Gemm, x: number, ldx: number, w: number, ldw: number, y: number, ldy: number, M: number, N: number, K: number): void {
  g.x = x;
  g.ldx = ldx;
  g.w = w;
  g.ldw = ldw;
  g.y = y;
  g.ldy = ldy;
  g.M = M;
  g.N = N;
  g.K = K;
}

// ---------------------------------------------------------------- elementwise kernels (host)

/** Softmax of one score row with Gemma 2's tanh soft-capping (host; the Wasm kernel has no tanh cap). */
function softcapSoftmax(f: Float32Array, row: number, S: number, from: number, to: number, scale: number, cap: number): void {
  let mx = -Infinity;
  for (let s = from; s <= to; s++) {
    const v = Math.tanh((f[row + s]! * scale) / cap) * cap;
    f[row + s] = v;
    if (v > mx) mx = v;
  }
  let sum = 0;
  for (let s = from; s <= to; s++) {
    const e = Math.exp(f[row + s]! - mx);
    f[row + s] = e;
    sum += e;
  }
  const inv = 1 / sum;
  for (let s = 0; s < S; s++) f[row + s] = s >= from && s <= to ? f[row + s]! * inv : 0;
}

/** Normalize R rows of width D from `src` into `dst` (may alias). */
function normRows(f: Float32Array, src: number, dst: number, R: number, D: number, p: Norm, spec: NormSpec): void {
  const w = p.weight;
  for (let r = 0; r < R; r++) {
    const a = src + r * D, o = dst + r * D;
    if (spec.kind === "rms") {
      let ss = 0;
      for (let i = 0; i < D; i++) ss += f[a + i]! * f[a + i]!;
      const inv = 1 / Math.sqrt(ss / D + spec.eps);
      if (spec.weightOffset) for (let i = 0; i < D; i++) f[o + i] = f[a + i]! * inv * (1 + w[i]!);
      else for (let i = 0; i < D; i++) f[o + i] = f[a + i]! * inv * w[i]!;
    } else {
      let mu = 0;
      for (let i = 0; i < D; i++) mu += f[a + i]!;
      mu /= D;
      let vr = 0;
      for (let i = 0; i < D; i++) vr += (f[a + i]! - mu) ** 2;
      const inv = 1 / Math.sqrt(vr / D + spec.eps);
      const b = p.bias;
      for (let i = 0; i < D; i++) f[o + i] = (f[a + i]! - mu) * inv * w[i]! + (b ? b[i]! : 0);
    }
  }
}

/** dst[r, 0:n] = src[r, col0:col0+n] for R rows of width `ld`. */
/** `list` if it has n entries, else a list of n that keeps its first entries and makes the rest. */
function resized<T>(list: T[], n: number, make: () => T): T[] {
  return list.length === n ? list : Array.from({ length: n }, (_, i) => list[i] ?? make());
}

function copyCols(f: Float32Array, src: number, ld: number, col0: number, dst: number, n: number, R: number): void {
  for (let r = 0; r < R; r++) f.copyWithin(dst + r * n, src + r * ld + col0, src + r * ld + col0 + n);
}

const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);

function act(v: number, a: Activation): number {
  if (a === "silu") return v / (1 + Math.exp(-v));
  if (a === "gelu_tanh") return 0.5 * v * (1 + Math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)));
  return 0.5 * v * (1 + erf(v / Math.SQRT2));
}

function actInPlace(f: Float32Array, off: number, n: number, a: Activation): void {
  for (let i = 0; i < n; i++) f[off + i] = act(f[off + i]!, a);
}

/** hid[r] = act(hid[r]) · up[r, F:2F] (hid holds the gate, after its hook). */
function gatedAct(f: Float32Array, hid: number, up: number, R: number, F: number, a: Activation): void {
  for (let r = 0; r < R; r++) {
    const g = hid + r * F, u = up + r * 2 * F + F;
    for (let i = 0; i < F; i++) f[g + i] = Math.fround(act(f[g + i]!, a)) * f[u + i]!;
  }
}


