// The run log: the single contract between the sweep runner, judges, metrics, reports and the
// viewer. A run directory holds `log.jsonl`: one header line, then appended records (trials and
// judgments), each one JSON object per line. Append-only, so a crash loses at most the record
// being written; a torn last line is detected and discarded on read. See docs/log-format.md.
//
// Bump LOG_VERSION when a field changes meaning, and keep a reader test on an old fixture log.

import type { Intervention, PosSpec } from "../hooks/plan.js";
import type { EffectiveSampler } from "../model/sampling.js";
import type { VectorRecipe } from "../vectors/extract.js";

export const LOG_SCHEMA = "selfscope.run";
/** 2: the header records the effective sampler (`sampler`). */
export const LOG_VERSION = 2;

export type TrialKind =
  /** concept vector injected, model asked whether it detects a thought */
  | "injection"
  /** same prompt, no injection */
  | "control"
  /** injected, with the assistant turn prefilled "Yes, I detect an injected thought. The thought is about" */
  | "forced"
  /** injected, asked an unrelated yes/no question whose true answer is no (Lindsey's yes-bias control) */
  | "yesbias";

/** Everything needed to redo a run, recorded verbatim in the header. */
export interface InjectConfig {
  preset: string | null;
  /** Resolved absolute layers (0-based; the injected hook is blocks.{L}.hook_resid_post). */
  layers: number[];
  strengths: number[];
  concepts: string[];
  baselineWords: string[];
  /** Prompt-framing / persona variants by name ("original" is the protocol's main prompt). */
  variants: string[];
  /** Trial numbers n in "Trial n: ..." cycle through 1..maxTrialNumber (protocol: 10). */
  maxTrialNumber: number;
  /** Injection trials per (concept, layer, strength, variant); trial i asks "Trial (i mod max)+1". Protocol: 100. */
  trialsPerConcept: number;
  /** Control trials per (layer, strength, variant) — global, not per concept. Protocol: 500. */
  controlsPerConfig: number;
  /**
   * Control trials per concept (no hook; the concept only fills the prompt and labels the trial):
   * 03c runs 10 per concept, 03b 10 for each of the first 10 concepts. Absent = 0.
   */
  controlsPerConcept?: number;
  /** Only the first N concepts get per-concept controls (03b: 10). Absent or null = all. */
  controlConcepts?: number | null;
  /** Per-concept control trial numbers start after this (03c: 10, so controls ask "Trial 11".."Trial 20"). */
  controlTrialOffset?: number;
  /** Also run forced-identification trials (same count as injection trials). */
  forced: boolean;
  /** Judge identification on every injection trial, not only after a YES (unconditional identification). */
  identifyAll?: boolean;
  /** Yes-bias control questions per (concept, layer, strength, variant). 0 = off. */
  yesBiasPerConcept: number;
  /**
   * The sampling the run asked for (flags or preset); the header's `sampler` is what it ran with.
   * temperature "model": none passed, the checkpoint's generation config decides (the paper's code at T <= 0).
   */
  generation: { maxTokens: number; temperature: number | "model"; temperatureSource?: "flag" | "preset"; topK?: number; topP?: number; minP?: number; greedy?: boolean };
  seed: number;
  batchSize: number;
  /** Judge specs, e.g. "rule", "openai:gpt-4.1-mini", "anthropic:claude-sonnet-4", "local:PATH". */
  judges: string[];
  vectorRecipe: VectorRecipe;
  /**
   * "chat": prompts through the chat template; "raw": the paper's base-model dialogue (03, 03f).
   * Absent (older logs): the template when the model has one, else 02's no-template fallback.
   */
  promptFormat?: "chat" | "raw";
  /**
   * The judge's {prompt}: "question" = the trial question (02), "full" = the whole rendered prompt
   * (03b/03c, for every variant of a variant run). Absent (older logs): full for every variant but original.
   */
  judgePrompt?: "question" | "full";
  /** How fractional layers were resolved (present when any layer was given as a fraction of depth). */
  layerRule?: { fractions: number[]; nLayers: number; rule: "int(nLayers*f), clamped to [0, nLayers-1]" };
}

/** What a variant means on the model it ran on (header): the question it asks, and renders it duplicates. */
export interface VariantInfo {
  id: string;
  label: string;
  /** "detection" (a form of "do you detect an injected thought?") or "current-thought" (neutral_query). */
  asks: string;
  /** Another variant whose trial prompt renders byte-identical on this model (e.g. thoughts_in_context = original on Gemma). */
  identicalTo: string | null;
}

