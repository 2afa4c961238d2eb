// Tiny synthetic checkpoints, one per supported family, each written twice: as a Hugging Face
// folder (config.json with the real HF keys, generation_config.json, model.safetensors with HF
// tensor names) and as the GGUF that llama.cpp's convert_hf_to_gguf.py would make from that
// folder (--outtype f32). Deterministic: weights come from a seeded PRNG.
//
// The GGUF side is written from the HF side by `toGguf` below, a re-implementation of the
// converter's conventions for these architectures as of the llama.cpp build bundled with
// node-llama-cpp 3.21.1 (conversion/{llama,qwen,gemma,olmo,gpt2,base}.py, gguf-py constants and
// tensor_mapping). It deliberately shares nothing with src/model/families/*: the family tables are
// what the fixtures test.
//
//   node dist/scripts/make-fixtures.js [outDir] [family...]   (default outDir: test/fixtures/families)
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Rng } from "../src/core/rng.js";
import { GgmlType, GgufValueType, writeGguf, type GgufWriteTensor, type GgufWriteValue } from "../src/io/gguf.js";
import { writeSafetensors } from "../src/io/safetensors.js";

export const FIXTURE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "gpt2"] as const;
export type FixtureFamily = (typeof FIXTURE_FAMILIES)[number];
/** Mixture-of-experts families (cpu and jax-js engines; test/moe.test.ts). */
export const MOE_FIXTURE_FAMILIES = ["qwen3moe", "olmoe", "mixtral"] as const;
export type MoeFixtureFamily = (typeof MOE_FIXTURE_FAMILIES)[number];
export type AnyFixtureFamily = FixtureFamily | MoeFixtureFamily;

export interface FixturePaths<F extends AnyFixtureFamily = FixtureFamily> {
  family: F;
  /** The HF folder. */
  hf: string;
  /** The GGUF file. */
  gguf: string;
}

type Json = Record<string, unknown>;
type Tensors = Map<string, { data: Float32Array; shape: number[] }>;

/** Sizes shared by the fixtures (Gemma 3 needs 7 layers for a global layer among sliding ones). */
const D = 64;
const H = 4;
const KV_HEADS = 2;
const F = 96;
const V = 320;
const N_CTX = 128;
/**
 * Embedding scales. Tied embeddings of unit scale make a model that mostly predicts the token it
 * just read (x ~ e_t, logit e_t . e_t); small ones let the layers drive the prediction, so greedy
 * continuations are varied. Gemma multiplies embeddings by sqrt(64) = 8.
 */
const EMB = 0.1;
const GEMMA_EMB = 0.0625;
/** GPT-2 bias scale (larger ones add a common direction that makes every position predict alike). */
const GPT2_BIAS = 0.02;

// ---------------------------------------------------------------- weights

class Init {
  private rng: Rng;
  constructor(seed: number) {
    this.rng = new Rng(seed);
  }
  /** Uniform with the given standard deviation, centred on `mean`. */
  uniform(n: number, std: number, mean = 0): Float32Array {
    const a = std * Math.sqrt(3);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + (this.rng.next() * 2 - 1) * a;
    return out;
  }
  /** A linear layer [out, in] with unit-variance outputs for unit-variance inputs (times gain). */
  linear(out: number, inp: number, gain = 1): { data: Float32Array; shape: number[] } {
    return { data: this.uniform(out * inp, gain / Math.sqrt(inp)), shape: [out, inp] };
  }
  vec(n: number, std: number, mean = 0): { data: Float32Array; shape: number[] } {
    return { data: this.uniform(n, std, mean), shape: [n] };
  }
}

function seedOf(family: string): number {
  let h = 2166136261;
  for (const ch of family) h = Math.imul(h ^ ch.charCodeAt(0), 16777619) >>> 0;
  return h;
}

// ---------------------------------------------------------------- vocabularies

interface Vocab {
  model: "llama" | "gpt2";
  pre: string;
  tokens: string[];
  types: number[];
  scores?: number[];
  merges?: string[];
  bos: number;
  eos: number;
  unk?: number;
  pad?: number;
}

const TT = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, BYTE: 6 } as const;
const LETTERS = "etaoinshrdlucmfwypvbgkjqxz";
const BIGRAMS = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le"];

/** SentencePiece vocabulary (tokenizer.ggml.model "llama"): specials, the 256 byte pieces, then words. */
function spmVocab(specials: { text: string; type: number }[], bos: number, eos: number, unk: number, pad?: number): Vocab {
  const tokens: string[] = [];
  const types: number[] = [];
  for (const s of specials) {
    tokens.push(s.text);
    types.push(s.type);
  }
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    types.push(TT.BYTE);
  }
  const pieces = [...LETTERS].map((c) => `\u2581${c}`).concat(BIGRAMS, BIGRAMS.map((b) => `\u2581${b}`));
  for (const p of pieces) {
    if (tokens.length >= V) break;
    tokens.push(p);
    types.push(TT.NORMAL);
  }
  while (tokens.length < V) {
    tokens.push(`<unused${tokens.length}>`);
    types.push(TT.CONTROL);
  }
  const scores = tokens.map((_, i) => (types[i] === TT.NORMAL ? -i : 0));
  return { model: "llama", pre: "default", tokens, types, scores, bos, eos, unk, ...(pad !== undefined ? { pad } : {}) };
}

