// Plans resolved and compiled for one call: rows, left padding, positions, scopes and the per-site
// host ops both backends apply. No device arrays here.
import { NumericalError, UsageError } from "../core/errors.js";
import { parseHook } from "../hooks/names.js";
import { checkIntervention, patchOverrun, type Intervention, type Plan, type PosSpec } from "../hooks/plan.js";
import type { ModelConfig } from "./config.js";
import type { PrefixCounter, Row } from "./types.js";

/** Kinds of compiled site ops: add and project take per-row payloads, replace covers patch and ablate. */
export type OpKind = "add" | "project" | "replace";

/** An op compiled on the host, before its arrays are made (so same-kind ops can merge). */
export interface HostOp {
  kind: OpKind;
  v: Float32Array;
  vShape: number[];
  m: Float32Array;
  mShape: number[];
  rows: Set<number>;
}

/** Per-row position scope after resolution: [from, to) in absolute positions, or null (row untouched). */
export type Scope = { from: number; to: number } | null;

export interface Resolved {
  iv: Intervention;
  layer: number | null;
  site: string;
  featShape: number[];
  scopes: Scope[];
  /** Precomputed payload (scaled vector / unit direction / mean). */
  vec?: Float32Array;
}

/** Positions of one forward call: B rows × T slots, absolute position per slot (-1 = padding). */
export interface CallCtx {
  B: number;
  T: number;
  pos: Int32Array;
  /** Token id per slot (padding slots hold 0; they are masked). */
  ids: Int32Array;
}


export function featShapeOf(c: ModelConfig, site: string): number[] {
{
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
    case "attn.hook_result":
      return [c.nHeads, c.dModel];
    case "mlp.hook_router_logits":
    case "mlp.hook_expert_weights":
      return [c.mlp.kind === "moe" ? c.mlp.nExperts : 0];
    case "mlp.hook_expert_out":
      return [c.mlp.kind === "moe" ? c.mlp.nExperts : 0, c.dModel];
    default:
      return [c.dModel];
  }
}
}

/**
 * Check and resolve a plan for one call. `fedBack`: generated tokens the call runs through the
 * model after the prompt (generate: maxTokens - 1; forward: 0), so row b runs positions
 * [0, promptLen[b] + fedBack).
 */
export function resolvePlan(c: ModelConfig, plan: Plan, rows: Row[], promptLen: number[], countPrefix: PrefixCounter | undefined, fedBack = 0): Resolved[] {
  return plan.map((iv, i) => {
    checkIntervention(iv, i);
    const { layer, site } = parseHook(iv.at, c.nLayers);
    if (site === "hook_pos_embed" && c.pos.kind !== "learned") throw new UsageError(`${iv.at}: this model has no learned position embedding`);
    checkMlpSite(c, site, iv.at);
    const featShape = featShapeOf(c, site);
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
        if (featShape.length !== 2) throw new UsageError(`ablate at ${iv.at}: heads apply to attn.hook_q|k|v|z|result (and experts to mlp.hook_expert_out) only`);
        if (iv.heads.some((h) => h < 0 || h >= featShape[0]!)) throw new UsageError(`ablate at ${iv.at}: heads ${iv.heads} out of range 0..${featShape[0]! - 1}`);
      }
    } else if (iv.op === "patch") {
      if (iv.source.length % F !== 0) throw new UsageError(`patch at ${iv.at}: source length ${iv.source.length} is not a multiple of ${F}`);
      if (rows.length > 1 && !iv.rows) throw new UsageError(`patch at ${iv.at}: in a batch, say which rows the source is for (rows: [b])`);
      const have = iv.source.length / F;
      scopes.forEach((s, b) => {
        const p = patchOverrun(s, promptLen[b]! + fedBack, have);
        if (p === null) return;
        const runs = fedBack > 0 ? `prompt and generated positions 0..${promptLen[b]! + fedBack - 1}` : `positions 0..${promptLen[b]! - 1}`;
        throw new UsageError(
          `patch at ${iv.at}: its scope reaches position ${p} of row ${b} (the call runs ${runs}) but the source holds positions 0..${have - 1} only; ` +
            `limit pos to { from, to: ${have} } or pass a source covering every position in scope`,
        );
      });
    }
    return r;
  });
}


/** A dense MLP's sites on a mixture-of-experts model, or the other way round, is a clear error. */
export function checkMlpSite(c: ModelConfig, site: string, at: string): void {
  const moeSite = site === "mlp.hook_router_logits" || site === "mlp.hook_expert_weights" || site === "mlp.hook_expert_out";
  if (c.mlp.kind === "moe" && (site === "mlp.hook_pre" || site === "mlp.hook_post")) {
    throw new UsageError(`${at}: this model's MLPs are mixtures of ${c.mlp.nExperts} experts and have no single hidden layer; use mlp.hook_router_logits, mlp.hook_expert_weights, mlp.hook_expert_out or mlp.hook_down`);
  }
  if (c.mlp.kind !== "moe" && moeSite) throw new UsageError(`${at}: this model's MLPs are dense (not a mixture of experts)`);
}

