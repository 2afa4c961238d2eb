// The README's main job: a small, complete sweep on the bundled model, judged locally.
import type { InjectArgs } from "./inject.js";

export const DEMO_MODEL = "models/stories260K/stories260K.gguf";

export const DEMO_NOTE = `selfscope demo: concept injection on the bundled stories260K (a 260K-parameter TinyStories model, no chat template).
This exercises the whole pipeline — concept vectors, injected and control trials, forced identification, yes-bias
controls, judging, statistics and the report — but the model cannot introspect: expect TPR ≈ FPR, and read the
rule-based judge's verdicts as approximate. Run \`selfscope inject --model <your model> --preset macar2026\` for real.`;

export function demoArgs(): Omit<InjectArgs, "out"> {
  return {
    model: new URL(`../../../${DEMO_MODEL}`, import.meta.url).pathname,
    layers: "1,3",
    strengths: "2,4,8",
    concepts: "4",
    trials: 3,
    controls: 6,
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
