// Memory needed to run a model, estimated from its config before any weight is read, so a model
// that cannot fit is refused with a clear message instead of crashing mid-load.
import os from "node:os";
import { SelfscopeError } from "../core/errors.js";
import type { DeviceName } from "../engine/device.js";
import { expectedParams, type ModelConfig } from "../engine/config.js";

/** Weight bytes the cpu engine puts in one wasm32 memory before splitting a model across several. */
export { SEGMENT_BYTES } from "../engine/cpu/engine.js";

/** jax-js' Wasm backend keeps every array in one wasm32 memory: 4 GiB, minus headroom for activations. */
export const WASM_HEAP_BYTES = 4 * 1024 ** 3;
/** Of those, what the weights may take (the rest holds activations, KV cache and scratch). */
export const WASM_USABLE_BYTES = 3.5 * 1024 ** 3;
const WASM_USABLE = WASM_USABLE_BYTES;

export interface MemoryEstimate {
  params: number;
  /** Parameters one token uses (a mixture of experts runs topK of its experts; equals params for dense models). */
  activeParams: number;
  /** Device bytes for weights (f32; the token embedding stays on the host unless tied). */
  weightBytes: number;
  /** KV cache bytes for one row at full context `nCtxUsed`. */
  kvBytesPerRow: (nCtxUsed: number) => number;
  hostBytes: number;
}

export function estimateMemory(c: ModelConfig): MemoryEstimate {
  let params = 0;
  let active = 0;
  let device = 0;
  const share = c.mlp.kind === "moe" ? c.mlp.topK / c.mlp.nExperts : 1;
  for (const [name, shape] of expectedParams(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    params += n;
    active += /\.mlp\.experts\./.test(name) ? n * share : n;
    if (name !== "embed.weight" && name !== "posEmbed.weight") device += n * 4;
  }
  if (c.tieEmbeddings) device += c.dVocab * c.dModel * 4;
  const host = (c.dVocab * c.dModel + (c.pos.kind === "learned" ? c.nCtx * c.dModel : 0)) * 4;
  return { params, activeParams: active, weightBytes: device, hostBytes: host, kvBytesPerRow: (t) => 2 * c.nLayers * t * c.nKvHeads * c.dHead * 4 };
}

const gib = (b: number) => `${(b / 1024 ** 3).toFixed(2)} GiB`;

/** The share of the machine's RAM the cpu engine's weights may take (the rest: activations, KV cache, the OS). */
export const CPU_RAM_SHARE = 0.85;

/**
 * Throw before loading when the weights cannot fit the device. `nativeQuantBytes` (cpu device,
 * quantized matrices kept in their format): the weights' bytes as the cpu engine will hold them.
 * The cpu engine splits weights past one wasm32 memory across several (src/engine/cpu/engine.ts
 * planSegments), so it is bounded by the machine's RAM (`ramBytes`, default os.totalmem());
 * jax-js's wasm backend keeps one memory.
 */
export function checkFits(c: ModelConfig, device: DeviceName, source: string, nativeQuantBytes?: number, ramBytes = os.totalmem()): MemoryEstimate {
  const e = estimateMemory(c);
  const bytes = device === "cpu" && nativeQuantBytes !== undefined ? nativeQuantBytes : e.weightBytes;
  const how = device === "cpu" && nativeQuantBytes !== undefined ? "with its Q8_0/Q4_K/BF16 matrices kept in their format (also Q4_0, Q5_K, Q6_K, F16) and the rest as f32" : "as f32";
  if (device === "cpu" && bytes > CPU_RAM_SHARE * ramBytes) {
    throw new SelfscopeError(
      `${source}: ${(e.params / 1e9).toFixed(2)}B parameters need ${gib(bytes)} ${how} on the cpu backend, more than ${Math.round(CPU_RAM_SHARE * 100)}% of this machine's ${gib(ramBytes)} of RAM. ` +
        `Pick a smaller model${nativeQuantBytes === undefined ? " (or its Q8_0/Q4_K GGUF or BF16 safetensors)" : " or a smaller quantization"}, or run it with --device webgpu on a GPU with enough memory.`,
    );
  }
  if (device === "wasm" && bytes > WASM_USABLE) {
    throw new SelfscopeError(
      `${source}: ${(e.params / 1e9).toFixed(2)}B parameters need ${gib(bytes)} ${how} on the ${device} backend, ` +
        `whose arrays share one 4 GiB wasm32 memory (about ${gib(WASM_USABLE)} usable for weights). ` +
        `Run it with --device cpu (which splits a model across several memories) or --device webgpu, or pick a smaller model.`,
    );
  }
  return e;
}