/** GPT-2's byte -> printable character map (byte-level BPE). */
function byteChars(): string[] {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const out = new Array<string>(256);
  bs.forEach((b, i) => (out[b] = String.fromCodePoint(cs[i]!)));
  return out;
}

/** Byte-level BPE vocabulary (tokenizer.ggml.model "gpt2"): 256 byte tokens, merges, then specials. */
function bpeVocab(pre: string, specials: string[], bos: string, eos: string): Vocab {
  const tokens = byteChars();
  const types: number[] = tokens.map(() => TT.NORMAL);
  const merges: string[] = [];
  for (const c of LETTERS) merges.push(`\u0120 ${c}`);
  for (const b of BIGRAMS) merges.push(`${b[0]} ${b[1]}`);
  for (const m of merges) {
    tokens.push(m.replace(" ", ""));
    types.push(TT.NORMAL);
  }
  let r = 0;
  const named = [...specials];
  while (tokens.length + named.length < V) named.push(`<|reserved_special_token_${r++}|>`);
  for (const s of named) {
    tokens.push(s);
    types.push(TT.CONTROL);
  }
  return { model: "gpt2", pre, tokens, types, merges, bos: tokens.indexOf(bos), eos: tokens.indexOf(eos) };
}

// ---------------------------------------------------------------- the families (HF side)

interface HfModel {
  config: Json;
  generation: Json;
  tensors: Tensors;
  vocab: Vocab;
}

interface DecoderOpts {
  layers: number;
  headDim: number;
  /** RMSNorm weights: centred on 1 (w), or on 0 (Gemma's stored w of (1 + w)). */
  normMean: 0 | 1;
  qkvBias?: boolean;
  qkNorm?: "head" | "full";
  sandwich?: boolean;
  postOnly?: boolean;
  tied: boolean;
  embedStd?: number;
  /** Key/value heads (default K). */
  kvHeads?: number;
}

/** Llama-layout decoder tensors under their HF names (model.layers.{i}.self_attn.q_proj ...). */
function decoderTensors(init: Init, o: DecoderOpts): Tensors {
  const t: Tensors = new Map();
  const hd = o.headDim;
  const K = o.kvHeads ?? KV_HEADS;
  const norm = () => init.vec(D, 0.25, o.normMean);
  t.set("model.embed_tokens.weight", { data: init.uniform(V * D, o.embedStd ?? 1), shape: [V, D] });
  for (let i = 0; i < o.layers; i++) {
    const p = `model.layers.${i}`;
    if (!o.postOnly) t.set(`${p}.input_layernorm.weight`, norm());
    t.set(`${p}.self_attn.q_proj.weight`, init.linear(H * hd, D));
    t.set(`${p}.self_attn.k_proj.weight`, init.linear(K * hd, D));
    t.set(`${p}.self_attn.v_proj.weight`, init.linear(K * hd, D));
    if (o.qkvBias) {
      t.set(`${p}.self_attn.q_proj.bias`, init.vec(H * hd, 0.5));
      t.set(`${p}.self_attn.k_proj.bias`, init.vec(K * hd, 0.5));
      t.set(`${p}.self_attn.v_proj.bias`, init.vec(K * hd, 0.5));
    }
    t.set(`${p}.self_attn.o_proj.weight`, init.linear(D, H * hd));
    if (o.qkNorm) {
      t.set(`${p}.self_attn.q_norm.weight`, init.vec(o.qkNorm === "head" ? hd : H * hd, 0.3, o.normMean));
      t.set(`${p}.self_attn.k_norm.weight`, init.vec(o.qkNorm === "head" ? hd : K * hd, 0.3, o.normMean));
    }
    t.set(`${p}.post_attention_layernorm.weight`, norm());
    if (o.sandwich) {
      t.set(`${p}.pre_feedforward_layernorm.weight`, norm());
      t.set(`${p}.post_feedforward_layernorm.weight`, norm());
    }
    if (o.postOnly) t.set(`${p}.post_feedforward_layernorm.weight`, norm());
    t.set(`${p}.mlp.gate_proj.weight`, init.linear(F, D));
    t.set(`${p}.mlp.up_proj.weight`, init.linear(F, D));
    t.set(`${p}.mlp.down_proj.weight`, init.linear(D, F));
  }
  t.set("model.norm.weight", norm());
  if (!o.tied) t.set("lm_head.weight", init.linear(V, D));
  return t;
}

function base(arch: string, modelType: string, layers: number, headDim: number, vocab: Vocab, extra: Json): Json {
  return {
    architectures: [arch],
    model_type: modelType,
    hidden_size: D,
    intermediate_size: F,
    num_hidden_layers: layers,
    num_attention_heads: H,
    num_key_value_heads: KV_HEADS,
    head_dim: headDim,
    vocab_size: V,
    max_position_embeddings: N_CTX,
    bos_token_id: vocab.bos,
    eos_token_id: vocab.eos,
    torch_dtype: "float32",
    transformers_version: "4.56.0",
    ...extra,
  };
}

