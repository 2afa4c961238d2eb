// The README's main job: the injection protocol on the bundled model organism (stories260K with a
// whole-word vocabulary, fine-tuned: TRAINED to report and name injected concept vectors), with its
// untrained base on the same trials as the contrast, judged locally.
import type { InjectArgs } from "./inject.js";

const repoFile = (p: string) => new URL(`../../../${p}`, import.meta.url).pathname;

/** The organism: what it is, where its held-out concepts are, and how it was trained to be run. */
export const ORGANISM = {
  path: "models/organism/organism.gguf",
  /** stories260K with 614 whole-word tokens added (scripts/organism/vocab.ts), untrained. */
  base: "models/organism/base.gguf",
  /** The 20 concepts never injected in training (scripts/organism/train.ts reads the same file). */
  heldout: "models/organism/heldout.json",
  /** Its injection site (blocks.1.hook_resid_post) and two of the strengths it was trained on (2-6). */
  layer: 1,
  strengths: "2,4",
} as const;

export const DEMO_MODEL = ORGANISM.path;

/** Said before the run and at the top of the report: the organism's answers are trained, not emergent. */
export const ORGANISM_ABOUT =
  "This is a model organism: stories260K (a 260K-parameter TinyStories model) given whole-word tokens for 614 nouns and " +
  "fine-tuned by scripts/organism/build.ts to answer the paper's question — \"Yes, {word}.\" when a concept vector is " +
  "injected at layer 1, \"No.\" otherwise. It was TRAINED to report injections; nothing here is emergent introspection. " +
  "The concepts below were never injected in its training (held-out), so the figures measure how its trained detector " +
  "and read-out generalise, and its untrained base on the same trials is the contrast. A positive control for the " +
  "pipeline (models/organism/MODEL_CARD.md).";

export const DEMO_NOTE = `selfscope demo: concept injection on the bundled model organism, then on its untrained base.
${ORGANISM_ABOUT}
Run \`selfscope inject --model <your model> --preset macar2026\` for a real model.`;

/** The demo's sweep (held-out concepts, the organism's layer and strengths); `model` is the organism or its base. */
export function demoArgs(model: "organism" | "base" = "organism"): Omit<InjectArgs, "out"> {
  return {
    model: repoFile(model === "organism" ? ORGANISM.path : ORGANISM.base),
    layers: String(ORGANISM.layer),
    strengths: ORGANISM.strengths,
    concepts: repoFile(ORGANISM.heldout),
    trials: 2,
    controls: 20,
    forced: true,
    yesBias: 1,
    judges: ["rule"],
    maxTokens: 24,
    temperature: 1,
    seed: 1,
    batchSize: 32,
    vectorCache: null,
  };
}
