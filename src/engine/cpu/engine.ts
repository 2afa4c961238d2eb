// selfscope's own CPU engine: the forward pass written out by hand over one WebAssembly memory,
// with every matrix product in our Wasm SIMD kernels (kernels.ts) on a thread pool (runtime.ts)
// and the light per-token work (norms, RoPE, softmax, activations, interventions) in plain
// TypeScript. It computes exactly what the jax-js engine computes (same plan semantics, same
// hook names, same left-padded batches) — the tests hold both to the same references — but
// without jax-js's per-kernel dispatch: a decode step is ~6 kernel calls per block.
//
// Memory is stack-scoped: weights are allocated once; a call marks the stack, allocates its
// activations (and, for generate, its KV cache), and releases them when it returns.
import { UsageError } from "../../core/errors.js";
import type { HookName } from "../../hooks/names.js";
import { ActivationCache } from "../cache.js";
import { NonFiniteLogits, locateNonFinite } from "../numerics.js";
import { Decoder } from "../decode.js";
import { asRow, compileHost, featShapeOf, fullCtx, lastCtx, padShape, planForRow, resolvePlan, sliceCtx, type CallCtx, type HostOp, type Resolved } from "../plan.js";
import { type ForwardOptions, type ForwardResult, type GenerateOptions, type GenerateResult, type Row } from "../types.js";
import type { Activation, ModelConfig, NormSpec } from "../config.js";
import { LazyWeights, type HostModel } from "../../model/load.js";
import { ropeInvFreq } from "../rope.js";
import { elementwise, type Elementwise } from "./elementwise.js";
import type { AttentionTask, Gemm } from "./runtime.js";

/** What the engine needs from the kernel runtime (runtime.ts). */
export interface KernelRuntime {
  readonly threads: number;
  readonly memory: WebAssembly.Memory;
  readonly f32: Float32Array;
  alloc(nFloats: number): number;
  mark(): number;
  release(mark: number): void;
  gemm(g: Gemm): void;
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
/** A weight matrix in Wasm memory, [rows, cols] row-major. */
interface Mat {
  off: number;
  rows: number;
  cols: number;
}
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
  /** Gated MLPs: gate and up stacked [2F, D]; plain MLPs: up [F, D]. */
  up: Mat;
  upBias?: Float32Array;
  down: Mat;
  downBias?: Float32Array;
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
  private ew: Elementwise;

