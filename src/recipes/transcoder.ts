// `selfscope train-transcoder`: a TopK transcoder (MLP input -> MLP output of one layer) trained on
// the model's own activations, for models no published transcoder covers (issue 15 §4).
import fs from "node:fs";
import path from "node:path";
import type { TopLevelSpec } from "vega-lite";
import { UsageError } from "../core/errors.js";
import type { Intervention } from "../hooks/plan.js";
import { readData } from "../eval/protocol.js";
import { trainTopK } from "../train/dictionary.js";
import { decode, encode, loadDictionary, saveDictionary, splice, transcoderSites } from "../vectors/dictionary.js";
import { escapeHtml, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { loadAnalysisModel } from "./site.js";

export interface TranscoderArgs {
  model: string;
  out: string;
  layer?: number;
  /** Text file, one prompt per line (default: "Tell me about {c}" for the paper's 500 concepts and 100 baseline words). */
  texts?: string;
  dSae?: number;
  k?: number;
  steps?: number;
  batch?: number;
  lr?: number;
  seed?: number;
  deadAfter?: number;
  device?: string;
  quiet?: boolean;
  threads?: number;
}

export interface TranscoderResults {
  recipe: "train-transcoder";
  model: { path: string; hash: string; nLayers: number; dModel: number };
  layer: number;
  input_site: string;
  output_site: string;
  d_sae: number;
  k: number;
  tokens: number;
  steps: number;
  fvu: number;
  resampled: number;
  /** Share of features that fire on no training token at the end. */
  dead_fraction: number;
  mean_active: number;
  /** On the first prompt: max |Δ logit| with the error node kept (should be ~0) and without it. */
  splice_max_abs_dlogit_with_error: number;
  splice_max_abs_dlogit_without_error: number;
  history: { step: number; mse: number }[];
  file: string;
}

function defaultTexts(): string[] {
  const c = readData<{ concepts: string[] }>("protocol/concepts_500.json").concepts;
  const b = readData<{ words: string[] }>("protocol/baseline_words.json").words;
  return [...new Set([...c, ...b])].map((w) => `Tell me about ${w.toLowerCase()}`);
}

export async function transcoderCommand(a: TranscoderArgs): Promise<TranscoderResults> {
  const log = (m: string) => { if (!a.quiet) process.stderr.write(`[train-transcoder] ${m}\n`); };
  const model = await loadAnalysisModel(a);
  try {
    const { nLayers, dModel } = model.config;
    const layer = a.layer ?? Math.floor(nLayers / 2);
    if (!Number.isInteger(layer) || layer < 0 || layer >= nLayers) throw new UsageError(`--layer ${layer} is outside 0..${nLayers - 1}`);
    let texts: string[];
    if (a.texts) {
      if (!fs.existsSync(a.texts)) throw new UsageError(`--texts ${a.texts} does not exist; give a text file with one prompt per line`);
      texts = fs.readFileSync(a.texts, "utf8").split("\n").map((s) => s.trim()).filter(Boolean);
      if (texts.length === 0) throw new UsageError(`--texts ${a.texts} has no non-empty lines`);
    } else texts = defaultTexts();
    const sites = transcoderSites(layer);
    const xs: Float32Array[] = [], ys: Float32Array[] = [];
    let n = 0;
    for (let i = 0; i < texts.length; i += 16) {
      const batch = texts.slice(i, i + 16);
      const plan: Intervention[] = [{ op: "read", at: sites.input, pos: { from: 0 } }, { op: "read", at: sites.output, pos: { from: 0 } }];
      const res = await model.forward(batch.map((t) => ({ text: t, addSpecial: true })), { plan, logits: "none" });
      batch.forEach((_, b) => {
        const x = res.cache.get(sites.input, b).data, y = res.cache.get(sites.output, b).data;
        xs.push(x);
        ys.push(y);
        n += x.length / dModel;
      });
    }
    const x = new Float32Array(n * dModel), y = new Float32Array(n * dModel);
    let off = 0;
    xs.forEach((xi, i) => { x.set(xi, off); y.set(ys[i]!, off); off += xi.length; });
    const dSae = a.dSae ?? 4 * dModel, k = a.k ?? 8, steps = a.steps ?? 2000;
    log(`${texts.length} prompts, ${n} tokens at layer ${layer}; d_sae ${dSae}, k ${k}, ${steps} steps`);
    const r = trainTopK(x, y, n, dModel, dModel, { dSae, k, steps, batch: a.batch ?? 256, lr: a.lr ?? 5e-3, seed: a.seed ?? 0, deadAfter: a.deadAfter ?? 200, inputSite: sites.input, outputSite: sites.output, log });
    const acts = encode(r.dict, x, n);
    const fired = new Uint8Array(dSae);
    let active = 0;
    acts.forEach((v, i) => { if (v > 0) { fired[i % dSae] = 1; active++; } });
    fs.mkdirSync(a.out, { recursive: true });
    const file = path.join(a.out, "transcoder.safetensors");
    saveDictionary(file, r.dict, { model: model.weightsHash(), layer: String(layer) });
    // Splice the saved file back in on the first prompt: with the error node nothing may change.
    const back = loadDictionary(file, nLayers, dModel);
    const ids = model.tokenizer ? model.tokenizer.encode(texts[0]!, { addSpecial: true }) : [0];
    const base = (await model.forward([{ ids }], { logits: "all" })).logits[0]!;
    const sp = await splice(model, back, ids);
    const withErr = (await model.forward([{ ids }], { plan: [sp.patch], logits: "all" })).logits[0]!;
    const recon = decode(back, sp.acts, ids.length);
    const without = (await model.forward([{ ids }], { plan: [{ op: "patch", at: back.outputSite, source: recon, pos: { from: 0 } }], logits: "all" })).logits[0]!;
    const maxd = (u: Float32Array) => u.reduce((m, v, i) => Math.max(m, Math.abs(v - base[i]!)), 0);
    const results: TranscoderResults = {
      recipe: "train-transcoder",
      model: { path: a.model, hash: model.weightsHash(), nLayers, dModel },
      layer,
      input_site: sites.input,
      output_site: sites.output,
      d_sae: dSae,
      k,
      tokens: n,
      steps,
      fvu: r.fvu,
      resampled: r.resampled,
      dead_fraction: 1 - fired.reduce((s, v) => s + v, 0) / dSae,
      mean_active: active / n,
      splice_max_abs_dlogit_with_error: maxd(withErr),
      splice_max_abs_dlogit_without_error: maxd(without),
      history: r.history,
      file: "transcoder.safetensors",
    };
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(a.out, "report.html"), await transcoderReport(results));
    log(`FVU ${r.fvu.toFixed(4)}, dead ${(100 * results.dead_fraction).toFixed(1)}%, spliced Δlogit ${results.splice_max_abs_dlogit_with_error.toExponential(1)} (without the error node ${results.splice_max_abs_dlogit_without_error.toFixed(3)})`);
    return results;
  } finally {
    model.dispose();
  }
}

