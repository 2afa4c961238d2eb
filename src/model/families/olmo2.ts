// OLMo 2: norms after attention and MLP (no pre-norms), RMSNorm on the whole q and k projections.
import { LLAMA_GGUF, LLAMA_SAFETENSORS, QK_NORM_GGUF, QK_NORM_SAFETENSORS, defineFamily } from "../family.js";
import { llamaFromGguf, llamaFromHf } from "./llama.js";

const quirks = { blockNorm: "post", qkNorm: { kind: "full" } } as const;

export default defineFamily({
  id: "olmo2",
  matches: { hf: ["Olmo2ForCausalLM", "Olmo3ForCausalLM"], gguf: ["olmo2"] },
  fromHf: (hf) => ({ ...llamaFromHf(hf, "olmo2"), ...quirks }),
  // llama.cpp's olmo2 arch (OLMo 3 sliding layers): default pattern period 4.
  fromGguf: (g) => ({ ...llamaFromGguf(g, "olmo2", 4), ...quirks }),
  safetensors: {
    ...LLAMA_SAFETENSORS,
    ...QK_NORM_SAFETENSORS,
    "blocks.{i}.ln1Post.weight": { name: "model.layers.{i}.post_attention_layernorm.weight" },
    "blocks.{i}.ln2Post.weight": { name: "model.layers.{i}.post_feedforward_layernorm.weight" },
  },
  gguf: {
    ...LLAMA_GGUF,
    ...QK_NORM_GGUF,
    "blocks.{i}.ln1Post.weight": { name: "blk.{i}.post_attention_norm.weight" },
    "blocks.{i}.ln2Post.weight": { name: "blk.{i}.post_ffw_norm.weight" },
  },
});
