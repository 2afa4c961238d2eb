// The training objectives as functions of per-sequence log-probabilities. A sequence's log-prob
// s = Σ log p(target) over its masked targets comes from lossAndGrad with one row (loss × count),
// and so does its gradient (∇s = −count · ∇loss); an objective returns its value and dL/ds for the
// chosen and rejected sequence, and the loop combines the two gradients with those weights. The
// 03f presets are our reading of the paper's conditions (its code is not available): docs/training.md.
import { UsageError } from "../core/errors.js";

export const OBJECTIVES = [
  "sft",
  "dpo",
  "dpo_no_ref",
  "dpo_shuffled",
  "dpo_reversed",
  "dpo_chosen_sft",
  "dpo_rejected_sft",
  "contrastive_margin",
  "contrastive_margin_kl",
  "sft_chosen_kl",
  "random_lora",
] as const;
export type ObjectiveName = (typeof OBJECTIVES)[number];

/** How a loss reads one example. */
export type LossKind = "sft" | "dpo" | "margin" | "margin_kl" | "sft_kl" | "none";

export interface Objective {
  name: ObjectiveName;
  /** What the data must hold: chat/completion examples, or preference pairs. */
  data: "sft" | "pairs";
  /** What is done to the pairs before training (seeded where it draws). */
  transform: "none" | "shuffle_rejected" | "swap" | "chosen_only" | "rejected_only";
  loss: LossKind;
  /** Needs the frozen reference's log-probs. */
  reference: boolean;
}

const O = (name: ObjectiveName, data: Objective["data"], transform: Objective["transform"], loss: LossKind, reference: boolean): Objective => ({ name, data, transform, loss, reference });

const TABLE: Record<ObjectiveName, Objective> = {
  sft: O("sft", "sft", "none", "sft", false),
  dpo: O("dpo", "pairs", "none", "dpo", true),
  dpo_no_ref: O("dpo_no_ref", "pairs", "none", "dpo", false),
  dpo_shuffled: O("dpo_shuffled", "pairs", "shuffle_rejected", "dpo", true),
  dpo_reversed: O("dpo_reversed", "pairs", "swap", "dpo", true),
  dpo_chosen_sft: O("dpo_chosen_sft", "pairs", "chosen_only", "sft", false),
  dpo_rejected_sft: O("dpo_rejected_sft", "pairs", "rejected_only", "sft", false),
  contrastive_margin: O("contrastive_margin", "pairs", "none", "margin", false),
  contrastive_margin_kl: O("contrastive_margin_kl", "pairs", "none", "margin_kl", true),
  sft_chosen_kl: O("sft_chosen_kl", "pairs", "chosen_only", "sft_kl", true),
  random_lora: O("random_lora", "pairs", "none", "none", false),
};

export function objective(name: string): Objective {
  const o = (TABLE as Record<string, Objective>)[name];
  if (!o) throw new UsageError(`--objective: unknown objective "${name}"; use one of ${OBJECTIVES.join(", ")}`);
  return o;
}

export interface Hyper {
  /** DPO's β (default 0.1, as TRL). */
  beta: number;
  /** The hinge margin m of contrastive_margin (in nats of sequence log-prob). */
  margin: number;
  /** λ of the KL-to-reference term. */
  kl: number;
}

export const DEFAULT_HYPER: Hyper = { beta: 0.1, margin: 1, kl: 0.1 };

/** Per-example inputs: policy and reference sequence log-probs (sums), and target counts. */
export interface PairLogps {
  sc: number;
  sr: number;
  /** Reference log-probs (0 when the objective has no reference). */
  rc: number;
  rr: number;
  /** Number of chosen targets (for the token-mean of sft_kl). */
  nc: number;
}

export interface PairLoss {
  loss: number;
  /** dL/d sc and dL/d sr. */
  dc: number;
  dr: number;
}

/** log(1 + e^x) without overflow. */
export function softplus(x: number): number {
  return Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x)));
}

/** σ(x) without overflow. */
export function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/**
 * One example's loss and its derivatives in the sequence log-probs:
 * - dpo: z = β[(sc − rc) − (sr − rr)], L = −log σ(z) = softplus(−z) (rc = rr = 0 without a reference)
 * - margin: L = max(0, m − (sc − sr))
 * - margin_kl: margin + λ · ½ (sc − rc)²
 * - sft_kl: −sc / nc + λ · ½ (sc − rc)²
 * (sft is a token mean over the batch and goes through lossAndGrad directly; "none" trains nothing.)
 */
export function pairLoss(kind: LossKind, x: PairLogps, h: Hyper): PairLoss {
  switch (kind) {
    case "dpo": {
      const z = h.beta * (x.sc - x.rc - (x.sr - x.rr));
      const w = h.beta * sigmoid(-z);
      return { loss: softplus(-z), dc: -w, dr: w };
    }
    case "margin":
    case "margin_kl": {
      const d = x.sc - x.sr;
      const active = d < h.margin;
      let loss = active ? h.margin - d : 0;
      let dc = active ? -1 : 0;
      const dr = active ? 1 : 0;
      if (kind === "margin_kl") {
        const k = x.sc - x.rc;
        loss += 0.5 * h.kl * k * k;
        dc += h.kl * k;
      }
      return { loss, dc, dr };
    }
    case "sft_kl": {
      if (!(x.nc > 0)) throw new UsageError("sft_chosen_kl: a chosen response with no target tokens");
      const k = x.sc - x.rc;
      return { loss: -x.sc / x.nc + 0.5 * h.kl * k * k, dc: -1 / x.nc + h.kl * k, dr: 0 };
    }
    case "sft":
    case "none":
      throw new Error(`pairLoss: ${kind} is not a pairwise loss`);
  }
}

/** Whether the loss reads the rejected sequence (saves its pass when not). */
export function readsRejected(kind: LossKind): boolean {
  return kind === "dpo" || kind === "margin" || kind === "margin_kl";
}
