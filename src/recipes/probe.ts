// `selfscope probe` (issue 17.1): linear probes of a JSONL dataset's targets on the activations of
// one or more models, every layer, with permutation tests; the layer's attention-head and MLP
// contributions projected on the probe direction; cross-model activation patching followed by
// generation; steering along the probe direction at a strength relative to the residual norm.
//
// The data: one JSON object per line, `prompt` (raw text, BOS added as the tokenizer does; with
// --chat it becomes a user message) or `messages` (rendered with the model's chat template), and
// either `target` (a number, or an array of numbers for a multi-output ridge probe) or `label`
// (string, number or boolean: a logistic probe, one-vs-rest past two classes).
//
// Resumable: activations and fits are steps of DIR/steps.jsonl (log/steps.ts), keyed by what they
// depend on; a killed run continues with `--out DIR` and the same flags, and different flags on the
// same folder are refused.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseLayers, parseNumbers } from "../core/parse.js";
import { hookName, type BlockSite, type HookName } from "../hooks/names.js";
import type { Plan } from "../hooks/plan.js";
import { Model, type Prompt } from "../model/model.js";
import type { ChatMessage } from "../io/chat-template.js";
import { pearson } from "../math/linalg.js";
import { gramMatrix, logisticFull, logisticProbe, primalDirection, ridgeFull, ridgeProbe, type LogisticResult, type RidgeResult } from "../math/probe-fit.js";
import { StepLog } from "../log/steps.js";
import { fileSha256 } from "../io/file-hash.js";
import { readJsonlObjects } from "../io/jsonl.js";
import { escapeHtml, htmlPage, htmlTable, plotOrNote } from "../report/page.js";
import { linesSpec } from "../report/plots.js";

// ---- data ------------------------------------------------------------------------------------------------

export interface ProbeExample {
  prompt: string | ChatMessage[];
  /** Continuous targets (ridge), or undefined. */
  target?: number[];
  /** Class label as written (logistic), or undefined. */
  label?: string;
}

export interface ProbeData {
  examples: ProbeExample[];
  kind: "ridge" | "logistic";
  /** Ridge: the target names; logistic: the classes in label order (index = class id). */
  names: string[];
  /** Logistic: each example's class id. */
  classIds: number[];
}

export function readProbeData(file: string, targetNames?: string[]): ProbeData {
  const examples: ProbeExample[] = [];
  readJsonlObjects(file, "--data", '{"prompt" or "messages", "target" or "label"}').forEach(({ where, value: o }) => {
    const ex: ProbeExample = { prompt: "" };
    if (typeof o.prompt === "string") ex.prompt = o.prompt;
    else if (Array.isArray(o.messages) && o.messages.every((m) => m && typeof (m as ChatMessage).role === "string" && typeof (m as ChatMessage).content === "string")) ex.prompt = o.messages as ChatMessage[];
    else throw new UsageError(`${where}: needs "prompt" (a string) or "messages" (an array of {role, content})`);
    if (o.target !== undefined) {
      const t = Array.isArray(o.target) ? o.target : [o.target];
      if (!t.length || t.some((v) => typeof v !== "number" || !Number.isFinite(v))) throw new UsageError(`${where}: "target" must be a finite number or an array of them`);
      ex.target = t as number[];
    }
    if (o.label !== undefined) {
      if (!["string", "number", "boolean"].includes(typeof o.label)) throw new UsageError(`${where}: "label" must be a string, number or boolean`);
      ex.label = String(o.label);
    }
    if ((ex.target === undefined) === (ex.label === undefined)) throw new UsageError(`${where}: give exactly one of "target" (numbers: ridge) and "label" (classes: logistic)`);
    examples.push(ex);
  });
  if (examples.length < 10) throw new UsageError(`--data ${file}: ${examples.length} examples; a cross-validated probe needs at least 10`);
  const ridge = examples[0]!.target !== undefined;
  examples.forEach((e, i) => {
    if ((e.target !== undefined) !== ridge) throw new UsageError(`--data ${file}: example ${i + 1} has ${ridge ? '"label"' : '"target"'} but the first has ${ridge ? '"target"' : '"label"'}; one file is one kind of probe`);
    if (ridge && e.target!.length !== examples[0]!.target!.length) throw new UsageError(`--data ${file}: example ${i + 1} has ${e.target!.length} targets, the first ${examples[0]!.target!.length}`);
  });
  if (ridge) {
    const k = examples[0]!.target!.length;
    const names = targetNames ?? (k === 1 ? ["target"] : Array.from({ length: k }, (_, j) => `target${j}`));
    if (names.length !== k) throw new UsageError(`--target-names: ${names.length} names for ${k} targets`);
    return { examples, kind: "ridge", names, classIds: [] };
  }
  const names = [...new Set(examples.map((e) => e.label!))].sort();
  if (names.length < 2) throw new UsageError(`--data ${file}: every label is "${names[0]}"; a probe needs two classes or more`);
  return { examples, kind: "logistic", names, classIds: examples.map((e) => names.indexOf(e.label!)) };
}

