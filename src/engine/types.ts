// The engine's public call types: rows, options and results of forward() and generate().
import type { Plan } from "../hooks/plan.js";
import type { ActivationCache } from "./cache.js";

/** One row of a batch: token ids, plus the text they encode when markers must be resolved. */
export interface Row {
  ids: number[];
  /** Text the ids were made from (needed by { marker } positions). */
  text?: string;
}

/** Turns the text before a marker into its token count (the caller's tokenizer, same special-token handling). */
export type PrefixCounter = (textBefore: string) => number;


export interface ForwardOptions {
  plan?: Plan;
  /** Which logits to return: every position (default), the last only, or none. */
  logits?: "all" | "last" | "none";
  /** For { marker } positions. */
  countPrefix?: PrefixCounter;
}

export interface ForwardResult {
  /** Per row: [positions, dVocab] ("all") or [dVocab] ("last"). */
  logits: Float32Array[];
  cache: ActivationCache;
}

export interface SampleOptions {
  /** 0 = greedy (default). */
  temperature?: number;
  /** Keep the k best tokens (0 or absent: off). */
  topK?: number;
  /** Keep the shortest ranked prefix whose probability reaches p (1 or absent: off). */
  topP?: number;
  /** Keep tokens with probability >= minP times the best one's (0 or absent: off). */
  minP?: number;
  /** HF's repetition_penalty over the prompt and generated ids (1 or absent: off); applies when greedy too. */
  repetitionPenalty?: number;
  /** One seed, or one per row (a row's sample then does not depend on its batch mates). */
  seed?: number | number[];
}

export interface GenerateOptions extends SampleOptions {
  maxTokens: number;
  plan?: Plan;
  /** Stop tokens; default: the model's EOS ids. Pass [] to never stop early. */
  stop?: number[];
  countPrefix?: PrefixCounter;
  /** Called each time a step's logits reach the host: step 0 after the prompt, then once per token (progress, timing). */
  onStep?: (step: number) => void;
}

export interface GenerateResult {
  /** Generated ids per row (a stop token, when hit, is the last id). */
  tokens: number[][];
  stopReason: ("stop" | "length")[];
  cache: ActivationCache;
}

