// The architecture vocabulary shared by every family. Quirks are variants of discriminated
// unions (design guide 10.3), never booleans scattered through the forward pass.
// Dims follow TransformerLens: dModel, nHeads, nKvHeads, dHead, dMlp, dVocab, nLayers, nCtx.

export type Activation = "silu" | "gelu_tanh" | "gelu";

export type NormSpec =
  /** RMSNorm: x / rms(x) * (weightOffset + w). Gemma stores w - 1, hence weightOffset 1. */
  | { kind: "rms"; eps: number; weightOffset: 0 | 1 }
  /** LayerNorm with weight and bias (GPT-2). */
  | { kind: "layer"; eps: number };

export type MlpSpec =
  /** down(act(gate(x)) * up(x)) — Llama, Qwen, Gemma, OLMo. */
  | { kind: "gated"; act: Activation }
  /** down(act(up(x))) — GPT-2. */
  | { kind: "plain"; act: Activation }
  /**
   * A mixture of gated experts (Qwen3-MoE, OLMoE, Mixtral): p = softmax(router·x); the topK experts
   * of highest p get weights p_e (divided by their sum when normTopK), every other expert 0; the MLP
   * adds Σ_e w_e · down_e(act(gate_e(x)) · up_e(x)). dMlp is one expert's hidden size.
   */
  | { kind: "moe"; act: Activation; nExperts: number; topK: number; normTopK: boolean };

export type RopeScaling =
  | { kind: "none" }
  | { kind: "llama3"; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositionEmbeddings: number }
  | { kind: "linear"; factor: number };

export type PositionSpec =
  | {
      kind: "rope";
      theta: number;
      scaling: RopeScaling;
      /** Sliding-window layers may use their own base (Gemma 3: 10k local vs 1M global), unscaled. */
      localTheta?: number;
      /** Per-frequency divisors stored by llama.cpp as rope_freqs.weight (its form of Llama 3 scaling). */
      freqFactors?: number[];
    }
  | { kind: "learned" };

/** Where the block's norms sit. */
export type BlockNorm =
  /** x + f(norm(x)) — Llama, Qwen, GPT-2. */
  | "pre"
  /** x + postNorm(f(norm(x))) — Gemma 2/3. */
  | "sandwich"
  /** x + postNorm(f(x)) — OLMo 2. */
  | "post";

export type QkNorm =
  | { kind: "none" }
  /** RMSNorm over each head's dHead (Qwen3, Gemma 3). */
  | { kind: "head" }
  /** RMSNorm over the whole projection, nHeads·dHead (OLMo 2). */
  | { kind: "full" };

export type LayerType = "full" | "sliding";

/** Which linear layers carry a bias. */
export type BiasSpec = "none" | "qkv" | "all";

export interface ModelConfig {
  family: string;
  dModel: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  dHead: number;
  dMlp: number;
  dVocab: number;
  nCtx: number;
  norm: NormSpec;
  mlp: MlpSpec;
  pos: PositionSpec;
  bias: BiasSpec;
  tieEmbeddings: boolean;
  /** Multiplier applied to token embeddings (Gemma: sqrt(dModel)). */
  embedScale: number;
  /** Attention logits are scaled by this (default 1/sqrt(dHead)). */
  attnScale: number;
  blockNorm: BlockNorm;
  qkNorm: QkNorm;
  /** tanh soft-capping of attention scores / final logits: cap·tanh(x/cap) (Gemma 2). */
  attnSoftcap?: number;
  finalSoftcap?: number;
  /** Per-layer attention type; sliding layers see keys with qPos - kPos < slidingWindow. */
  layerTypes: LayerType[];
  slidingWindow?: number;
  bosTokenId?: number;
  eosTokenIds: number[];
}

/** Defaults for the quirks most families do not have. */
export const PLAIN = { blockNorm: "pre", qkNorm: { kind: "none" } } as const;

