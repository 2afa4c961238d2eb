// `selfscope selfie-train` and `selfscope describe` (docs/selfie.md): train a SelfIE adapter on the
// concept vectors of a word list and evaluate it on held-out words against its untrained and
// label-shuffled baselines; let the frozen model describe a vector through an adapter.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { readSafetensorsHeader, readStTensor } from "../io/safetensors.js";
import { Model } from "../model/model.js";
import { conceptVectors, type VectorRecipe } from "../vectors/extract.js";
import { readData } from "../eval/protocol.js";
import {
  describeVectors, identityAdapter, labelScores, loadAdapter, ranks, recallAt, renderTemplate, saveAdapter, shuffleLabels, trainAdapter,
  type Adapter, type AdapterKind, type Example, type Recall, type SelfiePrompt,
} from "./selfie.js";

/** The template the docs' measurements use on stories260K (a raw story prompt; no chat template). */
export const DEFAULT_TEMPLATE = "Lily saw a <v>. Lily saw a {word}";
/** Concept vectors as the protocol makes them, with the raw prompt (stories260K has no chat template). */
export const SELFIE_RECIPE: VectorRecipe = { method: "baseline-mean", format: "raw", userTemplate: "Tell me about {word}", tokenIndex: -1 };

function wordList(spec: string, flag: string): string[] {
  const words = fs.existsSync(spec) ? fs.readFileSync(spec, "utf8").split(/[\n,]/) : spec.split(",");
  const out = words.map((w) => w.trim()).filter((w) => w.length > 0);
  if (out.length === 0) throw new UsageError(`${flag}: no words in ${JSON.stringify(spec)} (a comma list or a file with one word a line)`);
  return out;
}

export interface SelfieEval {
  candidates: number;
  chance: number;
  recall1: Recall;
  recall5: Recall;
}

/** Topic recall@1 and @5 of `a` on `words`: each word's vector, candidates = the same word list. */
export async function evalRecall(model: Model, a: Adapter, p: SelfiePrompt, vectors: Map<string, Float32Array>, words: string[]): Promise<SelfieEval> {
  const sc = await labelScores(model, a, p, words.map((w) => vectors.get(w)!), words);
  const rk = ranks(sc, words.map((_, i) => i));
  return { candidates: words.length, chance: 1 / words.length, recall1: recallAt(rk, 1), recall5: recallAt(rk, 5) };
}

export interface SelfieTrainArgs {
  model: string;
  out: string;
  layer?: number;
  words: string;
  heldOut?: string;
  template?: string;
  kind?: string;
  steps?: number;
  lr?: number;
  batchSize?: number;
  seed?: number;
  device?: string;
  threads?: number;
  maxTokens?: number;
  quiet?: boolean;
  vectorCache?: string | null;
}