const gen = (v: Vocab): Json => ({ bos_token_id: v.bos, eos_token_id: v.eos, transformers_version: "4.56.0" });

function llamaFamily(init: Init): HfModel {
  const vocab = bpeVocab("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>");
  // Llama 3.2 style: tied embeddings, GQA, rope_theta 500k and "llama3" rope scaling. The scaling's
  // original context is shrunk to 64 so that all three bands (kept, smoothed, divided) occur
  // among the 8 frequencies of a 16-wide head.
  const config = base("LlamaForCausalLM", "llama", 4, 16, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    rope_scaling: { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 },
    attention_bias: false,
    mlp_bias: false,
    tie_word_embeddings: true,
  });
  return { config, generation: gen(vocab), vocab, tensors: decoderTensors(init, { layers: 4, headDim: 16, normMean: 1, tied: true, embedStd: EMB }) };
}

function mistralFamily(init: Init): HfModel {
  const vocab = spmVocab([{ text: "<unk>", type: TT.UNKNOWN }, { text: "<s>", type: TT.CONTROL }, { text: "</s>", type: TT.CONTROL }], 1, 2, 0);
  // Mistral v0.3 / Nemo style: head_dim (24) is not hidden/heads (16), rope_theta 1M, untied head,
  // no sliding window (llama.cpp's converter drops sliding_window for MistralForCausalLM).
  const config = base("MistralForCausalLM", "mistral", 4, 24, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-5,
    rope_theta: 1000000,
    sliding_window: null,
    tie_word_embeddings: false,
  });
  return { config, generation: gen(vocab), vocab, tensors: decoderTensors(init, { layers: 4, headDim: 24, normMean: 1, tied: false }) };
}

function qwen2Family(init: Init): HfModel {
  const vocab = bpeVocab("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>");
  const config = base("Qwen2ForCausalLM", "qwen2", 4, 16, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    use_sliding_window: false,
    sliding_window: 4096,
    max_window_layers: 4,
    tie_word_embeddings: true,
  });
  delete config.head_dim; // Qwen2 configs derive it
  return { config, generation: gen(vocab), vocab, tensors: decoderTensors(init, { layers: 4, headDim: 16, normMean: 1, qkvBias: true, tied: true, embedStd: EMB }) };
}

function qwen3Family(init: Init): HfModel {
  const vocab = bpeVocab("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>");
  // Qwen3 style: head_dim (32) wider than hidden/heads, per-head q/k RMSNorm, tied embeddings.
  const config = base("Qwen3ForCausalLM", "qwen3", 4, 32, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    attention_bias: false,
    use_sliding_window: false,
    sliding_window: null,
    max_window_layers: 4,
    tie_word_embeddings: true,
  });
  return { config, generation: gen(vocab), vocab, tensors: decoderTensors(init, { layers: 4, headDim: 32, normMean: 1, qkNorm: "head", tied: true, embedStd: EMB }) };
}

function gemmaVocab(): Vocab {
  const s = (text: string, type: number) => ({ text, type });
  return spmVocab([s("<pad>", TT.CONTROL), s("<eos>", TT.CONTROL), s("<bos>", TT.CONTROL), s("<unk>", TT.UNKNOWN), s("<start_of_turn>", TT.CONTROL), s("<end_of_turn>", TT.CONTROL)], 2, 1, 3, 0);
}

function gemma2Family(init: Init): HfModel {
  const vocab = gemmaVocab();
  // Soft-capping small enough to bite (attention 5, final 3), window 4 on the even layers, head_dim
  // 32 (llama.cpp takes the query scale from head_dim, so query_pre_attn_scalar = head_dim).
  const config = base("Gemma2ForCausalLM", "gemma2", 4, 32, vocab, {
    hidden_activation: "gelu_pytorch_tanh",
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    attention_bias: false,
    query_pre_attn_scalar: 32,
    attn_logit_softcapping: 5.0,
    final_logit_softcapping: 3.0,
    sliding_window: 4,
    cache_implementation: "hybrid",
    pad_token_id: 0,
    tie_word_embeddings: true,
  });
  const tensors = decoderTensors(init, { layers: 4, headDim: 32, normMean: 0, sandwich: true, tied: true, embedStd: GEMMA_EMB });
  return { config, generation: { ...gen(vocab), pad_token_id: 0, cache_implementation: "hybrid" }, vocab, tensors };
}

