// Mixtral: the Mistral block with every MLP a mixture of experts (softmax over the top-k router
// logits, i.e. renormalised top-k weights). llama.cpp converts it to GGUF arch "llama" with
// experts, read by the llama family (llama.ts).
import { LLAMA_SAFETENSORS, defineFamily } from "../family.js";
import { llamaFromHf, moeFromHf } from "./llama.js";

export default defineFamily({
  id: "mixtral",
  matches: { hf: ["MixtralForCausalLM"], gguf: [] },
  fromHf: (hf) => ({ ...llamaFromHf(hf, "mixtral"), ...moeFromHf(hf, "num_local_experts", "intermediate_size", true) }),
  safetensors: {
    ...LLAMA_SAFETENSORS,
    "blocks.{i}.mlp.router.weight": { name: "model.layers.{i}.block_sparse_moe.gate.weight" },
    "blocks.{i}.mlp.experts.{e}.gate.weight": { name: "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight" },
    "blocks.{i}.mlp.experts.{e}.up.weight": { name: "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight" },
    "blocks.{i}.mlp.experts.{e}.down.weight": { name: "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight" },
  },
});
