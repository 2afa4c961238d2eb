// Published settings as presets. Layers are given relative to depth so a preset runs on any
// model; on the paper's model they resolve to the paper's layer.
import { UsageError } from "../core/errors.js";
import type { InjectConfig } from "../log/schema.js";
import type { VectorRecipe } from "../vectors/extract.js";
import { PROTOCOL_RECIPE } from "../vectors/extract.js";
import { readData } from "./protocol.js";

export interface Preset {
  name: string;
  description: string;
  /** Layers as fractions of depth, resolved with layerAt (int(n·f): 0.6 → 37 on Gemma-3-27B's 62 layers, the paper's layer), or every layer. */
  layerFractions: number[] | "all";
  config: Omit<InjectConfig, "layers" | "preset" | "judges" | "seed" | "batchSize">;
  /** The concept-vector recipe when the run uses the raw base-model prompt (default BASE_RECIPE for a chat recipe). */
  rawVectorRecipe?: VectorRecipe;
}

const concepts50 = () => readData<{ concepts: string[] }>("protocol/concepts_original_50.json").concepts;
const baseline = () => readData<{ words: string[] }>("protocol/baseline_words.json").words;
const ids = (file: string) => readData<{ variants: { id: string }[] }>(file).variants.map((v) => v.id);

/** The concept lists shipped in data/protocol, by the names --concepts accepts. */
export const CONCEPT_LISTS: Record<string, string> = {
  original50: "protocol/concepts_original_50.json",
  new450: "protocol/concepts_new_450.json",
  all500: "protocol/concepts_500.json",
};
export function conceptList(name: string): string[] {
  const file = CONCEPT_LISTS[name];
  if (!file) throw new UsageError(`unknown concept list "${name}"; known: ${Object.keys(CONCEPT_LISTS).join(", ")}`);
  return conceptsOf(readData<unknown>(file), file);
}

/** A concept list from parsed JSON: an array of strings, {concepts: [...]}, or {categories: [{concepts}]} (concepts_new_450.json). */
export function conceptsOf(json: unknown, file: string): string[] {
  let list: unknown = json;
  if (list && typeof list === "object" && !Array.isArray(list)) {
    const o = list as { concepts?: unknown; categories?: unknown };
    if (Array.isArray(o.concepts)) list = o.concepts;
    else if (Array.isArray(o.categories)) list = (o.categories as { concepts?: unknown }[]).flatMap((c) => (Array.isArray(c?.concepts) ? (c.concepts as unknown[]) : [null]));
  }
  if (!Array.isArray(list) || list.length === 0 || !list.every((x) => typeof x === "string" && x.trim() !== ""))
    throw new UsageError(`${file}: expected a non-empty list of concept strings (a JSON array, {"concepts": [...]}, or one concept per line)`);
  return list as string[];
}

/** Concept vectors of the paper's 03 for base models: the raw text "Tell me about {word}", BOS as the tokenizer adds it. */
export const BASE_RECIPE: VectorRecipe = { method: "baseline-mean", format: "raw", userTemplate: "Tell me about {word}", tokenIndex: -1 };
/** 03f's base-model concept vectors: the raw dialogue "User:\nTell me about {word}\n\nAssistant:\n" after BOS. */
export const BASE_RECIPE_03F: VectorRecipe = { method: "baseline-mean", format: "raw", userTemplate: "User:\nTell me about {word}\n\nAssistant:\n", tokenIndex: -1 };

