// Gemma 2 and Gemma 3 (text): sandwich norms with (1 + w) RMSNorm, embeddings scaled by
// sqrt(dModel), gated GELU-tanh MLP, alternating sliding-window layers; Gemma 2 soft-caps
// attention and final logits, Gemma 3 has per-head qk-norm and a separate local RoPE base.
// llama.cpp's converter stores norm weights as (1 + w), so GGUF configs use weightOffset 0.
import { ggufOpt, type GgufFile } from "../../io/gguf.js";
import type { LayerType, ModelConfig } from "../../engine/config.js";
import { LLAMA_GGUF, LLAMA_SAFETENSORS, QK_NORM_GGUF, QK_NORM_SAFETENSORS, defineFamily, num, type HfConfig, type WeightTable } from "../family.js";
import { llamaFromGguf, llamaFromHf } from "./llama.js";

const SANDWICH_ST: WeightTable = {
  "blocks.{i}.ln1Post.weight": { name: "model.layers.{i}.post_attention_layernorm.weight" },
  "blocks.{i}.ln2.weight": { name: "model.layers.{i}.pre_feedforward_layernorm.weight" },
  "blocks.{i}.ln2Post.weight": { name: "model.layers.{i}.post_feedforward_layernorm.weight" },
};
const SANDWICH_GGUF: WeightTable = {
  "blocks.{i}.ln1Post.weight": { name: "blk.{i}.post_attention_norm.weight" },
  "blocks.{i}.ln2.weight": { name: "blk.{i}.ffn_norm.weight" },
  "blocks.{i}.ln2Post.weight": { name: "blk.{i}.post_ffw_norm.weight" },
};

/** Sliding unless (i + 1) % pattern === 0: Gemma 2 has pattern 2, Gemma 3 pattern 6. */
function pattern(n: number, every: number): LayerType[] {
  return Array.from({ length: n }, (_, i) => ((i + 1) % every === 0 ? "full" : "sliding"));
}

function gemmaCommon(base: ModelConfig, family: string, weightOffset: 0 | 1, layerTypes: LayerType[], window: number | undefined): ModelConfig {
  return {
    ...base,
    family,
    norm: { kind: "rms", eps: base.norm.eps, weightOffset },
    mlp: { kind: "gated", act: "gelu_tanh" },
    blockNorm: "sandwich",
    embedScale: Math.sqrt(base.dModel),
    tieEmbeddings: true,
    layerTypes,
    ...(window ? { slidingWindow: window } : {}),
  };
}

function hfLayerTypes(hf: HfConfig, every: number): LayerType[] {
  const n = num(hf, "num_hidden_layers");
  if (Array.isArray(hf.layer_types)) return hf.layer_types.map((t) => (t === "sliding_attention" ? "sliding" : "full"));
  return pattern(n, typeof hf.sliding_window_pattern === "number" ? hf.sliding_window_pattern : every);
}

/** Multimodal Gemma 3 checkpoints nest the text config; we load their language model. */
function textConfig(hf: HfConfig): HfConfig {
  return typeof hf.text_config === "object" && hf.text_config !== null ? { ...(hf.text_config as HfConfig), eos_token_id: hf.eos_token_id } : hf;
}

/** A soft-cap from config.json: absent = the config class default, null = off. */
function cap(hf: HfConfig, key: string, dflt?: number): number | undefined {
  const v = hf[key] === undefined ? dflt : hf[key];
  return typeof v === "number" && v > 0 ? v : undefined;
}

function softcaps(attn: number | undefined, final: number | undefined): Pick<ModelConfig, "attnSoftcap" | "finalSoftcap"> {
  return { ...(attn ? { attnSoftcap: attn } : {}), ...(final ? { finalSoftcap: final } : {}) };
}

function gemma2FromHf(hf: HfConfig): ModelConfig {
  const base = { ...llamaFromHf({ ...hf, sliding_window: undefined }, "gemma2") };
  return {
    ...gemmaCommon(base, "gemma2", 1, hfLayerTypes(hf, 2), num(hf, "sliding_window")),
    attnScale: 1 / Math.sqrt(num(hf, "query_pre_attn_scalar", base.dHead)),
    // Gemma2Config defaults: attention 50, final 30.
    ...softcaps(cap(hf, "attn_logit_softcapping", 50), cap(hf, "final_logit_softcapping", 30)),
  };
}

