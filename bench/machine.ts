// Child process: the machine's memory bandwidth, at 1 thread and at N threads, measured in the
// same run as the engines. Two kernels, the better of which is taken as the limit (a lower bound
// of the true one):
//  - read: a hand-assembled WebAssembly SIMD loop summing 256 MiB per thread with four 128-bit
//    accumulators (what a decode step does with its weights: stream them once);
//  - copy: TypedArray.prototype.set between two 256 MiB buffers (native memmove), counted as
//    read + write bytes, as STREAM's "copy" does.
// Compute: the WebAssembly SIMD multiply-add peak (a register-only loop of the kernel module's
// `peak`, 12 independent f32x4 accumulators) at 1 and N threads — the ceiling for any Wasm code on
// this machine; and the int8 products' peak (the kernel module's `peakdot`: the int8-activation
// rows' relaxed dots, i16 sums and scale dot in a register-only loop), the ceiling of the
// quantized (`native-int8`) products. The native f32 GEMM rate comes from llama.cpp's ggml in the
// llama.cpp child (its best batch; a lower bound of the native peak).
//
//   node dist/bench/machine.js --threads N --out FILE [--quick] [--compute-only]
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { CpuRuntime } from "../src/engine/cpu/runtime.js";
import { PEAK_FLOPS_PER_ITER, peakDotMacsPerIter } from "../src/engine/cpu/kernels.js";
import { cpuSeconds, log, parseChildArgs, round, writeJson } from "./common.js";

const PEAK_ITERS = 20_000_000;

const BYTES = 256 * 2 ** 20;

/** (func (param ptr end) (result f32)): sums f32x4 lanes of [ptr, end) with 4 accumulators. */
function sumModuleBytes(): Uint8Array<ArrayBuffer> {
  const leb = (n: number): number[] => {
    const out: number[] = [];
    do {
      let b = n & 0x7f;
      n >>>= 7;
      if (n) b |= 0x80;
      out.push(b);
    } while (n);
    return out;
  };
  const section = (id: number, body: number[]) => [id, ...leb(body.length), ...body];
  const str = (s: string) => [s.length, ...[...s].map((c) => c.charCodeAt(0))];
  const F32X4_ADD = [0xfd, ...leb(228)];
  const load = (offset: number) => [0xfd, 0x00, 0x04, ...leb(offset)];
  const acc = (local: number, offset: number) => [0x20, local, 0x20, 0x00, ...load(offset), ...F32X4_ADD, 0x21, local];
  const code = [
    0x01, 0x04, 0x7b, // 4 locals of v128 (locals 2..5)
    0x03, 0x40, // loop
    ...acc(2, 0), ...acc(3, 16), ...acc(4, 32), ...acc(5, 48),
    0x20, 0x00, 0x41, 0xc0, 0x00, 0x6a, 0x21, 0x00, // p += 64
    0x20, 0x00, 0x20, 0x01, 0x49, 0x0d, 0x00, // br_if 0 (p < end)
    0x0b, // end loop
    0x20, 0x02, 0x20, 0x03, ...F32X4_ADD, 0x20, 0x04, ...F32X4_ADD, 0x20, 0x05, ...F32X4_ADD,
    0xfd, 0x1f, 0x00, // f32x4.extract_lane 0
    0x0b,
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7d]),
    ...section(2, [0x01, ...str("env"), ...str("memory"), 0x02, 0x03, ...leb(1), ...leb(65536)]),
    ...section(3, [0x01, 0x00]),
    ...section(7, [0x01, ...str("sum"), 0x00, 0x00]),
    ...section(10, [0x01, ...leb(code.length), ...code]),
  ]);
}

interface Job {
  kind: "read" | "copy" | "peak" | "peakdot";
  reps: number;
  module?: WebAssembly.Module;
  memory?: WebAssembly.Memory;
  offset?: number;
  src?: SharedArrayBuffer;
  dst?: SharedArrayBuffer;
}

/** Runs one job `reps` times and returns the best time in ms. */
function runJob(j: Job, rt: CpuRuntime | null): number {
  let best = Infinity;
  if (j.kind === "peak" || j.kind === "peakdot") {
    for (let r = 0; r < j.reps; r++) {
      const t = performance.now();
      if (j.kind === "peak") rt!.peak(PEAK_ITERS);
      else rt!.peakDot(PEAK_ITERS);
      best = Math.min(best, performance.now() - t);
    }
  } else if (j.kind === "read") {
    const sum = new WebAssembly.Instance(j.module!, { env: { memory: j.memory! } }).exports.sum as (p: number, e: number) => number;
    let sink = 0;
    for (let r = 0; r < j.reps; r++) {
      const t = performance.now();
      sink += sum(j.offset!, j.offset! + BYTES);
      best = Math.min(best, performance.now() - t);
    }
    if (Number.isNaN(sink)) throw new Error("unreachable");
  } else {
    const a = new Float64Array(j.src!);
    const b = new Float64Array(j.dst!);
    for (let r = 0; r < j.reps; r++) {
      const t = performance.now();
      b.set(a);
      best = Math.min(best, performance.now() - t);
    }
  }
  return best;
}

