// Choosing and initialising the jax-js backend ("wasm" or "webgpu"), and the one WebGPU limit
// that fails silently: a single tensor bigger than maxStorageBufferBindingSize computes zeros
// with no exception (engine-study issue 9), so the engine checks sizes against it up front.
//
// In Node, WebGPU comes from Dawn through the `webgpu` npm package. It is loaded with a dynamic
// import on the Node path only, so this module stays importable in a browser bundle, where
// navigator.gpu is provided by the browser.
import "../core/polyfills.js"; // must run before jax-js is evaluated
import { defaultDevice, getWebGPUDevice, init } from "@jax-js/jax";
import { SelfscopeError, UsageError } from "../core/errors.js";

/**
 * "cpu": selfscope's own engine (src/engine/cpu: Wasm SIMD kernels on a thread pool; forward and
 * generate). "wasm" and "webgpu": the jax-js engine on those backends (also used for gradients).
 */
export type DeviceName = "cpu" | "wasm" | "webgpu";

export interface DeviceInfo {
  readonly name: DeviceName;
  /** Adapter description (WebGPU) or "wasm". */
  readonly adapter: string;
  /** Largest single buffer a kernel may bind, in bytes (Infinity on wasm). */
  readonly maxBindingBytes: number;
  /** Whether f16 arithmetic is available in kernels (never on wasm: engine-study issue 8). */
  readonly shaderF16: boolean;
}

type WebGPUModule = typeof import("webgpu"); // type only; also brings in the GPU* global types

/** What the device reports, before any test override. */
const detected = new Map<DeviceName, DeviceInfo>();
/** In-flight or finished initialisations, so concurrent first calls share one. */
const pending = new Map<DeviceName, Promise<DeviceInfo>>();
let current: DeviceName | undefined;
let bindingOverride: number | undefined;

/**
 * Initialises `name` and makes it jax-js's default device. Idempotent: later calls return the
 * cached info. Calling it with the other name switches the default device; jax-js keeps every
 * initialised backend alive, and arrays stay on the device they were created on.
 */
export async function initDevice(name: DeviceName): Promise<DeviceInfo> {
  if (name !== "cpu" && name !== "wasm" && name !== "webgpu") {
    throw new UsageError(`unknown device "${String(name)}"; expected "cpu", "wasm" or "webgpu"`);
  }
  if (name === "cpu") {
    // Not a jax-js backend: the CPU engine owns its memory and threads (src/engine/cpu/runtime.ts).
    const info: DeviceInfo = { name: "cpu", adapter: "selfscope wasm-simd128 kernels", maxBindingBytes: Infinity, shaderF16: false };
    detected.set("cpu", info);
    return info;
  }
  let p = pending.get(name);
  if (!p) {
    p = name === "wasm" ? initWasm() : initWebGPU();
    pending.set(name, p);
    // A failed attempt is not cached, so a caller may fix the system and retry.
    p.catch(() => pending.delete(name));
  }
  await p;
  defaultDevice(name);
  current = name;
  return effective(name);
}

/** The current device's info (with any test override applied), or undefined before initDevice. */
export function getDeviceInfo(): DeviceInfo | undefined {
  return current === undefined ? undefined : effective(current);
}

/**
 * Forces a smaller binding limit (bytes) on every device, so tests can exercise the engine's
 * chunking paths on wasm. It can only lower the real limit, never raise it. `undefined` clears it.
 */
export function setMaxBindingBytesOverride(n: number | undefined): void {
  if (n !== undefined && !(Number.isInteger(n) && n > 0)) {
    throw new UsageError(`setMaxBindingBytesOverride: expected a positive integer or undefined, got ${n}`);
  }
  bindingOverride = n;
}

/**
 * Throws when one tensor of `bytes` bytes would not fit in a single storage-buffer binding on the
 * current device. On WebGPU such a tensor would otherwise silently compute zeros; callers must
 * split it (e.g. an embedding or unembedding matrix into row chunks). `what` names the tensor.
 */
export function assertFitsBinding(bytes: number, what: string): void {
  const info = getDeviceInfo();
  // Before initDevice, jax-js runs on wasm, which has no binding limit of its own.
  const limit = info?.maxBindingBytes ?? bindingOverride ?? Infinity;
  if (bytes <= limit) return;
  const device = info ? `${info.name} (${info.adapter})` : "the current device";
  throw new SelfscopeError(
    `${what} needs ${formatBytes(bytes)} in one buffer, more than the ${formatBytes(limit)} ` +
      `maximum storage-buffer binding of ${device}; it must be split into chunks that fit ` +
      `(on WebGPU an oversized binding silently computes zeros)`,
  );
}

function effective(name: DeviceName): DeviceInfo {
  const info = detected.get(name);
  if (!info) throw new Error(`internal: device ${name} marked current but not detected`);
  if (bindingOverride === undefined) return info;
  return { ...info, maxBindingBytes: Math.min(info.maxBindingBytes, bindingOverride) };
}

async function initWasm(): Promise<DeviceInfo> {
  const available = await init("wasm");
  if (!available.includes("wasm")) {
    throw new SelfscopeError("the wasm backend is unavailable: this JavaScript runtime has no WebAssembly");
  }
  const info: DeviceInfo = { name: "wasm", adapter: "wasm", maxBindingBytes: Infinity, shaderF16: false };
  detected.set("wasm", info);
  return info;
}

