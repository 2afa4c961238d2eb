// Numeric comparison helpers for tests. Tolerances are two-sided, |a - b| <= atol + rtol * |b|,
// and a failure message names the worst element and the first one out of tolerance, so a
// mismatch can be located without re-running under a debugger.
import assert from "node:assert/strict";

export interface CloseOptions {
  atol: number;
  rtol?: number;
  /** What is being compared (goes first in the failure message). */
  what: string;
}

/** Largest |a[i] - b[i]|; NaN anywhere (or a length mismatch) gives NaN / throws. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  return worst(a, b).max;
}

function worst(a: ArrayLike<number>, b: ArrayLike<number>): { max: number; index: number } {
  if (a.length !== b.length) throw new Error(`maxAbsDiff: lengths differ (${a.length} vs ${b.length})`);
  let max = 0;
  let index = -1;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    // NaN compares false with everything; report it as the worst element.
    if (Number.isNaN(d)) return { max: NaN, index: i };
    if (d > max || index < 0) {
      max = d;
      index = i;
    }
  }
  return { max, index };
}

const fmt = (x: number | undefined): string => (x === undefined ? "undefined" : x.toPrecision(9));

/** Assert every element of `actual` is within atol + rtol*|expected| of `expected`. */
export function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, o: CloseOptions): void {
  assert.equal(actual.length, expected.length, `${o.what}: length ${actual.length}, expected ${expected.length}`);
  const rtol = o.rtol ?? 0;
  let first = -1;
  let bad = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const b = expected[i]!;
    // Written so that NaN on either side fails (the comparison is false).
    if (!(Math.abs(a - b) <= o.atol + rtol * Math.abs(b))) {
      bad++;
      if (first < 0) first = i;
    }
  }
  if (bad === 0) return;
  const w = worst(actual, expected);
  assert.fail(
    `${o.what}: ${bad} of ${actual.length} elements out of tolerance (atol ${o.atol}, rtol ${rtol}); ` +
      `max |Δ| = ${fmt(w.max)} at index ${w.index} (actual ${fmt(actual[w.index])}, expected ${fmt(expected[w.index])}); ` +
      `first at index ${first}: actual ${fmt(actual[first])}, expected ${fmt(expected[first])}`,
  );
}
