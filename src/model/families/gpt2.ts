// GPT-2: pre-norm LayerNorm, learned positions, fused qkv (Conv1D, [in, out]), GELU-tanh MLP,
// biases everywhere, tied unembedding.
import { ggufGet, type GgufFile } from "../../io/gguf.js";
import { PLAIN, type LayerType, type ModelConfig } from "../../engine/config.js";
import { defineFamily, eosList, num, type HfConfig, type WeightTable } from "../family.js";

const conv = (name: string, extra: Partial<{ split: { index: number; parts: number } }> = {}) => ({ name, transpose: true, ...extra });

const SAFETENSORS: WeightTable = {
  "embed.weight": { name: "wte.weight" },
  "posEmbed.weight": { name: "wpe.weight" },
  "blocks.{i}.ln1.weight": { name: "h.{i}.ln_1.weight" },
  "blocks.{i}.ln1.bias": { name: "h.{i}.ln_1.bias" },
  "blocks.{i}.attn.q.weight": conv("h.{i}.attn.c_attn.weight", { split: { index: 0, parts: 3 } }),
  "blocks.{i}.attn.k.weight": conv("h.{i}.attn.c_attn.weight", { split: { index: 1, parts: 3 } }),
  "blocks.{i}.attn.v.weight": conv("h.{i}.attn.c_attn.weight", { split: { index: 2, parts: 3 } }),
  "blocks.{i}.attn.q.bias": { name: "h.{i}.attn.c_attn.bias", split: { index: 0, parts: 3 } },
  "blocks.{i}.attn.k.bias": { name: "h.{i}.attn.c_attn.bias", split: { index: 1, parts: 3 } },
  "blocks.{i}.attn.v.bias": { name: "h.{i}.attn.c_attn.bias", split: { index: 2, parts: 3 } },
  "blocks.{i}.attn.o.weight": conv("h.{i}.attn.c_proj.weight"),
  "blocks.{i}.attn.o.bias": { name: "h.{i}.attn.c_proj.bias" },
  "blocks.{i}.ln2.weight": { name: "h.{i}.ln_2.weight" },
  "blocks.{i}.ln2.bias": { name: "h.{i}.ln_2.bias" },
  "blocks.{i}.mlp.up.weight": conv("h.{i}.mlp.c_fc.weight"),
  "blocks.{i}.mlp.up.bias": { name: "h.{i}.mlp.c_fc.bias" },
  "blocks.{i}.mlp.down.weight": conv("h.{i}.mlp.c_proj.weight"),
  "blocks.{i}.mlp.down.bias": { name: "h.{i}.mlp.c_proj.bias" },
  "lnFinal.weight": { name: "ln_f.weight" },
  "lnFinal.bias": { name: "ln_f.bias" },
  "unembed.weight": { name: "lm_head.weight" },
};

// llama.cpp's gpt2 GGUF keeps the fused qkv as [3*D, D] rows (already [out, in]).
const GGUF: WeightTable = {
  "embed.weight": { name: "token_embd.weight" },
  "posEmbed.weight": { name: "position_embd.weight" },
  "blocks.{i}.ln1.weight": { name: "blk.{i}.attn_norm.weight" },
  "blocks.{i}.ln1.bias": { name: "blk.{i}.attn_norm.bias" },
  "blocks.{i}.attn.q.weight": { name: "blk.{i}.attn_qkv.weight", split: { index: 0, parts: 3 } },
  "blocks.{i}.attn.k.weight": { name: "blk.{i}.attn_qkv.weight", split: { index: 1, parts: 3 } },
  "blocks.{i}.attn.v.weight": { name: "blk.{i}.attn_qkv.weight", split: { index: 2, parts: 3 } },
  "blocks.{i}.attn.q.bias": { name: "blk.{i}.attn_qkv.bias", split: { index: 0, parts: 3 } },
  "blocks.{i}.attn.k.bias": { name: "blk.{i}.attn_qkv.bias", split: { index: 1, parts: 3 } },
  "blocks.{i}.attn.v.bias": { name: "blk.{i}.attn_qkv.bias", split: { index: 2, parts: 3 } },
  "blocks.{i}.attn.o.weight": { name: "blk.{i}.attn_output.weight" },
  "blocks.{i}.attn.o.bias": { name: "blk.{i}.attn_output.bias" },
  "blocks.{i}.ln2.weight": { name: "blk.{i}.ffn_norm.weight" },
  "blocks.{i}.ln2.bias": { name: "blk.{i}.ffn_norm.bias" },
  "blocks.{i}.mlp.up.weight": { name: "blk.{i}.ffn_up.weight" },
  "blocks.{i}.mlp.up.bias": { name: "blk.{i}.ffn_up.bias" },
  "blocks.{i}.mlp.down.weight": { name: "blk.{i}.ffn_down.weight" },
  "blocks.{i}.mlp.down.bias": { name: "blk.{i}.ffn_down.bias" },
  "lnFinal.weight": { name: "output_norm.weight" },
  "lnFinal.bias": { name: "output_norm.bias" },
  "unembed.weight": { name: "output.weight" },
};

