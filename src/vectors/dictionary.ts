// Sparse dictionaries on a model's activations: SAEs (SAELens layout) and transcoders (Gemma Scope 2
// layout), attached to the hook sites they were trained on, with the error node kept so that
// splicing one in changes nothing unless a feature is edited (protocol §9.2; issue 15 §4).
//
// Gemma Scope 2 (`params.safetensors`): w_enc [d_in, d_sae], b_enc [d_sae], w_dec [d_sae, d_out],
// b_dec [d_out], threshold [d_sae], optional affine_skip_connection [d_in, d_out] (x @ W_skip).
// JumpReLU: a = 1[pre > θ]·ReLU(pre), pre = x·W_enc + b_enc; x̂ = a·W_dec + b_dec (+ x·W_skip).
// SAELens (`cfg.json` + `sae_weights.safetensors`): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc,
// b_dec, threshold (jumprelu); architecture standard | jumprelu | topk (activation_fn_kwargs.k);
// apply_b_dec_to_input subtracts b_dec before encoding; hook_name is the site.
import fs from "node:fs";
import path from "node:path";
import { ModelFileError, UsageError } from "../core/errors.js";
import { hookName, parseHook, type HookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import { openSafetensors, readStTensor, writeSafetensors } from "../io/safetensors.js";
import type { Model } from "../model/model.js";

export type Activation = "relu" | "jumprelu" | "topk";

export interface Dictionary {
  kind: "sae" | "transcoder";
  activation: Activation;
  dIn: number;
  dSae: number;
  dOut: number;
  /** Row-major [dIn, dSae]. */
  wEnc: Float32Array;
  bEnc: Float32Array;
  /** Row-major [dSae, dOut]. */
  wDec: Float32Array;
  bDec: Float32Array;
  threshold: Float32Array | null;
  k: number | null;
  /** Row-major [dIn, dOut] (transcoders with an affine skip). */
  wSkip: Float32Array | null;
  /** Subtract b_dec from the input before encoding (SAELens apply_b_dec_to_input). */
  bDecToInput: boolean;
  /** Where the input is read and the output written (the same site for an SAE). */
  inputSite: HookName;
  outputSite: HookName;
  source: string;
}

function tensor(set: ReturnType<typeof openSafetensors>, file: string, name: string, shape: (number | null)[]): { data: Float32Array; shape: number[] } {
  if (!set.tensors.has(name)) throw new ModelFileError(file, `missing tensor ${name}`, `expected ${name} with shape [${shape.map((s) => s ?? "?").join(", ")}]`);
  const t = readStTensor(set, name);
  if (t.shape.length !== shape.length || shape.some((s, i) => s !== null && s !== t.shape[i])) {
    throw new ModelFileError(file, `tensor ${name} has shape [${t.shape.join(", ")}], expected [${shape.map((s) => s ?? "?").join(", ")}]`);
  }
  return t;
}

/** A Gemma Scope 2 transcoder (or SAE, when `output` is the input site) from its params.safetensors. */
export function loadGemmaScope(file: string, o: { input: HookName; output?: HookName; dModel: number }): Dictionary {
  if (!fs.existsSync(file)) throw new UsageError(`${file} does not exist; pass the params.safetensors of a Gemma Scope 2 release`);
  const set = openSafetensors(file);
  const enc = tensor(set, file, "w_enc", [o.dModel, null]);
  const dSae = enc.shape[1]!;
  const dec = tensor(set, file, "w_dec", [dSae, o.dModel]);
  const skip = set.tensors.has("affine_skip_connection") ? tensor(set, file, "affine_skip_connection", [o.dModel, o.dModel]).data : null;
  return {
    kind: o.output && o.output !== o.input ? "transcoder" : "sae",
    activation: "jumprelu",
    dIn: o.dModel,
    dSae,
    dOut: o.dModel,
    wEnc: enc.data,
    bEnc: tensor(set, file, "b_enc", [dSae]).data,
    wDec: dec.data,
    bDec: tensor(set, file, "b_dec", [o.dModel]).data,
    // A trained TopK/ReLU dictionary (loadDictionary) has no threshold; Gemma Scope's JumpReLU always does.
    threshold: set.tensors.has("threshold") || set.metadata.format !== TRAINED_FORMAT ? tensor(set, file, "threshold", [dSae]).data : null,
    k: null,
    wSkip: skip,
    bDecToInput: false,
    inputSite: o.input,
    outputSite: o.output ?? o.input,
    source: file,
  };
}

/** A SAELens SAE from its folder (cfg.json + sae_weights.safetensors). */
export function loadSaeLens(dir: string, nLayers: number): Dictionary {
  const cfgFile = path.join(dir, "cfg.json");
  const wFile = path.join(dir, "sae_weights.safetensors");
  for (const f of [cfgFile, wFile]) if (!fs.existsSync(f)) throw new UsageError(`${f} does not exist; a SAELens SAE folder holds cfg.json and sae_weights.safetensors`);
  let cfg: Record<string, unknown>;
  try {
    cfg = JSON.parse(fs.readFileSync(cfgFile, "utf8")) as Record<string, unknown>;
  } catch (e) {
    throw new ModelFileError(cfgFile, `is not JSON: ${(e as Error).message}`);
  }
  const num = (k: string) => {
    const v = cfg[k];
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) throw new ModelFileError(cfgFile, `${k} should be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  };
  const dIn = num("d_in"), dSae = num("d_sae");
  const arch = String(cfg.architecture ?? (cfg.activation_fn_str === "topk" ? "topk" : "standard"));
  const activation: Activation = arch === "jumprelu" ? "jumprelu" : arch === "topk" || cfg.activation_fn_str === "topk" ? "topk" : arch === "standard" ? "relu" : (() => { throw new ModelFileError(cfgFile, `architecture ${JSON.stringify(arch)} is not one selfscope runs (standard, jumprelu, topk)`); })();
  const hook = cfg.hook_name;
  if (typeof hook !== "string") throw new ModelFileError(cfgFile, "hook_name is missing");
  parseHook(hook, nLayers);
  const kw = cfg.activation_fn_kwargs as Record<string, unknown> | undefined;
  const k = activation === "topk" ? (typeof kw?.k === "number" ? kw.k : typeof cfg.k === "number" ? cfg.k : null) : null;
  if (activation === "topk" && (k === null || !Number.isInteger(k) || k < 1 || k > dSae)) throw new ModelFileError(cfgFile, "a topk SAE needs activation_fn_kwargs.k between 1 and d_sae");
  const set = openSafetensors(wFile);
  return {
    kind: "sae",
    activation,
    dIn,
    dSae,
    dOut: dIn,
    wEnc: tensor(set, wFile, "W_enc", [dIn, dSae]).data,
    bEnc: tensor(set, wFile, "b_enc", [dSae]).data,
    wDec: tensor(set, wFile, "W_dec", [dSae, dIn]).data,
    bDec: tensor(set, wFile, "b_dec", [dIn]).data,
    threshold: activation === "jumprelu" ? tensor(set, wFile, "threshold", [dSae]).data : null,
    k,
    wSkip: null,
    bDecToInput: cfg.apply_b_dec_to_input === true,
    inputSite: hook as HookName,
    outputSite: hook as HookName,
    source: dir,
  };
}

/** Feature activations of `n` input rows [n, dIn] -> [n, dSae] (float64 accumulation). */
export function encode(d: Dictionary, x: Float32Array, n: number): Float32Array {
  const out = new Float32Array(n * d.dSae);
  const pre = new Float64Array(d.dSae);
  for (let r = 0; r < n; r++) {
    for (let f = 0; f < d.dSae; f++) pre[f] = d.bEnc[f]!;
    for (let i = 0; i < d.dIn; i++) {
      const xi = x[r * d.dIn + i]! - (d.bDecToInput ? d.bDec[i]! : 0);
      if (xi === 0) continue;
      const row = i * d.dSae;
      for (let f = 0; f < d.dSae; f++) pre[f] = pre[f]! + xi * d.wEnc[row + f]!;
    }
    const o = r * d.dSae;
    if (d.activation === "topk") {
      const idx = Array.from(pre.keys()).sort((a, b) => pre[b]! - pre[a]! || a - b).slice(0, d.k!);
      for (const f of idx) out[o + f] = Math.max(0, pre[f]!);
    } else {
      for (let f = 0; f < d.dSae; f++) {
        const p = pre[f]!;
        out[o + f] = d.activation === "jumprelu" ? (p > d.threshold![f]! ? Math.max(0, p) : 0) : Math.max(0, p);
      }
    }
  }
  return out;
}

/** Reconstruction [n, dOut] from activations (and, with a skip, the inputs). */
export function decode(d: Dictionary, acts: Float32Array, n: number, x?: Float32Array): Float32Array {
  const out = new Float32Array(n * d.dOut);
  const acc = new Float64Array(d.dOut);
  for (let r = 0; r < n; r++) {
    for (let j = 0; j < d.dOut; j++) acc[j] = d.bDec[j]!;
    for (let f = 0; f < d.dSae; f++) {
      const a = acts[r * d.dSae + f]!;
      if (a === 0) continue;
      const row = f * d.dOut;
      for (let j = 0; j < d.dOut; j++) acc[j] = acc[j]! + a * d.wDec[row + j]!;
    }
    if (d.wSkip) {
      if (!x) throw new Error("decode: a transcoder with an affine skip needs its inputs");
      for (let i = 0; i < d.dIn; i++) {
        const xi = x[r * d.dIn + i]!;
        for (let j = 0; j < d.dOut; j++) acc[j] = acc[j]! + xi * d.wSkip[i * d.dOut + j]!;
      }
    }
    for (let j = 0; j < d.dOut; j++) out[r * d.dOut + j] = acc[j]!;
  }
  return out;
}

export interface Splice {
  /** Feature activations [positions, dSae] of the unedited run. */
  acts: Float32Array;
  /** What the output site held, minus the reconstruction ("error node"), [positions, dOut]. */
  error: Float32Array;
  /** The patch that writes reconstruction(edited acts) + error at the output site. */
  patch: Intervention;
  positions: number;
}

/**
 * Splice a dictionary into one prompt: read its sites on `plan`'s run, encode, and build the patch
 * that writes decode(edit(acts)) + error at the output site. With no edit the patched run equals the
 * original (up to float32 rounding of recon + error); `edit` changes activations in place
 * (ablation, scaling, clamping).
 */
export async function splice(model: Model, d: Dictionary, ids: number[], plan: Intervention[] = [], edit?: (acts: Float32Array, positions: number) => void): Promise<Splice> {
  if (model.config.dModel !== d.dIn || model.config.dModel !== d.dOut) throw new UsageError(`${d.source}: d_in ${d.dIn} / d_out ${d.dOut} do not match the model's d_model ${model.config.dModel}`);
  const reads: Intervention[] = [{ op: "read", at: d.inputSite, pos: { from: 0 } }];
  if (d.outputSite !== d.inputSite) reads.push({ op: "read", at: d.outputSite, pos: { from: 0 } });
  const res = await model.forward([{ ids }], { plan: [...plan, ...reads], logits: "none" });
  const x = res.cache.get(d.inputSite, 0).data;
  const y = res.cache.get(d.outputSite, 0).data;
  const n = ids.length;
  const acts = encode(d, x, n);
  const recon = decode(d, acts, n, x);
  const error = new Float32Array(n * d.dOut);
  for (let i = 0; i < error.length; i++) error[i] = y[i]! - recon[i]!;
  const edited = acts.slice();
  edit?.(edited, n);
  const recon2 = edit ? decode(d, edited, n, x) : recon;
  const source = new Float32Array(n * d.dOut);
  for (let i = 0; i < source.length; i++) source[i] = recon2[i]! + error[i]!;
  return { acts, error, patch: { op: "patch", at: d.outputSite, source, pos: { from: 0 } }, positions: n };
}

/** A transcoder's usual sites on layer L: MLP input (ln2.hook_normalized) -> MLP output (hook_mlp_out). */
export const transcoderSites = (layer: number): { input: HookName; output: HookName } => ({ input: hookName(layer, "ln2.hook_normalized"), output: hookName(layer, "hook_mlp_out") });

/** The file selfscope writes for a dictionary it trained: F32 tensors as Gemma Scope 2 names them, plus metadata. */
export const TRAINED_FORMAT = "selfscope-dictionary-1";

export function saveDictionary(file: string, d: Dictionary, meta: Record<string, string> = {}): void {
  const t: Record<string, { data: Float32Array; shape: number[] }> = {
    w_enc: { data: d.wEnc, shape: [d.dIn, d.dSae] },
    b_enc: { data: d.bEnc, shape: [d.dSae] },
    w_dec: { data: d.wDec, shape: [d.dSae, d.dOut] },
    b_dec: { data: d.bDec, shape: [d.dOut] },
  };
  if (d.threshold) t.threshold = { data: d.threshold, shape: [d.dSae] };
  if (d.wSkip) t.affine_skip_connection = { data: d.wSkip, shape: [d.dIn, d.dOut] };
  writeSafetensors(file, t, { ...meta, format: TRAINED_FORMAT, activation: d.activation, k: String(d.k ?? ""), input_site: d.inputSite, output_site: d.outputSite });
}

/** A dictionary written by saveDictionary (its sites and activation from the metadata). */
export function loadDictionary(file: string, nLayers: number, dModel: number): Dictionary {
  if (!fs.existsSync(file)) throw new UsageError(`${file} does not exist`);
  const set = openSafetensors(file);
  const m = set.metadata;
  if (m.format !== TRAINED_FORMAT) throw new ModelFileError(file, `is not a dictionary selfscope trained (metadata format ${JSON.stringify(m.format)})`, "load Gemma Scope 2 or SAELens files with their own loaders");
  const input = m.input_site as HookName, output = m.output_site as HookName;
  parseHook(input, nLayers);
  parseHook(output, nLayers);
  const d = loadGemmaScope(file, { input, output, dModel });
  const activation = m.activation as Activation;
  if (activation !== "topk" && activation !== "relu" && activation !== "jumprelu") throw new ModelFileError(file, `activation ${JSON.stringify(activation)} is unknown`);
  const k = m.k ? Number(m.k) : null;
  return { ...d, activation, k, threshold: activation === "jumprelu" ? d.threshold : null, source: file };
}
