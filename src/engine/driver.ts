// The one driver both backends run under: forward (chunked prefill into a call-local KV cache),
// generate (chunked prefill, then one slot per row per step), the finiteness check of every
// logit that reaches the host and, when one is not finite, the re-run that names the first bad
// activation. A backend supplies memory scopes, a KV cache, the layers (the schedule's steps)
// and the head; everything about rows, padding, plans, chunks and sampling lives here.
import { UsageError } from "../core/errors.js";
import { ActivationCache } from "./cache.js";
import type { ModelConfig } from "./config.js";
import { Decoder } from "./decode.js";
import { NonFiniteLogits, locateNonFinite } from "./numerics.js";
import { asRow, fullCtx, lastCtx, padShape, planForRow, resolvePlan, sliceCtx, type CallCtx, type Resolved } from "./plan.js";
import type { ForwardOptions, ForwardResult, GenerateOptions, GenerateResult, Row } from "./types.js";

/** What the layers of one call see besides the backend's own state. */
export interface LayerCall {
  ctx: CallCtx;
  pad: number[];
  promptLen: number[];
  resolved: Resolved[];
  cache: ActivationCache;
}

/**
 * A backend: the CPU engine (Wasm kernels over one memory) or the jax-js engine (wasm, webgpu).
 * X is its handle on the residual stream, KV its cache.
 */
export interface Backend<X, KV> {
  readonly config: ModelConfig;
  /** Throws a UsageError once the backend is disposed. */
  live(): void;
  /** Slots per prefill chunk for B rows of T prompt slots in a cache of `cap` slots (bounded activations). */
  prefillChunk(B: number, T: number, cap: number): number;
  /** A KV cache of `cap` slots per row. For a forward pass a backend may return null: run the call in one piece without one. */
  openKv(B: number, cap: number, forward: boolean): KV | null;
  closeKv(kv: KV | null): void;
  /** Memory scopes: release(mark()) frees what was allocated since (the CPU backend's stack; no-ops elsewhere). */
  mark(): number;
  release(mark: number): void;
  /** The embedding stage and every block over one call's slots, starting at cache slot `slot0`. */
  layers(call: LayerCall, kv: KV | null, slot0: number): X;
  /**
   * Final norm and unembedding of every slot ("all") or of each row's last slot ("last"); `headCtx`
   * describes the selected slots. Consumes x. With `view`, the logits may live in the backend's
   * memory until its next allocation.
   */
  head(x: X, which: "all" | "last", call: LayerCall, headCtx: CallCtx, view: boolean): Float32Array | Promise<Float32Array>;
  /** The driver is done with x without a head (a prefill chunk before the last, or logits "none"). */
  drop(x: X, kv: KV | null): void | Promise<void>;
}

export class Driver<X, KV> {
  constructor(private readonly be: Backend<X, KV>) {}

