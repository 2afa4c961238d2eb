// Llama 1/2/3 (and GGUF "llama"). Pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU.
// The HF/GGUF readers here are the base that Mistral, Qwen, Gemma and OLMo extend.
import { ggufGet, ggufOpt, readGgufTensor, type GgufFile, type GgufValue } from "../../io/gguf.js";
import { PLAIN, type LayerType, type ModelConfig, type RopeScaling } from "../../engine/config.js";
import { LLAMA_GGUF, LLAMA_SAFETENSORS, MOE_GGUF, defineFamily, eosList, num, type HfConfig } from "../family.js";

function ropeScaling(s: unknown): RopeScaling {
  const r = (s ?? {}) as Record<string, unknown>;
  const type = r.rope_type ?? r.type;
  if (type === "llama3") {
    return {
      kind: "llama3",
      factor: Number(r.factor),
      lowFreqFactor: Number(r.low_freq_factor),
      highFreqFactor: Number(r.high_freq_factor),
      originalMaxPositionEmbeddings: Number(r.original_max_position_embeddings),
    };
  }
  if (type === "linear") return { kind: "linear", factor: Number(r.factor) };
  if (type === undefined || type === "default") return { kind: "none" };
  throw new Error(`rope_scaling type "${String(type)}" is not supported`);
}

export function llamaFromHf(hf: HfConfig, family = "llama"): ModelConfig {
  const dModel = num(hf, "hidden_size");
  const nHeads = num(hf, "num_attention_heads");
  const nLayers = num(hf, "num_hidden_layers");
  const dHead = num(hf, "head_dim", dModel / nHeads);
  // Mistral v0.1 declares a sliding window on every layer; Qwen2 only with use_sliding_window;
  // newer configs (OLMo 3) list the attention type per layer.
  const window = typeof hf.sliding_window === "number" && hf.use_sliding_window !== false ? hf.sliding_window : undefined;
  const perLayer = Array.isArray(hf.layer_types) && hf.layer_types.length === nLayers ? hf.layer_types : undefined;
  return {
    family,
    dModel,
    nLayers,
    nHeads,
    nKvHeads: num(hf, "num_key_value_heads", nHeads),
    dHead,
    dMlp: num(hf, "intermediate_size"),
    dVocab: num(hf, "vocab_size"),
    nCtx: num(hf, "max_position_embeddings", 2048),
    norm: { kind: "rms", eps: num(hf, "rms_norm_eps", 1e-6), weightOffset: 0 },
    mlp: { kind: "gated", act: "silu" },
    pos: { kind: "rope", theta: num(hf, "rope_theta", 10000), scaling: ropeScaling(hf.rope_scaling) },
    bias: hf.attention_bias === true ? "qkv" : "none",
    tieEmbeddings: hf.tie_word_embeddings === true,
    embedScale: 1,
    attnScale: 1 / Math.sqrt(dHead),
    ...PLAIN,
    layerTypes: window && perLayer ? perLayer.map((t): LayerType => (t === "sliding_attention" ? "sliding" : "full")) : Array<LayerType>(nLayers).fill(window ? "sliding" : "full"),
    ...(window ? { slidingWindow: window } : {}),
    ...(typeof hf.bos_token_id === "number" ? { bosTokenId: hf.bos_token_id } : {}),
    eosTokenIds: eosList(hf.eos_token_id),
  };
}

/** `swaPeriod`: the architecture's default sliding-window pattern in llama.cpp (OLMo 2/3: 4). */
export function llamaFromGguf(g: GgufFile, family = "llama", swaPeriod?: number): ModelConfig {
  const a = ggufGet<string>(g, "general.architecture", "string");
  const k = (key: string) => ggufGet<number>(g, `${a}.${key}`, "number");
  const dModel = k("embedding_length");
  const nHeads = k("attention.head_count");
  const nLayers = k("block_count");
  const dHead = ggufOpt<number>(g, `${a}.attention.key_length`) ?? dModel / nHeads;
  const vocab = g.tensors.get("token_embd.weight")?.ne[1] ?? ggufOpt<GgufValue[]>(g, "tokenizer.ggml.tokens")?.length ?? 0;
  const window = ggufOpt<number>(g, `${a}.attention.sliding_window`) || undefined;
  // llama.cpp: `{arch}.attention.sliding_window_pattern` is a period n (layer i slides unless
  // i % n == n - 1) or one boolean per layer (OLMo 3); without it, the architecture's default
  // period, else every layer slides.
  const pat = ggufOpt<GgufValue>(g, `${a}.attention.sliding_window_pattern`) ?? swaPeriod;
  const slides = (i: number) => (Array.isArray(pat) ? pat[i] === true : typeof pat === "number" ? i % pat < pat - 1 : true);
  const eos = ggufOpt<number>(g, "tokenizer.ggml.eos_token_id");
  const eot = ggufOpt<number>(g, "tokenizer.ggml.eot_token_id");
  const bos = ggufOpt<number>(g, "tokenizer.ggml.bos_token_id");
  const scalingType = ggufOpt<string>(g, `${a}.rope.scaling.type`);
  // llama.cpp's default type is "linear" with no factor (= none); YaRN and LongRoPE are not implemented.
  if (scalingType !== undefined && scalingType !== "none" && scalingType !== "linear") throw new Error(`rope scaling type "${scalingType}" is not supported`);
  const factor = ggufOpt<number>(g, `${a}.rope.scaling.factor`) ?? ggufOpt<number>(g, `${a}.rope.scale_linear`);
  const scaling: RopeScaling = scalingType !== "none" && factor && factor !== 1 ? { kind: "linear", factor } : { kind: "none" };
  // llama.cpp stores Llama 3 rope scaling as explicit per-frequency divisors.
  const freqFactors = g.tensors.has("rope_freqs.weight") ? [...readGgufTensor(g, "rope_freqs.weight").data] : undefined;
  return {
    family,
    dModel,
    nLayers,
    nHeads,
    nKvHeads: ggufOpt<number>(g, `${a}.attention.head_count_kv`) ?? nHeads,
    dHead,
    dMlp: k("feed_forward_length"),
    dVocab: vocab,
    nCtx: k("context_length"),
    norm: { kind: "rms", eps: k("attention.layer_norm_rms_epsilon"), weightOffset: 0 },
    mlp: { kind: "gated", act: "silu" },
    pos: { kind: "rope", theta: ggufOpt<number>(g, `${a}.rope.freq_base`) ?? 10000, scaling, ...(freqFactors ? { freqFactors } : {}) },
    bias: g.tensors.has("blk.0.attn_q.bias") ? "qkv" : "none",
    tieEmbeddings: !g.tensors.has("output.weight"),
    embedScale: 1,
    attnScale: 1 / Math.sqrt(dHead),
    ...PLAIN,
    layerTypes: Array.from({ length: nLayers }, (_, i): LayerType => (window && slides(i) ? "sliding" : "full")),
    ...(window ? { slidingWindow: window } : {}),
    ...(bos !== undefined ? { bosTokenId: bos } : {}),
    eosTokenIds: [eos, eot].filter((x): x is number => typeof x === "number"),
  };
}