// ---- arguments ---------------------------------------------------------------------------------------------

export interface ProbeArgs {
  /** Models, each PATH or NAME=PATH (the CLI's repeated --model). */
  model: string | string[];
  data: string;
  out: string;
  site?: string;
  layers?: string;
  /** "last" (default), "mean" (every position after a leading BOS), or an index (negative: from the end). */
  position?: string;
  chat?: boolean;
  targetNames?: string;
  folds?: number;
  innerFolds?: number;
  alphas?: string;
  cs?: string;
  permutations?: number;
  seed?: number;
  batchSize?: number;
  noDecompose?: boolean;
  decomposeLayer?: number;
  patchFrom?: string;
  patchInto?: string;
  patchLayers?: string;
  patchPrompts?: number;
  steerAlphas?: string;
  steerLayer?: number;
  steerModel?: string;
  steerPrompts?: number;
  maxTokens?: number;
  device?: string;
  threads?: number;
  quiet?: boolean;
}

interface ModelSpec {
  name: string;
  path: string;
}

function parseModels(spec: string | string[]): ModelSpec[] {
  const out = (Array.isArray(spec) ? spec : [spec]).map((s) => s.trim()).filter(Boolean).map((s, i) => {
    const eq = s.indexOf("=");
    return eq > 0 ? { name: s.slice(0, eq), path: s.slice(eq + 1) } : { name: i === 0 ? path.basename(s) : `${path.basename(s)}#${i}`, path: s };
  });
  if (!out.length) throw new UsageError("--model: give at least one model (PATH or NAME=PATH; repeat --model for several)");
  if (new Set(out.map((m) => m.name)).size !== out.length) throw new UsageError(`--model: two models share the name ${out.map((m) => m.name).join(", ")}; name them NAME=PATH`);
  return out;
}

const DEFAULT_ALPHAS = [1e-2, 1e-1, 1, 10, 100, 1e3, 1e4, 1e5];
const DEFAULT_CS = [1e-3, 1e-2, 1e-1, 1, 10, 100];
const PROBE_SITES = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"] as const;

// ---- results -----------------------------------------------------------------------------------------------

export interface LayerFit {
  layer: number;
  ridge?: RidgeResult;
  logistic?: LogisticResult;
  /** The score the curves plot: mean R² (ridge) or accuracy (logistic). */
  score: number;
  p: number | null;
}

export interface Component {
  name: string;
  layer: number | null;
  /** Per direction (target or class): mean projection on the unit probe direction, and its Pearson r with the target. */
  mean: number[];
  r: (number | null)[];
}

export interface Decomposition {
  model: string;
  layer: number;
  /** Per direction: the probe's name (target or class). */
  directions: string[];
  components: Component[];
  /** Largest |Σ components − activation| projection over rows and directions, relative to the activation's mean |projection|. */
  sumCheck: number;
  note?: string;
}

export interface PatchResult {
  from: string;
  into: string;
  prompts: {
    prompt: string;
    own: string;
    source: string;
    patched: Record<string, string>;
    agreeSource: Record<string, number>;
    agreeOwn: Record<string, number>;
    /** The generated ids: the target's own, the source's own, and per layer the patched target's. */
    ids: { own: number[]; source: number[]; patched: Record<string, number[]> };
  }[];
}

export interface SteerResult {
  model: string;
  layer: number;
  direction: string;
  /** Mean ‖activation‖ at the layer over the data (the unit of the strengths). */
  residNorm: number;
  alphas: number[];
  prompts: { prompt: string; texts: string[] }[];
}

export interface ProbeResults {
  kind: "ridge" | "logistic";
  names: string[];
  n: number;
  site: string;
  position: string;
  layers: number[];
  models: { name: string; path: string; fits: LayerFit[]; best: number }[];
  /** Second model minus first, per layer (when both ran the same layers). */
  difference?: { layer: number; delta: number }[];
  decompositions: Decomposition[];
  patch?: PatchResult;
  steer?: SteerResult;
  resumedSteps: number;
}