async function initWebGPU(): Promise<DeviceInfo> {
  const node = isNode();
  if (node) await installDawn();
  const gpu = (globalThis as { navigator?: { gpu?: GPU } }).navigator?.gpu;
  if (!gpu) {
    throw new SelfscopeError(
      "WebGPU is not available: navigator.gpu is missing; use a browser with WebGPU enabled, or the wasm device",
    );
  }
  // Ask for the adapter ourselves first: jax-js's init() just leaves webgpu out when there is
  // none, and we want to say why and what to install.
  let adapter: GPUAdapter | null;
  try {
    adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
  } catch (e) {
    throw noAdapterError(node, `requestAdapter failed: ${errorMessage(e)}`);
  }
  if (!adapter) throw noAdapterError(node, "no WebGPU adapter found");
  const available = await init("webgpu");
  if (!available.includes("webgpu")) {
    // jax-js has printed the requestDevice error to stderr already.
    throw new SelfscopeError(
      `WebGPU adapter "${describeAdapter(adapter.info)}" was found, but jax-js could not create a ` +
        `device on it (see the error printed above); use the wasm device instead`,
    );
  }
  const device = getWebGPUDevice();
  const info: DeviceInfo = {
    name: "webgpu",
    adapter: describeAdapter(device.adapterInfo ?? adapter.info),
    maxBindingBytes: device.limits.maxStorageBufferBindingSize,
    shaderF16: device.features.has("shader-f16"),
  };
  detected.set("webgpu", info);
  return info;
}

function isNode(): boolean {
  const proc = (globalThis as { process?: { versions?: { node?: string } } }).process;
  return typeof proc?.versions?.node === "string";
}

/** Node only: puts Dawn's navigator.gpu (and the WebGPU globals jax-js uses) on globalThis. */
async function installDawn(): Promise<void> {
  const g = globalThis as { navigator?: { gpu?: GPU } };
  if (g.navigator?.gpu) return;

  // Mesa's Vulkan drivers complain (and some setups fail) without XDG_RUNTIME_DIR, which CI
  // containers and `sudo` shells usually lack. Any private directory will do.
  if (!process.env.XDG_RUNTIME_DIR) {
    const [{ mkdtempSync, rmSync }, { tmpdir }, { join }] = await Promise.all([
      nodeImport<typeof import("node:fs")>("node:fs"),
      nodeImport<typeof import("node:os")>("node:os"),
      nodeImport<typeof import("node:path")>("node:path"),
    ]);
    const dir = mkdtempSync(join(tmpdir(), "selfscope-xdg-"));
    process.env.XDG_RUNTIME_DIR = dir;
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
  }

  let dawn: WebGPUModule;
  try {
    dawn = await nodeImport<WebGPUModule>("webgpu");
  } catch (e) {
    throw new SelfscopeError(
      `cannot load the "webgpu" package (Dawn for Node): ${errorMessage(e)}; run "npm ci" ` +
        `(its prebuilt binary ships inside the npm package), or use the wasm device`,
    );
  }
  Object.assign(globalThis, dawn.globals);
  const gpu = dawn.create([`backend=${dawnBackend()}`]);
  if (g.navigator) {
    // Node >= 21 has a global navigator (a getter on globalThis): extend it rather than replace it.
    Object.defineProperty(g.navigator, "gpu", { value: gpu, configurable: true });
  } else {
    // jax-js's kernel tuner reads navigator.userAgent.
    const navigator = { gpu, userAgent: `Node.js/${process.versions.node}` };
    Object.defineProperty(globalThis, "navigator", { value: navigator, configurable: true, writable: true });
  }
}

function dawnBackend(): string {
  switch (process.platform) {
    case "darwin":
      return "metal";
    case "win32":
      return "d3d12";
    default:
      return "vulkan";
  }
}

/** A dynamic import that bundlers do not follow, for modules that exist only in Node. */
async function nodeImport<T>(specifier: string): Promise<T> {
  return (await import(/* @vite-ignore */ /* webpackIgnore: true */ specifier)) as T;
}

function noAdapterError(node: boolean, what: string): SelfscopeError {
  const fix = node
    ? "Dawn (backend=vulkan) needs a Vulkan driver. Without a GPU, on Debian 12 run " +
      "scripts/install-system-deps.sh as root (mesa-vulkan-drivers >= 25 from bookworm-backports " +
      "for the lavapipe CPU driver, and libvulkan1); with a GPU, install its vendor's Vulkan driver " +
      "(NVIDIA in a container also needs NVIDIA_DRIVER_CAPABILITIES to include graphics). " +
      `XDG_RUNTIME_DIR is ${process.env.XDG_RUNTIME_DIR ?? "unset"}. "vulkaninfo --summary" ` +
      "(Debian package vulkan-tools) shows what the Vulkan loader sees. Or use the wasm device."
    : "this browser exposes navigator.gpu but returned no adapter; check that WebGPU is enabled " +
      "and the GPU is not blocklisted, or use the wasm device.";
  return new SelfscopeError(`${what}. ${fix}`);
}

function describeAdapter(info: GPUAdapterInfo): string {
  // Dawn fills description (e.g. "llvmpipe: Mesa 25.0.7 ..."); browsers often leave it empty.
  const parts = [info.description, info.vendor, info.architecture].filter((s) => s && s.length > 0);
  return parts.length > 0 ? parts.join(" / ") : "unknown adapter";
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  return n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB (${n} bytes)` : `${n} bytes`;
}
