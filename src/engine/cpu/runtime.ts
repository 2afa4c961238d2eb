// CpuRuntime: one WebAssembly.Memory (shared when threads > 1), a stack allocator on it, and a
// GEMM (Y = X · Wᵀ, W stored [N, K] row-major) run by hand-written Wasm SIMD kernels
// (kernels.ts) on the main thread plus a pool of worker_threads (worker.ts).
//
// Threading protocol (control words in a separate SharedArrayBuffer, indices in C):
//  - A dispatch publishes a list of tasks (gemm pieces, and the row and attention tasks of
//    kernels.ts TASK; TASK_WORDS i32 each, in a reserved area of the memory) and
//    a new generation number g: NEXT = g << IDX_BITS, then SEQ = g, then Atomics.notify if some
//    worker sleeps. Every thread, the main thread included, then claims chunks of the list by
//    compare-exchange on NEXT (which carries g, so a late worker can never claim from a newer
//    generation with stale parameters) and adds the number of finished tasks to FIN.
//  - The main thread runs its own claims, then waits (spin, then Atomics.wait) until
//    FIN = count, and closes the generation (NEXT = -1) before writing the next list.
//  - Workers spin on SEQ for `spinMicros` after each dispatch, then sleep in Atomics.wait. The
//    main thread never waits for an idle worker to wake up: unclaimed work is simply done by
//    whoever gets there first, so a sleeping worker costs at most its share of parallelism.
//  - Workers are unref()'d: a forgotten dispose() does not keep the process alive. They are
//    started with execArgv: [] (the parent's --input-type / --import flags are not for them).
//
// Work splitting: a big gemm becomes pieces of W rows (N), claimed dynamically. When X is
// tall enough for the packed path, the main thread packs it once (kernels.ts packx) and the
// pieces share it, so pieces can be small (16 per thread): the threads finish together. Every
// piece takes the same kernel path as the whole: results are bitwise identical for any
// thread count.
// gemmBatch splits only its big members (by N) and hands out chunks of the list; attention
// hands out one task per (row, head) pair; gatedRows / rmsnormRows split rows (from 32K values).
//
// Rules for callers: call the runtime only from the thread that created it; Y must not overlap
// X or W; re-read `f32` after any alloc (growth replaces the buffer). A multi-threaded gemm
// allocates its packed X too, but then the memory is shared, and views of a shared memory stay
// valid for everything they covered.
// create() turns on V8's --experimental-wasm-relaxed-simd (process-wide) on Node 20.
//
// Measured on the 2-core EPYC (Zen 4) this was written on (bench/gemm.ts): 1 thread 47-51
// GFLOP/s for M >= 64 (register-only peak 58), 2 threads 93-101; M = 1 streams weights at
// 28-29 GB/s (1 thread) and 35-39 GB/s (2 threads); 2-thread dispatch of a 1x768x768 gemm
// takes 27 µs vs 47 µs on 1 thread.
import os from "node:os";
import { Worker } from "node:worker_threads";
import { ACCUMULATE, buildKernelModule, DEFAULT_KERNEL, gemmScratchBytes, type KernelOptions, MAX_PAGES, PACKED_X, packedXBytes, QUANT_TASK, relaxedDotProbeBytes, relaxedProbeBytes, scratchBytes, TASK, TASK_WORDS } from "./kernels.js";
import { DEQ_BYTES, deqRowsFor, INT8_ACT, MAX_Q8_K, q8actRowBytes, QUANT_BLOCK, QUANT_EXPORTS, quantBytes } from "./qkernels.js";
import type { QuantReadIo, QuantType } from "../weights.js";

export interface Gemm {
  x: number;
  ldx: number;
  w: number;
  ldw: number;
  y: number;
  ldy: number;
  M: number;
  N: number;
  K: number;
  accumulate?: boolean;
}

/**
 * Y = X · Wᵀ with W [N, K] held in a quantized layout (qkernels.ts; type default "q8_0"): x, y and
 * the strides in floats like Gemm; wq and ws (the quants and the scales, quantBytes) as BYTE
 * offsets; K a multiple of QUANT_BLOCK[type].
 */
export interface QGemm extends Omit<Gemm, "w" | "ldw"> {
  type?: QuantType;
  /** int8-quantized activations (qkernels.ts INT8_ACT): Q4_K / Q5_K / Q6_K rows at any M, Q8_0 (K % 256 == 0) at decode sizes (M below the packed path). */
  int8?: boolean;
  wq: number;
  ws: number;
}

export type { QuantType };


/** One (row, head) pair of attention; element offsets (see kernels.ts TASK.ATTENTION). */
export interface AttentionTask {
  /** Queries [T, hd], rows ldq apart; z (the output) has the same layout. */
  q: number;
  ldq: number;
  /** Keys [S, hd] (rows hd apart) and values transposed [hd, S] (rows ldv apart). */
  k: number;
  v: number;
  ldv: number;
  /** Scratch for the [T, S] scores. */
  scores: number;
  z: number;
  T: number;
  S: number;
  hd: number;
  /** Query t sits in slot slot0 + t and sees keys max(pad, slot - window + 1)..slot. */
  slot0: number;
  pad: number;
  window: number;
  scale: number;
}

export interface CpuRuntimeOptions {
  /** Threads including the main thread (default os.availableParallelism()). */
  threads?: number;
  /** Force (true) or forbid (false) f32x4.relaxed_madd; default: use it when the engine has it. */
  relaxed?: boolean;
  /** Forbid (false) i16x8.relaxed_dot_i8x16_i7x16_s in the int8-activation rows; default: use it when the engine has it and it passes a check (true: require it). */
  relaxedDot?: boolean;
  /** How long a worker spins after a dispatch before sleeping (default 100 µs). */
  spinMicros?: number;
  /** Pieces per thread a big gemm is split into (for tuning; default 16 on the packed path, else 4). */
  piecesPerThread?: number;
  /** Kernel blocking parameters (for tuning; defaults are the fastest measured). */
  kernel?: Partial<Omit<KernelOptions, "relaxed" | "relaxedDot" | "shared">>;
}