export async function selfieTrainCommand(args: SelfieTrainArgs): Promise<unknown> {
  const kind = (args.kind ?? "scalar") as AdapterKind;
  if (kind !== "scalar" && kind !== "full") throw new UsageError(`--kind must be scalar or full, got ${JSON.stringify(args.kind)}`);
  if (!args.words) throw new UsageError("selfie-train: --words WORDS|FILE is required (the training labels)");
  const model = await Model.load(args.model, { device: (args.device ?? "cpu") as "cpu", ...(args.threads ? { threads: args.threads } : {}) });
  try {
    const layer = args.layer ?? Math.floor(model.config.nLayers / 2);
    if (!Number.isInteger(layer) || layer < 0 || layer >= model.config.nLayers) throw new UsageError(`--layer ${layer} is outside 0..${model.config.nLayers - 1}`);
    const train = wordList(args.words, "--words");
    const held = args.heldOut ? wordList(args.heldOut, "--held-out") : [];
    const p = renderTemplate(model, args.template ?? DEFAULT_TEMPLATE);
    const baselineWords = readData<{ words: string[] }>("protocol/baseline_words.json").words;
    const vs = (await conceptVectors(model, { concepts: [...new Set([...train, ...held])], baselineWords, layers: [layer], recipe: SELFIE_RECIPE, ...(args.vectorCache !== undefined ? { cacheDir: args.vectorCache } : {}) })).vectors.get(layer)!;
    const data: Example[] = train.map((w) => ({ vector: vs.get(w)!, label: w }));
    const o = { steps: args.steps ?? 100, lr: args.lr ?? 0.1, batchSize: args.batchSize ?? 8, seed: args.seed ?? 0 };
    const log = (what: string) => (s: number, l: number) => {
      if (!args.quiet && (s % 10 === 0 || s === o.steps - 1)) process.stderr.write(`selfie-train ${what}: step ${s} loss ${l.toFixed(4)}\n`);
    };
    const trained = await trainAdapter(model, kind, p, data, { ...o, onStep: log("trained") });
    fs.mkdirSync(args.out, { recursive: true });
    const meta = { kind, layer, model: model.weightsHash(), template: p.template, vectorRecipe: JSON.stringify(SELFIE_RECIPE) };
    const file = path.join(args.out, "adapter.safetensors");
    saveAdapter(file, trained.adapter, meta);
    const results: Record<string, unknown> = { adapter: file, kind, layer, template: p.template, train, heldOut: held, options: o, losses: trained.losses };
    if (held.length > 0) {
      const shuffled = await trainAdapter(model, kind, p, shuffleLabels(data, o.seed + 1), { ...o, onStep: log("label-shuffled") });
      saveAdapter(path.join(args.out, "adapter-shuffled.safetensors"), shuffled.adapter, meta);
      const a = trained.adapter;
      const noBias: Adapter = { ...a, b: new Float64Array(a.d) };
      const biasOnly: Adapter = { ...a, s: new Float64Array(1), W: new Float64Array(a.W.length) };
      const rows: Record<string, Adapter> = { trained: a, untrained: identityAdapter(kind, a.d), shuffled: shuffled.adapter, noBias, biasOnly };
      const recall: Record<string, SelfieEval> = {};
      for (const [k, ad] of Object.entries(rows)) recall[k] = await evalRecall(model, ad, p, vs, held);
      const r1 = (k: string) => recall[k]!.recall1.rate.estimate!;
      const gain = r1("trained") - r1("untrained");
      // The bias term's share of the gain: how much of the trained adapter's recall@1 gain over the untrained one is lost when b is zeroed.
      const biasShare = gain > 0 ? (r1("trained") - r1("noBias")) / gain : null;
      const gen: Record<string, { hits: number; n: number; texts: string[] }> = {};
      for (const k of ["trained", "untrained", "shuffled"]) {
        const d = await describeVectors(model, rows[k]!, p, held.map((w) => vs.get(w)!), { maxTokens: args.maxTokens ?? 12, labels: held });
        gen[k] = { hits: d.hits!.filter(Boolean).length, n: held.length, texts: d.texts };
      }
      Object.assign(results, { recall, biasShare, generation: gen });
      if (!args.quiet)
        for (const [k, e] of Object.entries(recall))
          process.stdout.write(`${k.padEnd(10)} recall@1 ${e.recall1.hits}/${e.recall1.n} [${e.recall1.rate.lo!.toFixed(2)}, ${e.recall1.rate.hi!.toFixed(2)}]  recall@5 ${e.recall5.hits}/${e.recall5.n}  (chance @1 ${e.chance.toFixed(3)})${gen[k] ? `  generation ${gen[k].hits}/${gen[k].n}` : ""}\n`);
      if (!args.quiet) process.stdout.write(`bias share of the recall@1 gain: ${biasShare === null ? "n/a (no gain)" : biasShare.toFixed(2)}\n`);
    }
    fs.writeFileSync(path.join(args.out, "results.json"), JSON.stringify(results, null, 1));
    return results;
  } finally {
    model.dispose();
  }
}

