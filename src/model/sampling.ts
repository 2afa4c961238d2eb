// The effective sampler of a generation, resolved the way Hugging Face `generate` resolves it: the
// caller's arguments over the checkpoint's generation_config.json (or a GGUF's general.sampling.*
// keys) over transformers' GenerationConfig defaults. The paper's code passes only `temperature`
// (and do_sample=True when T > 0), so everything else came from the checkpoint (protocol §0, §2.6).
import { ModelFileError, UsageError } from "../core/errors.js";
import { readGguf, type GgufFile } from "../io/gguf.js";
import type { SampleOptions } from "../engine/types.js";
import type { ModelFiles } from "./load.js";
import { readJson } from "./load.js";

/** Where a sampler parameter came from. */
export type SamplerSource = "flag" | "preset" | "generation_config.json" | "gguf" | "default" | "run log v1";

export type SamplerParam = "doSample" | "temperature" | "topK" | "topP" | "minP" | "repetitionPenalty";

/** What the model file recommends (absent keys are undefined). */
export interface SamplingDefaults {
  kind: "generation_config.json" | "gguf" | null;
  file: string | null;
  doSample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  /** Keys that change sampling but that selfscope does not implement ("typical_p=0.9"); reported, not applied. */
  unsupported: string[];
}

/** The sampler a generation ran with: every parameter and its source. Recorded in run-log headers (version 2). */
export interface EffectiveSampler {
  /** false: greedy (argmax); temperature, top-k, top-p and min-p are then unused. */
  doSample: boolean;
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 0 = off. */
  minP: number;
  /** 1 = off; applied to greedy decoding too (as HF does). */
  repetitionPenalty: number;
  sources: Record<SamplerParam, SamplerSource>;
  /** The model file the defaults came from, if any. */
  defaultsFile: string | null;
  unsupported: string[];
}

/** What the caller asked for. `temperature: "model"` passes no temperature (as the paper's code did at T <= 0). */
export interface SamplerRequest {
  temperature?: number | "model";
  /** Where a numeric temperature came from (default "flag"). */
  temperatureSource?: "flag" | "preset";
  greedy?: boolean;
  topK?: number;
  topP?: number;
  minP?: number;
}

/** transformers' GenerationConfig defaults (what HF applies when neither the caller nor the file says). */
export const HF_DEFAULTS = { doSample: false, temperature: 1, topK: 50, topP: 1, minP: 0, repetitionPenalty: 1 } as const;

// HF generation_config keys that change the distribution but are not implemented, with their "off" value.
const HF_UNSUPPORTED: Record<string, unknown> = {
  typical_p: 1, epsilon_cutoff: 0, eta_cutoff: 0, no_repeat_ngram_size: 0, num_beams: 1, penalty_alpha: null, diversity_penalty: 0,
  encoder_repetition_penalty: 1, bad_words_ids: null, suppress_tokens: null, begin_suppress_tokens: null, sequence_bias: null,
  renormalize_logits: false, guidance_scale: null, forced_bos_token_id: null, forced_eos_token_id: null, exponential_decay_length_penalty: null, top_h: null,
};
// llama.cpp's general.sampling.* keys beyond the ones applied, with their "off" value.
const GGUF_UNSUPPORTED: Record<string, unknown> = { xtc_probability: 0, mirostat: 0, typ_p: 1, penalty_present: 0, penalty_freq: 0 };

/** Read the checkpoint's recommended sampling: generation_config.json beside HF weights, general.sampling.* in a GGUF. */
export function readSamplingDefaults(files: ModelFiles, gguf?: GgufFile): SamplingDefaults {
  if (files.format === "gguf") return fromGguf(gguf ?? readGguf(files.weights));
  if (!files.generationConfig) return { kind: null, file: null, unsupported: [] };
  const file = files.generationConfig;
  const g = readJson(file) as Record<string, unknown>;
  const d: SamplingDefaults = { kind: "generation_config.json", file, unsupported: [] };
  const num = (key: string, ok: (x: number) => boolean, want: string): number | null | undefined => {
    const v = g[key];
    if (v === undefined || v === null) return v as null | undefined;
    if (typeof v !== "number" || !ok(v)) throw new ModelFileError(file, `${key} = ${JSON.stringify(v)} is not ${want}`, "fix the value or remove the key");
    return v;
  };
  if (g.do_sample !== undefined && g.do_sample !== null) {
    if (typeof g.do_sample !== "boolean") throw new ModelFileError(file, `do_sample = ${JSON.stringify(g.do_sample)} is not true or false`, "fix the value or remove the key");
    d.doSample = g.do_sample;
  }
  // A null top_k / top_p / min_p switches that filter off in HF (it is not the default).
  const t = num("temperature", (x) => x >= 0, "a number >= 0");
  if (t !== undefined && t !== null) d.temperature = t;
  const k = num("top_k", (x) => Number.isInteger(x) && x >= 0, "an integer >= 0");
  if (k !== undefined) d.topK = k ?? 0;
  const p = num("top_p", (x) => x >= 0 && x <= 1, "in [0, 1]");
  if (p !== undefined) d.topP = p ?? 1;
  const m = num("min_p", (x) => x >= 0 && x <= 1, "in [0, 1]");
  if (m !== undefined) d.minP = m ?? 0;
  const r = num("repetition_penalty", (x) => x > 0, "a number > 0");
  if (r !== undefined) d.repetitionPenalty = r ?? 1;
  for (const [key, off] of Object.entries(HF_UNSUPPORTED)) {
    const v = g[key];
    if (v !== undefined && v !== null && JSON.stringify(v) !== JSON.stringify(off) && !(Array.isArray(v) && v.length === 0)) d.unsupported.push(`${key}=${JSON.stringify(v)}`);
  }
  return d;
}