/** Control-word indices in the control SharedArrayBuffer. */
export const C = { SEQ: 0, NEXT: 1, FIN: 2, LIST: 3, COUNT: 4, CHUNK: 5, STOP: 6, SLEEPERS: 7, ERROR: 8, WORDS: 16 } as const;
const IDX_BITS = 13; // list indices < 8192 (LIST_CAP <= 8191)
const IDX_MASK = (1 << IDX_BITS) - 1;
const GEN_MASK = (1 << (31 - IDX_BITS)) - 1;
const LIST_CAP = 4096; // gemms per dispatch
const LIST_BYTE = 64; // the list area starts here; then one scratch area per thread, then the heap
const SCRATCH_BYTE = LIST_BYTE + LIST_CAP * TASK_WORDS * 4;
const PAGE = 65536;
const MAX_BYTES = MAX_PAGES * PAGE;
/** Below this many flops a gemm (or a batch) runs on the main thread alone. */
const PARALLEL_FLOPS = 1 << 18;
/** Below this many values a row task (RMSNorm, gated activation) runs on the main thread alone. */
const PARALLEL_ROW_WORK = 1 << 15;
/** The OS page (the unit of first-touch faults) and the least a prefault shares out (smaller: the writes fault them as cheaply). */
const PAGE_BYTES = 4096;
const TOUCH_MIN_BYTES = 1 << 20;

/**
 * Ends of the pieces of N rows for `threads` threads, largest first: each piece is the remaining
 * rows over 2·threads (at least N / (4·pieces)), so the last pieces, the ones a thread may be left
 * alone with, are small.
 */
export function guidedCuts(N: number, threads: number, pieces: number): number[] {
  const min = Math.max(1, Math.ceil(N / (4 * pieces)));
  const cuts: number[] = [];
  for (let n0 = 0; n0 < N; ) {
    n0 = Math.min(N, n0 + Math.max(min, Math.ceil((N - n0) / (2 * threads))));
    cuts.push(n0);
  }
  return cuts;
}

export interface WorkerInit {
  module: WebAssembly.Module;
  memory: WebAssembly.Memory;
  ctrl: SharedArrayBuffer;
  spinMicros: number;
  /** Byte offset of this worker's kernel scratch area. */
  scratch: number;
}

/**
 * Claims chunks of generation `gen`'s list and runs them until none are left (or the
 * generation is over). Shared by the main thread and the workers. A failing chunk (a Wasm
 * trap: cannot happen with checked arguments) still counts as finished, so nobody waits
 * forever; the first error is returned and C.ERROR is set.
 */
export function claimAndRun(ctrl: Int32Array, gen: number, taskList: TaskListFn, scratch: number): unknown {
  const ptr = Atomics.load(ctrl, C.LIST);
  const count = Atomics.load(ctrl, C.COUNT);
  const chunk = Atomics.load(ctrl, C.CHUNK);
  const base = gen << IDX_BITS;
  let error: unknown;
  for (;;) {
    const v = Atomics.load(ctrl, C.NEXT);
    if (v < 0 || v >>> IDX_BITS !== gen) return error;
    const i = v & IDX_MASK;
    if (i >= count) return error;
    const e = Math.min(i + chunk, count);
    if (Atomics.compareExchange(ctrl, C.NEXT, v, base | e) !== v) continue;
    try {
      taskList(ptr + i * TASK_WORDS * 4, e - i, scratch);
    } catch (err) {
      Atomics.store(ctrl, C.ERROR, 1);
      error ??= err;
    }
    if (Atomics.add(ctrl, C.FIN, e - i) + (e - i) === count) Atomics.notify(ctrl, C.FIN);
  }
}

type QGemmFn = (x: number, ldx: number, wq: number, ws: number, y: number, ldy: number, M: number, N: number, K: number, flags: number, scratch: number, deq: number, deqRows: number) => void;
type DeqFn = (wq: number, ws: number, rows: number, K: number, dst: number) => void;
/** The loader's repack kernels (qkernels.ts emitRepackKernels): (src, blocks, quants, scales) -> first non-finite block or -1. */
type RepackFn = (src: number, nb: number, dq: number, ds: number) => number;
type GemmFn = (x: number, ldx: number, w: number, ldw: number, y: number, ldy: number, M: number, N: number, K: number, acc: number, scratch: number) => void;
export type TaskListFn = (ptr: number, count: number, scratch: number) => void;
type PackxFn = (x: number, ldx: number, M: number, K: number, dst: number) => void;

let relaxedFlagSet = false;
async function relaxedAvailable(): Promise<boolean> {
  if (!relaxedFlagSet) {
    relaxedFlagSet = true;
    // Node 20 (V8 11.3) ships relaxed SIMD behind a flag; newer Node has it on by default.
    try {
      const v8 = await import("node:v8");
      v8.setFlagsFromString("--experimental-wasm-relaxed-simd");
    } catch {
      // not Node, or flags are frozen: validate() below decides
    }
  }
  return WebAssembly.validate(relaxedProbeBytes());
}

