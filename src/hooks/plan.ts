// Interventions are data (a JSON-able plan plus Float32Array payloads), never callbacks: the
// engine compiles them into the jit'd layer functions, so they cost almost nothing and behave
// identically in a full forward pass, in KV-cached decoding and in left-padded batches.
import { UsageError } from "../core/errors.js";
import type { HookName } from "./names.js";

/**
 * Which positions an intervention touches. Positions are absolute token indices within a row
 * (0 = the row's first real token; left padding is never touched).
 * - "all": every prompt and generated token; "prompt" / "generated": one part only;
 * - { from, to? }: positions from..to-1 (to open = through generation);
 * - { marker, offset? }: from the first token of the first occurrence of `marker` in the
 *   row's text (resolved after templating by tokenizing the text before it), plus `offset`
 *   (the protocol's "token before 'Trial n'" is { marker: "Trial 1", offset: -1 }).
 */
export type PosSpec = "all" | "prompt" | "generated" | { from: number; to?: number } | { marker: string; offset?: number; to?: number };

interface Base {
  at: HookName;
  pos?: PosSpec;
  /** Batch rows this applies to (default: all rows). */
  rows?: number[];
}

export type Intervention =
  /** Record the activation (returned in the activation cache under `at`). */
  | (Base & { op: "read" })
  /** x += scale * vector. */
  | (Base & { op: "add"; vector: Float32Array; scale?: number })
  /**
   * Remove the component along `direction` (normalized by the engine): x -= scale · (x·u) u.
   * scale 1 (default) removes it entirely; abliteration weights layers with 0 < scale <= 1.
   */
  | (Base & { op: "project"; direction: Float32Array; scale?: number })
  /**
   * Replace the activation with a stored one: `source` is row-major [positions, ...feature]
   * indexed by absolute position (e.g. a read from another run). The scope must stay within the
   * source's positions (a generate call runs prompt and fed-back positions): anything else is an error.
   */
  | (Base & { op: "patch"; source: Float32Array })
  /** Zero- or mean-ablate. `heads` restricts attn.hook_z / hook_q|k|v ablations to those heads. */
  | (Base & { op: "ablate"; mode: "zero" | "mean"; mean?: Float32Array; heads?: number[] });

export type Plan = readonly Intervention[];

export const OPS = ["read", "add", "project", "patch", "ablate"] as const;

/**
 * Check that an intervention is one of the ops with the payloads that op needs: plans also come
 * from JSON and untyped callers, and a typo must not end in a TypeError deep in an engine or in
 * an op that silently does something else. Called when a plan is resolved, for every engine.
 */
export function checkIntervention(iv: Intervention, i: number): void {
  const o = iv as unknown as Record<string, unknown>;
  const op = o.op;
  const where = `plan[${i}] (${typeof op === "string" ? op : JSON.stringify(op)} at ${String(o.at)})`;
  if (!(OPS as readonly unknown[]).includes(op)) throw new UsageError(`${where}: unknown op ${JSON.stringify(op)}; use one of ${OPS.join(", ")}`);
  const f32 = (k: string) => {
    if (!(o[k] instanceof Float32Array)) throw new UsageError(`${where}: ${k} must be a Float32Array, got ${o[k] === undefined ? "nothing" : typeof o[k]}`);
  };
  const num = (k: string) => {
    if (o[k] !== undefined && typeof o[k] !== "number") throw new UsageError(`${where}: ${k} must be a number, got ${typeof o[k]}`);
  };
  if (op === "add") {
    f32("vector");
    num("scale");
  } else if (op === "project") {
    f32("direction");
    num("scale");
  } else if (op === "patch") f32("source");
  else if (op === "ablate") {
    if (o.mode !== "zero" && o.mode !== "mean") throw new UsageError(`${where}: mode must be "zero" or "mean", got ${JSON.stringify(o.mode)}`);
    if (o.mean !== undefined) f32("mean");
    if (o.heads !== undefined && !(Array.isArray(o.heads) && o.heads.every((h) => Number.isInteger(h)))) throw new UsageError(`${where}: heads must be a list of head indices`);
  }
  if (o.rows !== undefined && !(Array.isArray(o.rows) && o.rows.every((r) => Number.isInteger(r)))) throw new UsageError(`${where}: rows must be a list of batch row indices`);
}

/**
 * The first position a patch would write without a stored value: the positions a call runs in a
 * row are [0, end), the patch's scope is [from, to); the source holds `have` positions. null if none.
 */
export function patchOverrun(scope: { from: number; to: number } | null, end: number, have: number): number | null {
  if (!scope) return null;
  const last = Math.min(scope.to, end) - 1;
  return last >= Math.max(scope.from, have) ? Math.max(scope.from, have) : null;
}
