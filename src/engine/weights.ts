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
  /** Whether `name` can be read as Q8_0 rows without dequantizing (GGUF Q8_0 tensors). */
  isQ8?(name: string): boolean;
  /** Q8_0 rows: int8 quants [rows·cols] and f32 scales [rows·cols/32]. */
  readQ8Into?(name: string, qs: Int8Array, ds: Float32Array): void;
}

export interface EngineModel {
  config: ModelConfig;
  weights: WeightStore;
}

export function isLazy(w: WeightStore): w is LazyWeightStore {
  return typeof (w as Partial<LazyWeightStore>).readInto === "function" && typeof (w as Partial<LazyWeightStore>).shapeOf === "function";
}