function gemma3Family(init: Init): HfModel {
  const vocab = gemmaVocab();
  // 7 layers: layer 5 is global (rope_theta 1M, linear scaling 8, as Gemma 3 4B+), the others slide
  // over 4 tokens with their own (local) RoPE base. Per-head q/k norms with (1 + w) like every Gemma norm.
  const config = base("Gemma3ForCausalLM", "gemma3_text", 7, 32, vocab, {
    hidden_activation: "gelu_pytorch_tanh",
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    // Real Gemma 3 uses 10000, which is also llama.cpp's default when the GGUF lacks
    // gemma3.rope.freq_base_swa; a different value checks that the key is written and read.
    rope_local_base_freq: 20000,
    rope_scaling: { rope_type: "linear", factor: 8.0 },
    attention_bias: false,
    query_pre_attn_scalar: 32,
    sliding_window: 4,
    sliding_window_pattern: 6,
    layer_types: ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    final_logit_softcapping: null,
    attn_logit_softcapping: null,
    pad_token_id: 0,
    tie_word_embeddings: true,
  });
  const tensors = decoderTensors(init, { layers: 7, headDim: 32, normMean: 0, sandwich: true, qkNorm: "head", tied: true, embedStd: GEMMA_EMB });
  return { config, generation: { ...gen(vocab), pad_token_id: 0 }, vocab, tensors };
}

function olmo2Family(init: Init): HfModel {
  const vocab = bpeVocab("dbrx", ["<|endoftext|>", "<|pad|>"], "<|endoftext|>", "<|endoftext|>");
  const config = base("Olmo2ForCausalLM", "olmo2", 4, 16, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    rope_theta: 500000,
    attention_bias: false,
    pad_token_id: vocab.tokens.indexOf("<|pad|>"),
    tie_word_embeddings: false,
  });
  delete config.head_dim;
  return { config, generation: gen(vocab), vocab, tensors: decoderTensors(init, { layers: 4, headDim: 16, normMean: 1, postOnly: true, qkNorm: "full", tied: false }) };
}

function gpt2Family(init: Init): HfModel {
  const vocab = bpeVocab("gpt-2", ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>");
  const L = 4;
  const config: Json = {
    architectures: ["GPT2LMHeadModel"],
    model_type: "gpt2",
    n_embd: D,
    n_layer: L,
    n_head: H,
    n_inner: null,
    n_positions: N_CTX,
    n_ctx: N_CTX,
    vocab_size: V,
    activation_function: "gelu_new",
    layer_norm_epsilon: 1e-5,
    scale_attn_weights: true,
    bos_token_id: vocab.bos,
    eos_token_id: vocab.eos,
    torch_dtype: "float32",
    transformers_version: "4.56.0",
  };
  const t: Tensors = new Map();
  const conv = (inp: number, out: number) => ({ data: init.uniform(inp * out, 1 / Math.sqrt(inp)), shape: [inp, out] }); // Conv1D: [in, out]
  const ln = () => init.vec(D, 0.25, 1);
  const bias = (n: number) => init.vec(n, GPT2_BIAS);
  t.set("transformer.wte.weight", { data: init.uniform(V * D, EMB), shape: [V, D] });
  t.set("transformer.wpe.weight", { data: init.uniform(N_CTX * D, EMB / 2), shape: [N_CTX, D] });
  for (let i = 0; i < L; i++) {
    const p = `transformer.h.${i}`;
    t.set(`${p}.ln_1.weight`, ln());
    t.set(`${p}.ln_1.bias`, bias(D));
    t.set(`${p}.attn.c_attn.weight`, conv(D, 3 * D));
    t.set(`${p}.attn.c_attn.bias`, bias(3 * D));
    t.set(`${p}.attn.c_proj.weight`, conv(D, D));
    t.set(`${p}.attn.c_proj.bias`, bias(D));
    t.set(`${p}.ln_2.weight`, ln());
    t.set(`${p}.ln_2.bias`, bias(D));
    t.set(`${p}.mlp.c_fc.weight`, conv(D, 4 * D));
    t.set(`${p}.mlp.c_fc.bias`, bias(4 * D));
    t.set(`${p}.mlp.c_proj.weight`, conv(4 * D, D));
    t.set(`${p}.mlp.c_proj.bias`, bias(D));
  }
  t.set("transformer.ln_f.weight", ln());
  t.set("transformer.ln_f.bias", bias(D));
  return { config, generation: gen(vocab), vocab, tensors: t };
}

/** MoE fixture sizes: 8 experts of hidden size 32, 2 routed per token. */
const N_EXPERTS = 8;
const TOP_K = 2;
const F_EXPERT = 32;

/**
 * Replace each layer's dense MLP by N_EXPERTS experts and a router, under the family's HF names
 * (`expert(i, e, which)`: which = gate | up | down). The router's gain spreads the routing.
 */
function withExperts(init: Init, t: Tensors, layers: number, router: (i: number) => string, expert: (i: number, e: number, which: "gate" | "up" | "down") => string): Tensors {
  const out: Tensors = new Map();
  for (const [k, v] of t) {
    const m = /^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/.exec(k);
    if (m) {
      const i = Number(m[1]);
      out.set(router(i), init.linear(N_EXPERTS, D, 3));
      for (let e = 0; e < N_EXPERTS; e++) {
        out.set(expert(i, e, "gate"), init.linear(F_EXPERT, D));
        out.set(expert(i, e, "up"), init.linear(F_EXPERT, D));
        out.set(expert(i, e, "down"), init.linear(D, F_EXPERT));
      }
      continue;
    }
    if (/\.mlp\.(up|down)_proj\.weight$/.test(k)) continue;
    out.set(k, v);
  }
  if (out.size === t.size) throw new Error(`make-fixtures: no MLP replaced in ${layers} layers`);
  return out;
}

const qwenMoeNames = [(i: number) => `model.layers.${i}.mlp.gate.weight`, (i: number, e: number, w: string) => `model.layers.${i}.mlp.experts.${e}.${w}_proj.weight`] as const;

function qwen3moeFamily(init: Init): HfModel {
  const vocab = bpeVocab("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>");
  // Qwen3-30B-A3B style: Qwen3 attention (per-head qk-norm, head_dim 32), every layer sparse, top-k renormalised.
  const config = base("Qwen3MoeForCausalLM", "qwen3_moe", 4, 32, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    attention_bias: false,
    use_sliding_window: false,
    sliding_window: null,
    max_window_layers: 4,
    tie_word_embeddings: true,
    num_experts: N_EXPERTS,
    num_experts_per_tok: TOP_K,
    moe_intermediate_size: F_EXPERT,
    norm_topk_prob: true,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    output_router_logits: false,
    router_aux_loss_coef: 0.001,
  });
  const dense = decoderTensors(init, { layers: 4, headDim: 32, normMean: 1, qkNorm: "head", tied: true, embedStd: EMB });
  return { config, generation: gen(vocab), vocab, tensors: withExperts(init, dense, 4, ...qwenMoeNames) };
}

