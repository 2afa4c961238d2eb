// Interventions are data (a JSON-able plan plus Float32Array payloads), never callbacks: the
// engine compiles them into the jit'd layer functions, so they cost almost nothing and behave
// identically in a full forward pass, in KV-cached decoding and in left-padded batches.
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
   * indexed by absolute position (e.g. a read from another run). Positions past its end are kept.
   */
  | (Base & { op: "patch"; source: Float32Array })
  /** Zero- or mean-ablate. `heads` restricts attn.hook_z / hook_q|k|v ablations to those heads. */
  | (Base & { op: "ablate"; mode: "zero" | "mean"; mean?: Float32Array; heads?: number[] });

export type Plan = readonly Intervention[];
