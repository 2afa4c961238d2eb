// Mistral: the Llama block (llama.cpp converts it to GGUF arch "llama"); v0.1 adds a sliding window.
import { LLAMA_SAFETENSORS, defineFamily } from "../family.js";
import { llamaFromHf } from "./llama.js";

export default defineFamily({
  id: "mistral",
  matches: { hf: ["MistralForCausalLM"], gguf: [] },
  fromHf: (hf) => llamaFromHf(hf, "mistral"),
  safetensors: LLAMA_SAFETENSORS,
});
