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
  | { kind: "rope"; theta: number; scaling: RopeScaling; /** dims rotated, default dHead */ rotaryDim?: number }
  | { kind: "learned" };

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
  bosTokenId?: number;
  eosTokenIds: number[];
}

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
    norm(`${b}.ln1`);
    lin(`${b}.attn.q`, H * hd, D, c.bias !== "none");
    lin(`${b}.attn.k`, K * hd, D, c.bias !== "none");
    lin(`${b}.attn.v`, K * hd, D, c.bias !== "none");
    lin(`${b}.attn.o`, D, H * hd, c.bias === "all");
    norm(`${b}.ln2`);
    if (c.mlp.kind === "gated") lin(`${b}.mlp.gate`, F, D, c.bias === "all");
    lin(`${b}.mlp.up`, F, D, c.bias === "all");
    lin(`${b}.mlp.down`, D, F, c.bias === "all");
  }
  norm("lnFinal");
  if (!c.tieEmbeddings) m.set("unembed.weight", [V, D]);
  return m;
}
