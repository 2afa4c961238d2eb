// The worker half of math/blackbox.ts: NLopt runs here because its objective is a synchronous
// callback, while selfscope's objectives (generate, then judge) are asynchronous. Each call posts x
// to the main thread and blocks on a shared flag until the value is written back.
import { parentPort, workerData } from "node:worker_threads";
import nlopt from "nlopt-js";

interface Job {
  algorithm: string;
  lower: number[];
  upper: number[];
  start: number[];
  maxEvals: number;
  shared: SharedArrayBuffer;
}

const job = workerData as Job;
const flag = new Int32Array(job.shared, 0, 2);
const value = new Float64Array(job.shared, 8, 1);

await nlopt.ready;
const opt = new nlopt.Optimize(nlopt.Algorithm[job.algorithm], job.lower.length);
opt.setLowerBounds(job.lower);
opt.setUpperBounds(job.upper);
opt.setMaxeval(job.maxEvals);
opt.setMaxObjective((x) => {
  Atomics.store(flag, 0, 0);
  parentPort!.postMessage({ kind: "eval", x: Array.from(x) });
  Atomics.wait(flag, 0, 0);
  if (Atomics.load(flag, 1) !== 0) throw new Error("objective failed");
  return value[0]!;
}, 0);
let result: { success: boolean; x: number[]; value: number } | null = null;
try {
  result = opt.optimize(job.start);
} catch {
  result = null;
}
nlopt.GC.flush();
parentPort!.postMessage({ kind: "done", result });