function fromGguf(g: GgufFile): SamplingDefaults {
  const d: SamplingDefaults = { kind: "gguf", file: g.path, unsupported: [] };
  const get = (key: string, ok: (x: number) => boolean, want: string): number | undefined => {
    const v = g.metadata.get(`general.sampling.${key}`);
    if (v === undefined) return undefined;
    if (typeof v !== "number" || !ok(v)) throw new ModelFileError(g.path, `general.sampling.${key} = ${String(v)} is not ${want}`, "fix the metadata or remove the key");
    return v;
  };
  // GGUF stores floats as float32: round to the decimal the converter was given (0.95, not 0.949999988).
  const f = (x: number | undefined) => (x === undefined ? undefined : Number(Math.fround(x).toPrecision(7)));
  const temp = f(get("temp", (x) => x >= 0, "a number >= 0"));
  const topK = get("top_k", (x) => Number.isInteger(x), "an integer");
  const topP = f(get("top_p", (x) => x >= 0 && x <= 1, "in [0, 1]"));
  const minP = f(get("min_p", (x) => x >= 0 && x <= 1, "in [0, 1]"));
  const rep = f(get("penalty_repeat", (x) => x > 0, "a number > 0"));
  if (temp !== undefined) d.temperature = temp;
  if (topK !== undefined) d.topK = Math.max(0, topK); // llama.cpp: k <= 0 is off
  if (topP !== undefined) d.topP = topP;
  if (minP !== undefined) d.minP = minP;
  if (rep !== undefined) d.repetitionPenalty = rep;
  // GGUF has no do_sample: a file that recommends sampling parameters is sampled from (llama.cpp always samples).
  if ([temp, topK, topP, minP].some((x) => x !== undefined)) d.doSample = temp === undefined || temp > 0;
  for (const [key, off] of Object.entries(GGUF_UNSUPPORTED)) {
    const v = g.metadata.get(`general.sampling.${key}`);
    if (v !== undefined && v !== off) d.unsupported.push(`general.sampling.${key}=${String(v)}`);
  }
  const lastN = g.metadata.get("general.sampling.penalty_last_n");
  if (rep !== undefined && rep !== 1 && lastN !== undefined && lastN !== -1) d.unsupported.push(`general.sampling.penalty_last_n=${String(lastN)} (the penalty is applied over the whole context, as HF does)`);
  return d;
}

/**
 * The effective sampler, as HF `generate` resolves it when called with only a temperature:
 * - T > 0 sets do_sample (the paper's code passes do_sample=True with it); top-k, top-p, min-p and the
 *   repetition penalty come from the file, else from transformers' defaults (top-k 50!).
 * - T = 0 is greedy, whatever the file's do_sample says. (HF itself raises on temperature 0 with
 *   do_sample; the paper's code passed nothing at T <= 0, which `temperature: "model"` reproduces.)
 * - No temperature (or "model"): the file's do_sample and temperature decide, as HF with no arguments.
 * - Flags override the file for top-k / top-p / min-p; `greedy` forces argmax (over a preset's temperature too).
 */
