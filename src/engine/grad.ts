// What a backend differentiates: the loss (mean cross-entropy of target tokens) with respect to
// parameters a plan adds, and activations at a site; and the forward-mode derivative of reads
// with respect to one intervention's scale. Both backends implement these; docs/gradients.md
// says how.
import type { HookName } from "../hooks/names.js";
import type { Plan, PosSpec } from "../hooks/plan.js";
import type { PrefixCounter } from "./types.js";
import { isLazy, type EngineModel } from "./weights.js";

/** The linear layers of a block that take a low-rank adapter (weights blocks.{i}.{name}.weight, [out, in]). */
export type LinearName = "attn.q" | "attn.k" | "attn.v" | "attn.o" | "mlp.gate" | "mlp.up" | "mlp.down";

export type TrainParam =
  /** x += value at `at` over pos / rows (a steering or bias vector). Gradient: one array, value's shape. */
  | { kind: "vector"; at: HookName; pos?: PosSpec; rows?: number[]; value: Float32Array }
  /** x += value · vector at `at` (a steering strength). Gradient: one array of length 1. */
  | { kind: "scale"; at: HookName; pos?: PosSpec; rows?: number[]; vector: Float32Array; value: number }
  /**
   * A low-rank adapter on one linear layer: y = x·(W + scale·B·A)ᵀ, A [rank, in], B [out, rank],
   * row-major. Gradients: [dA, dB].
   */
  | { kind: "lora"; layer: number; linear: LinearName; a: Float32Array; b: Float32Array; rank: number; scale?: number }
  /** The activation at `at` itself (attribution). Gradient: one array per row, [positions, ...feature] without padding. */
  | { kind: "activation"; at: HookName }
  /**
   * A full-rank additive delta on the weight `name` (a canonical name, see trainableWeights): the
   * pass uses W + value (W dequantized when the checkpoint is quantized; the stored weights are
   * never changed). value has W's shape, row-major. Gradient: one array, dLoss/dW (= dLoss/dvalue).
   * A tied embedding is one weight, "embed.weight": its gradient sums the embedding and unembedding uses.
   */
  | { kind: "delta"; name: string; value: Float32Array };

/** A weight a `delta` parameter can target. */
export interface TrainableWeight {
  name: string;
  shape: number[];
}

/**
 * Every weight of the model a `delta` can target, in the engine's canonical names and shapes:
 * embeddings, each block's norms, linears and biases, the final norm and (untied) unembedding.
 * Shapes come from the store's headers when it is lazy (nothing is read).
 */
export function trainableWeights(m: EngineModel): TrainableWeight[] {
  const c = m.config;
  const w = m.weights;
  const lazy = isLazy(w) ? w : null;
  const out: TrainableWeight[] = [];
  const add = (name: string): void => {
    if (!w.has(name)) return;
    const shape = lazy ? lazy.shapeOf(name) : w.get(name)?.shape;
    if (shape) out.push({ name, shape: [...shape] });
  };
  add("embed.weight");
  add("posEmbed.weight");
  for (let i = 0; i < c.nLayers; i++) {
    const b = `blocks.${i}`;
    for (const n of ["ln1", "ln1Post", "ln2", "ln2Post", "attn.qNorm", "attn.kNorm"]) {
      add(`${b}.${n}.weight`);
      add(`${b}.${n}.bias`);
    }
    for (const n of ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]) {
      add(`${b}.${n}.weight`);
      add(`${b}.${n}.bias`);
    }
  }
  add("lnFinal.weight");
  add("lnFinal.bias");
  if (!c.tieEmbeddings) add("unembed.weight");
  return out;
}

export interface LossAndGradRequest {
  /** Per row, per position: the token whose log-probability the loss takes at that position, or -1 (ignored). */
  targets: number[][];
  params: TrainParam[];
  /** Interventions applied as constants in the same pass (no reads). */
  plan?: Plan;
  countPrefix?: PrefixCounter;
}

export interface LossAndGradResult {
  /** Mean over the targets of -log p(target). */
  loss: number;
  /** Per param, in request order: see TrainParam for each kind's arrays. */
  grads: Float32Array[][];
}

export interface JvpRequest {
  /** The interventions of the pass; `wrt` indexes an `add` among them. */
  plan: Plan;
  wrt: number;
  /** Sites whose derivative d(activation)/d(scale of plan[wrt]) is returned. */
  reads: HookName[];
  countPrefix?: PrefixCounter;
}

export interface JvpResult {
  /** Per read, per row: the activation [positions, ...feature] and its derivative, same layout. */
  values: Map<HookName, Float32Array[]>;
  tangents: Map<HookName, Float32Array[]>;
}