// ---- the command ------------------------------------------------------------------------------------------

export async function probeCommand(a: ProbeArgs): Promise<ProbeResults> {
  const say = (m: string) => void (a.quiet || process.stderr.write(`probe: ${m}\n`));
  const models = parseModels(a.model);
  const data = readProbeData(a.data, a.targetNames ? a.targetNames.split(",").map((s) => s.trim()) : undefined);
  const n = data.examples.length;
  const site = a.site ?? "hook_resid_post";
  if (!(PROBE_SITES as readonly string[]).includes(site)) throw new UsageError(`--site ${site}: probes read a residual-width site: ${PROBE_SITES.join(", ")}`);
  const position = a.position ?? "last";
  if (position !== "last" && position !== "mean" && !/^-?\d+$/.test(position)) throw new UsageError(`--position ${position}: use last, mean, or a token index (negative counts from the end)`);
  const alphas = a.alphas ? parseNumbers(a.alphas, "--alphas") : DEFAULT_ALPHAS;
  const cs = a.cs ? parseNumbers(a.cs, "--cs") : DEFAULT_CS;
  const folds = a.folds ?? 5, inner = a.innerFolds ?? 3, permutations = a.permutations ?? 100, seed = a.seed ?? 0;
  if (folds < 2 || folds > n) throw new UsageError(`--folds ${folds}: need 2..${n}`);
  const batch = a.batchSize ?? 8;
  const maxTokens = a.maxTokens ?? 24;
  const load = (p: string) => Model.load(p, { device: (a.device ?? "cpu") as "cpu", ...(a.threads ? { threads: a.threads } : {}) });

  // Everything results depend on enters the fingerprint: a resumed run with other inputs is refused.
  // The first model stays loaded for its activations, read first (one load fewer).
  const identities: { name: string; path: string; identity: unknown; nLayers: number; dModel: number }[] = [];
  let kept: Model | undefined;
  for (let i = models.length - 1; i >= 0; i--) {
    const model = await load(models[i]!.path);
    identities[i] = { name: models[i]!.name, path: models[i]!.path, identity: model.identity(), nLayers: model.config.nLayers, dModel: model.config.dModel };
    if (i === 0) kept = model;
    else model.dispose();
  }
  try {
    const layers = parseLayers(a.layers ?? "all", Math.min(...identities.map((x) => x.nLayers)), "--layers", { sorted: true });
    const log = StepLog.open(a.out, "probe", {
      data: fileSha256(a.data),
      models: identities.map(({ name, identity }) => ({ name, identity })),
      site, position, layers, chat: !!a.chat, folds, inner, alphas, cs, permutations, seed, names: data.names,
      patch: a.patchLayers ? { from: a.patchFrom, into: a.patchInto, layers: a.patchLayers, prompts: a.patchPrompts ?? 4, maxTokens } : null,
      steer: a.steerAlphas ? { alphas: a.steerAlphas, layer: a.steerLayer ?? null, model: a.steerModel ?? null, prompts: a.steerPrompts ?? 3, maxTokens } : null,
      decompose: a.noDecompose ? null : (a.decomposeLayer ?? "best"),
    });
    if (log.resumed) say(`resuming ${a.out}: ${log.resumed} steps already done`);

    const promptOf = (e: ProbeExample): Prompt => (typeof e.prompt === "string" ? (a.chat ? { messages: [{ role: "user", content: e.prompt }] } : e.prompt) : { messages: e.prompt });
    const Y = data.kind === "ridge" ? data.names.map((_, k) => data.examples.map((e) => e.target![k]!)) : [];

    const out: ProbeResults = { kind: data.kind, names: data.names, n, site, position, layers, models: [], decompositions: [], resumedSteps: log.resumed };
    const acts = new Map<string, Float32Array>();
    for (const [mi, m] of models.entries()) {
      const d = identities[mi]!.dModel;
      const preloaded = mi === 0 ? kept : undefined;
      kept = undefined; // activations() disposes it
      const x = await activations(log, mi, m, load, data.examples.map(promptOf), layers, site as BlockSite, position, batch, d, say, preloaded);
      acts.set(m.name, x);
      const L = layers.length;
      const fits: LayerFit[] = [];
      for (const [li, layer] of layers.entries()) {
        const fit = await log.step<LayerFit>(`fit:${mi}:${layer}`, () => {
          const G = gramMatrix(x, n, d, L * d, li * d);
          if (data.kind === "ridge") {
            const ridge = ridgeProbe(G, n, Y, { alphas, outer: folds, inner, seed, permutations });
            return { layer, ridge, score: ridge.meanR2, p: ridge.permutation?.p ?? null };
          }
          const logistic = logisticProbe(G, n, data.classIds, { Cs: cs, outer: folds, inner, seed, permutations });
          return { layer, logistic, score: logistic.accuracy, p: logistic.permutation?.p ?? null };
        });
        fits.push(fit);
        say(`${m.name} layer ${layer}: ${data.kind === "ridge" ? "R²" : "accuracy"} ${fit.score.toFixed(3)}${fit.p !== null ? `, permutation p ${fit.p.toPrecision(2)}` : ""}`);
      }
      const best = fits.reduce((b, f) => (f.score > b.score ? f : b), fits[0]!).layer;
      out.models.push({ name: m.name, path: m.path, fits, best });
    }
    if (out.models.length >= 2) {
      const [m0, m1] = out.models;
      out.difference = layers.map((l, i) => ({ layer: l, delta: m1!.fits[i]!.score - m0!.fits[i]!.score }));
    }

    // The probe direction(s) at a layer, in activation space, from a fit on every row.
    const directions = (name: string, li: number, d: number) => {
      const x = acts.get(name)!;
      const G = gramMatrix(x, n, d, layers.length * d, li * d);
      const duals = data.kind === "ridge" ? ridgeFull(G, n, Y, alphas, inner).dual : logisticFull(G, n, data.classIds, cs, inner, seed).dual;
      const dirNames = data.kind === "ridge" ? data.names : data.names.length === 2 ? [data.names[1]!] : data.names;
      return duals.map((a2, k) => ({ name: dirNames[k]!, w: primalDirection(x, n, d, a2, layers.length * d, li * d).w }));
    };
    /** The values each direction's projections are correlated with: the target, or the class indicator. */
    const targetsFor = (k: number): number[] => (data.kind === "ridge" ? Y[k]! : data.classIds.map((c) => (c === (data.names.length === 2 ? 1 : k) ? 1 : 0)));

    if (!a.noDecompose) {
      for (const [mi, m] of models.entries()) {
        const layer = a.decomposeLayer ?? out.models[mi]!.best;
        const li = layers.indexOf(layer);
        if (li < 0) throw new UsageError(`--decompose-layer ${layer}: not among the probed layers (${layers.join(",")})`);
        const dec = await log.step<Decomposition>(`decompose:${mi}:${layer}`, async () => {
          const model = await load(m.path);
          try {
            return await decompose(model, m.name, layer, site as BlockSite, position, data.examples.map(promptOf), batch, directions(m.name, li, identities[mi]!.dModel), targetsFor);
          } finally {
            model.dispose();
          }
        });
        out.decompositions.push(dec);
        say(`${m.name}: decomposition at layer ${layer} (sum check ${dec.sumCheck.toExponential(1)})`);
      }
    }

    if (a.patchLayers) {
      const from = models.find((m) => m.name === a.patchFrom) ?? (a.patchFrom === undefined ? models[models.length - 1] : undefined);
      const into = models.find((m) => m.name === a.patchInto) ?? (a.patchInto === undefined ? models[0] : undefined);
      if (!from || !into) throw new UsageError(`--patch-from/--patch-into: name models given to --model (${models.map((m) => m.name).join(", ")})`);
      const fi = models.indexOf(from), ii = models.indexOf(into);
      const idF = identities[fi]!.identity as { tokenizer: string | null }, idI = identities[ii]!.identity as { tokenizer: string | null };
      if (idF.tokenizer === null || idF.tokenizer !== idI.tokenizer) throw new UsageError(`--patch-from ${from.name} --patch-into ${into.name}: the two models' tokenizers differ (or one has none); cross-model patching needs the same tokenizer`);
      if (identities[fi]!.dModel !== identities[ii]!.dModel) throw new UsageError(`--patch-from ${from.name} --patch-into ${into.name}: d_model ${identities[fi]!.dModel} vs ${identities[ii]!.dModel}`);
      const pLayers = parseLayers(a.patchLayers, Math.min(identities[fi]!.nLayers, identities[ii]!.nLayers), "--patch-layers", { sorted: true });
      const prompts = data.examples.slice(0, a.patchPrompts ?? 4).map(promptOf);
      out.patch = await log.step<PatchResult>("patch", async () => {
        const src = await load(from.path);
        const dst = from === into ? src : await load(into.path);
        try {
          return await crossPatch(src, dst, from.name, into.name, pLayers, prompts, maxTokens);
        } finally {
          src.dispose();
          if (dst !== src) dst.dispose();
        }
      });
      say(`patched ${from.name} → ${into.name} at layers ${pLayers.join(",")}`);
    }

    if (a.steerAlphas) {
      const sm = models.find((m) => m.name === a.steerModel) ?? (a.steerModel === undefined ? models[0] : undefined);
      if (!sm) throw new UsageError(`--steer-model ${a.steerModel}: not among the models (${models.map((m) => m.name).join(", ")})`);
      const mi = models.indexOf(sm);
      const layer = a.steerLayer ?? out.models[mi]!.best;
      const li = layers.indexOf(layer);
      if (li < 0) throw new UsageError(`--steer-layer ${layer}: not among the probed layers (${layers.join(",")})`);
      const steerAlphas = parseNumbers(a.steerAlphas, "--steer-alphas");
      out.steer = await log.step<SteerResult>(`steer:${layer}`, async () => {
        const d = identities[mi]!.dModel;
        const dir = directions(sm.name, li, d)[0]!;
        const x = acts.get(sm.name)!;
        let residNorm = 0;
        for (let i = 0; i < n; i++) {
          let s = 0;
          for (let k = 0; k < d; k++) s += x[i * layers.length * d + li * d + k]! ** 2;
          residNorm += Math.sqrt(s) / n;
        }
        const wn = Math.hypot(...dir.w);
        const unit = Float32Array.from(dir.w, (v) => v / wn);
        const model = await load(sm.path);
        try {
          const prompts = data.examples.slice(0, a.steerPrompts ?? 3);
          const at = hookName(layer, site as BlockSite);
          const res: SteerResult = { model: sm.name, layer, direction: dir.name, residNorm, alphas: steerAlphas, prompts: prompts.map((e) => ({ prompt: promptText(e), texts: [] })) };
          for (const alpha of steerAlphas) {
            const g = await model.generate(prompts.map(promptOf), { maxTokens, plan: alpha === 0 ? [] : [{ op: "add", at, vector: unit, scale: alpha * residNorm }] });
            g.texts.forEach((t, i) => res.prompts[i]!.texts.push(t));
          }
          return res;
        } finally {
          model.dispose();
        }
      });
      say(`steered ${sm.name} at layer ${layer} along "${out.steer.direction}" (α × ${out.steer.residNorm.toFixed(2)})`);
    }
    log.close();

    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(out, (_, v: unknown) => (typeof v === "number" && !Number.isFinite(v) ? null : v), 1));
    fs.writeFileSync(path.join(a.out, "report.html"), await probeReport(out));
    return out;
  } finally {
    kept?.dispose();
  }
}