/** Whether i16x8.relaxed_dot_i8x16_i7x16_s compiles and gives the exact dot on its deterministic range (kernels.ts relaxedDotProbeBytes); checked once per process. */
let relaxedDotChecked: boolean | undefined;
function relaxedDotWorks(): boolean {
  relaxedDotChecked ??= probeRelaxedDot();
  return relaxedDotChecked;
}
function probeRelaxedDot(): boolean {
  try {
    const memory = new WebAssembly.Memory({ initial: 1, maximum: 1 });
    const inst = new WebAssembly.Instance(new WebAssembly.Module(relaxedDotProbeBytes()), { env: { memory } });
    const i8 = new Int8Array(memory.buffer);
    const a = [-127, 127, -1, 5, 0, -64, 99, -128, 13, -13, 127, 127, -127, -127, 1, 2];
    const b = [127, 127, 63, 0, 1, 15, 31, 7, 100, 100, 127, 126, 127, 1, 0, 64];
    i8.set(a, 0);
    i8.set(b, 16);
    (inst.exports.dot as () => void)();
    const out = new Int16Array(memory.buffer, 32, 8);
    for (let k = 0; k < 8; k++) if (out[k] !== a[2 * k]! * b[2 * k]! + a[2 * k + 1]! * b[2 * k + 1]!) return false;
    return true;
  } catch {
    return false;
  }
}

export class CpuRuntime {
  readonly threads: number;
  readonly simd: string;
  /** The memory every kernel runs on (shared when threads > 1). */
  readonly memory: WebAssembly.Memory;
  private readonly module: WebAssembly.Module;
  private readonly gemmFn: GemmFn;
  /** Each quantized type's driver and dequantization kernel (qkernels.ts QUANT_EXPORTS). */
  private readonly quant: Record<QuantType, { gemm: QGemmFn; deq: DeqFn }>;
  private gemmScratch = 0; // bytes of a thread's scratch before its dequantization area
  private readonly taskListFn: TaskListFn;
  private readonly packxFn: PackxFn;
  /** q8act(px, ldx, M, K, dst): X into the int8-activation layout (same signature as packx). */
  private readonly q8actFn: PackxFn;
  /** q8act32: the same for the Q8_0 rows (per 32, as llama.cpp's q8_0). */
  private readonly q8act32Fn: PackxFn;
  private readonly scratch: number; // the main thread's scratch (bytes)
  private readonly heapStart: number; // bytes
  private readonly peakFn: (iters: number) => number;
  private readonly peakDotFn: (iters: number) => number;
  /** The loader's repack kernel of each type it has one for, and the type's block size in the file (bytes). */
  private readonly repackFns: Partial<Record<QuantType, { fn: RepackFn; fileBlock: number }>>;
  private readonly ctrl: Int32Array;
  private readonly workers: Worker[];
  private view: Float32Array;
  private iview: Int32Array;
  private viewBuffer: ArrayBufferLike;
  private top: number; // bytes
  private hwm: number; // bytes ever handed out (above it the memory is still zero)
  private gen = 0;
  private disposed = false;
  private piecesPerThread: number | undefined;
  private packMinM = DEFAULT_KERNEL.packMinM;
  private kernel: Pick<KernelOptions, "kc"> = DEFAULT_KERNEL;
  /**
   * Counters since creation (for profiles): parallel dispatches, and the time the main thread
   * spent idle at their ends, waiting for other threads' last pieces (load imbalance).
   */
  readonly stats = { dispatches: 0, waitMs: 0 };

  private constructor(threads: number, simd: string, memory: WebAssembly.Memory, module: WebAssembly.Module, instance: WebAssembly.Instance, ctrl: Int32Array, workers: Worker[], heapStart: number) {
    this.threads = threads;
    this.simd = simd;
    this.memory = memory;
    this.module = module;
    const ex = instance.exports;
    this.gemmFn = ex.gemm as GemmFn;
    const of = (names: { gemm: string; deq: string }) => ({ gemm: ex[names.gemm] as QGemmFn, deq: ex[names.deq] as DeqFn });
    this.quant = { q8_0: of(QUANT_EXPORTS.q8_0), q4_0: of(QUANT_EXPORTS.q4_0), q4_k: of(QUANT_EXPORTS.q4_k), q6_k: of(QUANT_EXPORTS.q6_k), bf16: of(QUANT_EXPORTS.bf16), f16: of(QUANT_EXPORTS.f16), q5_k: of(QUANT_EXPORTS.q5_k) };
    this.taskListFn = ex.task_list as TaskListFn;
    this.packxFn = ex.packx as PackxFn;
    this.q8actFn = ex.q8act as PackxFn;
    this.q8act32Fn = ex.q8act32 as PackxFn;
    this.scratch = SCRATCH_BYTE;
    this.heapStart = heapStart;
    this.top = heapStart;
    this.hwm = heapStart;
    this.peakFn = ex.peak as (iters: number) => number;
    this.peakDotFn = ex.peakdot as (iters: number) => number;
    this.repackFns = {
      q8_0: { fn: ex.splitq8 as RepackFn, fileBlock: 34 },
      q4_0: { fn: ex.splitq4 as RepackFn, fileBlock: 18 },
      q4_k: { fn: ex.repackq4k as RepackFn, fileBlock: 144 },
      q5_k: { fn: ex.repackq5k as RepackFn, fileBlock: 176 },
      q6_k: { fn: ex.repackq6k as RepackFn, fileBlock: 210 },
    };
    this.ctrl = ctrl;
    this.workers = workers;
    this.viewBuffer = memory.buffer;
    this.view = new Float32Array(this.viewBuffer);
    this.iview = new Int32Array(this.viewBuffer);
  }