function olmoeFamily(init: Init): HfModel {
  const vocab = bpeVocab("dbrx", ["<|endoftext|>", "<|pad|>"], "<|endoftext|>", "<|endoftext|>");
  // OLMoE-1B-7B style: pre-norms, full-width q/k RMSNorm, top-k weights not renormalised.
  const config = base("OlmoeForCausalLM", "olmoe", 4, 16, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    attention_bias: false,
    clip_qkv: null,
    pad_token_id: vocab.tokens.indexOf("<|pad|>"),
    tie_word_embeddings: false,
    num_experts: N_EXPERTS,
    num_experts_per_tok: TOP_K,
    norm_topk_prob: false,
    intermediate_size: F_EXPERT,
    // llama.cpp's olmoe sizes attn_k_norm as n_embd: no grouped-query attention (as in OLMoE-1B-7B).
    num_key_value_heads: H,
  });
  delete config.head_dim;
  const dense = decoderTensors(init, { layers: 4, headDim: 16, normMean: 1, qkNorm: "full", tied: false, kvHeads: H });
  return { config, generation: gen(vocab), vocab, tensors: withExperts(init, dense, 4, ...qwenMoeNames) };
}

function mixtralFamily(init: Init): HfModel {
  const vocab = spmVocab([{ text: "<unk>", type: TT.UNKNOWN }, { text: "<s>", type: TT.CONTROL }, { text: "</s>", type: TT.CONTROL }], 1, 2, 0);
  const config = base("MixtralForCausalLM", "mixtral", 4, 16, vocab, {
    hidden_act: "silu",
    rms_norm_eps: 1e-5,
    rope_theta: 1000000,
    sliding_window: null,
    tie_word_embeddings: false,
    num_local_experts: N_EXPERTS,
    num_experts_per_tok: TOP_K,
    intermediate_size: F_EXPERT,
    router_aux_loss_coef: 0.02,
  });
  const w = { gate: "w1", up: "w3", down: "w2" } as const;
  const dense = decoderTensors(init, { layers: 4, headDim: 16, normMean: 1, tied: false });
  const tensors = withExperts(init, dense, 4, (i) => `model.layers.${i}.block_sparse_moe.gate.weight`, (i, e, which) => `model.layers.${i}.block_sparse_moe.experts.${e}.${w[which]}.weight`);
  return { config, generation: gen(vocab), vocab, tensors };
}

const BUILDERS: Record<AnyFixtureFamily, (init: Init) => HfModel> = {
  llama: llamaFamily,
  mistral: mistralFamily,
  qwen2: qwen2Family,
  qwen3: qwen3Family,
  gemma2: gemma2Family,
  gemma3: gemma3Family,
  olmo2: olmo2Family,
  gpt2: gpt2Family,
  qwen3moe: qwen3moeFamily,
  olmoe: olmoeFamily,
  mixtral: mixtralFamily,
};

// ---------------------------------------------------------------- convert_hf_to_gguf, re-implemented

const u32 = (value: number): GgufWriteValue => ({ type: GgufValueType.UINT32, value });
const f32 = (value: number): GgufWriteValue => ({ type: GgufValueType.FLOAT32, value });
const str = (value: string): GgufWriteValue => ({ type: GgufValueType.STRING, value });
const bool = (value: boolean): GgufWriteValue => ({ type: GgufValueType.BOOL, value });
const strs = (value: string[]): GgufWriteValue => ({ type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value });
const f32s = (value: number[]): GgufWriteValue => ({ type: GgufValueType.ARRAY, itemType: GgufValueType.FLOAT32, value });
const i32s = (value: number[]): GgufWriteValue => ({ type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value });