const promptText = (e: ProbeExample) => (typeof e.prompt === "string" ? e.prompt : e.prompt.map((m) => `${m.role}: ${m.content}`).join(" | "));

/** Rows of [n × layers × d] activations for one model, read in batches that are steps of the log; disposes the model it loads (or is given). */
async function activations(log: StepLog, mi: number, m: ModelSpec, load: (p: string) => Promise<Model>, prompts: Prompt[], layers: number[], site: BlockSite, position: string, batch: number, d: number, say: (s: string) => void, preloaded?: Model): Promise<Float32Array> {
  const n = prompts.length, L = layers.length;
  const x = new Float32Array(n * L * d);
  let model: Model | undefined = preloaded;
  try {
    for (let b = 0; b * batch < n; b++) {
      const from = b * batch, to = Math.min(n, from + batch);
      const key = `acts:${mi}:${b}`;
      if (!log.has(key)) {
        model ??= await load(m.path);
        const plan: Plan = layers.map((l) => ({ op: "read" as const, at: hookName(l, site) }));
        const { cache, rows } = await model.forward(prompts.slice(from, to), { plan, logits: "none" });
        const chunk = new Float32Array((to - from) * L * d);
        for (let r = 0; r < to - from; r++)
          layers.forEach((l, li) => {
            const { data, shape } = cache.get(hookName(l, site), r);
            chunk.set(pick(data, shape[0]!, d, position, startsWithBos(model!, rows[r]!.ids)), (r * L + li) * d);
          });
        log.put(key, { file: log.writeBinary(`acts/model${mi}-batch${b}.f32`, chunk), rows: to - from });
        say(`${m.name}: activations ${to}/${n}`);
      }
      x.set(log.readF32(`acts/model${mi}-batch${b}.f32`, (to - from) * L * d), from * L * d);
    }
  } finally {
    model?.dispose();
  }
  return x;
}

