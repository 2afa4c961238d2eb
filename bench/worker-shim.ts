// A Web `Worker` for Node, so that jax-js's Wasm backend runs its kernels on a thread pool
// (engine study, issue 7). jax-js creates the pool when the module is first evaluated, sized by
// navigator.hardwareConcurrency, and builds its workers from a Blob URL of a classic script that
// uses `self.onmessage` / `postMessage`; worker_threads cannot load blob: URLs, so the script's
// text is captured when the Blob is made and evaluated inside a worker_threads Worker.
//
// It must run before @jax-js/jax is imported (otherwise the backend has already chosen an
// unshared memory and no pool):  node --import ./dist/bench/worker-shim.js ...
// The pool size is SELFSCOPE_WASM_THREADS (default: os.availableParallelism()).
import os from "node:os";
import { Worker as NodeWorker } from "node:worker_threads";

const threads = Number(process.env.SELFSCOPE_WASM_THREADS ?? os.availableParallelism());
if (!Number.isInteger(threads) || threads < 1) throw new Error(`SELFSCOPE_WASM_THREADS=${process.env.SELFSCOPE_WASM_THREADS} is not a positive integer`);

const g = globalThis as unknown as Record<string, unknown>;
// Node 20 has no global navigator; Node >= 21 has one whose hardwareConcurrency counts the host.
Object.defineProperty(globalThis, "navigator", { value: { ...((g.navigator as object | undefined) ?? {}), hardwareConcurrency: threads }, configurable: true, writable: true });

/** Script text of every string-only Blob, and of the object URLs made from them. */
const blobText = new WeakMap<Blob, string>();
const urlText = new Map<string, string>();
const NativeBlob = globalThis.Blob;
class TextBlob extends NativeBlob {
  constructor(parts?: BlobPart[], opts?: BlobPropertyBag) {
    super(parts, opts);
    if (parts && parts.every((p) => typeof p === "string")) blobText.set(this, parts.join(""));
  }
}
g.Blob = TextBlob;
const createObjectURL = URL.createObjectURL.bind(URL);
const revokeObjectURL = URL.revokeObjectURL.bind(URL);
URL.createObjectURL = (obj: Blob) => {
  const url = createObjectURL(obj);
  const text = blobText.get(obj);
  if (text !== undefined) urlText.set(url, text);
  return url;
};
URL.revokeObjectURL = (url: string) => {
  urlText.delete(url);
  revokeObjectURL(url);
};

/** Runs inside each worker thread: a `self` with onmessage/postMessage over parentPort. */
const BOOT = `
const { parentPort, workerData } = require("node:worker_threads");
globalThis.self = globalThis;
globalThis.postMessage = (data) => parentPort.postMessage(data);
parentPort.on("message", (data) => { if (typeof self.onmessage === "function") self.onmessage({ data }); });
(0, eval)(workerData.source);
`;

type Listener = (ev: { data?: unknown; message?: string }) => void;

class ShimWorker {
  onmessage: Listener | null = null;
  onerror: Listener | null = null;
  private w: NodeWorker;
  constructor(url: string | URL, _opts?: unknown) {
    const source = urlText.get(String(url));
    if (source === undefined) throw new Error(`worker-shim: only Blob-URL workers made from script text are supported (got ${String(url)})`);
    this.w = new NodeWorker(BOOT, { eval: true, workerData: { source } });
    this.w.on("message", (data: unknown) => this.onmessage?.({ data }));
    this.w.on("error", (e: Error) => this.onerror?.({ message: e.message }));
  }
  postMessage(data: unknown): void {
    this.w.postMessage(data);
  }
  terminate(): void {
    void this.w.terminate();
  }
}
g.Worker = ShimWorker;
