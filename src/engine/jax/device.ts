// The jax-js backends ("wasm", "webgpu"): initialisation and the choice of jax-js's default
// device. Loaded by ../device.ts with a dynamic import only when one of them is asked for, so a
// cpu-only run never evaluates @jax-js/jax.
//
// In Node, WebGPU comes from Dawn through the `webgpu` npm package. It is loaded with a dynamic
// import on the Node path only, so this module stays importable in a browser bundle, where
// navigator.gpu is provided by the browser.
import "../../core/polyfills.js"; // must run before jax-js is evaluated
import { defaultDevice, getWebGPUDevice, init } from "@jax-js/jax";
import { SelfscopeError } from "../../core/errors.js";
import type { DeviceInfo } from "../device.js";

type WebGPUModule = typeof import("webgpu"); // type only; also brings in the GPU* global types

/** Initialise a jax-js backend and report what it offers. */
export function initBackend(name: "wasm" | "webgpu"): Promise<DeviceInfo> {
  return name === "wasm" ? initWasm() : initWebGPU();
}

/** Make an initialised backend jax-js's default device (arrays stay on the device they were created on). */
export function selectBackend(name: "wasm" | "webgpu"): void {
  defaultDevice(name);
}

async function initWasm(): Promise<DeviceInfo> {
  const available = await init("wasm");
  if (!available.includes("wasm")) {
    throw new SelfscopeError("the wasm backend is unavailable: this JavaScript runtime has no WebAssembly");
  }
  const info: DeviceInfo = { name: "wasm", adapter: "wasm", maxBindingBytes: Infinity, shaderF16: false };
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