function common(c: { dModel: number; nLayers: number; nHeads: number; dMlp: number; dVocab: number; nCtx: number; eps: number; tie: boolean; bos?: number; eos: number[] }): ModelConfig {
  return {
    family: "gpt2",
    dModel: c.dModel,
    nLayers: c.nLayers,
    nHeads: c.nHeads,
    nKvHeads: c.nHeads,
    dHead: c.dModel / c.nHeads,
    dMlp: c.dMlp,
    dVocab: c.dVocab,
    nCtx: c.nCtx,
    norm: { kind: "layer", eps: c.eps },
    mlp: { kind: "plain", act: "gelu_tanh" },
    pos: { kind: "learned" },
    bias: "all",
    tieEmbeddings: c.tie,
    embedScale: 1,
    ...PLAIN,
    layerTypes: Array<LayerType>(c.nLayers).fill("full"),
    attnScale: 1 / Math.sqrt(c.dModel / c.nHeads),
    ...(c.bos !== undefined ? { bosTokenId: c.bos } : {}),
    eosTokenIds: c.eos,
  };
}

export default defineFamily({
  id: "gpt2",
  matches: { hf: ["GPT2LMHeadModel", "GPT2Model"], gguf: ["gpt2"] },
  fromHf: (hf: HfConfig) => {
    const dModel = num(hf, "n_embd");
    return common({
      dModel,
      nLayers: num(hf, "n_layer"),
      nHeads: num(hf, "n_head"),
      dMlp: typeof hf.n_inner === "number" ? hf.n_inner : 4 * dModel,
      dVocab: num(hf, "vocab_size"),
      nCtx: num(hf, "n_positions", 1024),
      eps: num(hf, "layer_norm_epsilon", 1e-5),
      tie: hf.tie_word_embeddings !== false,
      ...(typeof hf.bos_token_id === "number" ? { bos: hf.bos_token_id } : {}),
      eos: eosList(hf.eos_token_id),
    });
  },
  fromGguf: (g: GgufFile) => {
    const k = (key: string) => ggufGet<number>(g, `gpt2.${key}`, "number");
    return common({
      dModel: k("embedding_length"),
      nLayers: k("block_count"),
      nHeads: k("attention.head_count"),
      dMlp: k("feed_forward_length"),
      dVocab: g.tensors.get("token_embd.weight")?.ne[1] ?? 0,
      nCtx: k("context_length"),
      eps: k("attention.layer_norm_epsilon"),
      tie: !g.tensors.has("output.weight"),
      ...(typeof g.metadata.get("tokenizer.ggml.bos_token_id") === "number" ? { bos: g.metadata.get("tokenizer.ggml.bos_token_id") as number } : {}),
      eos: [g.metadata.get("tokenizer.ggml.eos_token_id")].filter((x): x is number => typeof x === "number"),
    });
  },
  safetensors: SAFETENSORS,
  safetensorsAliases: [(n) => `transformer.${n}`],
  safetensorsIgnore: /^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$/,
  gguf: GGUF,
});