if (!isMainThread) {
  const job = workerData as Job;
  // A 1-thread kernel runtime per worker for the peak loops, warmed up (tiered up) before "ready".
  const rt = job.kind === "peak" || job.kind === "peakdot" ? await CpuRuntime.create({ threads: 1 }) : null;
  for (let i = 0; rt && i < 50; i++) {
    if (job.kind === "peak") rt.peak(20000);
    else rt.peakDot(20000);
  }
  parentPort!.on("message", (go: boolean) => {
    if (go) parentPort!.postMessage(runJob(job, rt));
  });
  parentPort!.postMessage("ready");
} else {
  const args = parseChildArgs(process.argv.slice(2));
  const N = args.threads;
  const reps = args.quick ? 4 : 10;
  // --compute-only (the large bench, whose models fill the memory): the peaks without the 2·N·256 MiB of buffers.
  const computeOnly = args.flags.has("--compute-only");
  const module = new WebAssembly.Module(sumModuleBytes());
  const memory = new WebAssembly.Memory({ initial: computeOnly ? 1 : (N * BYTES) / 65536 + 1, maximum: 65536, shared: true });
  if (!computeOnly) new Float32Array(memory.buffer).fill(1);
  const bufs = Array.from({ length: computeOnly ? 0 : N }, () => {
    const src = new SharedArrayBuffer(BYTES);
    new Float64Array(src).fill(1);
    const dst = new SharedArrayBuffer(BYTES);
    new Float64Array(dst).fill(0);
    return { src, dst };
  });
  const self = fileURLToPath(import.meta.url);

  /** `threads` workers run the job at once (started together); the slowest one's best time counts. */
  async function parallel(kind: Job["kind"], threads: number): Promise<number> {
    const workers = Array.from({ length: threads }, (_, i) => {
      const job: Job = kind === "read" ? { kind, reps, module, memory, offset: 64 + i * BYTES } : kind === "peak" || kind === "peakdot" ? { kind, reps } : { kind, reps, src: bufs[i]!.src, dst: bufs[i]!.dst };
      return new Worker(self, { workerData: job });
    });
    await Promise.all(workers.map((w) => new Promise<void>((res) => w.once("message", () => res()))));
    const times = await Promise.all(
      workers.map(
        (w) =>
          new Promise<number>((res) => {
            w.once("message", (ms: number) => res(ms));
            w.postMessage(true);
          }),
      ),
    );
    await Promise.all(workers.map((w) => w.terminate()));
    return Math.max(...times);
  }

  const out: Record<string, { ms: number; GBps: number }> = {};
  for (const th of computeOnly ? [] : [...new Set([1, N])]) {
    const r = await parallel("read", th);
    out[`read_t${th}`] = { ms: round(r, 1), GBps: round((th * BYTES) / r / 1e6, 2) };
    const c = await parallel("copy", th);
    out[`copy_t${th}`] = { ms: round(c, 1), GBps: round((2 * th * BYTES) / c / 1e6, 2) };
    log("machine", `memory at ${th} thread(s): wasm-SIMD read ${out[`read_t${th}`]!.GBps} GB/s, memmove copy ${out[`copy_t${th}`]!.GBps} GB/s (read+write)`);
  }
  const best = (th: number) => (computeOnly ? null : Math.max(out[`read_t${th}`]!.GBps, out[`copy_t${th}`]!.GBps));
  const wasmPeak: Record<string, number> = {};
  for (const th of [...new Set([1, N])]) {
    const ms = await parallel("peak", th);
    wasmPeak[`t${th}`] = round((th * PEAK_ITERS * PEAK_FLOPS_PER_ITER) / ms / 1e6, 1);
    log("machine", `wasm SIMD multiply-add peak at ${th} thread(s): ${wasmPeak[`t${th}`]} GFLOP/s`);
  }
  // The int8 products' peak: products per iteration depend on whether this engine has the relaxed dot.
  const probe = await CpuRuntime.create({ threads: 1 });
  const relaxedDot = probe.simd.includes("+relaxed-dot");
  await probe.dispose();
  const dotPeak: Record<string, number> = {};
  for (const th of [...new Set([1, N])]) {
    const ms = await parallel("peakdot", th);
    dotPeak[`t${th}`] = round((th * PEAK_ITERS * peakDotMacsPerIter(relaxedDot)) / ms / 1e6, 1);
    log("machine", `wasm int8 products peak (${relaxedDot ? "relaxed i8 dot" : "i16 dot"}) at ${th} thread(s): ${dotPeak[`t${th}`]} G products/s`);
  }
  writeJson(args.out, {
    threads: N,
    bytesPerThread: BYTES,
    kernels: out,
    bandwidthGBps: { t1: best(1), tN: best(N) },
    wasmPeakGflops: { t1: wasmPeak.t1!, tN: wasmPeak[`t${N}`]! },
    wasmInt8PeakGmacs: { t1: dotPeak.t1!, tN: dotPeak[`t${N}`]!, relaxedDot },
    cpuS: cpuSeconds(),
  });
  process.exit(0);
}