  async forward(rows: (Row | number[])[], opts: ForwardOptions = {}): Promise<ForwardResult> {
    try {
      return await this.forwardUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) throw await this.locate(rows.map(asRow)[e.row]!, opts, e);
      throw e;
    }
  }

  async generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    try {
      return await this.generateUnchecked(rows, opts);
    } catch (e) {
      if (e instanceof NonFiniteLogits) {
        // Locate the first bad activation over the prompt, with the row's own interventions.
        const plan = planForRow(opts.plan ?? [], e.row);
        throw await this.locate(rows.map(asRow)[e.row]!, { plan, ...(opts.countPrefix ? { countPrefix: opts.countPrefix } : {}) }, e);
      }
      throw e;
    }
  }

  private locate(row: Row, opts: ForwardOptions, e: NonFiniteLogits) {
    return locateNonFinite(this.be.config, (r, o) => this.forwardUnchecked(r, o), row, opts, e);
  }

  private async forwardUnchecked(rows: (Row | number[])[], opts: ForwardOptions): Promise<ForwardResult> {
    const be = this.be;
    be.live();
    const c = be.config;
    const rs = rows.map(asRow);
    const { B, T, pad } = padShape(rs);
    const promptLen = rs.map((r) => r.ids.length);
    const resolved = resolvePlan(c, opts.plan ?? [], rs, promptLen, opts.countPrefix);
    const cache = new ActivationCache();
    const mode = opts.logits ?? "all";
    const V = c.dVocab;
    const mark = be.mark();
    const kv = be.openKv(B, T, true);
    try {
      // A full pass is a prefill into a KV cache that lives for this call only, in chunks of
      // slots as generate() does (bounded activations), unless attention patterns are read:
      // those need every query's full row, so that call runs in one piece.
      const whole = kv === null || resolved.some((r) => r.site === "attn.hook_pattern");
      const chunk = whole ? T : be.prefillChunk(B, T, T);
      const out = mode === "all" ? rs.map((_, b) => new Float32Array((T - pad[b]!) * V)) : [];
      for (let start = 0; start < T; start += chunk) {
        const n = Math.min(chunk, T - start);
        const m = be.mark();
        const ctx = whole ? fullCtx(rs, B, T, pad) : sliceCtx(rs, pad, start, n);
        const call: LayerCall = { ctx, pad, promptLen, resolved, cache };
        const x = be.layers(call, kv, start);
        if (mode === "all") {
          // Every slot of the chunk (padding too, so ln_final ops see the call's own layout), then padding dropped.
          const lg = finite(await be.head(x, "all", call, ctx, true), V, n);
          for (let b = 0; b < B; b++)
            for (let t = Math.max(0, pad[b]! - start); t < n; t++) out[b]!.set(lg.subarray((b * n + t) * V, (b * n + t + 1) * V), (start + t - pad[b]!) * V);
        } else if (mode === "last" && start + n >= T) {
          const lg = finite(await be.head(x, "last", call, lastCtx(B, T, pad), false), V, 1);
          out.push(...rs.map((_, b) => lg.slice(b * V, (b + 1) * V)));
        } else await be.drop(x, kv);
        be.release(m);
      }
      return { logits: out, cache };
    } finally {
      be.closeKv(kv);
      be.release(mark);
    }
  }

  private async generateUnchecked(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult> {
    const be = this.be;
    be.live();
    const d = new Decoder(be.config, rows, opts);
    const { B, T, pad, promptLen, resolved, rows: rs } = d;
    const cache = new ActivationCache();
    if (d.empty) return d.result(cache);
    const V = be.config.dVocab;
    const mark = be.mark();
    const kv = be.openKv(B, d.cap, false);
    if (kv === null) throw new UsageError("internal: generate needs a KV cache");
    try {
      // Prefill in chunks of slots: activations and attention scores stay bounded whatever the
      // batch and prompt (a 64-row sweep prefills a few slots at a time).
      const chunk = be.prefillChunk(B, T, d.cap);
      let logits: Float32Array = new Float32Array(0);
      for (let start = 0; start < T; start += chunk) {
        const n = Math.min(chunk, T - start);
        const m = be.mark();
        const call: LayerCall = { ctx: sliceCtx(rs, pad, start, n), pad, promptLen, resolved, cache };
        const x = be.layers(call, kv, start);
        if (start + n >= T) {
          logits = finite(await be.head(x, "last", call, lastCtx(B, T, pad), true), V, 1);
          opts.onStep?.(0);
        } else await be.drop(x, kv);
        be.release(m);
      }
      for (let st = d.next(logits); st; st = d.next(logits)) {
        const m = be.mark();
        const call: LayerCall = { ctx: st.ctx, pad, promptLen, resolved, cache };
        logits = finite(await be.head(be.layers(call, kv, st.slot), "all", call, st.ctx, true), V, 1);
        be.release(m);
        opts.onStep?.(d.steps);
      }
    } finally {
      be.closeKv(kv);
      be.release(mark);
    }
    return d.result(cache);
  }
}

/** Every logit finite, or NonFiniteLogits naming the batch row (`T` slots per row). */
function finite(lg: Float32Array, V: number, T: number): Float32Array {
  for (let i = 0; i < lg.length; i++) if (!Number.isFinite(lg[i]!)) throw new NonFiniteLogits(Math.floor(i / V / T), lg[i]!);
  return lg;
}
