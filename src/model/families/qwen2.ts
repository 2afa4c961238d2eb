// Qwen2 / Qwen2.5: the Llama block with q/k/v biases. llama.cpp keeps q/k rotate-half (NEOX).
import { LLAMA_GGUF, LLAMA_SAFETENSORS, defineFamily } from "../family.js";
import { llamaFromGguf, llamaFromHf } from "./llama.js";

export default defineFamily({
  id: "qwen2",
  matches: { hf: ["Qwen2ForCausalLM"], gguf: ["qwen2"] },
  fromHf: (hf) => ({ ...llamaFromHf(hf, "qwen2"), bias: "qkv" }),
  fromGguf: (g) => ({ ...llamaFromGguf(g, "qwen2"), bias: "qkv" }),
  safetensors: LLAMA_SAFETENSORS,
  gguf: LLAMA_GGUF,
});