  static async create(opts: CpuRuntimeOptions = {}): Promise<CpuRuntime> {
    const threads = opts.threads ?? os.availableParallelism();
    if (!Number.isInteger(threads) || threads < 1) throw new Error(`CpuRuntime: threads must be a positive integer, got ${threads}`);
    const spinMicros = opts.spinMicros ?? 100;
    const hasRelaxed = await relaxedAvailable();
    if (opts.relaxed === true && !hasRelaxed) throw new Error("CpuRuntime: relaxed SIMD requested but this engine does not support f32x4.relaxed_madd");
    const relaxed = opts.relaxed ?? hasRelaxed;
    const hasDot = hasRelaxed && relaxedDotWorks();
    if (opts.relaxedDot === true && !hasDot) throw new Error("CpuRuntime: relaxedDot requested but this engine lacks a working i16x8.relaxed_dot_i8x16_i7x16_s");
    const relaxedDot = opts.relaxedDot ?? hasDot;
    const shared = threads > 1;
    const kernel: KernelOptions = { ...DEFAULT_KERNEL, ...opts.kernel, relaxed, relaxedDot, shared };
    const module = await WebAssembly.compile(buildKernelModule(kernel));
    const scratchSize = Math.ceil(scratchBytes(kernel) / 64) * 64;
    const heapStart = SCRATCH_BYTE + threads * scratchSize;
    if (heapStart > MAX_BYTES / 2) throw new Error(`CpuRuntime: ${threads} threads need too much scratch memory`);
    const initialPages = Math.ceil((heapStart + (16 << 20)) / PAGE);
    const memory = new WebAssembly.Memory({ initial: initialPages, maximum: MAX_PAGES, shared } as WebAssembly.MemoryDescriptor);
    const instance = await WebAssembly.instantiate(module, { env: { memory } });
    const ctrlBuf = new SharedArrayBuffer(C.WORDS * 4);
    const ctrl = new Int32Array(ctrlBuf);
    Atomics.store(ctrl, C.NEXT, -1);

    const workers: Worker[] = [];
    try {
      for (let t = 1; t < threads; t++) {
        const init: WorkerInit = { module, memory, ctrl: ctrlBuf, spinMicros, scratch: SCRATCH_BYTE + t * scratchSize };
        // execArgv: [] — the parent's flags (e.g. --input-type, --import hooks) are not for the
        // worker; V8 flags (relaxed SIMD) are process-wide anyway.
        workers.push(new Worker(new URL("./worker.js", import.meta.url), { workerData: init, execArgv: [] }));
      }
      await Promise.all(
        workers.map(
          (w, t) =>
            new Promise<void>((resolve, reject) => {
              w.once("message", () => resolve());
              w.once("error", (e) => reject(new Error(`CpuRuntime: worker ${t + 1} failed to start: ${String(e)}`)));
              w.once("exit", (code) => reject(new Error(`CpuRuntime: worker ${t + 1} exited with code ${code} while starting`)));
            }),
        ),
      );
    } catch (e) {
      Atomics.store(ctrl, C.STOP, 1);
      await Promise.all(workers.map((w) => w.terminate()));
      throw e;
    }
    for (const w of workers) {
      w.removeAllListeners("error");
      w.removeAllListeners("exit");
      // A worker error after start-up is reported by claimAndRun through C.ERROR; keep the
      // process from crashing on an 'error' event nobody listens to.
      w.on("error", () => Atomics.store(ctrl, C.ERROR, 1));
      w.unref();
    }
    const simd = (relaxed ? "wasm-simd128+relaxed-madd" : "wasm-simd128") + (relaxedDot ? "+relaxed-dot" : "");
    const rt = new CpuRuntime(threads, simd, memory, module, instance, ctrl, workers, heapStart);
    rt.piecesPerThread = opts.piecesPerThread;
    rt.packMinM = kernel.packMinM;
    rt.kernel = kernel;
    rt.gemmScratch = gemmScratchBytes(kernel);
    rt.warmUp();
    return rt;
  }

  /** View of the whole memory (re-created after growth). */
  get f32(): Float32Array {
    if (this.memory.buffer !== this.viewBuffer) this.refreshViews();
    return this.view;
  }

  private refreshViews(): void {
    this.viewBuffer = this.memory.buffer;
    this.view = new Float32Array(this.viewBuffer);
    this.iview = new Int32Array(this.viewBuffer);
  }

  /** Floats of memory currently available (the memory grows on alloc). */
  get sizeFloats(): number {
    if (this.memory.buffer !== this.viewBuffer) this.refreshViews();
    return this.view.length;
  }

  /** Allocates nFloats zero-filled floats; returns their element offset (64-byte aligned). */
  alloc(nFloats: number): number {
    return this.allocate(nFloats, true);
  }

  /** alloc without the zero fill, for buffers the caller writes in full before reading. */
  allocUninitialized(nFloats: number): number {
    return this.allocate(nFloats, false);
  }

  private allocate(nFloats: number, zero: boolean): number {
    if (!Number.isInteger(nFloats) || nFloats < 0) throw new Error(`CpuRuntime.alloc: nFloats must be a non-negative integer, got ${nFloats}`);
    const start = Math.ceil(this.top / 64) * 64;
    const end = start + nFloats * 4;
    if (end > MAX_BYTES) {
      throw new Error(`CpuRuntime.alloc: ${nFloats} floats (${(nFloats * 4 / 2 ** 20).toFixed(1)} MiB) at offset ${(start / 2 ** 20).toFixed(1)} MiB would exceed the 4 GiB limit of wasm32 memory`);
    }
    const have = this.memory.buffer.byteLength;
    if (end > have) {
      // Grow at least by half of the current size, to keep the number of grows small.
      const want = Math.min(MAX_PAGES, Math.max(Math.ceil(end / PAGE), Math.ceil((have * 1.5) / PAGE)));
      const delta = want - have / PAGE;
      try {
        this.memory.grow(delta);
      } catch (e) {
        // Retry with exactly what is needed before giving up.
        const need = Math.ceil(end / PAGE) - have / PAGE;
        try {
          this.memory.grow(need);
        } catch {
          throw new Error(`CpuRuntime.alloc: cannot grow the memory to ${(end / 2 ** 20).toFixed(1)} MiB: ${String(e)}`);
        }
      }
    }
    if (zero && start < this.hwm) this.f32.fill(0, start / 4, Math.min(end, this.hwm) / 4);
    this.top = end;
    if (end > this.hwm) this.hwm = end;
    return start / 4;
  }

  /** The current allocation top (an element offset), for release(). */
  mark(): number {
    return this.top / 4;
  }

