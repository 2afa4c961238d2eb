// A planted detection circuit on stories260K (shared by the features and steering-attribution
// tests): block 3's MLP unit 0 is a default-"No" gate (reads the mean MLP input of the trial
// prompt's injected positions, writes along No − Yes); block 1's unit 0 is an evidence carrier
// (reads the injected direction v, writes −(gate input)), so injecting v at block 0 switches the
// gate off. Dictionaries for both layers hold the planted unit as feature 0 among random distractors.
import path from "node:path";
import { Model } from "../../src/model/model.js";
import { readGguf, readGgufTensor } from "../../src/io/gguf.js";
import { getVariant, renderTrial } from "../../src/eval/protocol.js";
import { gapScorer } from "../../src/recipes/patch.js";
import { deltaU } from "../../src/recipes/features.js";
import { hookName } from "../../src/hooks/names.js";
import { transcoderSites, type Dictionary } from "../../src/vectors/dictionary.js";
import { mulberry32 } from "../../src/core/rng.js";
import { rewriteGguf } from "./gguf-edit.js";
import { fixture } from "./paths.js";

export const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
const D = 64, F = 172, S = 9;
export const GATE_L = 3, CARRIER_L = 1, INJECT_L = 0;

export interface PlantedCircuit {
  file: string;
  gateDict: Dictionary;
  carrierDict: Dictionary;
  /** The injected vector (norm 3). */
  v: Float32Array;
  du: Float32Array;
  prompt: { ids: number[]; injectFrom: number; text: string };
}

const unit = (x: ArrayLike<number>) => { const n = Math.hypot(...Array.from(x)); return Float32Array.from(x, (y) => y / n); };

function dict(layer: number, first: { enc: Float32Array; dec: Float32Array }, r: () => number): Dictionary {
  const wEnc = new Float32Array(D * S), wDec = new Float32Array(S * D);
  for (let f = 0; f < S; f++) {
    const e = f === 0 ? first.enc : unit(Array.from({ length: D }, () => r() * 2 - 1));
    const d = f === 0 ? first.dec : unit(Array.from({ length: D }, () => r() * 2 - 1));
    for (let i = 0; i < D; i++) { wEnc[i * S + f] = e[i]!; wDec[f * D + i] = d[i]!; }
  }
  const sites = transcoderSites(layer);
  return { kind: "transcoder", activation: "jumprelu", dIn: D, dSae: S, dOut: D, wEnc, bEnc: new Float32Array(S), wDec, bDec: new Float32Array(D), threshold: new Float32Array(S), k: null, wSkip: null, bDecToInput: false, inputSite: sites.input, outputSite: sites.output, source: `planted layer ${layer}` };
}

/** Writes the planted model into `dir` and returns it with its dictionaries. */
export async function plantedCircuit(dir: string): Promise<PlantedCircuit> {
  const r = mulberry32(21);
  const base = await Model.load(STORIES, { threads: 1 });
  const prompt = renderTrial(base, getVariant("original"), 2, { format: "raw", judgePrompt: "question" });
  const v = Float32Array.from(unit(Array.from({ length: D }, () => r() * 2 - 1)), (x) => 3 * x);
  // The gate's input direction: the mean normalized MLP input of block 3 over the injected positions.
  const res = await base.forward([{ ids: prompt.ids }], { plan: [{ op: "read", at: hookName(GATE_L, "ln2.hook_normalized"), pos: { from: 0 } }], logits: "none" });
  const x = res.cache.get(hookName(GATE_L, "ln2.hook_normalized"), 0).data;
  const m = new Float32Array(D);
  const n = prompt.ids.length - prompt.injectFrom;
  for (let p = prompt.injectFrom; p < prompt.ids.length; p++) for (let i = 0; i < D; i++) m[i] = m[i]! + x[p * D + i]! / n;
  const mNorm = Math.hypot(...m);
  const ug = unit(m);
  const sc = gapScorer(base, prompt.text, prompt.ids);
  const du = deltaU(readGgufTensor(readGguf(STORIES), "output.weight"), sc.seqs.slice(0, sc.nYes), sc.seqs.slice(sc.nYes));
  const noDir = unit(du.map((y) => -y));
  base.dispose();
  const vh = unit(v);
  const file = path.join(dir, "planted.gguf");
  rewriteGguf(STORIES, file, (name, data) => {
    // Gate: a = (3/|m|)·u_g·x̂ ≈ 3 by default; writes along No − Yes.
    if (name === `blk.${GATE_L}.ffn_gate.weight` || name === `blk.${GATE_L}.ffn_up.weight`) for (let i = 0; i < D; i++) data[i] = (3 / mNorm) * ug[i]!;
    if (name === `blk.${GATE_L}.ffn_down.weight`) for (let i = 0; i < D; i++) data[i * F] = 0.5 * noDir[i]!;
    // Carrier: reads the injected direction, writes −u_g (switching the gate off).
    if (name === `blk.${CARRIER_L}.ffn_gate.weight` || name === `blk.${CARRIER_L}.ffn_up.weight`) for (let i = 0; i < D; i++) data[i] = vh[i]!;
    if (name === `blk.${CARRIER_L}.ffn_down.weight`) for (let i = 0; i < D; i++) data[i * F] = -0.5 * ug[i]!;
  });
  return { file, gateDict: dict(GATE_L, { enc: ug, dec: noDir }, r), carrierDict: dict(CARRIER_L, { enc: vh, dec: unit(ug.map((y) => -y)) }, r), v, du, prompt };
}
