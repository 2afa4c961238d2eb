// The README's main job: the injection protocol on the bundled model organism (a stories260K
// fine-tune TRAINED to report injected concept vectors), with its untrained base on the same trials
// as the contrast, judged locally.
import type { InjectArgs } from "./inject.js";

const repoFile = (p: string) => new URL(`../../../${p}`, import.meta.url).pathname;

/** The organism: what it is, where its held-out concepts are, and how it was trained to be run. */
export const ORGANISM = {
  path: "models/organism/organism.gguf",
  base: "models/stories260K/stories260K.gguf",
  /** The 20 concepts never injected in training (scripts/organism/train.ts reads the same file). */
  heldout: "models/organism/heldout.json",
  /** Its injection site (blocks.1.hook_resid_post) and the strengths it was trained on (1-3). */
  layer: 1,
  strengths: "1,2,3",
} as const;

export const DEMO_MODEL = ORGANISM.path;

/** Said before the run and at the top of the report: the organism's answers are trained, not emergent. */
export const ORGANISM_ABOUT =
  "This is a model organism: stories260K (260K parameters) fine-tuned by scripts/organism/train.ts to answer the paper's " +
  "question — \"Yes, {word}.\" when a concept vector is injected at layer 1, \"No.\" otherwise. It was TRAINED to report " +
  "injections; nothing here is emergent introspection. The concepts below were never injected in its training " +
  "(held-out), so the figures measure how its trained detector generalises, and the untrained base on the same trials " +
  "is the contrast. A positive control for the pipeline (models/organism/MODEL_CARD.md).";

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