async function transcoderReport(r: TranscoderResults): Promise<string> {
  const spec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: "Training MSE (batch)", anchor: "start", fontSize: 14 },
    data: { values: r.history },
    width: 360,
    height: 200,
    mark: { type: "line", point: true },
    encoding: { x: { field: "step", type: "quantitative" }, y: { field: "mse", type: "quantitative", scale: { type: "log" } } },
  } as TopLevelSpec;
  return htmlPage(`selfscope train-transcoder — layer ${r.layer}`, `${r.input_site} → ${r.output_site} · d_sae ${r.d_sae}, TopK k = ${r.k} · ${r.tokens} tokens`, [
    {
      title: "Fit",
      html: `${await plotOrNote(r.history, () => spec, "no history")}${htmlTable(["measure", "value"], [
        ["fraction of variance unexplained (all tokens)", r.fvu],
        ["dead features (fire on no token)", `${(100 * r.dead_fraction).toFixed(1)}%`],
        ["mean active features per token", r.mean_active],
        ["features re-initialised in training", r.resampled],
        ["spliced in with the error node: max |Δ logit|", r.splice_max_abs_dlogit_with_error],
        ["spliced in without it: max |Δ logit|", r.splice_max_abs_dlogit_without_error],
      ])}<p class="note">${escapeHtml("Trained on short prompts only; features are candidates to inspect, not labelled concepts.")}</p>`,
    },
  ]);
}