/** Canonical parameter paths and their row-major shapes, derived from the config alone. */
export function expectedParams(c: ModelConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  const { dModel: D, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F, dVocab: V } = c;
  const norm = (p: string) => {
    m.set(`${p}.weight`, [D]);
    if (c.norm.kind === "layer") m.set(`${p}.bias`, [D]);
  };
  const lin = (p: string, out: number, inp: number, bias: boolean) => {
    m.set(`${p}.weight`, [out, inp]);
    if (bias) m.set(`${p}.bias`, [out]);
  };
  m.set("embed.weight", [V, D]);
  if (c.pos.kind === "learned") m.set("posEmbed.weight", [c.nCtx, D]);
  for (let i = 0; i < c.nLayers; i++) {
    const b = `blocks.${i}`;
    if (c.blockNorm !== "post") norm(`${b}.ln1`);
    if (c.blockNorm !== "pre") norm(`${b}.ln1Post`);
    if (c.qkNorm.kind !== "none") {
      m.set(`${b}.attn.qNorm.weight`, [c.qkNorm.kind === "head" ? hd : H * hd]);
      m.set(`${b}.attn.kNorm.weight`, [c.qkNorm.kind === "head" ? hd : K * hd]);
    }
    lin(`${b}.attn.q`, H * hd, D, c.bias !== "none");
    lin(`${b}.attn.k`, K * hd, D, c.bias !== "none");
    lin(`${b}.attn.v`, K * hd, D, c.bias !== "none");
    lin(`${b}.attn.o`, D, H * hd, c.bias === "all");
    if (c.blockNorm !== "post") norm(`${b}.ln2`);
    if (c.blockNorm !== "pre") norm(`${b}.ln2Post`);
    if (c.mlp.kind === "moe") {
      m.set(`${b}.mlp.router.weight`, [c.mlp.nExperts, D]);
      for (let e = 0; e < c.mlp.nExperts; e++) {
        lin(`${b}.mlp.experts.${e}.gate`, F, D, false);
        lin(`${b}.mlp.experts.${e}.up`, F, D, false);
        lin(`${b}.mlp.experts.${e}.down`, D, F, false);
      }
      continue;
    }
    if (c.mlp.kind === "gated") lin(`${b}.mlp.gate`, F, D, c.bias === "all");
    lin(`${b}.mlp.up`, F, D, c.bias === "all");
    lin(`${b}.mlp.down`, D, F, c.bias === "all");
  }
  norm("lnFinal");
  if (!c.tieEmbeddings) m.set("unembed.weight", [V, D]);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Validation of the source configuration (config.json or GGUF metadata), before any family reads
// it: a bad value is one error naming the file and the key, never "Invalid array length" or a
// NaN blamed on the weights later, and never a silently different model.

/** Where configuration values come from: config.json (keys as written) or GGUF metadata (keys without the `{arch}.` prefix). */
export type ConfigSource =
  /** `prefix` names a nested config in messages ("text_config." for multimodal Gemma 3). */
  | { format: "hf"; get(key: string): unknown; prefix?: string }
  | { format: "gguf"; arch: string; get(key: string): unknown };

type Check = "count" | "positive" | "window";

const HF_KEYS: [string, Check][] = [
  ...(["num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "vocab_size", "head_dim", "max_position_embeddings", "n_positions", "sliding_window_pattern"] as const).map((k): [string, Check] => [k, "count"]),
  ...(["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar"] as const).map((k): [string, Check] => [k, "positive"]),
  ["sliding_window", "window"],
  ...(["num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"] as const).map((k): [string, Check] => [k, "count"]),
];

const GGUF_KEYS: [string, Check][] = [
  ...(["block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "feed_forward_length", "context_length", "attention.key_length", "attention.value_length"] as const).map((k): [string, Check] => [k, "count"]),
  ...(["attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base", "rope.freq_base_swa"] as const).map((k): [string, Check] => [k, "positive"]),
  ["attention.sliding_window", "window"],
  ...(["expert_count", "expert_used_count", "expert_feed_forward_length"] as const).map((k): [string, Check] => [k, "count"]),
];

/** Why `v` is not acceptable for a key checked as `check` (null when it is). */
function problem(v: unknown, check: Check, format: "hf" | "gguf"): string | null {
  if (typeof v !== "number") return "is not a number";
  switch (check) {
    case "count":
      return Number.isInteger(v) && v > 0 ? null : "must be a positive integer";
    case "positive":
      return Number.isFinite(v) && v > 0 ? null : "must be a finite number greater than 0";
    case "window":
      // llama.cpp reads a GGUF window of 0 as "no sliding window"; config.json says so with null.
      if (format === "gguf") return Number.isInteger(v) && v >= 0 ? null : "must be a non-negative integer (0 = no sliding window)";
      return Number.isInteger(v) && v > 0 ? null : "must be a positive number of tokens (or null for no sliding window)";
  }
}

/**
 * Check the configuration values every family reads; throws one line naming the file and the key.
 * `layer_types` / `sliding_window_pattern` lists must have one entry per layer.
 */
export function validateConfigSource(file: string, src: ConfigSource, fail: (file: string, problem: string, fix: string) => Error): void {
  const fixIn = src.format === "hf" ? "fix config.json" : "re-convert the GGUF (or fix its metadata)";
  const err = (key: string, v: unknown, why: string) => fail(file, `${key} = ${JSON.stringify(v)} ${why}`, fixIn);
  // GGUF keys carry the architecture; the name shown for a config.json key includes its nesting.
  const full = (k: string) => (src.format === "gguf" ? `${src.arch}.${k}` : k);
  const shown = (k: string) => (src.format === "hf" ? `${src.prefix ?? ""}${k}` : k);
  for (const [k, check] of src.format === "hf" ? HF_KEYS : GGUF_KEYS) {
    const v = src.get(full(k));
    if (v === undefined || v === null) continue;
    // config.json's sliding_window is ignored when use_sliding_window is false (Qwen2).
    if (src.format === "hf" && k === "sliding_window" && src.get("use_sliding_window") === false) continue;
    // GGUF per-layer head counts are arrays (checked per entry).
    if (src.format === "gguf" && Array.isArray(v)) {
      const bad = v.findIndex((x) => problem(x, "count", "gguf") !== null && x !== 0);
      if (bad >= 0) throw err(`${shown(full(k))}[${bad}]`, v[bad], "must be a non-negative integer");
      continue;
    }
    const why = problem(v, check, src.format);
    if (why !== null) throw err(shown(full(k)), v, why);
  }
  const nKey = src.format === "hf" ? (src.get("num_hidden_layers") !== undefined ? "num_hidden_layers" : "n_layer") : full("block_count");
  const n = src.get(nKey);
  if (typeof n !== "number") return;
  const listKey = src.format === "hf" ? "layer_types" : full("attention.sliding_window_pattern");
  const list = src.get(listKey);
  if (Array.isArray(list)) {
    if (list.length !== n) throw fail(file, `${shown(listKey)} has ${list.length} entries but ${shown(nKey)} = ${n}: it must list one entry per layer`, fixIn);
    if (src.format === "hf") {
      const bad = list.findIndex((t) => t !== "sliding_attention" && t !== "full_attention");
      if (bad >= 0) throw err(`${shown(listKey)}[${bad}]`, list[bad], 'must be "sliding_attention" or "full_attention"');
    }
  } else if (src.format === "gguf" && list !== undefined && problem(list, "count", "gguf") !== null) {
    throw err(listKey, list, "must be a positive integer period or one boolean per layer");
  }
}

/** Check a converted config (whatever its source): what the forward pass needs, named by config field. */
export function validateModelConfig(c: ModelConfig): string | null {
  for (const k of ["dModel", "nLayers", "nHeads", "nKvHeads", "dHead", "dMlp", "dVocab", "nCtx"] as const) {
    if (!Number.isInteger(c[k]) || c[k] <= 0) return `configuration gives ${k} = ${c[k]} (must be a positive integer)`;
  }
  if (c.nHeads % c.nKvHeads !== 0) return `nHeads ${c.nHeads} is not a multiple of nKvHeads ${c.nKvHeads}`;
  if (!(Number.isFinite(c.norm.eps) && c.norm.eps > 0)) return `configuration gives norm epsilon = ${c.norm.eps} (must be > 0)`;
  if (c.pos.kind === "rope") {
    if (!(Number.isFinite(c.pos.theta) && c.pos.theta > 0)) return `configuration gives rope theta = ${c.pos.theta} (must be > 0)`;
    if (c.pos.localTheta !== undefined && !(Number.isFinite(c.pos.localTheta) && c.pos.localTheta > 0)) return `configuration gives local rope theta = ${c.pos.localTheta} (must be > 0)`;
  }
  if (c.layerTypes.length !== c.nLayers) return `configuration gives ${c.layerTypes.length} layer types for ${c.nLayers} layers`;
  if (c.slidingWindow !== undefined && !(Number.isInteger(c.slidingWindow) && c.slidingWindow > 0)) return `configuration gives sliding window = ${c.slidingWindow} (must be a positive integer)`;
  if (c.layerTypes.includes("sliding") && c.slidingWindow === undefined) return "configuration has sliding-window layers but no window size";
  if (c.mlp.kind === "moe") {
    const { nExperts: E, topK } = c.mlp;
    if (!Number.isInteger(E) || E < 1) return `configuration gives ${E} experts (must be a positive integer)`;
    if (!Number.isInteger(topK) || topK < 1 || topK > E) return `configuration routes each token to ${topK} experts of ${E} (must be 1..${E})`;
  }
  return null;
}