/** A vector from a .npy (float32 or float64, 1-D little-endian) or .safetensors file (tensor "vector", else its only tensor). */
export function readVectorFile(file: string, d: number): Float32Array {
  if (!fs.existsSync(file)) throw new UsageError(`--vector ${file} does not exist`);
  let v: Float32Array;
  if (file.endsWith(".npy")) {
    const buf = fs.readFileSync(file);
    if (buf.subarray(0, 6).toString("latin1") !== "\x93NUMPY") throw new UsageError(`--vector ${file} is not a .npy file (bad magic)`);
    // Version 1 stores the header length as uint16 at byte 8; versions 2 and 3 as uint32.
    const v1 = buf[6] === 1;
    const start = v1 ? 10 : 12;
    const header = buf.subarray(start, start + (v1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8))).toString("latin1");
    const body = buf.subarray(start + header.length);
    if (/'fortran_order':\s*True/.test(header)) throw new UsageError(`--vector ${file}: fortran-order arrays are not supported`);
    const ab = body.buffer.slice(body.byteOffset, body.byteOffset + body.byteLength);
    if (/'descr':\s*'<f4'/.test(header)) v = new Float32Array(ab);
    else if (/'descr':\s*'<f8'/.test(header)) v = Float32Array.from(new Float64Array(ab));
    else throw new UsageError(`--vector ${file}: dtype in ${header.trim()} is not <f4 or <f8`);
  } else if (file.endsWith(".safetensors")) {
    const set = readSafetensorsHeader(file);
    const name = set.tensors.has("vector") ? "vector" : set.tensors.size === 1 ? [...set.tensors.keys()][0]! : null;
    if (name === null) throw new UsageError(`--vector ${file} holds ${set.tensors.size} tensors and none is named "vector"`);
    v = readStTensor(set, name).data;
  } else throw new UsageError(`--vector ${file}: use a .npy or .safetensors file`);
  if (v.length !== d) throw new UsageError(`--vector ${file} has ${v.length} values; the model's d_model is ${d}`);
  if (!v.every(Number.isFinite)) throw new UsageError(`--vector ${file} holds non-finite values`);
  return v;
}

export interface DescribeArgs {
  model: string;
  adapter: string;
  concept?: string;
  vector?: string;
  template?: string;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
  device?: string;
  threads?: number;
  vectorCache?: string | null;
}

export async function describeCommand(args: DescribeArgs): Promise<{ text: string; mentions: boolean | null }> {
  if (!args.adapter) throw new UsageError("describe: --adapter FILE is required (train one with selfscope selfie-train)");
  if ((args.concept === undefined) === (args.vector === undefined)) throw new UsageError("describe: pass exactly one of --concept WORD or --vector FILE");
  const model = await Model.load(args.model, { device: (args.device ?? "cpu") as "cpu", ...(args.threads ? { threads: args.threads } : {}) });
  try {
    const { adapter, meta } = loadAdapter(args.adapter, model);
    const p = renderTemplate(model, args.template ?? meta.template);
    let v: Float32Array;
    if (args.concept !== undefined) {
      const baselineWords = readData<{ words: string[] }>("protocol/baseline_words.json").words;
      const recipe = meta.vectorRecipe ? (JSON.parse(meta.vectorRecipe) as VectorRecipe) : SELFIE_RECIPE;
      v = (await conceptVectors(model, { concepts: [args.concept], baselineWords, layers: [meta.layer], recipe, ...(args.vectorCache !== undefined ? { cacheDir: args.vectorCache } : {}) })).vectors.get(meta.layer)!.get(args.concept)!;
    } else v = readVectorFile(args.vector!, model.config.dModel);
    const d = await describeVectors(model, adapter, p, [v], {
      maxTokens: args.maxTokens ?? 20, temperature: args.temperature ?? 0, seed: args.seed ?? 0, ...(args.concept ? { labels: [args.concept] } : {}),
    });
    process.stdout.write(`${d.texts[0]}\n`);
    return { text: d.texts[0]!, mentions: d.hits ? d.hits[0]! : null };
  } finally {
    model.dispose();
  }
}