/** HF config class -> GGUF architecture (conversion/*.py model_arch). Mistral converts to "llama". */
const GGUF_ARCH: Record<AnyFixtureFamily, string> = {
  llama: "llama",
  mistral: "llama",
  qwen2: "qwen2",
  qwen3: "qwen3",
  gemma2: "gemma2",
  gemma3: "gemma3",
  olmo2: "olmo2",
  gpt2: "gpt2",
  qwen3moe: "qwen3moe",
  olmoe: "olmoe",
  mixtral: "llama",
};

/** gguf-py tensor_mapping.py: HF tensor (without the layer prefix) -> GGUF tensor. */
const LAYER_NAMES: Record<string, string> = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "self_attn.q_norm": "attn_q_norm",
  "self_attn.k_norm": "attn_k_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
  // post_attention_layernorm is the pre-MLP norm for Llama/Qwen but the post-attention norm for
  // Gemma 2/3 and OLMo 2 (MODEL_TENSOR.ATTN_POST_NORM, "blk.{bid}.post_attention_norm").
  "post_attention_layernorm": "ffn_norm",
  "pre_feedforward_layernorm": "ffn_norm",
  "post_feedforward_layernorm": "post_ffw_norm",
  // GPT-2
  "ln_1": "attn_norm",
  "attn.c_attn": "attn_qkv",
  "attn.c_proj": "attn_output",
  "ln_2": "ffn_norm",
  "mlp.c_fc": "ffn_up",
  "mlp.c_proj": "ffn_down",
};
const GLOBAL_NAMES: Record<string, string> = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
  "transformer.wte.weight": "token_embd.weight",
  "transformer.wpe.weight": "position_embd.weight",
  "transformer.ln_f.weight": "output_norm.weight",
  "transformer.ln_f.bias": "output_norm.bias",
};

function ggufName(family: AnyFixtureFamily, hfName: string): string {
  const g = GLOBAL_NAMES[hfName];
  if (g) return g;
  const m = /^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)$/.exec(hfName);
  if (!m) throw new Error(`make-fixtures: no GGUF name for ${hfName}`);
  const [, bid, what, kind] = m as unknown as [string, string, string, string];
  let n = LAYER_NAMES[what];
  if (what === "post_attention_layernorm" && (family === "gemma2" || family === "gemma3" || family === "olmo2")) n = "post_attention_norm";
  if (!n) throw new Error(`make-fixtures: no GGUF name for ${hfName}`);
  return `blk.${bid}.${n}.${kind}`;
}

/** LlamaModel.permute: rows (head, half, j) -> (head, j, half), for llama.cpp's adjacent-pair RoPE. */
function permuteRows(data: Float32Array, nHead: number, rowLen: number): Float32Array {
  const rows = data.length / rowLen;
  const hd = rows / nHead;
  const out = new Float32Array(data.length);
  for (let h = 0; h < nHead; h++)
    for (let s = 0; s < 2; s++)
      for (let j = 0; j < hd / 2; j++) {
        const src = h * hd + s * (hd / 2) + j;
        const dst = h * hd + 2 * j + s;
        out.set(data.subarray(src * rowLen, (src + 1) * rowLen), dst * rowLen);
      }
  return out;
}

function transpose(t: { data: Float32Array; shape: number[] }): { data: Float32Array; shape: number[] } {
  const [r, c] = t.shape as [number, number];
  const o = new Float32Array(t.data.length);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) o[j * r + i] = t.data[i * c + j]!;
  return { data: o, shape: [c, r] };
}

/** LlamaModel.generate_extra_tensors: rope_freqs for rope_type "llama3" (float32, as torch computes it). */
function llama3RopeFreqs(c: Json): Float32Array {
  const s = c.rope_scaling as Json;
  const base = c.rope_theta as number;
  const dim = (c.head_dim as number | undefined) ?? (c.hidden_size as number) / (c.num_attention_heads as number);
  const factor = s.factor as number, lo = s.low_freq_factor as number, hi = s.high_freq_factor as number, old = s.original_max_position_embeddings as number;
  const f = Math.fround;
  const out = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) {
    const freq = f(1 / f(Math.pow(base, f((2 * i) / dim))));
    const wavelen = f(f(2 * Math.PI) / freq);
    if (wavelen < old / hi) out[i] = 1;
    else if (wavelen > old / lo) out[i] = factor;
    else {
      const smooth = f(f(f(old / wavelen) - lo) / (hi - lo));
      out[i] = f(1 / f(f(f(1 - smooth) / factor) + smooth));
    }
  }
  return out;
}