const startsWithBos = (m: Model, ids: readonly number[]) => m.config.bosTokenId !== undefined && ids[0] === m.config.bosTokenId;

/** The activation at `position` of one row [positions × d]: last, an index, or the mean (after a leading BOS). */
function pick(data: Float32Array, positions: number, d: number, position: string, hasBos: boolean): Float32Array {
  if (position === "mean") {
    const from = hasBos && positions > 1 ? 1 : 0;
    const v = new Float32Array(d);
    const acc = new Float64Array(d);
    for (let p = from; p < positions; p++) for (let k = 0; k < d; k++) acc[k]! += data[p * d + k]!;
    for (let k = 0; k < d; k++) v[k] = acc[k]! / (positions - from);
    return v;
  }
  const i = position === "last" ? positions - 1 : Number(position) < 0 ? positions + Number(position) : Number(position);
  if (i < 0 || i >= positions) throw new UsageError(`--position ${position}: a prompt has ${positions} tokens`);
  return data.slice(i * d, (i + 1) * d);
}

/**
 * The activation at `layer` (hook_resid_post, or _pre/_mid) as the sum of what wrote it: the
 * embeddings, each attention head (attn.hook_result; the o-bias and anything else as "attn.rest"),
 * or each attention block where a norm follows attention, and each MLP. Each part is projected on
 * the unit probe directions and correlated with the targets over the rows.
 */