/**
 * Compile the resolved plan into per-site host ops for one call and one group (a layer, the
 * embedding stage (null) or the final norm). Same-kind ops on disjoint rows merge into one.
 */
export function compileHost(resolved: Resolved[], ctx: CallCtx, promptLen: number[], group: number | null | "final"): { host: Map<string, HostOp[]>; reads: string[] } {
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
      // A weighted projection is the unit projection with its mask scaled.
      if (iv.op === "project" && iv.scale !== undefined) for (let i = 0; i < m.length; i++) m[i]! *= iv.scale;
      // A sweep puts one intervention per row: ops of one kind on disjoint rows merge into a
      // single op (sum of payloads and masks), so a batch of 32 steered rows costs one add.
      // Disjoint rows are still zero in the merged op, so merging writes only this op's rows.
      const last = list.at(-1);
      if (last && last.kind === iv.op && ![...rows].some((b) => last.rows.has(b))) {
        const per = m.length / B;
        for (const b of rows) {
          last.v.set(r.vec!, b * F);
          for (let i = b * per; i < (b + 1) * per; i++) last.m[i] = m[i]!;
          last.rows.add(b);
        }
      } else {
        const v = new Float32Array(B * F);
        for (const b of rows) v.set(r.vec!, b * F);
        list.push({ kind: iv.op, v, vShape: [B, 1, ...r.featShape], m, mShape: maskShape, rows });
      }
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
          else m.fill(0, (b * T + t) * (m.length / (B * T)), (b * T + t + 1) * (m.length / (B * T))); // padding, or out of scope (resolvePlan keeps scopes within the source)
        }
      list.push({ kind: "replace", v, vShape: [B, T, ...r.featShape], m, mShape: maskShape, rows });
    }
  }
  return { host, reads: [...reads].sort() };
}

// ---------------------------------------------------------------- host helpers

export function asRow(r: Row | number[]): Row {
  return Array.isArray(r) ? { ids: r } : r;
}

export function padShape(rows: Row[]): { B: number; T: number; pad: number[] } {
  if (rows.length === 0) throw new UsageError("empty batch");
  const T = Math.max(...rows.map((r) => r.ids.length));
  if (T === 0) throw new UsageError("every row is empty");
  return { B: rows.length, T, pad: rows.map((r) => T - r.ids.length) };
}

export function fullCtx(rows: Row[], B: number, T: number, pad: number[]): CallCtx {
  return sliceCtx(rows, pad, 0, T, B);
}

/** Slots start..start+n-1 of a left-padded batch. */
export function sliceCtx(rows: Row[], pad: number[], start: number, n: number, B = rows.length): CallCtx {
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

export function lastCtx(B: number, T: number, pad: number[]): CallCtx {
  const pos = new Int32Array(B);
  for (let b = 0; b < B; b++) pos[b] = T - 1 - pad[b]!;
  return { B, T: 1, pos, ids: new Int32Array(B) };
}

export function sliceRow(lg: Float32Array, b: number, T: number, pad: number, V: number): Float32Array {
  return lg.subarray((b * T + pad) * V, (b + 1) * T * V);
}

/**
 * mask[b, t, s]: key slot s visible to query slot t. Causal, never a padding key — except a
 * padding query sees itself, so no softmax row is all -inf (which would give NaN).
 */
export function attnMaskHost(ctx: CallCtx, pad: number[], S: number, slot0: number, window: number | undefined): Int32Array {
  const { B, T } = ctx;
  const m = new Int32Array(B * T * S);
  const w = window ?? Infinity;
  for (let b = 0; b < B; b++)
    for (let t = 0; t < T; t++) {
      const qSlot = slot0 + t;
      // Slots and positions differ by the row's padding only, so slot distance = position distance.
      for (let s = Math.max(0, qSlot - w + 1); s <= qSlot; s++) if (s >= pad[b]! || s === qSlot) m[(b * T + t) * S + s] = 1;
    }
  return m;
}



export function scopeOf(spec: PosSpec, row: Row, promptLen: number, countPrefix: PrefixCounter | undefined, at: string): Scope {
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
export function scopeMask(r: Resolved, ctx: CallCtx, _promptLen: number[], maskShape: number[], heads: number[] | null = null): Float32Array {
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

/** Rows whose plan applies to batch row `row`, renumbered as row 0 (to re-run that row alone). */
export function planForRow(plan: Plan, row: number): Intervention[] {
  return plan.filter((iv) => !iv.rows || iv.rows.includes(row)).map((iv) => ({ ...iv, rows: [0] }));
}