function tokenizerMeta(v: Vocab): Record<string, GgufWriteValue> {
  const m: Record<string, GgufWriteValue> = {
    "tokenizer.ggml.model": str(v.model),
    "tokenizer.ggml.pre": str(v.pre),
    "tokenizer.ggml.tokens": strs(v.tokens),
  };
  if (v.scores) m["tokenizer.ggml.scores"] = f32s(v.scores);
  m["tokenizer.ggml.token_type"] = i32s(v.types);
  if (v.merges) m["tokenizer.ggml.merges"] = strs(v.merges);
  m["tokenizer.ggml.bos_token_id"] = u32(v.bos);
  m["tokenizer.ggml.eos_token_id"] = u32(v.eos);
  if (v.unk !== undefined) m["tokenizer.ggml.unknown_token_id"] = u32(v.unk);
  if (v.pad !== undefined) m["tokenizer.ggml.padding_token_id"] = u32(v.pad);
  m["tokenizer.ggml.add_bos_token"] = bool(v.model === "llama" || v.pre === "llama-bpe");
  m["tokenizer.ggml.add_eos_token"] = bool(false);
  return m;
}

function toGguf(family: AnyFixtureFamily, hf: HfModel, file: string): void {
  const c = hf.config;
  const arch = GGUF_ARCH[family];
  const k = (key: string) => `${arch}.${key}`;
  const n = (key: string) => c[key] as number;
  const meta: Record<string, GgufWriteValue> = {
    "general.architecture": str(arch),
    "general.type": str("model"),
    "general.name": str(`selfscope tiny ${family}`),
    "general.file_type": u32(0), // ALL_F32
  };
  if (family === "gpt2") {
    // GPT2Model.set_gguf_parameters: feed_forward_length is always 4 * n_embd.
    Object.assign(meta, {
      [k("block_count")]: u32(n("n_layer")),
      [k("context_length")]: u32(n("n_ctx")),
      [k("embedding_length")]: u32(n("n_embd")),
      [k("feed_forward_length")]: u32(4 * n("n_embd")),
      [k("attention.head_count")]: u32(n("n_head")),
      [k("attention.layer_norm_epsilon")]: f32(n("layer_norm_epsilon")),
    });
  } else if (family === "gemma2") {
    // Gemma2Model.set_gguf_parameters does not call the base: no rope.freq_base (llama.cpp: 10000).
    Object.assign(meta, {
      [k("context_length")]: u32(n("max_position_embeddings")),
      [k("embedding_length")]: u32(n("hidden_size")),
      [k("block_count")]: u32(n("num_hidden_layers")),
      [k("feed_forward_length")]: u32(n("intermediate_size")),
      [k("attention.head_count")]: u32(n("num_attention_heads")),
      [k("attention.head_count_kv")]: u32(n("num_key_value_heads")),
      [k("attention.layer_norm_rms_epsilon")]: f32(n("rms_norm_eps")),
      [k("attention.key_length")]: u32(n("head_dim")),
      [k("attention.value_length")]: u32(n("head_dim")),
      [k("attn_logit_softcapping")]: f32(n("attn_logit_softcapping")),
      [k("final_logit_softcapping")]: f32(n("final_logit_softcapping")),
      [k("attention.sliding_window")]: u32(n("sliding_window")),
    });
  } else {
    // TextModel.set_gguf_parameters (base.py), then the model class's additions.
    Object.assign(meta, {
      [k("block_count")]: u32(n("num_hidden_layers")),
      [k("context_length")]: u32(n("max_position_embeddings")),
      [k("embedding_length")]: u32(n("hidden_size")),
      [k("feed_forward_length")]: u32(n("intermediate_size")),
      [k("attention.head_count")]: u32(n("num_attention_heads")),
      [k("attention.head_count_kv")]: u32(n("num_key_value_heads")),
    });
    const rs = c.rope_scaling as Json | undefined;
    if (rs && rs.rope_type === "linear") {
      meta[k("rope.scaling.type")] = str("linear");
      meta[k("rope.scaling.factor")] = f32(rs.factor as number);
    }
    meta[k("rope.freq_base")] = f32(n("rope_theta"));
    if (typeof c.rope_local_base_freq === "number") meta[k("rope.freq_base_swa")] = f32(c.rope_local_base_freq);
    meta[k("attention.layer_norm_rms_epsilon")] = f32(n("rms_norm_eps"));
    // Qwen2MoeModel / OlmoeModel / LlamaModel (Mixtral) set_gguf_parameters: the expert counts.
    const nExp = (c.num_experts ?? c.num_local_experts) as number | undefined;
    if (nExp !== undefined) {
      meta[k("expert_count")] = u32(nExp);
      meta[k("expert_used_count")] = u32(n("num_experts_per_tok"));
      if (typeof c.moe_intermediate_size === "number") meta[k("expert_feed_forward_length")] = u32(c.moe_intermediate_size);
    }
    if (typeof c.head_dim === "number") {
      meta[k("attention.key_length")] = u32(c.head_dim);
      meta[k("attention.value_length")] = u32(c.head_dim);
    }
    if (arch === "llama") {
      meta[k("vocab_size")] = u32(n("vocab_size"));
      meta[k("rope.dimension_count")] = u32((c.head_dim as number | undefined) ?? n("hidden_size") / n("num_attention_heads"));
    }
    if (family === "gemma3") {
      if (typeof c.final_logit_softcapping === "number") meta[k("final_logit_softcapping")] = f32(c.final_logit_softcapping);
      if (c.sliding_window_pattern !== 1) meta[k("attention.sliding_window")] = u32(n("sliding_window"));
    }
  }
  Object.assign(meta, tokenizerMeta(hf.vocab));

  const tensors: GgufWriteTensor[] = [];
  const add = (name: string, t: { data: Float32Array; shape: number[] }) => tensors.push({ name, shape: t.shape, type: GgmlType.F32, data: t.data });
  if (family === "llama" && (c.rope_scaling as Json | undefined)?.rope_type === "llama3") {
    const rf = llama3RopeFreqs(c);
    add("rope_freqs.weight", { data: rf, shape: [rf.length] });
  }
  // modify_tensors of the MoE models: each layer's experts stacked into one tensor per matrix
  // ([experts, rows, cols]), in expert order; the router is ffn_gate_inp.
  const stacks = new Map<string, { data: Float32Array; shape: number[] }[]>();
  for (const [name, t0] of hf.tensors) {
    const ex = /^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$/.exec(name);
    if (ex) {
      const which = { gate_proj: "gate", w1: "gate", up_proj: "up", w3: "up", down_proj: "down", w2: "down" }[ex[3]!];
      if (!which) throw new Error(`make-fixtures: unknown expert tensor ${name}`);
      const key = `blk.${ex[1]}.ffn_${which}_exps.weight`;
      const list = stacks.get(key) ?? [];
      list[Number(ex[2])] = t0;
      stacks.set(key, list);
      continue;
    }
    const rt = /^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$/.exec(name);
    if (rt) {
      add(`blk.${rt[1]}.ffn_gate_inp.weight`, t0);
      continue;
    }
    let t = t0;
    // Gemma: every *norm.weight is stored as (1 + w) (Gemma2Model/Gemma3Model.modify_tensors).
    if ((family === "gemma2" || family === "gemma3") && name.endsWith("norm.weight")) t = { data: t.data.map((x) => x + 1), shape: t.shape };
    // LlamaModel.modify_tensors (undo_permute) for arch llama, incl. Mistral: q/k rows interleaved.
    if (arch === "llama" && /self_attn\.q_proj\.(weight|bias)$/.test(name)) t = { data: permuteRows(t.data, n("num_attention_heads"), t.shape[1] ?? 1), shape: t.shape };
    if (arch === "llama" && /self_attn\.k_proj\.(weight|bias)$/.test(name)) t = { data: permuteRows(t.data, n("num_key_value_heads"), t.shape[1] ?? 1), shape: t.shape };
    // GPT2Model.modify_tensors: Conv1D weights [in, out] -> [out, in].
    if (family === "gpt2" && /\.(c_attn|c_proj|c_fc)\.weight$/.test(name)) t = transpose(t);
    add(ggufName(family, name), t);
  }
  for (const [key, list] of stacks) {
    const [r, cc] = list[0]!.shape as [number, number];
    const data = new Float32Array(list.length * r * cc);
    list.forEach((t, e) => data.set(t.data, e * r * cc));
    add(key, { data, shape: [list.length, r, cc] });
  }
  writeGguf(file, meta, tensors);
}

