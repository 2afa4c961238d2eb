// Black-box maximisation over a box with NLopt (nlopt-js: NLopt compiled to WebAssembly), for
// objectives that are asynchronous and expensive (a judged batch of generations). NLopt runs in a
// worker (math/blackbox-worker.ts) and blocks on each evaluation while this thread computes it.
// The algorithms offered are NLopt's deterministic ones, so a run is reproducible from its starting
// point, which is drawn from the seed: DIRECT-L (global, Jones et al.; ignores the start), BOBYQA
// (Powell's bounded quadratic model), Nelder-Mead and Subplex (Rowan).
import { Worker } from "node:worker_threads";
import { Rng } from "../core/rng.js";
import { UsageError } from "../core/errors.js";

export const BLACKBOX_ALGORITHMS = { "direct-l": "GN_DIRECT_L", bobyqa: "LN_BOBYQA", "nelder-mead": "LN_NELDERMEAD", sbplx: "LN_SBPLX" } as const;
export type BlackboxAlgorithm = keyof typeof BLACKBOX_ALGORITHMS;

export interface BlackboxOptions {
  lower: number[];
  upper: number[];
  algorithm?: BlackboxAlgorithm;
  maxEvals: number;
  /** Starting point (default: uniform in the box, from `seed`). */
  start?: number[];
  seed?: number;
}

export interface BlackboxResult {
  x: number[];
  value: number;
  start: number[];
  /** Every evaluation, in order. */
  evals: { x: number[]; value: number }[];
  /** NLopt's own status (false: it stopped on an error; the best evaluation is still returned). */
  success: boolean;
}

export async function maximize(f: (x: number[]) => Promise<number>, o: BlackboxOptions): Promise<BlackboxResult> {
  const n = o.lower.length;
  if (!n || o.upper.length !== n || o.lower.some((l, i) => !(l <= o.upper[i]!))) throw new UsageError("black-box search: lower and upper bounds must be the same length, with lower ≤ upper");
  if (!(o.maxEvals >= 1)) throw new UsageError(`black-box search: at least one evaluation (got ${o.maxEvals})`);
  const algorithm = o.algorithm ?? "direct-l";
  if (!(algorithm in BLACKBOX_ALGORITHMS)) throw new UsageError(`black-box search: unknown algorithm "${algorithm}" (use ${Object.keys(BLACKBOX_ALGORITHMS).join(", ")})`);
  const rng = new Rng(o.seed ?? 42);
  const start = o.start ?? o.lower.map((l, i) => l + rng.next() * (o.upper[i]! - l));
  const shared = new SharedArrayBuffer(16);
  const flag = new Int32Array(shared, 0, 2);
  const value = new Float64Array(shared, 8, 1);
  const evals: BlackboxResult["evals"] = [];
  const worker = new Worker(new URL("./blackbox-worker.js", import.meta.url), {
    workerData: { algorithm: BLACKBOX_ALGORITHMS[algorithm], lower: o.lower, upper: o.upper, start, maxEvals: o.maxEvals, shared },
  });
  try {
    return await new Promise<BlackboxResult>((resolve, reject) => {
      let failed: unknown = null;
      worker.on("message", (m: { kind: "eval"; x: number[] } | { kind: "done"; result: { success: boolean; x: number[]; value: number } | null }) => {
        if (m.kind === "eval") {
          f(m.x).then(
            (v) => {
              evals.push({ x: m.x, value: v });
              value[0] = v;
              Atomics.store(flag, 0, 1);
              Atomics.notify(flag, 0);
            },
            (e: unknown) => {
              failed = e;
              Atomics.store(flag, 1, 1);
              Atomics.store(flag, 0, 1);
              Atomics.notify(flag, 0);
            },
          );
          return;
        }
        if (failed !== null) return reject(failed instanceof Error ? failed : new Error(String(failed)));
        const best = evals.reduce((b, e) => (e.value > b.value ? e : b), evals[0] ?? { x: start, value: -Infinity });
        resolve({ x: best.x, value: best.value, start, evals, success: m.result?.success ?? false });
      });
      // A failed objective unwinds through NLopt's WebAssembly, which may end the worker with its own
      // error: report the objective's.
      worker.on("error", (e) => reject(failed instanceof Error ? failed : e));
    });
  } finally {
    await worker.terminate();
  }
}