async function decompose(
  model: Model,
  name: string,
  layer: number,
  site: BlockSite,
  position: string,
  prompts: Prompt[],
  batch: number,
  dirs: { name: string; w: Float64Array }[],
  targetsFor: (k: number) => number[],
): Promise<Decomposition> {
  const c = model.config;
  const d = c.dModel;
  if (site !== "hook_resid_post" && site !== "hook_resid_pre" && site !== "hook_resid_mid") {
    return { model: name, layer, directions: dirs.map((x) => x.name), components: [], sumCheck: 0, note: `no decomposition at ${site}: only the residual stream is a sum of components` };
  }
  const heads = c.blockNorm === "pre";
  // The last block whose attention / MLP wrote the activation.
  const attnLast = site === "hook_resid_pre" ? layer - 1 : layer;
  const mlpLast = site === "hook_resid_post" ? layer : layer - 1;
  const reads: HookName[] = ["hook_embed", hookName(layer, site)];
  if (c.pos.kind === "learned") reads.push("hook_pos_embed");
  for (let l = 0; l <= attnLast; l++) {
    reads.push(hookName(l, "hook_attn_out"));
    if (heads) reads.push(hookName(l, "attn.hook_result"));
    if (l <= mlpLast) reads.push(hookName(l, "hook_mlp_out"));
  }
  const units = dirs.map((x) => {
    const nn = Math.hypot(...x.w);
    return Float64Array.from(x.w, (v) => v / nn);
  });
  const proj = new Map<string, { layer: number | null; values: number[][] }>(); // component → [dir][row]
  const add = (key: string, l: number | null, v: Float32Array, row: number) => {
    let e = proj.get(key);
    if (!e) proj.set(key, (e = { layer: l, values: dirs.map(() => []) }));
    units.forEach((u, k) => {
      let s = 0;
      for (let j = 0; j < d; j++) s += u[j]! * v[j]!;
      e.values[k]![row] = s;
    });
  };
  const total: number[][] = dirs.map(() => []);
  for (let from = 0; from < prompts.length; from += batch) {
    const part = prompts.slice(from, from + batch);
    const { cache, rows } = await model.forward(part, { plan: reads.map((at) => ({ op: "read" as const, at })), logits: "none" });
    for (let r = 0; r < part.length; r++) {
      const row = from + r;
      const hasBos = startsWithBos(model, rows[r]!.ids);
      const at = (name: HookName) => {
        const { data, shape } = cache.get(name, r);
        return { data, positions: shape[0]! };
      };
      const target = at(hookName(layer, site));
      const v = pick(target.data, target.positions, d, position, hasBos);
      units.forEach((u, k) => {
        let s = 0;
        for (let j = 0; j < d; j++) s += u[j]! * v[j]!;
        total[k]![row] = s;
      });
      const e = at("hook_embed");
      add("embed", null, pick(e.data, e.positions, d, position, hasBos), row);
      if (c.pos.kind === "learned") {
        const pe = at("hook_pos_embed");
        add("pos_embed", null, pick(pe.data, pe.positions, d, position, hasBos), row);
      }
      for (let l = 0; l <= attnLast; l++) {
        const ao = at(hookName(l, "hook_attn_out"));
        const attn = pick(ao.data, ao.positions, d, position, hasBos);
        if (heads) {
          const res = at(hookName(l, "attn.hook_result"));
          const rest = Float32Array.from(attn);
          for (let h = 0; h < c.nHeads; h++) {
            // hook_result is [positions, nHeads, dModel]: view one head as [positions, dModel].
            const one = new Float32Array(res.positions * d);
            for (let p = 0; p < res.positions; p++) one.set(res.data.subarray((p * c.nHeads + h) * d, (p * c.nHeads + h + 1) * d), p * d);
            const hv = pick(one, res.positions, d, position, hasBos);
            add(`L${l}H${h}`, l, hv, row);
            for (let j = 0; j < d; j++) rest[j]! -= hv[j]!;
          }
          add(`L${l} attn.rest`, l, rest, row);
        } else add(`L${l} attn`, l, attn, row);
        if (l <= mlpLast) {
          const mo = at(hookName(l, "hook_mlp_out"));
          add(`L${l} mlp`, l, pick(mo.data, mo.positions, d, position, hasBos), row);
        }
      }
    }
  }
  // The parts must add up to the activation (checks the reads, and that nothing was left out).
  let worst = 0, scale = 0;
  total.forEach((tk, k) => {
    tk.forEach((t, row) => {
      let s = 0;
      for (const e of proj.values()) s += e.values[k]![row]!;
      worst = Math.max(worst, Math.abs(s - t));
      scale += Math.abs(t) / (tk.length * total.length);
    });
  });
  const components: Component[] = [...proj.entries()].map(([key, e]) => ({
    name: key,
    layer: e.layer,
    mean: e.values.map((vs) => vs.reduce((s, v) => s + v, 0) / vs.length),
    r: e.values.map((vs, k) => {
      const r = pearson(vs, targetsFor(k));
      return Number.isFinite(r) ? r : null;
    }),
  }));
  return {
    model: name,
    layer,
    directions: dirs.map((x) => x.name),
    components,
    sumCheck: worst / Math.max(scale, 1e-30),
    ...(heads ? {} : { note: "a norm follows attention in this family, so attention blocks are parts, not heads" }),
  };
}