  /** Frees everything allocated after mark() returned m. */
  release(m: number): void {
    if (!Number.isInteger(m) || m * 4 < this.heapStart || m * 4 > this.top) throw new Error(`CpuRuntime.release: ${m} is not a mark at or below the current top ${this.top / 4}`);
    this.top = m * 4;
  }

  private check(g: Gemm, what: string): void {
    const { x, ldx, w, ldw, y, ldy, M, N, K } = g;
    const ok = (v: number) => Number.isInteger(v) && v >= 0;
    if (!(ok(x) && ok(ldx) && ok(w) && ok(ldw) && ok(y) && ok(ldy) && ok(M) && ok(N) && ok(K))) {
      throw new Error(`CpuRuntime.${what}: offsets, strides and sizes must be non-negative integers, got ${JSON.stringify(g)}`);
    }
    if (M === 0 || N === 0) return;
    const size = this.sizeFloats;
    if (K > 0 && x + (M - 1) * ldx + K > size) throw new Error(`CpuRuntime.${what}: X [${M} x ${K}] at ${x} (ld ${ldx}) is outside the memory (${size} floats)`);
    if (K > 0 && w + (N - 1) * ldw + K > size) throw new Error(`CpuRuntime.${what}: W [${N} x ${K}] at ${w} (ld ${ldw}) is outside the memory (${size} floats)`);
    if (y + (M - 1) * ldy + N > size) throw new Error(`CpuRuntime.${what}: Y [${M} x ${N}] at ${y} (ld ${ldy}) is outside the memory (${size} floats)`);
  }

  /** Y = X · Wᵀ (+ Y if accumulate); see Gemm. Synchronous; uses all threads when big enough. */
  gemm(g: Gemm): void {
    this.assertLive();
    this.check(g, "gemm");
    const { M, N, K } = g;
    if (M === 0 || N === 0) return;
    const flops = 2 * M * N * K;
    const flags = g.accumulate ? ACCUMULATE : 0;
    if (this.threads === 1 || flops < PARALLEL_FLOPS) {
      this.gemmFn(g.x * 4, g.ldx * 4, g.w * 4, g.ldw * 4, g.y * 4, g.ldy * 4, M, N, K, flags, this.scratch);
      return;
    }
    // Split by N into pieces of W rows, claimed dynamically (a late or slowed thread costs
    // little), in multiples of 4 columns. On the packed path the main thread packs X once
    // and every piece reads that: pieces then cost no re-packing, so they can be small enough
    // for the threads to finish together (with 2 pieces per thread, each packing its own X,
    // prefill waited 10-30 ms per pass for the slower thread on this VM).
    const packed = M >= this.packMinM && K >= 4;
    const mark = this.mark();
    try {
      const xp = packed ? this.allocUninitialized(packedXBytes(this.kernel, M, K) / 4) : 0;
      if (packed) this.packxFn(g.x * 4, g.ldx * 4, M, K, xp * 4);
      this.ints(); // fresh views after the allocation
      const perThread = this.piecesPerThread ?? (packed ? 16 : 4);
      const pieces = Math.max(1, Math.min(this.threads * perThread, Math.floor(N / 4), Math.floor(flops / PARALLEL_FLOPS)));
      const step = Math.ceil(N / pieces / 4) * 4;
      let count = 0;
      for (let n0 = 0; n0 < N; n0 += step, count++) {
        if (packed) this.putGemmPiece(count, g, n0, Math.min(step, N - n0), xp, 0, flags | PACKED_X);
        else this.putGemmPiece(count, g, n0, Math.min(step, N - n0), g.x, g.ldx, flags);
      }
      this.dispatch(LIST_BYTE, count, 1);
    } finally {
      this.release(mark);
    }
  }