  /** Copies the weights into the runtime's memory one tensor at a time (a lazy HostModel then never holds them all). */
  constructor(
    host: HostModel,
    readonly rt: KernelRuntime,
  ) {
    const c = (this.config = host.config);
    this.ew = elementwise(rt.memory, rt.memory.buffer instanceof SharedArrayBuffer);
    const get = (name: string) => {
      const t = host.weights.get(name);
      if (!t) throw new UsageError(`internal: weight ${name} missing after load`);
      return t;
    };
    const opt = (name: string) => (host.weights.has(name) ? get(name).data : undefined);
    // Shapes from the header when the weights are lazy (a get() would read the tensor).
    const lazy = host.weights instanceof LazyWeights ? host.weights : null;
    const shapeOf = (name: string) => (lazy ? lazy.shapeOf(name) : host.weights.get(name)?.shape);
    const norm = (p: string): Norm | undefined => {
      const w = opt(`${p}.weight`);
      if (!w) return undefined;
      const off = rt.alloc(w.length);
      rt.f32.set(w, off);
      const b = opt(`${p}.bias`);
      return b ? { weight: w, bias: b, off } : { weight: w, off };
    };
    /** Stack matrices with the same column count into one [Σrows, cols] matrix. */
    const mat = (...names: string[]): Mat => {
      const cols = shapeOf(names[0]!)![1]!;
      const rowsOf = names.map((n) => shapeOf(n)![0]!);
      const rows = rowsOf.reduce((a, b) => a + b, 0);
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
      const b = `blocks.${i}`;
      const qkvNames = ["q", "k", "v"].map((x) => `${b}.attn.${x}`);
      const upNames = c.mlp.kind === "gated" ? [`${b}.mlp.gate`, `${b}.mlp.up`] : [`${b}.mlp.up`];
      const blk: Block = {
        qkv: mat(...qkvNames.map((n) => `${n}.weight`)),
        o: mat(`${b}.attn.o.weight`),
        up: mat(...upNames.map((n) => `${n}.weight`)),
        down: mat(`${b}.mlp.down.weight`),
      };
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
    this.embed = mat("embed.weight");
    if (host.weights.has("posEmbed.weight")) this.posEmbed = mat("posEmbed.weight");
    this.unembed = c.tieEmbeddings ? this.embed : mat("unembed.weight");
    this.lnFinal = norm("lnFinal")!;
  }

  /**
   * An engine on a kernel runtime of its own (`threads` including the calling one; default every
   * core). The runtime is imported here, on demand: it needs node:worker_threads, and this module
   * stays importable in a browser bundle.
   */
  static async create(host: HostModel, opts: { threads?: number } = {}): Promise<CpuEngine> {
    const { CpuRuntime } = await import("./runtime.js");
    const rt = await CpuRuntime.create(opts.threads !== undefined ? { threads: opts.threads } : {});
    try {
      return new CpuEngine(host, rt);
    } catch (e) {
      await rt.dispose();
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
    await this.rt.dispose();
  }

  featShape(site: string): number[] {
    return featShapeOf(this.config, site);
  }

  // ------------------------------------------------------------ public entry points

  async forward(rows: (Row | number[])[], opts: ForwardOptions = {}): Promise<ForwardResult> {
    try {
      return this.forwardUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) throw await locateNonFinite(this.config, async (r, o) => this.forwardUnchecked(r, o), rows.map(asRow)[e.row]!, opts, e);
      throw e;
    }
  }

  async generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    try {
      return this.generateUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) {
        const plan = planForRow(opts.plan ?? [], e.row);
        throw await locateNonFinite(this.config, async (r, o) => this.forwardUnchecked(r, o), rows.map(asRow)[e.row]!, { plan, ...(opts.countPrefix ? { countPrefix: opts.countPrefix } : {}) }, e);
      }
      throw e;
    }
  }

  private live(): void {
    if (this.disposed) throw new UsageError("this model was disposed");
  }

  private forwardUnchecked(rows: (Row | number[])[], opts: ForwardOptions): ForwardResult {
    this.live();
    const c = this.config;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const resolved = resolvePlan(c, opts.plan ?? [], rs, promptLen, opts.countPrefix);
    const cache = new ActivationCache();
    const mode = opts.logits ?? "all";
    const V = c.dVocab;
    const mark = this.rt.mark();
    try {
      // A full pass is a prefill into a KV cache that lives for this call only, in chunks of
      // slots as generate() does (bounded activations), unless attention patterns are read:
      // those need every query's full row, so that call runs in one piece.
      const kv = this.allocCache(B, T);
      const whole = resolved.some((r) => r.site === "attn.hook_pattern");
      const chunk = whole ? T : this.prefillChunk(B, T);
      const out = mode === "all" ? rs.map((_, b) => new Float32Array((T - pad[b]!) * V)) : [];
      for (let start = 0; start < T; start += chunk) {
        const n = Math.min(chunk, T - start);
        const m = this.rt.mark();
        const ctx = whole ? fullCtx(rs, B, T, pad) : sliceCtx(rs, pad, start, n);
        const x = this.runLayers(ctx, pad, promptLen, resolved, kv, start, cache);
        if (mode === "all") {
          // Every slot of the chunk (padding too, so ln_final ops see the call's own layout),
          // then padding dropped.
          const lg = this.head(x, Array.from({ length: B * n }, (_, r) => r), ctx, promptLen, resolved, cache, true);
          for (let bb = 0; bb < B; bb++)
            for (let t = Math.max(0, pad[bb]! - start); t < n; t++) out[bb]!.set(lg.subarray((bb * n + t) * V, (bb * n + t + 1) * V), (start + t - pad[bb]!) * V);
        } else if (mode === "last" && start + n >= T) {
          const lg = this.head(x, Array.from({ length: B }, (_, bb) => bb * n + n - 1), lastCtx(B, T, pad), promptLen, resolved, cache);
          out.push(...rs.map((_, bb) => lg.slice(bb * V, (bb + 1) * V)));
        }
        this.rt.release(m);
      }
      return { logits: out, cache };
    } finally {
      this.rt.release(mark);
    }
  }

  /** Slots per prefill chunk: activations are B·chunk rows and the score buffer B·heads·chunk·keys. */
  private prefillChunk(B: number, keys: number): number {
    return Math.max(1, Math.min(Math.floor(ROW_BUDGET / B), Math.floor(SCORE_BUDGET / (B * this.config.nHeads * keys))));
  }

  private generateUnchecked(rows: (Row | number[])[], opts: GenerateOptions): GenerateResult {
    this.live();
    const d = new Decoder(this.config, rows, opts);
    const { B, T, pad, promptLen, resolved, rows: rs } = d;
    const cache = new ActivationCache();
    if (d.empty) return d.result(cache);
    const mark = this.rt.mark();
    try {
      const kv = this.allocCache(B, d.cap);
      // Prefill in chunks of slots: activations are B·chunk rows and the score buffer
      // B·heads·chunk·keys, bounded whatever the batch and prompt (a 64-row sweep prefills 4 slots at a time).
      const chunk = this.prefillChunk(B, T);
      let logits: Float32Array = new Float32Array(0);
      for (let start = 0; start < T; start += chunk) {
        const n = Math.min(chunk, T - start);
        const m = this.rt.mark();
        const ctx = sliceCtx(rs, pad, start, n);
        const x = this.runLayers(ctx, pad, promptLen, resolved, kv, start, cache);
        if (start + n >= T) {
          logits = this.head(x, Array.from({ length: B }, (_, b) => b * n + n - 1), lastCtx(B, T, pad), promptLen, resolved, cache, true);
          opts.onStep?.(0);
        }
        this.rt.release(m);
      }
      for (let st = d.next(logits); st; st = d.next(logits)) {
        const m = this.rt.mark();
        const x = this.runLayers(st.ctx, pad, promptLen, resolved, kv, st.slot, cache);
        logits = this.head(x, Array.from({ length: B }, (_, b) => b), st.ctx, promptLen, resolved, cache, true);
        this.rt.release(m);
        opts.onStep?.(d.steps);
      }
    } finally {
      this.rt.release(mark);
    }
    return d.result(cache);
  }

  // ------------------------------------------------------------ the forward pass

  /** KV cache for B rows of `cap` slots, per layer: K as [B, nKv, cap, dHead], V transposed [B, nKv, dHead, cap]. */
  private allocCache(B: number, cap: number): KvCache {
    const c = this.config;
    const n = B * c.nKvHeads * cap * c.dHead;
    const layers = Array.from({ length: c.nLayers }, () => ({ k: this.rt.alloc(n), v: this.rt.alloc(n) }));
    return { cap, layers };
  }

  /**
   * Embedding and every block for one call whose T slots per row start at cache slot `slot0`.
   * Writes their k/v into `kv`. Returns the offset of the residual stream [B·T, D].
   */
  private runLayers(ctx: CallCtx, pad: number[], promptLen: number[], resolved: Resolved[], kv: KvCache, slot0: number, cache: ActivationCache): number {
    const c = this.config;
    const rt = this.rt;
    const { B, T } = ctx;
    const R = B * T;
    const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd } = c;
    const F = c.dMlp;
    const S = slot0 + T; // keys visible to this call: every slot up to its last query
    const qkvW = (H + 2 * K) * hd;
    const upW = c.mlp.kind === "gated" ? 2 * F : F;
    // Activations for the whole call (reused by every block).
    const x = rt.alloc(R * D);
    const h = rt.alloc(R * D);
    const qkv = rt.alloc(R * qkvW);
    const q = rt.alloc(R * H * hd);
    const kb = rt.alloc(R * K * hd);
    const vb = rt.alloc(R * K * hd);
    const z = rt.alloc(R * H * hd);
    const t1 = rt.alloc(R * D);
    const up = rt.alloc(R * upW);
    const hid = rt.alloc(R * F);
    const pairs = Math.max(1, Math.min(B * H, Math.floor(SCORE_BUDGET / (T * S))));
    const sc = rt.alloc(pairs * T * S);
    const needPattern = resolved.some((r) => r.site === "attn.hook_pattern");
    const pattern = needPattern ? new Float32Array(B * H * T * S) : null;
    // cos/sin rows for this call's positions, in our memory for the RoPE kernel.
    const rope = c.pos.kind === "rope"
      ? [...new Set(c.layerTypes)].map((ty) => {
          const t = this.ropeFor(ctx.pos, ty === "sliding");
          const cos = rt.alloc(t.cos.length), sin = rt.alloc(t.sin.length);
          rt.f32.set(t.cos, cos);
          rt.f32.set(t.sin, sin);
          return [ty, { cos, sin }] as const;
        })
      : [];
    const f = () => rt.f32;

    // Embedding (+ learned positions), with the hook_embed / hook_pos_embed sites.
    {
      const e = compileHost(resolved, ctx, promptLen, null);
      const fx = f();
      const emb = this.embed.off;
      for (let r = 0; r < R; r++) {
        const p = ctx.pos[r]!;
        if (p < 0) continue;
        const id = ctx.ids[r]!;
        if (!(id >= 0 && id < c.dVocab)) throw new UsageError(`token id ${id} is outside the vocabulary (0..${c.dVocab - 1})`);
        const src = emb + id * D;
        if (c.embedScale === 1) fx.copyWithin(x + r * D, src, src + D);
        else for (let i = 0; i < D; i++) fx[x + r * D + i] = fx[src + i]! * c.embedScale;
      }
      this.site("hook_embed", null, x, [D], e.host, e.reads, ctx, cache);
      if (this.posEmbed) {
        for (let r = 0; r < R; r++) {
          const p = ctx.pos[r]!;
          if (p < 0) continue;
          if (p >= c.nCtx) throw new UsageError(`position ${p} exceeds the model's context of ${c.nCtx}`);
          fx.copyWithin(t1 + r * D, this.posEmbed.off + p * D, this.posEmbed.off + (p + 1) * D);
        }
        this.site("hook_pos_embed", null, t1, [D], e.host, e.reads, ctx, cache);
        this.ew.add(x, t1, R * D);
      }
    }

    for (let l = 0; l < c.nLayers; l++) {
      const p = this.blocks[l]!;
      const { host: ops, reads } = compileHost(resolved, ctx, promptLen, l);
      const at = (site: string, off: number, feat: number[]) => this.site(site, l, off, feat, ops, reads, ctx, cache);
      const sliding = c.layerTypes[l] === "sliding";
      at("hook_resid_pre", x, [D]);
      // Attention.
      const hin = p.ln1 ? (this.norm(x, h, R, D, p.ln1), h) : x;
      this.linear(hin, D, R, p.qkv, p.qkvBias, qkv);
      const fx = f();
      const L = kv.layers[l]!;
      // q, k and v out of the fused product into their own rows (hooks see [R, heads, dHead]);
      // k and v then go into the cache.
      copyCols(fx, qkv, qkvW, 0, q, H * hd, R);
      copyCols(fx, qkv, qkvW, H * hd, kb, K * hd, R);
      copyCols(fx, qkv, qkvW, (H + K) * hd, vb, K * hd, R);
      const full = c.qkNorm.kind === "full";
      if (p.qNorm) this.norm(q, q, full ? R : R * H, full ? H * hd : hd, p.qNorm);
      if (p.kNorm) this.norm(kb, kb, full ? R : R * K, full ? K * hd : hd, p.kNorm);
      at("attn.hook_q", q, [H, hd]);
      at("attn.hook_k", kb, [K, hd]);
      at("attn.hook_v", vb, [K, hd]);
      const rot = rope.find(([ty]) => ty === c.layerTypes[l])?.[1];
      if (rot) {
        this.ew.rope(q, rot.cos, rot.sin, R, H, hd);
        this.ew.rope(kb, rot.cos, rot.sin, R, K, hd);
      }
      this.writeCache(kb, vb, L, kv.cap, B, T, slot0);
      this.attention(q, L, kv.cap, z, sc, pairs, ctx, pad, slot0, sliding, pattern);
      if (pattern && reads.includes("attn.hook_pattern")) this.readPattern(pattern, l, ctx, S, cache);
      at("attn.hook_z", z, [H, hd]);
      this.linear(z, H * hd, R, p.o, p.oBias, t1);
      if (p.ln1Post) this.norm(t1, t1, R, D, p.ln1Post);
      at("hook_attn_out", t1, [D]);
      this.ew.add(x, t1, R * D);
      at("hook_resid_mid", x, [D]);
      // MLP.
      const hin2 = p.ln2 ? (this.norm(x, h, R, D, p.ln2), h) : x;
      this.linear(hin2, D, R, p.up, p.upBias, up);
      if (c.mlp.kind === "gated") {
        // The gate is copied out only when mlp.hook_pre has ops or reads (hooks see [R, F]).
        const hooked = ops.has("mlp.hook_pre") || reads.includes("mlp.hook_pre");
        if (hooked || c.mlp.act === "gelu") {
          copyCols(f(), up, 2 * F, 0, hid, F, R);
          at("mlp.hook_pre", hid, [F]);
        }
        if (c.mlp.act === "gelu") gatedAct(f(), hid, up, R, F, c.mlp.act);
        else if (hooked) this.rt.gatedRows(hid, F, up + F, 2 * F, hid, F, R, F, c.mlp.act);
        else this.rt.gatedRows(up, 2 * F, up + F, 2 * F, hid, F, R, F, c.mlp.act);
      } else {
        copyCols(f(), up, F, 0, hid, F, R);
        at("mlp.hook_pre", hid, [F]);
        if (c.mlp.act === "gelu_tanh") this.ew.geluTanh(hid, R * F);
        else actInPlace(f(), hid, R * F, c.mlp.act);
      }
      at("mlp.hook_post", hid, [F]);
      this.linear(hid, F, R, p.down, p.downBias, t1);
      at("mlp.hook_down", t1, [D]);
      if (p.ln2Post) this.norm(t1, t1, R, D, p.ln2Post);
      at("hook_mlp_out", t1, [D]);
      this.ew.add(x, t1, R * D);
      at("hook_resid_post", x, [D]);
    }
    return x;
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
    this.rt.gemm({ x, ldx, w: w.off, ldw: w.cols, y, ldy: w.rows, M: R, N: w.rows, K: w.cols });
    if (bias) {
      const fx = this.rt.f32;
      const N = w.rows;
      for (let r = 0; r < R; r++) for (let n = 0; n < N; n++) fx[y + r * N + n] = fx[y + r * N + n]! + bias[n]!;
    }
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
    scores: [] as Gemm[],
    values: [] as Gemm[],
    attention: [] as AttentionTask[],
  };
  private gemmList(which: "scores" | "values", n: number): Gemm[] {
    return (this.lists[which] = resized(this.lists[which], n, () => ({ x: 0, ldx: 0, w: 0, ldw: 0, y: 0, ldy: 0, M: 0, N: 0, K: 0 })));
  }
  private attentionList(n: number): AttentionTask[] {
    return (this.lists.attention = resized(this.lists.attention, n, () => ({ q: 0, ldq: 0, k: 0, v: 0, ldv: 0, scores: 0, z: 0, T: 0, S: 0, hd: 0, slot0: 0, pad: 0, window: 0, scale: 0 })));
  }

  /**
   * Final norm + unembedding for the selected rows of x; returns logits [sel, V] on the host.
   * `ctx` describes the selected slots (B rows × ctx.T each, in order), for ln_final ops.
   */
  private head(x: number, sel: number[], ctx: CallCtx, promptLen: number[], resolved: Resolved[], cache: ActivationCache, view = false): Float32Array {
    const c = this.config;
    const rt = this.rt;
    const D = c.dModel, V = c.dVocab;
    const n = sel.length;
    const h = rt.alloc(n * D);
    const lg = rt.alloc(n * V);
    let fx = rt.f32;
    sel.forEach((r, i) => fx.copyWithin(h + i * D, x + r * D, x + (r + 1) * D));
    this.norm(h, h, n, D, this.lnFinal);
    const fin = compileHost(resolved, ctx, promptLen, "final");
    this.site("ln_final.hook_normalized", null, h, [D], fin.host, fin.reads, ctx, cache);
    rt.gemm({ x: h, ldx: D, w: this.unembed.off, ldw: D, y: lg, ldy: V, M: n, N: V, K: D });
    fx = rt.f32;
    // generate() samples straight from our memory (valid until the next step allocates): no
    // host copy of B·V floats per token.
    const out = view ? fx.subarray(lg, lg + n * V) : fx.slice(lg, lg + n * V);
    const cap = c.finalSoftcap;
    if (cap) for (let i = 0; i < out.length; i++) out[i] = Math.tanh(out[i]! / cap) * cap;
    for (let i = 0; i < out.length; i++) if (!Number.isFinite(out[i]!)) throw new NonFiniteLogits(Math.floor(i / V / ctx.T), out[i]!);
    return out;
  }

  /**
   * Apply the compiled ops for `site` to the activation at `off` ([B·T, ...feat]), then record a
   * read of it (dropping padding slots) when the plan asks.
   */
  private site(site: string, layer: number | null, off: number, feat: number[], ops: Map<string, HostOp[]>, reads: string[], ctx: CallCtx, cache: ActivationCache): void {
    const list = ops.get(site);
    const Fall = feat.reduce((a, b) => a * b, 1);
    const R = ctx.B * ctx.T;
    if (list) for (const op of list) this.applyOp(off, R, ctx.T, Fall, op);
    if (reads.includes(site)) {
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

/** erf to ~1e-7 relative (Numerical Recipes' erfc Chebyshev fit), enough for f32 GELU. */
function erf(x: number): number {
  const z = Math.abs(x);
  const t = 1 / (1 + 0.5 * z);
  const r =
    t *
    Math.exp(
      -z * z - 1.26551223 +
        t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))),
    );
  return x >= 0 ? 1 - r : r - 1;
}