/**
 * Cross-model activation patching: each prompt's residual stream (hook_resid_post) at a layer, from
 * `src`'s forward pass over the prompt, replaces `dst`'s at the prompt positions; then `dst`
 * generates greedily. Both run the `dst` model's rendering of the prompt (ids), so a chat template
 * applies once, the target's.
 */
export async function crossPatch(src: Model, dst: Model, fromName: string, intoName: string, layers: number[], prompts: Prompt[], maxTokens: number): Promise<PatchResult> {
  const res: PatchResult = { from: fromName, into: intoName, prompts: [] };
  for (const p of prompts) {
    const ids = dst.encode(p).ids;
    const own = await dst.generate([{ ids }], { maxTokens });
    const source = await src.generate([{ ids }], { maxTokens });
    const reads = await src.forward([{ ids }], { plan: layers.map((l) => ({ op: "read" as const, at: hookName(l, "hook_resid_post") })), logits: "none" });
    const entry: PatchResult["prompts"][number] = {
      prompt: dst.encode(p).text ?? ids.join(" "),
      own: own.texts[0]!,
      source: source.texts[0]!,
      patched: {},
      agreeSource: {},
      agreeOwn: {},
      ids: { own: own.tokens[0]!, source: source.tokens[0]!, patched: {} },
    };
    for (const l of layers) {
      const at = hookName(l, "hook_resid_post");
      const g = await dst.generate([{ ids }], { maxTokens, plan: [{ op: "patch", at, source: reads.cache.get(at, 0).data, pos: { from: 0, to: ids.length } }] });
      entry.patched[l] = g.texts[0]!;
      entry.ids.patched[l] = g.tokens[0]!;
      entry.agreeSource[l] = agreement(g.tokens[0]!, source.tokens[0]!);
      entry.agreeOwn[l] = agreement(g.tokens[0]!, own.tokens[0]!);
    }
    res.prompts.push(entry);
  }
  return res;
}

