// Choosing and initialising a device, and the one WebGPU limit that fails silently: a single
// tensor bigger than maxStorageBufferBindingSize computes zeros with no exception (engine-study
// issue 9), so the engine checks sizes against it up front.
//
// jax-js loads only when its backend is asked for: the "wasm" and "webgpu" devices import
// ./jax/device.js (which brings in @jax-js/jax and its polyfills) on first use; "cpu" never does.
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
    p = import("./jax/device.js").then(async (jax) => {
      const info = await jax.initBackend(name);
      detected.set(name, info);
      return info;
    });
    pending.set(name, p);
    // A failed attempt is not cached, so a caller may fix the system and retry.
    p.catch(() => pending.delete(name));
  }
  await p;
  (await import("./jax/device.js")).selectBackend(name);
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

function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  return n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB (${n} bytes)` : `${n} bytes`;
}