  /** Y = X · Wᵀ (+ Y) on Q8_0 weights (see QGemm). Synchronous; uses all threads when big enough. */
  qgemm(g: QGemm): void {
    this.assertLive();
    const { M, N, K } = g;
    const type = g.type ?? "q8_0";
    const block = QUANT_BLOCK[type];
    const ok = (v: number) => Number.isInteger(v) && v >= 0;
    if (![g.x, g.ldx, g.wq, g.ws, g.y, g.ldy, M, N, K].every(ok) || K % block !== 0 || K > MAX_Q8_K || g.ws % 4 !== 0) {
      throw new Error(`CpuRuntime.qgemm: offsets and sizes must be non-negative integers, K a multiple of ${block} (at most ${MAX_Q8_K}), ws 4-byte aligned; got ${JSON.stringify(g)}`);
    }
    if (M === 0 || N === 0) return;
    const bytes = this.memory.buffer.byteLength;
    const qb = quantBytes(type, N, K);
    const rowQ = quantBytes(type, 1, K);
    if (g.wq + qb.wq > bytes || g.ws + qb.ws > bytes || 4 * (g.x + (M - 1) * g.ldx + K) > bytes || 4 * (g.y + (M - 1) * g.ldy + N) > bytes) {
      throw new Error(`CpuRuntime.qgemm: an operand lies outside the memory (${bytes} bytes): ${JSON.stringify(g)}`);
    }
    const flops = 2 * M * N * K;
    // The int8-activation rows quantize X into the dequantization area: more rows than fit run in slices.
    // At prefill sizes they replace the dequantized f32 GEMM only where they are faster: Q4_K and
    // Q5_K (Q4_K 1.4-1.9x at M = 32-128 on the bench shapes, two rows per pass) and Q6_K since its layout
    // change (1.2-1.3x); on Q8_0 the GEMM stays ahead (0.85x). docs/cpu-engine.md has the figures.
    const int8 = g.int8 === true && (type === "q4_k" || type === "q5_k" || type === "q6_k" || (M < this.packMinM && type === "q8_0" && K % 256 === 0));
    const fit = int8 ? Math.floor(DEQ_BYTES / q8actRowBytes(K)) : Infinity;
    if (int8 && M > fit) {
      for (let m0 = 0; m0 < M; m0 += fit) this.qgemm({ ...g, x: g.x + m0 * g.ldx, y: g.y + m0 * g.ldy, M: Math.min(fit, M - m0) });
      return;
    }
    const flags = (g.accumulate ? ACCUMULATE : 0) | (int8 ? INT8_ACT : 0);
    const deqRows = deqRowsFor(K);
    const fn = this.quant[type].gemm;
    if (this.threads === 1 || flops < PARALLEL_FLOPS) {
      fn(g.x * 4, g.ldx * 4, g.wq, g.ws, g.y * 4, g.ldy * 4, M, N, K, flags, this.scratch, this.scratch + this.gemmScratch, deqRows);
      return;
    }
    // As gemm: pieces of W rows claimed dynamically; X packed once for the packed path, or
    // quantized once for the int8 rows (each piece would otherwise quantize all of X again).
    const packed = M >= this.packMinM || int8;
    const mark = this.mark();
    try {
      const xp = !packed ? 0 : this.allocUninitialized((int8 ? M * q8actRowBytes(K) : packedXBytes(this.kernel, M, K)) / 4);
      if (int8) (type === "q8_0" ? this.q8act32Fn : this.q8actFn)(g.x * 4, g.ldx * 4, M, K, xp * 4);
      else if (packed) this.packxFn(g.x * 4, g.ldx * 4, M, K, xp * 4);
      this.ints();
      // 8 pieces per thread with a shared X (packed, or quantized: the int8 rows at any M, as measured), 4 otherwise.
      const perThread = this.piecesPerThread ?? (packed ? 8 : 4);
      const pieces = Math.max(1, Math.min(this.threads * perThread, Math.floor(N / 4), Math.floor(flops / PARALLEL_FLOPS)));
      // At decode sizes, largest pieces first (guidedCuts): the thread left with the last piece
      // waits less for the other. In-process A/B, 2 threads: 3B-shaped Q4_K_M int8 decode 1.3-2.3%
      // faster, 1B 1.2%; prefill keeps equal pieces (not measured with these).
      const cuts = M < this.packMinM ? guidedCuts(N, this.threads, pieces) : null;
      const step = Math.ceil(N / pieces);
      let count = 0;
      for (let n0 = 0; n0 < N; n0 = cuts ? cuts[count]! : n0 + step, count++) {
        const ints = this.iview;
        const o = (LIST_BYTE >>> 2) + count * TASK_WORDS;
        ints[o] = QUANT_TASK[type];
        ints[o + 1] = (packed ? xp : g.x) * 4;
        ints[o + 2] = g.ldx * 4;
        ints[o + 3] = g.wq + n0 * rowQ.wq;
        ints[o + 4] = g.ws + n0 * rowQ.ws;
        ints[o + 5] = (g.y + n0) * 4;
        ints[o + 6] = g.ldy * 4;
        ints[o + 7] = M;
        ints[o + 8] = (cuts ? cuts[count]! : Math.min(N, n0 + step)) - n0;
        ints[o + 9] = K;
        ints[o + 10] = packed ? flags | PACKED_X : flags;
        ints[o + 11] = deqRows;
      }
      this.dispatch(LIST_BYTE, count, 1);
    } finally {
      this.release(mark);
    }
  }

  /**
   * The loader's help for reading Q8_0, Q4_0, Q4_K, Q5_K and Q6_K matrices into this memory
   * (LazyWeightStore.readQuantInto): the file's blocks are read into a stage here (the calling
   * thread's dequantization area, idle while nothing is multiplied) and repacked by Wasm kernels
   * (qkernels.ts emitRepackKernels) instead of JavaScript loops. Views over another buffer (or an old one of a grown memory) are declined.
   * Make a fresh one per read: a growing memory replaces its buffer.
   */
  quantReadIo(): QuantReadIo {
    this.assertLive();
    const buf = this.memory.buffer;
    const repack: QuantReadIo["repack"] = {};
    for (const [type, { fn, fileBlock }] of Object.entries(this.repackFns) as [QuantType, { fn: RepackFn; fileBlock: number }][]) {
      // Quant and scale bytes per block of the engine's layout.
      const { wq: q, ws: m } = quantBytes(type, 1, QUANT_BLOCK[type]);
      repack[type] = (bytes, wq, ws) => {
        const nb = bytes.byteLength / fileBlock;
        if (bytes.buffer !== buf || wq.buffer !== buf || ws.buffer !== buf || buf !== this.memory.buffer) return null;
        if (!Number.isInteger(nb) || wq.byteLength !== nb * q || ws.byteLength !== nb * m || ws.byteOffset % 4 !== 0) {
          throw new Error(`CpuRuntime.quantReadIo: ${bytes.byteLength} bytes of ${fileBlock}-byte blocks do not match the destinations (${wq.byteLength}, ${ws.byteLength} bytes at ${ws.byteOffset})`);
        }
        return fn(bytes.byteOffset, nb, wq.byteOffset, ws.byteOffset);
      };
    }
    return { stage: new Uint8Array(buf, this.scratch + this.gemmScratch, DEQ_BYTES), repack };
  }

  /** Dequantize `rows` rows of K of a quantized matrix (wq, ws: BYTE offsets of its first row) to f32 at element offset `dst`. */
  dequantRows(type: QuantType, wq: number, ws: number, rows: number, K: number, dst: number): void {
    this.assertLive();
    if (K % QUANT_BLOCK[type] !== 0) throw new Error(`CpuRuntime.dequantRows: K ${K} is not a multiple of ${QUANT_BLOCK[type]}`);
    this.quant[type].deq(wq, ws, rows, K, dst * 4);
  }