function gemma3FromHf(raw: HfConfig): ModelConfig {
  const hf = textConfig(raw);
  const base = llamaFromHf({ ...hf, sliding_window: undefined }, "gemma3");
  const c = gemmaCommon(base, "gemma3", 1, hfLayerTypes(hf, 6), num(hf, "sliding_window"));
  return {
    ...c,
    qkNorm: { kind: "head" },
    attnScale: 1 / Math.sqrt(num(hf, "query_pre_attn_scalar", base.dHead)),
    pos: { ...(c.pos as Extract<ModelConfig["pos"], { kind: "rope" }>), localTheta: num(hf, "rope_local_base_freq", 10000) },
    ...softcaps(undefined, cap(hf, "final_logit_softcapping")),
  };
}

// As llama.cpp reads these GGUFs (src/models/gemma2.cpp, gemma3.cpp, load_arch_hparams): the
// layer pattern is `{arch}.attention.sliding_window_pattern` (default 2 / 6); Gemma 2 always
// slides (window default 4096) and always soft-caps (defaults 50 / 30); Gemma 3 slides only when
// a window is stored, its local layers use `gemma3.rope.freq_base_swa` (default 10000), unscaled.
function gemmaFromGguf(g: GgufFile, family: "gemma2" | "gemma3"): ModelConfig {
  const base = llamaFromGguf(g, family);
  const every = ggufOpt<number>(g, `${family}.attention.sliding_window_pattern`) ?? (family === "gemma2" ? 2 : 6);
  const stored = ggufOpt<number>(g, `${family}.attention.sliding_window`);
  const window = family === "gemma2" ? (stored ?? 4096) : stored ? stored : undefined;
  const layers = window ? pattern(base.nLayers, every) : Array<LayerType>(base.nLayers).fill("full");
  const c = gemmaCommon(base, family, 0, layers, window);
  // llama.cpp derives the query scale from the model size rather than storing it
  // (query_pre_attn_scalar is not converted): 1/sqrt(dModel/nHeads) for the 27B models, else 1/sqrt(dHead).
  const attnScale = base.nLayers === (family === "gemma2" ? 46 : 62) ? 1 / Math.sqrt(base.dModel / base.nHeads) : 1 / Math.sqrt(base.dHead);
  const f = ggufOpt<number>(g, `${family}.final_logit_softcapping`);
  if (family === "gemma2") {
    const a = ggufOpt<number>(g, "gemma2.attn_logit_softcapping");
    return { ...c, attnScale, ...softcaps(a ?? 50, f ?? 30) };
  }
  const rope = c.pos as Extract<ModelConfig["pos"], { kind: "rope" }>;
  return {
    ...c,
    attnScale,
    qkNorm: { kind: "head" },
    pos: window ? { ...rope, localTheta: ggufOpt<number>(g, "gemma3.rope.freq_base_swa") ?? 10000 } : rope,
    ...softcaps(undefined, f),
  };
}

export const gemma2 = defineFamily({
  id: "gemma2",
  matches: { hf: ["Gemma2ForCausalLM"], gguf: ["gemma2"] },
  fromHf: gemma2FromHf,
  fromGguf: (g) => gemmaFromGguf(g, "gemma2"),
  safetensors: { ...LLAMA_SAFETENSORS, ...SANDWICH_ST },
  gguf: { ...LLAMA_GGUF, ...SANDWICH_GGUF },
});

export const gemma3 = defineFamily({
  id: "gemma3",
  matches: { hf: ["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"], gguf: ["gemma3"] },
  fromHf: gemma3FromHf,
  fromGguf: (g) => gemmaFromGguf(g, "gemma3"),
  safetensors: { ...LLAMA_SAFETENSORS, ...SANDWICH_ST, ...QK_NORM_SAFETENSORS },
  // Multimodal checkpoints keep the text model under language_model.model. (older transformers)
  // or model.language_model. (4.52+); the vision tower and projector are ignored.
  safetensorsAliases: [(n) => `language_model.${n}`, (n) => n.replace(/^model\./, "model.language_model.")],
  safetensorsIgnore: /^(model\.)?(vision_tower|multi_modal_projector)\./,
  gguf: { ...LLAMA_GGUF, ...SANDWICH_GGUF, ...QK_NORM_GGUF },
});