/**
 * A mixture-of-experts MLP from config.json: `expertsKey` counts the experts (num_experts,
 * num_local_experts), `dMlpKey` one expert's hidden size; norm_topk_prob when present, else
 * `normDefault` (the architecture's behaviour).
 */
export function moeFromHf(hf: HfConfig, expertsKey: string, dMlpKey: string, normDefault: boolean): Pick<ModelConfig, "mlp" | "dMlp"> {
  const norm = hf.norm_topk_prob;
  if (norm !== undefined && norm !== null && typeof norm !== "boolean") throw new Error(`norm_topk_prob = ${JSON.stringify(norm)} must be true or false`);
  return {
    mlp: { kind: "moe", act: "silu", nExperts: num(hf, expertsKey), topK: num(hf, "num_experts_per_tok"), normTopK: typeof norm === "boolean" ? norm : normDefault },
    dMlp: num(hf, dMlpKey),
  };
}

/**
 * A mixture-of-experts MLP from GGUF metadata (llama.cpp's build_moe_ffn): expert_count,
 * expert_used_count, expert_weights_norm (else the architecture's default `normDefault`); one
 * expert's hidden size from the stacked gate tensor. Only softmax gating is implemented.
 */
export function moeFromGguf(g: GgufFile, normDefault: boolean): Pick<ModelConfig, "mlp" | "dMlp"> {
  const a = ggufGet<string>(g, "general.architecture", "string");
  const gating = ggufOpt<number>(g, `${a}.expert_gating_func`);
  if (gating !== undefined && gating !== 1) throw new Error(`${a}.expert_gating_func = ${gating}: only softmax gating (1) is supported`);
  if (ggufOpt<number>(g, `${a}.expert_shared_count`)) throw new Error(`${a}.expert_shared_count: shared experts are not supported`);
  const gate = g.tensors.get("blk.0.ffn_gate_exps.weight");
  if (!gate) throw new Error("blk.0.ffn_gate_exps.weight is missing (experts stored one tensor per expert are not supported: re-convert with a current llama.cpp)");
  const norm = ggufOpt<boolean>(g, `${a}.expert_weights_norm`);
  return {
    mlp: { kind: "moe", act: "silu", nExperts: ggufGet<number>(g, `${a}.expert_count`, "number"), topK: ggufGet<number>(g, `${a}.expert_used_count`, "number"), normTopK: norm ?? normDefault },
    dMlp: gate.ne[1]!,
  };
}

/** GGUF "llama" with experts is Mixtral (llama.cpp converts MixtralForCausalLM to arch llama). */
function llamaOrMixtralFromGguf(g: GgufFile): ModelConfig {
  const experts = ggufOpt<number>(g, "llama.expert_count") ?? 0;
  return experts > 0 ? { ...llamaFromGguf(g, "mixtral"), ...moeFromGguf(g, true) } : llamaFromGguf(g);
}

export default defineFamily({
  id: "llama",
  matches: { hf: ["LlamaForCausalLM"], gguf: ["llama"] },
  fromHf: (hf) => llamaFromHf(hf),
  fromGguf: llamaOrMixtralFromGguf,
  safetensors: LLAMA_SAFETENSORS,
  gguf: {
    ...LLAMA_GGUF,
    ...MOE_GGUF,
    // llama.cpp's llama arch keeps q/k rows interleaved for its adjacent-pair RoPE
    // (convert_hf_to_gguf LlamaModel.permute, applied to q/k_proj weights and biases).
    "blocks.{i}.attn.q.weight": { name: "blk.{i}.attn_q.weight", unpermuteRope: "q" },
    "blocks.{i}.attn.k.weight": { name: "blk.{i}.attn_k.weight", unpermuteRope: "k" },
    "blocks.{i}.attn.q.bias": { name: "blk.{i}.attn_q.bias", unpermuteRope: "q" },
    "blocks.{i}.attn.k.bias": { name: "blk.{i}.attn_k.bias", unpermuteRope: "k" },
  },
  ggufIgnore: /^rope_freqs\.weight$/,
});
