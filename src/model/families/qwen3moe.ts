// Qwen3-MoE (Qwen3-30B-A3B, the paper's Qwen3-235B-A22B): the Qwen3 block with every MLP a
// mixture of experts. llama.cpp's qwen3moe always renormalises the top-k weights.
import { LLAMA_GGUF, LLAMA_SAFETENSORS, MOE_GGUF, MOE_SAFETENSORS, QK_NORM_GGUF, QK_NORM_SAFETENSORS, defineFamily, type HfConfig } from "../family.js";
import { llamaFromGguf, llamaFromHf, moeFromGguf, moeFromHf } from "./llama.js";

/** Dense layers among sparse ones (decoder_sparse_step > 1, mlp_only_layers) are not supported. */
function allSparse(hf: HfConfig): HfConfig {
  const step = hf.decoder_sparse_step;
  const dense = hf.mlp_only_layers;
  if (step !== undefined && step !== null && step !== 1) throw new Error(`decoder_sparse_step = ${JSON.stringify(step)}: only models whose every layer is sparse (1) are supported`);
  if (Array.isArray(dense) && dense.length > 0) throw new Error(`mlp_only_layers = ${JSON.stringify(dense)}: dense layers among mixture-of-experts ones are not supported`);
  return hf;
}

export default defineFamily({
  id: "qwen3moe",
  matches: { hf: ["Qwen3MoeForCausalLM"], gguf: ["qwen3moe"] },
  fromHf: (hf) => ({ ...llamaFromHf(allSparse(hf), "qwen3moe"), qkNorm: { kind: "head" }, ...moeFromHf(hf, "num_experts", "moe_intermediate_size", false) }),
  fromGguf: (g) => ({ ...llamaFromGguf(g, "qwen3moe"), qkNorm: { kind: "head" }, ...moeFromGguf(g, true) }),
  safetensors: { ...LLAMA_SAFETENSORS, ...QK_NORM_SAFETENSORS, ...MOE_SAFETENSORS },
  gguf: { ...LLAMA_GGUF, ...QK_NORM_GGUF, ...MOE_GGUF },
});