/** Share of positions where two generations have the same token (over the longer one). */
function agreement(a: readonly number[], b: readonly number[]): number {
  const len = Math.max(a.length, b.length);
  if (len === 0) return 1;
  let same = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] === b[i]) same++;
  return same / len;
}

// ---- report ---------------------------------------------------------------------------------------------


const fmt = (v: number | null | undefined, digits = 3) => (v === null || v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits));

export async function probeReport(r: ProbeResults): Promise<string> {
  const metric = r.kind === "ridge" ? "R²" : "accuracy";
  const curve = r.models.flatMap((m) => m.fits.map((f) => ({ layer: f.layer, [metric]: f.score, series: m.name })));
  if (r.difference) curve.push(...r.difference.map((x) => ({ layer: x.layer, [metric]: x.delta, series: `${r.models[1]!.name} − ${r.models[0]!.name}` })));
  const sections: { title: string; html: string }[] = [];
  sections.push({
    title: `${metric} by layer`,
    html:
      (await plotOrNote(curve, () => linesSpec(curve, "layer", metric, "series", `Probe ${metric} (outer-fold mean) by layer`, undefined, true), "no fits")) +
      htmlTable(
        ["model", "layer", metric, ...(r.kind === "ridge" ? r.names.map((t) => `R² ${t}`) : ["AUC", "chance"]), "permutation p", "chosen α / C"],
        r.models.flatMap((m) =>
          m.fits.map((f) => [
            m.name,
            f.layer,
            fmt(f.score),
            ...(f.ridge ? f.ridge.r2.map((v) => fmt(v)) : [fmt(f.logistic!.auc), fmt(f.logistic!.chance)]),
            f.p === null ? "–" : f.p.toPrecision(2),
            [...new Set(f.ridge ? f.ridge.foldAlpha : f.logistic!.foldC)].join(", "),
          ]),
        ),
      ),
  });
  for (const dec of r.decompositions) {
    const top = [...dec.components].sort((x, y) => Math.abs(y.r[0] ?? 0) - Math.abs(x.r[0] ?? 0)).slice(0, 20);
    sections.push({
      title: `${dec.model}: what writes the probe direction at layer ${dec.layer}`,
      html:
        `<p>Each part's projection on the unit probe direction (“${escapeHtml(dec.directions.join("”, “"))}”), averaged over the rows, and its Pearson r with the target over rows. The parts sum to the activation to within ${dec.sumCheck.toExponential(1)} (relative).${dec.note ? " " + escapeHtml(dec.note) + "." : ""}</p>` +
        htmlTable(["part", ...dec.directions.flatMap((x) => [`mean projection (${x})`, `r (${x})`])], top.map((cmp) => [cmp.name, ...cmp.mean.flatMap((mv, k) => [fmt(mv), fmt(cmp.r[k])])])),
    });
  }
  if (r.patch) {
    const ls = Object.keys(r.patch.prompts[0]?.patched ?? {});
    sections.push({
      title: `Patching ${r.patch.from} → ${r.patch.into}`,
      html:
        `<p>${escapeHtml(r.patch.from)}'s residual stream (hook_resid_post) over the prompt replaces ${escapeHtml(r.patch.into)}'s at one layer; then ${escapeHtml(r.patch.into)} generates greedily. Agreement: share of generated tokens equal to the source's own generation / the target's own.</p>` +
        htmlTable(["prompt", `${r.patch.into} (own)`, `${r.patch.from} (source)`, ...ls.map((l) => `patched at ${l}`)], r.patch.prompts.map((p) => [p.prompt, p.own, p.source, ...ls.map((l) => `${p.patched[l]} [src ${fmt(p.agreeSource[l], 2)} / own ${fmt(p.agreeOwn[l], 2)}]`)])),
    });
  }
  if (r.steer) {
    const s = r.steer;
    sections.push({
      title: `Steering ${s.model} along the probe direction at layer ${s.layer}`,
      html: `<p>Added at every position: α × ${s.residNorm.toFixed(3)} (the mean ‖activation‖ at this layer over the data) × the unit direction of “${escapeHtml(s.direction)}”.</p>` + htmlTable(["prompt", ...s.alphas.map((x) => `α = ${x}`)], s.prompts.map((p) => [p.prompt, ...p.texts])),
    });
  }
  return htmlPage("Linear probes", `${r.n} examples, ${r.kind}, ${r.site} at position ${r.position}; models: ${r.models.map((m) => m.name).join(", ")}`, sections);
}
