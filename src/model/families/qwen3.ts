// Qwen3: the Llama block with per-head RMSNorm on q and k (before RoPE), no biases.
import { LLAMA_GGUF, LLAMA_SAFETENSORS, QK_NORM_GGUF, QK_NORM_SAFETENSORS, defineFamily } from "../family.js";
import { llamaFromGguf, llamaFromHf } from "./llama.js";

export default defineFamily({
  id: "qwen3",
  matches: { hf: ["Qwen3ForCausalLM"], gguf: ["qwen3"] },
  fromHf: (hf) => ({ ...llamaFromHf(hf, "qwen3"), qkNorm: { kind: "head" } }),
  fromGguf: (g) => ({ ...llamaFromGguf(g, "qwen3"), qkNorm: { kind: "head" } }),
  safetensors: { ...LLAMA_SAFETENSORS, ...QK_NORM_SAFETENSORS },
  gguf: { ...LLAMA_GGUF, ...QK_NORM_GGUF },
});
