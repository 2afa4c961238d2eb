// A family is one declarative object: how to read its config (HF config.json or GGUF metadata)
// and where each canonical parameter lives in a safetensors or GGUF checkpoint.
import type { GgufFile } from "../io/gguf.js";
import type { ModelConfig } from "../engine/config.js";

export type HfConfig = Record<string, unknown>;

/** How a canonical parameter is found in a checkpoint. `{i}` is the layer index. */
export interface WeightSource {
  name: string;
  /** GPT-2 Conv1D stores [in, out]; we keep [out, in]. */
  transpose?: boolean;
  /** Take part `index` of `parts` equal slices along the (post-transpose) row axis (fused qkv). */
  split?: { index: number; parts: number };
  /** llama.cpp stores llama q/k rows interleaved for its RoPE; undo it for rotate-half RoPE. */
  unpermuteRope?: "q" | "k";
  /** The tensor stacks every expert along its first axis (GGUF ffn_*_exps): take expert `{e}`'s slab. */
  experts?: boolean;
  /** Set by the loader for an `experts` source: the expert index taken. */
  slab?: number;
}

export type WeightTable = Record<string, WeightSource>;

export interface Family {
  id: string;
  matches: { hf: string[]; gguf: string[] };
  fromHf?: (hf: HfConfig) => ModelConfig;
  fromGguf?: (g: GgufFile) => ModelConfig;
  /** canonical path template -> safetensors source (`{i}`: layer, `{e}`: expert) */
  safetensors?: WeightTable;
  /** Other spellings of a safetensors name (wrapper prefixes), tried after the name itself. */
  safetensorsAliases?: ((name: string) => string)[];
  /** Source names that hold buffers, not parameters (ignored rather than rejected). */
  safetensorsIgnore?: RegExp;
  /** canonical path template -> GGUF source */
  gguf?: WeightTable;
  /** GGUF tensors read by fromGguf rather than mapped (e.g. rope_freqs.weight). */
  ggufIgnore?: RegExp;
}

export function defineFamily(f: Family): Family {
  return f;
}

// Reading HF config values with a clear message when a required one is missing.
export function num(hf: HfConfig, key: string, fallback?: number): number {
  const v = hf[key];
  if (typeof v === "number") return v;
  if (fallback !== undefined) return fallback;
  throw new Error(`config.json has no numeric "${key}"`);
}

export function eosList(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number");
  return [];
}

/** Shared Llama-layout tables (Llama, Mistral, Qwen2/3 differ only in config). */
export const LLAMA_SAFETENSORS: WeightTable = {
  "embed.weight": { name: "model.embed_tokens.weight" },
  "blocks.{i}.ln1.weight": { name: "model.layers.{i}.input_layernorm.weight" },
  "blocks.{i}.attn.q.weight": { name: "model.layers.{i}.self_attn.q_proj.weight" },
  "blocks.{i}.attn.k.weight": { name: "model.layers.{i}.self_attn.k_proj.weight" },
  "blocks.{i}.attn.v.weight": { name: "model.layers.{i}.self_attn.v_proj.weight" },
  "blocks.{i}.attn.q.bias": { name: "model.layers.{i}.self_attn.q_proj.bias" },
  "blocks.{i}.attn.k.bias": { name: "model.layers.{i}.self_attn.k_proj.bias" },
  "blocks.{i}.attn.v.bias": { name: "model.layers.{i}.self_attn.v_proj.bias" },
  "blocks.{i}.attn.o.weight": { name: "model.layers.{i}.self_attn.o_proj.weight" },
  "blocks.{i}.ln2.weight": { name: "model.layers.{i}.post_attention_layernorm.weight" },
  "blocks.{i}.mlp.gate.weight": { name: "model.layers.{i}.mlp.gate_proj.weight" },
  "blocks.{i}.mlp.up.weight": { name: "model.layers.{i}.mlp.up_proj.weight" },
  "blocks.{i}.mlp.down.weight": { name: "model.layers.{i}.mlp.down_proj.weight" },
  "lnFinal.weight": { name: "model.norm.weight" },
  "unembed.weight": { name: "lm_head.weight" },
};

export const LLAMA_GGUF: WeightTable = {
  "embed.weight": { name: "token_embd.weight" },
  "blocks.{i}.ln1.weight": { name: "blk.{i}.attn_norm.weight" },
  "blocks.{i}.attn.q.weight": { name: "blk.{i}.attn_q.weight" },
  "blocks.{i}.attn.k.weight": { name: "blk.{i}.attn_k.weight" },
  "blocks.{i}.attn.v.weight": { name: "blk.{i}.attn_v.weight" },
  "blocks.{i}.attn.q.bias": { name: "blk.{i}.attn_q.bias" },
  "blocks.{i}.attn.k.bias": { name: "blk.{i}.attn_k.bias" },
  "blocks.{i}.attn.v.bias": { name: "blk.{i}.attn_v.bias" },
  "blocks.{i}.attn.o.weight": { name: "blk.{i}.attn_output.weight" },
  "blocks.{i}.ln2.weight": { name: "blk.{i}.ffn_norm.weight" },
  "blocks.{i}.mlp.gate.weight": { name: "blk.{i}.ffn_gate.weight" },
  "blocks.{i}.mlp.up.weight": { name: "blk.{i}.ffn_up.weight" },
  "blocks.{i}.mlp.down.weight": { name: "blk.{i}.ffn_down.weight" },
  "lnFinal.weight": { name: "output_norm.weight" },
  "unembed.weight": { name: "output.weight" },
};

export const QK_NORM_SAFETENSORS: WeightTable = {
  "blocks.{i}.attn.qNorm.weight": { name: "model.layers.{i}.self_attn.q_norm.weight" },
  "blocks.{i}.attn.kNorm.weight": { name: "model.layers.{i}.self_attn.k_norm.weight" },
};

export const QK_NORM_GGUF: WeightTable = {
  "blocks.{i}.attn.qNorm.weight": { name: "blk.{i}.attn_q_norm.weight" },
  "blocks.{i}.attn.kNorm.weight": { name: "blk.{i}.attn_k_norm.weight" },
};

/** Mixture-of-experts MLP tensors as llama.cpp stores them (every expert in one tensor per matrix). */
export const MOE_GGUF: WeightTable = {
  "blocks.{i}.mlp.router.weight": { name: "blk.{i}.ffn_gate_inp.weight" },
  "blocks.{i}.mlp.experts.{e}.gate.weight": { name: "blk.{i}.ffn_gate_exps.weight", experts: true },
  "blocks.{i}.mlp.experts.{e}.up.weight": { name: "blk.{i}.ffn_up_exps.weight", experts: true },
  "blocks.{i}.mlp.experts.{e}.down.weight": { name: "blk.{i}.ffn_down_exps.weight", experts: true },
};

/** Qwen-MoE / OLMoE safetensors layout (one tensor per expert). */
export const MOE_SAFETENSORS: WeightTable = {
  "blocks.{i}.mlp.router.weight": { name: "model.layers.{i}.mlp.gate.weight" },
  "blocks.{i}.mlp.experts.{e}.gate.weight": { name: "model.layers.{i}.mlp.experts.{e}.gate_proj.weight" },
  "blocks.{i}.mlp.experts.{e}.up.weight": { name: "model.layers.{i}.mlp.experts.{e}.up_proj.weight" },
  "blocks.{i}.mlp.experts.{e}.down.weight": { name: "model.layers.{i}.mlp.experts.{e}.down_proj.weight" },
};
