// What a backend is built from: a configuration and the canonical weights (model/load.ts makes
// them from a checkpoint). Structural types, so the engine never imports the loader.
import type { ModelConfig } from "./config.js";

export interface HostTensor {
  data: Float32Array;
  shape: number[];
}

export interface WeightStore {
  get(name: string): HostTensor | undefined;
  has(name: string): boolean;
}

/** Weights read from the file on demand (model/load.ts LazyWeights): a backend copies each into its own memory once. */
export interface LazyWeightStore extends WeightStore {
  shapeOf(name: string): number[] | undefined;
  readInto(name: string, dst: Float32Array): void;
  /** The type `name` can be read in without widening to f32 (GGUF Q8_0 / Q4_K, BF16 tensors), or null. */
  quantOf?(name: string): QuantType | null;
  /** Quantized rows in the CPU engine's layout (engine/cpu/qkernels.ts); io: see QuantReadIo. */
  readQuantInto?(name: string, wq: Uint8Array, ws: Uint8Array, io?: QuantReadIo): void;
}

/**
 * A backend's help with readQuantInto: a buffer in its own memory to read the file's blocks into,
 * and repacks of some types that run there (the cpu engine's Wasm kernels) instead of the loader's
 * JavaScript ones. Each returns the first non-finite block, or -1, as the loader's do; or null when
 * it cannot take those views (the loader's own repack then runs).
 */
export interface QuantReadIo {
  stage: Uint8Array;
  repack: Partial<Record<QuantType, (bytes: Uint8Array, wq: Uint8Array, ws: Uint8Array) => number | null>>;
}

/** Matrix types the CPU engine computes on in their own format (no f32 copy). */
export type QuantType = "q8_0" | "q4_0" | "q4_k" | "q5_k" | "q6_k" | "bf16" | "f16";

export interface EngineModel {
  config: ModelConfig;
  weights: WeightStore;
}

export function isLazy(w: WeightStore): w is LazyWeightStore {
  return typeof (w as Partial<LazyWeightStore>).readInto === "function" && typeof (w as Partial<LazyWeightStore>).shapeOf === "function";
}