export function resolveSampler(d: SamplingDefaults, r: SamplerRequest): EffectiveSampler {
  const fileSrc: SamplerSource = d.kind ?? "default";
  const from = <T>(flag: T | undefined, file: T | undefined, dflt: T): [T, SamplerSource] =>
    flag !== undefined ? [flag, "flag"] : file !== undefined ? [file, fileSrc] : [dflt, "default"];
  const [topK, kSrc] = from(r.topK, d.topK, HF_DEFAULTS.topK);
  const [topP, pSrc] = from(r.topP, d.topP, HF_DEFAULTS.topP);
  const [minP, mSrc] = from(r.minP, d.minP, HF_DEFAULTS.minP);
  const [rep, rSrc] = from(undefined, d.repetitionPenalty, HF_DEFAULTS.repetitionPenalty);
  if (!Number.isInteger(topK) || topK < 0) throw new UsageError(`--top-k ${topK}: expected an integer >= 0 (0 = off)`);
  if (!(topP >= 0 && topP <= 1)) throw new UsageError(`--top-p ${topP}: expected a number in [0, 1] (1 = off)`);
  if (!(minP >= 0 && minP <= 1)) throw new UsageError(`--min-p ${minP}: expected a number in [0, 1] (0 = off)`);
  let doSample: boolean, dsSrc: SamplerSource, temperature: number, tSrc: SamplerSource;
  if (typeof r.temperature === "number") {
    if (!(r.temperature >= 0)) throw new UsageError(`--temperature ${r.temperature}: expected a number >= 0 (0 = greedy) or "model"`);
    temperature = r.temperature;
    tSrc = dsSrc = r.temperatureSource ?? "flag";
    doSample = temperature > 0;
  } else {
    [temperature, tSrc] = from(undefined, d.temperature, HF_DEFAULTS.temperature);
    [doSample, dsSrc] = from(undefined, d.doSample, HF_DEFAULTS.doSample);
  }
  if (r.greedy) {
    if (typeof r.temperature === "number" && r.temperature > 0 && (r.temperatureSource ?? "flag") === "flag") throw new UsageError(`--greedy and --temperature ${r.temperature} contradict each other; pass one`);
    doSample = false;
    dsSrc = "flag";
  }
  if (doSample && !(temperature > 0)) {
    throw new UsageError(`${d.file ?? "the model"}: do_sample with temperature ${temperature} (HF generate raises here); pass --temperature T or --greedy`);
  }
  return {
    doSample, temperature, topK, topP, minP, repetitionPenalty: rep,
    sources: { doSample: dsSrc, temperature: tSrc, topK: kSrc, topP: pSrc, minP: mSrc, repetitionPenalty: rSrc },
    defaultsFile: d.file,
    unsupported: [...d.unsupported],
  };
}

/** The sampler a run log of version 1 ran with: its temperature, top-k and top-p and nothing from the model file. */
export function legacySampler(g: { temperature: number | "model"; topK?: number; topP?: number }): EffectiveSampler {
  const t = typeof g.temperature === "number" ? g.temperature : 0;
  const s: SamplerSource = "run log v1";
  return {
    doSample: t > 0, temperature: t, topK: g.topK ?? 0, topP: g.topP ?? 1, minP: 0, repetitionPenalty: 1,
    sources: { doSample: s, temperature: s, topK: s, topP: s, minP: s, repetitionPenalty: s },
    defaultsFile: null,
    unsupported: [],
  };
}

/** The options Model.generate takes for this sampler. */
export function sampleOptions(s: EffectiveSampler): SampleOptions {
  return { temperature: s.doSample ? s.temperature : 0, topK: s.topK, topP: s.topP, minP: s.minP, repetitionPenalty: s.repetitionPenalty };
}

/** The parameters that decide which tokens come out, for comparing two samplers (sources and files aside). */
export function samplerDifference(recorded: EffectiveSampler, now: EffectiveSampler): string | null {
  const keys: SamplerParam[] = ["doSample", "temperature", "topK", "topP", "minP", "repetitionPenalty"];
  const diff = keys.filter((k) => recorded[k] !== now[k]).map((k) => `${k} ${String(recorded[k])} → ${String(now[k])}`);
  return diff.length ? diff.join(", ") : null;
}

/** One line: "sampled: temperature 1 (preset), top-k 64 (generation_config.json), ..." or "greedy (flag)". */
export function describeSampler(s: EffectiveSampler): string {
  const src = (k: SamplerParam) => s.sources[k];
  const rep = s.repetitionPenalty !== 1 ? `, repetition penalty ${s.repetitionPenalty} (${src("repetitionPenalty")})` : "";
  const extra = s.unsupported.length ? `; not applied: ${s.unsupported.join(", ")}` : "";
  if (!s.doSample) return `greedy (do_sample false: ${src("doSample")})${rep}${extra}`;
  const off = (on: boolean, v: string) => (on ? v : "off");
  return (
    `sampled: temperature ${s.temperature} (${src("temperature")}), top-k ${off(s.topK > 0, String(s.topK))} (${src("topK")}), ` +
    `top-p ${off(s.topP < 1, String(s.topP))} (${src("topP")}), min-p ${off(s.minP > 0, String(s.minP))} (${src("minP")})${rep}${extra}`
  );
}
