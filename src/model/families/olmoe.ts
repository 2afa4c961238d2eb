// OLMoE: the Llama block (pre-norms) with RMSNorm over the whole q and k projections and every
// MLP a mixture of experts whose top-k weights are not renormalised (norm_topk_prob false).
import { LLAMA_GGUF, LLAMA_SAFETENSORS, MOE_GGUF, MOE_SAFETENSORS, QK_NORM_GGUF, QK_NORM_SAFETENSORS, defineFamily, type HfConfig } from "../family.js";
import { llamaFromGguf, llamaFromHf, moeFromGguf, moeFromHf } from "./llama.js";

function noClip(hf: HfConfig): HfConfig {
  if (hf.clip_qkv !== undefined && hf.clip_qkv !== null) throw new Error(`clip_qkv = ${JSON.stringify(hf.clip_qkv)}: clamping q/k/v is not supported`);
  return hf;
}

export default defineFamily({
  id: "olmoe",
  matches: { hf: ["OlmoeForCausalLM"], gguf: ["olmoe"] },
  fromHf: (hf) => ({ ...llamaFromHf(noClip(hf), "olmoe"), qkNorm: { kind: "full" }, ...moeFromHf(hf, "num_experts", "intermediate_size", false) }),
  fromGguf: (g) => ({ ...llamaFromGguf(g, "olmoe"), qkNorm: { kind: "full" }, ...moeFromGguf(g, false) }),
  safetensors: { ...LLAMA_SAFETENSORS, ...QK_NORM_SAFETENSORS, ...MOE_SAFETENSORS },
  gguf: { ...LLAMA_GGUF, ...QK_NORM_GGUF, ...MOE_GGUF },
});
