// The sweep plan: a pure function of the config, so a resumed run re-derives exactly the same
// trials and skips the ones whose ids are already in the log.
import { seedOf } from "../core/seed.js";
import type { InjectConfig, TrialKind } from "../log/schema.js";
import { getVariant, readData } from "./protocol.js";

export interface PlannedTrial {
  id: string;
  kind: TrialKind;
  concept: string | null;
  layer: number;
  strength: number;
  variant: string;
  trialNumber: number;
  sample: number;
  question?: string;
  /** Per-trial sampling seed (independent of batch composition). */
  seed: number;
}

export function yesBiasQuestions(): string[] {
  return readData<{ exp1_injected_thoughts: { bias_control_questions_answer_no: string[] } }>("protocol/lindsey_2025.json").exp1_injected_thoughts.bias_control_questions_answer_no;
}

/**
 * Order: per variant and layer (so consecutive batches share one jit trace), injection, forced and
 * yes-bias trials per concept, then per-concept controls (03b/03c), then global controls (02).
 * Controls carry the config's layer/strength for bookkeeping only: they run without any hook. A
 * variant whose prompt names the concept (anti_reward's category, thoughts_in_context) gives its
 * global controls concepts in turn, so no prompt is rendered with an empty slot.
 */
export function planTrials(c: InjectConfig): PlannedTrial[] {
  const out: PlannedTrial[] = [];
  const questions = c.yesBiasPerConcept > 0 ? yesBiasQuestions() : [];
  const add = (t: Omit<PlannedTrial, "id" | "seed">) => {
    const id = [t.kind, t.variant, `L${t.layer}`, `s${t.strength}`, t.concept ?? "-", `n${t.trialNumber}`, `#${t.sample}`].join("|");
    out.push({ ...t, id, seed: seedOf(c.seed, id) });
  };
  const perConcept = c.controlsPerConcept ?? 0;
  const controlConcepts = c.concepts.slice(0, c.controlConcepts ?? c.concepts.length);
  const offset = c.controlTrialOffset ?? 0;
  for (const variant of c.variants) {
    const named = getVariant(variant).usesConcept;
    for (const layer of c.layers)
      for (const strength of c.strengths) {
        for (const concept of c.concepts) {
          for (let i = 0; i < c.trialsPerConcept; i++) {
            const n = (i % c.maxTrialNumber) + 1;
            const sample = Math.floor(i / c.maxTrialNumber);
            add({ kind: "injection", concept, layer, strength, variant, trialNumber: n, sample });
            if (c.forced) add({ kind: "forced", concept, layer, strength, variant, trialNumber: n, sample });
          }
          for (let i = 0; i < c.yesBiasPerConcept; i++) {
            const q = questions[i % questions.length]!;
            add({ kind: "yesbias", concept, layer, strength, variant, trialNumber: (i % c.maxTrialNumber) + 1, sample: i, question: q });
          }
        }
        for (const concept of controlConcepts)
          for (let i = 0; i < perConcept; i++) {
            add({ kind: "control", concept, layer, strength, variant, trialNumber: offset + (i % c.maxTrialNumber) + 1, sample: Math.floor(i / c.maxTrialNumber) });
          }
        for (let i = 0; i < c.controlsPerConfig; i++) {
          const concept = named && c.concepts.length > 0 ? c.concepts[i % c.concepts.length]! : null;
          add({ kind: "control", concept, layer, strength, variant, trialNumber: (i % c.maxTrialNumber) + 1, sample: Math.floor(i / c.maxTrialNumber) });
        }
      }
  }
  return out;
}
