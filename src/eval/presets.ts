// Published settings as presets. Layers are given relative to depth so a preset runs on any
// model; on the paper's model they resolve to the paper's layer.
import { UsageError } from "../core/errors.js";
import type { InjectConfig, VectorRecipe } from "../log/schema.js";
import { PROTOCOL_RECIPE } from "../vectors/extract.js";
import { readData } from "./protocol.js";

export interface Preset {
  name: string;
  description: string;
  /** Layers as fractions of depth, resolved with round(nLayers · f) (37/62 → 37 on Gemma-3-27B). */
  layerFractions: number[];
  config: Omit<InjectConfig, "layers" | "preset" | "judges" | "seed" | "batchSize">;
}

const concepts50 = () => readData<{ concepts: string[] }>("protocol/concepts_original_50.json").concepts;
const baseline = () => readData<{ words: string[] }>("protocol/baseline_words.json").words;

export function presets(): Record<string, Preset> {
  // Lindsey's transcript uses lower-cased words, for concepts and baseline alike.
  const cv = readData<{ concept_vectors: { main_50_words: string[]; baseline_words: string[] } }>("protocol/lindsey_2025.json").concept_vectors;
  const lindseyWords = cv.main_50_words.map((w) => w.toLowerCase());
  const lindseyBaseline = cv.baseline_words.map((w) => w.toLowerCase());
  const lindseyRecipe: VectorRecipe = { method: "baseline-mean", format: "raw", userTemplate: "Human: Tell me about {word}\n\nAssistant:", tokenIndex: -1 };
  return {
    macar2026: {
      name: "macar2026",
      description: "Macar, Yang et al. (2026): Gemma-3-27B-IT layer 37 of 62, strength 4, the 50 original concepts, 100 trials per concept, 500 controls, T=1, 100 tokens",
      layerFractions: [37 / 62],
      config: {
        strengths: [4],
        concepts: concepts50(),
        baselineWords: baseline(),
        variants: ["original"],
        maxTrialNumber: 10,
        trialsPerConcept: 100,
        controlsPerConfig: 500,
        forced: false,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
      },
    },
    lindsey2025: {
      name: "lindsey2025",
      description: "Lindsey (2025): layer at ~2/3 depth, strengths 1/2/4/8, the 50 lower-cased words, Human/Assistant transcript, 100 controls, T=1, 100 tokens",
      layerFractions: [2 / 3],
      config: {
        strengths: [1, 2, 4, 8],
        concepts: lindseyWords,
        baselineWords: lindseyBaseline,
        variants: ["lindsey2025"],
        maxTrialNumber: 1,
        trialsPerConcept: 1,
        controlsPerConfig: 100,
        forced: false,
        yesBiasPerConcept: 1,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: lindseyRecipe,
      },
    },
  };
}

/** Layers from "37", "20,30,40", "0.6" (fraction of depth: int(n·f), clamped), or "all". */
export function parseLayers(spec: string, nLayers: number): number[] {
  if (spec === "all") return Array.from({ length: nLayers }, (_, i) => i);
  return spec.split(",").map((s) => {
    const x = Number(s.trim());
    if (!Number.isFinite(x) || x < 0) throw new UsageError(`--layers: bad layer "${s}" (use 37, 20,30,40, a fraction like 0.6, or all)`);
    const l = s.includes(".") ? Math.min(nLayers - 1, Math.floor(nLayers * x)) : x;
    if (!Number.isInteger(l) || l >= nLayers) throw new UsageError(`--layers: layer ${s} is outside 0..${nLayers - 1}`);
    return l;
  });
}