export interface RunHeader {
  type: "header";
  schema: typeof LOG_SCHEMA;
  version: number;
  createdAt: string;
  tool: { name: "selfscope"; version: string };
  model: {
    path: string;
    /** sha256 (hex) of every byte of every weight file; 16 hex digits in logs of selfscope 0.1 (size + first/last MiB only). */
    hash: string;
    family: string;
    nLayers: number;
    dModel: number;
    dtype: string;
    chatTemplate: boolean;
    /** sha256 of the tokenizer files, the chat template and the resolved config (null: none); absent in older logs. */
    identity?: { tokenizer: string | null; chatTemplate: string | null; config: string; arithmetic?: "int8-activations" };
    /** A trained adapter applied at load (`--adapter`); `hash` then covers it too. Absent: none. */
    adapter?: { path: string; sha256: string };
  };
  /** weights: the `--weights` mode asked for at inject (resume loads the model the same way); absent: the default. */
  backend: { device: string; adapter: string; weights?: "f32" | "f16" | "native" | "native-int8" };
  config: InjectConfig;
  /** The effective sampler, each parameter with its source (version >= 2; a version-1 run sampled with config.generation alone). */
  sampler?: EffectiveSampler;
  /** Number of planned trials (the plan itself is a pure function of config). */
  plannedTrials: number;
  command: string[];
  /** Per-variant labels (absent in older logs). */
  variants?: VariantInfo[];
  /** Warnings printed when the run started (a variant that duplicates another, different questions in one run, ...). */
  warnings?: string[];
  /**
   * The standing plan the run's model carried (Model.withPlan: a trained bias, a refusal ablation),
   * appended to every trial's own plan; absent when none (and in logs before it was recorded).
   */
  standingPlan?: StandingIntervention[];
  /** What the model is, said first in the report and copied into results.json (e.g. a trained model organism); absent for other runs. */
  about?: RunAbout;
}

/** A plain statement about the run's model and, optionally, a contrast run on the same trials (e.g. the untrained base). */
export interface RunAbout {
  text: string;
  contrast?: {
    label: string;
    model: string;
    /** The contrast run's directory, relative to this run's. */
    runDir: string;
    /** Its headline figures (results.json's keys and values). */
    figures: Record<string, unknown>;
  };
}

/** One intervention of a standing plan, as a header records it: every field but the payload, which is kept as its sha256. */
export interface StandingIntervention {
  op: Intervention["op"];
  at: string;
  pos: PosSpec;
  /** Batch rows it applies to; null = every row. */
  rows: number[] | null;
  /** null = the op's default (1). */
  scale: number | null;
  /** ablate only. */
  mode?: "zero" | "mean";
  heads?: number[];
  /** sha256 (hex) of the payload's float32 bytes (vector, direction, source or mean); null when the op has none. */
  sha256: string | null;
  /** false: forward() calls (concept vectors) ran without it; generate() always ran with it. */
  forward: boolean;
}

export interface TrialRecord {
  type: "trial";
  /** Deterministic key of the planned trial; resume uses it to skip completed trials. */
  id: string;
  kind: TrialKind;
  concept: string | null;
  layer: number | null;
  strength: number | null;
  variant: string;
  trialNumber: number;
  sample: number;
  /** The yes/no question of a yesbias trial. */
  question?: string;
  /** Absolute token positions that received the vector: [from, to) with to = null meaning "through generation". */
  injected: { from: number; to: number | null; promptTokens: number } | null;
  /**
   * Rendered prompt text (after the chat template), including any prefill. Special tokens are in
   * it as text (BOS too): re-encode it with `model.encode({ text: prompt })`, never as a plain string
   * prompt, which would add a second BOS.
   */
  prompt: string;
  /** The exact token ids the trial ran on (prompt and prefill); absent in logs before selfscope 0.2. */
  promptIds?: number[];
  /** What judges see as {prompt}: the trial question (02) or the whole prompt (persona/framing variants). */
  judgePrompt: string;
  prefill: string | null;
  /** The model's continuation (after the prefill), decoded with special tokens removed; what the judges see. */
  output: string;
  /** The uncut continuation, when `output` was cut at the first continuation of the dialogue (persona/base runs). */
  outputFull?: string;
  outputTokens: number;
  stopReason: "stop" | "length";
  /** Degenerate outputs flagged rather than silently judged (empty, repeated token, non-finite). */
  flags: string[];
  seed: number;
  ms: number;
}

export type Criterion = "detection" | "identification" | "forced_identification" | "yes_answer";
/** Every criterion, in the order results and reports list them. */
export const CRITERIA: readonly Criterion[] = ["detection", "identification", "forced_identification", "yes_answer"];

export interface JudgmentRecord {
  type: "judgment";
  trialId: string;
  judge: string;
  criterion: Criterion;
  /** null = unjudged (the judge failed or gave no verdict): never counted as NO. */
  verdict: "YES" | "NO" | null;
  /** The judge's own words (kept for audit), and why a verdict is missing. */
  raw: string | null;
  error: string | null;
  /** Rule-based judges are approximate and say so. */
  approximate: boolean;
  attempts: number;
  ms: number;
}

export type LogRecord = RunHeader | TrialRecord | JudgmentRecord;
