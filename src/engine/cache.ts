// Activations read during a run, per hook and row.
import { UsageError } from "../core/errors.js";
import type { HookName } from "../hooks/names.js";

/** Activations read during a run: per hook, per row, row-major [positions, ...feature]. */
export class ActivationCache {
  /**
   * Per hook, per row: the pieces appended so far (one per decode step), joined on first get()
   * so a long generation that reads every step costs linear, not quadratic, copying.
   * Feature shapes are per row: attention patterns are [nHeads, T_b] for a ragged batch.
   */
  readonly entries = new Map<HookName, { parts: Float32Array[]; featShape: number[] }[]>();
  get(name: HookName, row = 0): { data: Float32Array; shape: number[] } {
    const e = this.entries.get(name);
    if (!e) throw new UsageError(`activation ${name} was not read in this run; add { op: "read", at: "${name}" } to the plan`);
    const r = e[row];
    if (!r) throw new UsageError(`activation ${name}: no row ${row}`);
    if (r.parts.length > 1) {
      const cat = new Float32Array(r.parts.reduce((n, p) => n + p.length, 0));
      let o = 0;
      for (const p of r.parts) {
        cat.set(p, o);
        o += p.length;
      }
      r.parts = [cat];
    }
    const data = r.parts[0]!;
    const f = r.featShape.reduce((a, b) => a * b, 1);
    return { data, shape: [data.length / f, ...r.featShape] };
  }
  append(name: HookName, featShape: number[], row: number, data: Float32Array): void {
    let e = this.entries.get(name);
    if (!e) {
      e = [];
      this.entries.set(name, e);
    }
    const prev = e[row];
    if (!prev) e[row] = { parts: [data], featShape };
    else prev.parts.push(data);
  }
}
