// A CpuRuntime worker thread (see runtime.ts for the protocol): instantiates the kernel module
// on the shared memory, then loops forever: spin briefly on the generation word, sleep in
// Atomics.wait when idle, claim chunks of the published task list and run them.
import { parentPort, workerData } from "node:worker_threads";
import { type TaskListFn, type WorkerInit, claimAndRun, C } from "./runtime.js";

const init = workerData as WorkerInit;
const instance = new WebAssembly.Instance(init.module, { env: { memory: init.memory } });
const taskList = instance.exports.task_list as TaskListFn;
const ctrl = new Int32Array(init.ctrl);

let seen = Atomics.load(ctrl, C.SEQ);
parentPort?.postMessage("ready");

for (;;) {
  // Spin for up to spinMicros, then sleep until the generation changes.
  let seq = Atomics.load(ctrl, C.SEQ);
  if (seq === seen) {
    const until = performance.now() + init.spinMicros / 1000;
    for (let i = 1; ; i++) {
      seq = Atomics.load(ctrl, C.SEQ);
      if (seq !== seen) break;
      if ((i & 63) === 0 && performance.now() > until) {
        Atomics.add(ctrl, C.SLEEPERS, 1);
        Atomics.wait(ctrl, C.SEQ, seen);
        Atomics.sub(ctrl, C.SLEEPERS, 1);
        seq = Atomics.load(ctrl, C.SEQ);
        if (seq !== seen) break;
      }
    }
  }
  seen = seq;
  if (Atomics.load(ctrl, C.STOP) !== 0) break;
  const error = claimAndRun(ctrl, seq, taskList, init.scratch);
  if (error !== undefined) process.emitWarning(`CpuRuntime worker: ${String(error)}`);
}
parentPort?.close();