  /**
   * Allocates `bytes` bytes (zero-filled, 64-byte aligned); returns their BYTE offset. prefault:
   * the part never written since the memory grew takes its first-touch page faults on all threads
   * at once before this returns (a load then writes weights into present pages). On this VM a page
   * fault costs ~11 µs (most of a large model's load), and two threads take them 1.3-1.6x faster
   * than one (throwaway touch loop on 1 GiB, 2026-12-07).
   */
  allocBytes(bytes: number, prefault = false): number {
    const fresh = this.hwm;
    const start = this.alloc(Math.ceil(bytes / 4)) * 4;
    if (prefault) this.touchPages(Math.max(start, fresh), start + bytes);
    return start;
  }

  /**
   * TOUCH tasks over [from, to), memory nobody has written since it grew (zero, so writing a zero
   * byte changes nothing): one write per 4 KiB page, at `from` and then at page starts, so every
   * page of the range is hit and nothing below `from` is.
   */
  private touchPages(from: number, to: number): void {
    if (this.threads === 1 || to - from < TOUCH_MIN_BYTES) return;
    const pieces = Math.min(this.threads * 4, Math.ceil((to - from) / TOUCH_MIN_BYTES));
    const step = Math.ceil((to - from) / pieces / PAGE_BYTES) * PAGE_BYTES;
    const ints = this.ints();
    let count = 0;
    for (let a = from; a < to; count++) {
      const e = Math.min(to, (Math.floor(a / PAGE_BYTES) + 1) * PAGE_BYTES + step);
      const o = (LIST_BYTE >>> 2) + count * TASK_WORDS;
      ints[o] = TASK.TOUCH;
      ints[o + 1] = a;
      ints[o + 2] = e;
      a = e;
    }
    this.dispatch(LIST_BYTE, count, 1);
  }

  /** Many independent gemms in one dispatch, split across threads. */
  gemmBatch(list: readonly Gemm[]): void {
    this.assertLive();
    for (const g of list) this.check(g, "gemmBatch");
    let i = 0;
    while (i < list.length) {
      this.ints();
      let count = 0;
      let flops = 0;
      // Large members are split by N so that one big gemm does not serialise the batch.
      for (; i < list.length && count < LIST_CAP - this.threads * 4; i++) {
        const g = list[i] as Gemm;
        if (g.M === 0 || g.N === 0) continue;
        const f = 2 * g.M * g.N * g.K;
        flops += f;
        const pieces = this.threads > 1 && f >= 4 * PARALLEL_FLOPS ? Math.min(this.threads * 4, Math.floor(g.N / 4)) : 1;
        const step = pieces > 1 ? Math.ceil(g.N / pieces / 4) * 4 : g.N;
        for (let n0 = 0; n0 < g.N; n0 += step) {
          this.putGemmPiece(count, g, n0, Math.min(step, g.N - n0), g.x, g.ldx, g.accumulate ? ACCUMULATE : 0);
          count++;
        }
      }
      if (count === 0) continue;
      if (this.threads === 1 || flops < PARALLEL_FLOPS) this.taskListFn(LIST_BYTE, count, this.scratch);
      else this.dispatch(LIST_BYTE, count, Math.max(1, Math.floor(count / (this.threads * 8))));
    }
  }

  /**
   * out[r] = act(g[r]) · u[r] for R rows of F (element offsets; rows ldg, ldu, ldo apart),
   * split by rows across the threads.
   */
  gatedRows(g: number, ldg: number, u: number, ldu: number, out: number, ldo: number, R: number, F: number, act: "silu" | "gelu_tanh"): void {
    this.assertLive();
    this.rowTasks(R, R * F, (o, r0, rows) => {
      const ints = this.iview;
      ints[o] = TASK.GATED;
      ints[o + 1] = (g + r0 * ldg) * 4;
      ints[o + 2] = ldg * 4;
      ints[o + 3] = (u + r0 * ldu) * 4;
      ints[o + 4] = ldu * 4;
      ints[o + 5] = (out + r0 * ldo) * 4;
      ints[o + 6] = ldo * 4;
      ints[o + 7] = rows;
      ints[o + 8] = F;
      ints[o + 9] = act === "silu" ? 0 : 1;
    });
  }

  /** dst[r] = src[r] / rms(src[r]) · (offset + w) for R rows of D (dst may alias src), split by rows. */
  rmsnormRows(src: number, dst: number, w: number, R: number, D: number, eps: number, offset: 0 | 1): void {
    this.assertLive();
    this.rowTasks(R, R * D, (o, r0, rows) => {
      const ints = this.iview;
      ints[o] = TASK.RMSNORM;
      ints[o + 1] = (src + r0 * D) * 4;
      ints[o + 2] = (dst + r0 * D) * 4;
      ints[o + 3] = w * 4;
      ints[o + 4] = rows;
      ints[o + 5] = D;
      this.view[o + 6] = eps;
      this.view[o + 7] = offset;
    });
  }

  /** Attention for (row, head) pairs (kernels.ts TASK.ATTENTION), pairs split across the threads. */
  attention(list: readonly AttentionTask[]): void {
    this.assertLive();
    let i = 0;
    while (i < list.length) {
      this.ints();
      const base = LIST_BYTE >>> 2;
      let count = 0;
      let flops = 0;
      for (; i < list.length && count < LIST_CAP; i++, count++) {
        const a = list[i] as AttentionTask;
        const o = base + count * TASK_WORDS;
        const ints = this.iview;
        ints[o] = TASK.ATTENTION;
        ints[o + 1] = a.q * 4;
        ints[o + 2] = a.ldq * 4;
        ints[o + 3] = a.k * 4;
        ints[o + 4] = a.v * 4;
        ints[o + 5] = a.ldv * 4;
        ints[o + 6] = a.scores * 4;
        ints[o + 7] = a.z * 4;
        ints[o + 8] = a.T;
        ints[o + 9] = a.S;
        ints[o + 10] = a.hd;
        ints[o + 11] = a.slot0;
        ints[o + 12] = a.pad;
        ints[o + 13] = Math.min(a.window, 2 ** 30);
        this.view[o + 14] = a.scale;
        flops += 4 * a.T * a.S * a.hd;
      }
      if (this.threads === 1 || flops < PARALLEL_FLOPS) this.taskListFn(LIST_BYTE, count, this.scratch);
      else this.dispatch(LIST_BYTE, count, 1);
    }
  }