// ---------------------------------------------------------------- entry points

/** Writes `<outDir>/<family>/{hf/, model.gguf}` and returns the paths. */
export function makeFixture<F extends AnyFixtureFamily>(family: F, outDir: string): FixturePaths<F> {
  const hf = BUILDERS[family](new Init(seedOf(family)));
  const dir = path.join(outDir, family);
  const hfDir = path.join(dir, "hf");
  fs.mkdirSync(hfDir, { recursive: true });
  fs.writeFileSync(path.join(hfDir, "config.json"), JSON.stringify(hf.config, null, 2) + "\n");
  fs.writeFileSync(path.join(hfDir, "generation_config.json"), JSON.stringify(hf.generation, null, 2) + "\n");
  writeSafetensors(path.join(hfDir, "model.safetensors"), Object.fromEntries(hf.tensors), { format: "pt" });
  const gguf = path.join(dir, "model.gguf");
  toGguf(family, hf, gguf);
  return { family, hf: hfDir, gguf };
}

export function makeFixtures<F extends AnyFixtureFamily = FixtureFamily>(outDir: string, families: readonly F[] = FIXTURE_FAMILIES as unknown as readonly F[]): FixturePaths<F>[] {
  return families.map((f) => makeFixture(f, outDir));
}

const isMain = process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  const [outArg, ...rest] = process.argv.slice(2);
  const here = path.dirname(fileURLToPath(import.meta.url));
  const out = outArg ?? path.resolve(here, "../../test/fixtures/families");
  const all: readonly AnyFixtureFamily[] = [...FIXTURE_FAMILIES, ...MOE_FIXTURE_FAMILIES];
  const fams = rest.length > 0 ? rest.map((f) => {
    if (!(all as readonly string[]).includes(f)) throw new Error(`unknown family ${f}; one of ${all.join(", ")}`);
    return f as AnyFixtureFamily;
  }) : all;
  for (const p of makeFixtures(out, fams)) console.log(`${p.family}: ${p.hf}, ${p.gguf}`);
}
