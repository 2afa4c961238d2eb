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
  | { kind: "plain"; act: Activation };

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
    if (c.mlp.kind === "gated") lin(`${b}.mlp.gate`, F, D, c.bias === "all");
    lin(`${b}.mlp.up`, F, D, c.bias === "all");
    lin(`${b}.mlp.down`, D, F, c.bias === "all");
  }
  norm("lnFinal");
  if (!c.tieEmbeddings) m.set("unembed.weight", [V, D]);
  return m;
}