  /** Writes row tasks (fill(recordWord, firstRow, rows)) for R rows of `work` values in all, and runs them. */
  private rowTasks(R: number, work: number, fill: (o: number, r0: number, rows: number) => void): void {
    if (R === 0) return;
    this.ints();
    const pieces = this.threads === 1 || work < PARALLEL_ROW_WORK ? 1 : Math.min(R, this.threads * 4);
    const step = Math.ceil(R / pieces);
    let count = 0;
    for (let r0 = 0; r0 < R; r0 += step, count++) fill((LIST_BYTE >>> 2) + count * TASK_WORDS, r0, Math.min(step, R - r0));
    if (count === 1) this.taskListFn(LIST_BYTE, 1, this.scratch);
    else this.dispatch(LIST_BYTE, count, 1);
  }

  /**
   * Writes task i of the list: gemm g over W rows [n0, n0 + n), X read at x with stride ldx
   * (element offsets; packed X: ldx 0) and the given kernel flags. Call after ints().
   */
  private putGemmPiece(i: number, g: Gemm, n0: number, n: number, x: number, ldx: number, flags: number): void {
    const ints = this.iview;
    const o = (LIST_BYTE >>> 2) + i * TASK_WORDS;
    ints[o] = TASK.GEMM;
    ints[o + 1] = x * 4;
    ints[o + 2] = ldx * 4;
    ints[o + 3] = (g.w + n0 * g.ldw) * 4;
    ints[o + 4] = g.ldw * 4;
    ints[o + 5] = (g.y + n0) * 4;
    ints[o + 6] = g.ldy * 4;
    ints[o + 7] = g.M;
    ints[o + 8] = n;
    ints[o + 9] = g.K;
    ints[o + 10] = flags;
  }

  /** Runs the list on all threads; returns when every task is done. */
  private dispatch(ptr: number, count: number, chunk: number): void {
    const ctrl = this.ctrl;
    this.gen = (this.gen + 1) & GEN_MASK;
    const gen = this.gen;
    Atomics.store(ctrl, C.LIST, ptr);
    Atomics.store(ctrl, C.COUNT, count);
    Atomics.store(ctrl, C.CHUNK, chunk);
    Atomics.store(ctrl, C.FIN, 0);
    Atomics.store(ctrl, C.NEXT, gen << IDX_BITS);
    Atomics.store(ctrl, C.SEQ, gen);
    if (Atomics.load(ctrl, C.SLEEPERS) > 0) Atomics.notify(ctrl, C.SEQ);
    const mainError = claimAndRun(ctrl, gen, this.taskListFn, this.scratch);
    // Wait for the chunks other threads claimed: spin ~1 ms, then sleep.
    let fin = Atomics.load(ctrl, C.FIN);
    if (fin !== count) {
      const t0 = performance.now();
      for (let i = 0; fin !== count && i < 20000; i++) fin = Atomics.load(ctrl, C.FIN);
      while (fin !== count) {
        Atomics.wait(ctrl, C.FIN, fin, 1000);
        fin = Atomics.load(ctrl, C.FIN);
      }
      this.stats.waitMs += performance.now() - t0;
    }
    this.stats.dispatches++;
    Atomics.store(ctrl, C.NEXT, -1);
    const failed = Atomics.exchange(ctrl, C.ERROR, 0) !== 0;
    if (mainError !== undefined) throw mainError;
    if (failed) throw new Error("CpuRuntime: a gemm failed in a worker thread (see the worker's warning)");
  }

  private ints(): Int32Array {
    if (this.memory.buffer !== this.viewBuffer) this.refreshViews();
    return this.iview;
  }

  private assertLive(): void {
    if (this.disposed) throw new Error("CpuRuntime: used after dispose()");
  }

  /**
   * Runs the register-only multiply-add loop (no memory traffic) for `iters` iterations of
   * 96 flops on the calling thread; returns a value only to keep the work alive.
   */
  peak(iters: number): number {
    return this.peakFn(iters);
  }

  /**
   * Runs the register-only loop of the int8 rows' products (kernels.ts `peakdot`) for `iters`
   * iterations of peakDotMacsPerIter(this.kernel.relaxedDot) products on the calling thread.
   */
  peakDot(iters: number): number {
    return this.peakDotFn(iters);
  }

  /**
   * Runs a few small gemms on both kernel paths so that V8 tiers the hot functions up from its
   * baseline compiler to optimised code (in the background) before real work arrives; the
   * workers share the compiled code. Takes a few milliseconds.
   */
  private warmUp(): void {
    const mark = this.mark();
    const K = 259; // K % 4 = 3 exercises the tails too
    const x = this.alloc(16 * K);
    const w = this.alloc(64 * K);
    const y = this.alloc(16 * 64);
    for (let i = 0; i < 40; i++) {
      this.gemmFn(x * 4, K * 4, w * 4, K * 4, y * 4, 256, 16, 64, K, i & 1, this.scratch);
      this.gemmFn(x * 4, K * 4, w * 4, K * 4, y * 4, 256, 1 + (i % 4), 64, K, i & 1, this.scratch);
    }
    this.peakFn(10000);
    this.release(mark);
  }

  /** The compiled kernel module (the workers instantiate the same one). */
  get wasmModule(): WebAssembly.Module {
    return this.module;
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    Atomics.store(this.ctrl, C.STOP, 1);
    Atomics.add(this.ctrl, C.SEQ, 1);
    Atomics.notify(this.ctrl, C.SEQ);
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