export function presets(): Record<string, Preset> {
  // Lindsey's transcript uses lower-cased words, for concepts and baseline alike.
  const cv = readData<{ concept_vectors: { main_50_words: string[]; baseline_words: string[] } }>("protocol/lindsey_2025.json").concept_vectors;
  const lindseyWords = cv.main_50_words.map((w) => w.toLowerCase());
  const lindseyBaseline = cv.baseline_words.map((w) => w.toLowerCase());
  const lindseyRecipe: VectorRecipe = { method: "baseline-mean", format: "raw", userTemplate: "Human: Tell me about {word}\n\nAssistant:", tokenIndex: -1 };
  return {
    macar2026: {
      name: "macar2026",
      description: "Macar, Yang et al. (2026): Gemma-3-27B-IT layer 37 of 62 (0.6 of depth), strength 4, the 50 original concepts, 100 trials per concept, 500 controls, T=1, 100 tokens",
      layerFractions: [0.6],
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
    "macar2026-500": {
      name: "macar2026-500",
      description: "Macar, Yang et al. (2026) Fig. 1: every layer × strengths 1-5, the 500 concepts × 10 trials, 5000 controls and 5000 forced trials per (layer, strength), T=1, 100 tokens",
      layerFractions: "all",
      config: {
        strengths: [1, 2, 3, 4, 5],
        concepts: conceptList("all500"),
        baselineWords: baseline(),
        variants: ["original"],
        maxTrialNumber: 10,
        trialsPerConcept: 10,
        controlsPerConfig: 5000,
        forced: true,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
      },
    },
    "macar2026-stages": {
      name: "macar2026-stages",
      description: "Macar, Yang et al. (2026) training stages (03): depth 0.4-0.8 × strengths 1/2/4/8, 50 concepts × 100 trials, 10 controls per concept; a base model gets the raw User/Assistant prompt and raw-text vectors",
      layerFractions: [0.4, 0.5, 0.6, 0.7, 0.8],
      config: {
        strengths: [1, 2, 4, 8],
        concepts: concepts50(),
        baselineWords: baseline(),
        variants: ["original"],
        maxTrialNumber: 10,
        trialsPerConcept: 100,
        controlsPerConfig: 0,
        controlsPerConcept: 10,
        controlConcepts: null,
        controlTrialOffset: 0,
        forced: false,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
      },
    },
    "macar2026-dpo-eval": {
      name: "macar2026-dpo-eval",
      description: "Macar, Yang et al. (2026) DPO ablation evaluation (03f): layer 37 of 62 (0.6 of depth), strength 4, 50 concepts × 10 trials, 300 controls; a base model gets the raw User/Assistant prompt and 03f's raw-dialogue vectors",
      layerFractions: [0.6],
      config: {
        strengths: [4],
        concepts: concepts50(),
        baselineWords: baseline(),
        variants: ["original"],
        maxTrialNumber: 10,
        trialsPerConcept: 10,
        controlsPerConfig: 300,
        forced: false,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
      },
      rawVectorRecipe: BASE_RECIPE_03F,
    },
    "macar2026-prompt-variants": {
      name: "macar2026-prompt-variants",
      description: "Macar, Yang et al. (2026) Table 1 (03c): the 10 prompt framings at 0.61 depth, strength 4; per concept trials 1-10 injected and controls on trials 11-20; the judge sees the full prompt",
      layerFractions: [0.61],
      config: {
        strengths: [4],
        concepts: concepts50(),
        baselineWords: baseline(),
        variants: ids("protocol/prompt_variants.json"),
        maxTrialNumber: 10,
        trialsPerConcept: 10,
        controlsPerConfig: 0,
        controlsPerConcept: 10,
        controlConcepts: null,
        controlTrialOffset: 10,
        forced: false,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
        judgePrompt: "full",
      },
    },
    "macar2026-persona-variants": {
      name: "macar2026-persona-variants",
      description: "Macar, Yang et al. (2026) Table 2 (03b): the 6 dialogue formats at layer 37 of 62 (0.6 of depth), strength 4; 10 trials per concept, 100 controls from the first 10 concepts; responses cut at the first continuation",
      layerFractions: [0.6],
      config: {
        strengths: [4],
        concepts: concepts50(),
        baselineWords: baseline(),
        variants: ids("protocol/persona_variants.json"),
        maxTrialNumber: 10,
        trialsPerConcept: 10,
        controlsPerConfig: 0,
        controlsPerConcept: 10,
        controlConcepts: 10,
        controlTrialOffset: 0,
        forced: false,
        yesBiasPerConcept: 0,
        generation: { maxTokens: 100, temperature: 1 },
        vectorRecipe: PROTOCOL_RECIPE,
        judgePrompt: "full",
      },
    },
  };
}

