// `selfscope train`: fine-tune LoRA factors or added vectors through the engine (src/train/),
// writing OUT/adapter.safetensors (params + config in the metadata), OUT/loss.jsonl, OUT/checkpoint.bin,
// OUT/results.json and OUT/report.html (the loss curve). docs/training.md.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseLayers } from "../core/parse.js";
import type { DeviceName } from "../engine/device.js";
import { trainableWeights, type TrainParam } from "../engine/grad.js";
import { hookName, type HookName } from "../hooks/names.js";
import { loadHostModel } from "../model/load.js";
import { Model } from "../model/model.js";
import { escapeHtml, htmlPage, htmlTable } from "../report/page.js";
import { adapterPlan, readAdapter, writeAdapter } from "../train/adapter.js";
import { exportMerged } from "../model/export.js";
import { evaluateBiasArm } from "../recipes/bias-eval.js";
import { makeJudge } from "../judge/judge.js";
import { parseNumbers } from "../core/parse.js";
import { buildExamples, readTrainJsonl } from "../train/data.js";
import { batchLossAndGrad, referenceLogps, train, writeAtomic, type StepRecord, type TrainResult } from "../train/loop.js";
import { DEFAULT_HYPER, objective, type Hyper } from "../train/objectives.js";
import { initLora, loraDeltaNorm, paramKey, ParamSet, parseLinearNames, randomLora } from "../train/params.js";

export interface TrainArgs {
  model: string;
  data?: string;
  out: string;
  objective?: string;
  loraRank?: number;
  loraAlpha?: number;
  loraTargets?: string;
  layers?: string;
  /** Train an added vector at this hook (e.g. blocks.3.hook_resid_post) instead of LoRA. */
  vectorAt?: string;
  full?: boolean;
  lr?: number;
  warmup?: number;
  clip?: number;
  weightDecay?: number;
  steps?: number;
  epochs?: number;
  batch?: number;
  beta?: number;
  margin?: number;
  kl?: number;
  seed?: number;
  checkpointEvery?: number;
  resume?: boolean;
  evalEvery?: number;
  evalData?: string;
  /** --eval-every with a vector adapter: the §7.4 injection evaluation on these concepts (comma-separated). */
  evalConcepts?: string;
  evalLayers?: string;
  evalStrengths?: string;
  evalTrials?: number;
  maxTokens?: number;
  judge?: string[];
  /** random_lora: match each module's update norm to this trained adapter's. */
  matchAdapter?: string;
  randomNorm?: number;
  device?: string;
  threads?: number;
  vectorCache?: string | null;
  quiet?: boolean;
}

export interface TrainHooks {
  onStep?: (r: StepRecord) => void;
}

/** Run a training job end to end (the CLI's body; tests call it with hooks). */
export async function trainCommand(a: TrainArgs, hooks: TrainHooks = {}): Promise<TrainResult> {
  if (!a.data) throw new UsageError("--data is required (a JSONL file: docs/training.md)");
  if (a.full && a.vectorAt) throw new UsageError("--full and --vector-at: choose one (full-parameter training, or a vector adapter)");
  const obj = objective(a.objective ?? "sft");
  const seed = a.seed ?? 0;
  const model = await Model.load(a.model, { device: (a.device ?? "cpu") as DeviceName, ...(a.threads !== undefined ? { threads: a.threads } : {}) });
  try {
    const raw = readTrainJsonl(a.data);
    const examples = await buildExamples(model, raw, obj, { seed, ...(a.vectorCache !== undefined ? { vectorCache: a.vectorCache } : {}) });
    const c = model.config;
    const layers = a.layers ? parseLayers(a.layers, c.nLayers, "--layers", { sorted: true }) : undefined;
    const lora = { rank: a.loraRank ?? 8, alpha: a.loraAlpha ?? 16, targets: parseLinearNames(a.loraTargets ?? "attn.q,attn.v"), seed, ...(layers ? { layers } : {}) };
    let params: TrainParam[];
    if (a.vectorAt) {
      if (!/^blocks\.\d+\./.test(a.vectorAt)) throw new UsageError(`--vector-at ${a.vectorAt}: give a block hook like ${hookName(0, "hook_resid_post")}`);
      const D = c.dModel;
      params = [{ kind: "vector", at: a.vectorAt as HookName, value: new Float32Array(D) }];
    } else if (a.full) {
      // Full-parameter training: one zero-initialised additive delta per trainable weight (W + delta in the
      // pass); the lazy host load reads shapes only. Adam state is 2 more copies: small models only.
      params = trainableWeights(loadHostModel(a.model, undefined, { lazy: true })).map((w) => ({ kind: "delta", name: w.name, value: new Float32Array(w.shape.reduce((x, y) => x * y, 1)) }));
    } else params = initLora(c, lora);
    const hyper: Hyper = { beta: a.beta ?? DEFAULT_HYPER.beta, margin: a.margin ?? DEFAULT_HYPER.margin, kl: a.kl ?? DEFAULT_HYPER.kl };
    const batch = a.batch ?? 4;
    const steps = a.steps ?? (a.epochs ?? 1) * Math.ceil(examples.length / batch);
    const config = { objective: obj, hyper, lr: a.lr ?? 1e-3, warmup: a.warmup ?? 0, steps, batch, seed, ...(a.clip ? { clip: a.clip } : {}), ...(a.weightDecay ? { weightDecay: a.weightDecay } : {}) };
    const dataHash = createHash("sha256").update(fs.readFileSync(a.data)).digest("hex");
    const meta = { data: dataHash, params: a.vectorAt ? { vectorAt: a.vectorAt } : a.full ? { full: true } : { lora } };
    const describe = { ...config, objective: obj.name, data: path.basename(a.data), dataSha256: dataHash, model: path.basename(a.model), params: meta.params };
    fs.mkdirSync(a.out, { recursive: true });
    const adapterFile = path.join(a.out, "adapter.safetensors");
    const log = a.quiet ? () => {} : (s: string) => void process.stderr.write(s + "\n");

    let result: TrainResult;
    if (obj.loss === "none") {
      // random_lora: no training; a random adapter whose per-module update norms match a trained one.
      if (a.vectorAt || a.full) throw new UsageError(`random_lora randomizes LoRA factors; drop ${a.vectorAt ? "--vector-at" : "--full"}`);
      let norms: number[];
      if (a.matchAdapter) {
        const trained = new Map(readAdapter(a.matchAdapter).params.map((p, i) => [paramKey(p, i), p]));
        norms = params.map((p, i) => {
          const q = trained.get(paramKey(p, i));
          if (!q || q.kind !== "lora") throw new UsageError(`--match-adapter ${a.matchAdapter}: no LoRA module ${paramKey(p, i)} (train it with the same --lora-targets/--layers)`);
          return loraDeltaNorm(q);
        });
      } else if (a.randomNorm !== undefined) norms = params.map(() => a.randomNorm!);
      else throw new UsageError("random_lora needs --match-adapter FILE (a trained adapter whose update norms to match) or --random-norm X");
      params = randomLora(params, norms, seed);
      result = { params, step: 0, resumedFrom: null, curve: [] };
    } else {
      const evalEx = a.evalData ? await buildExamples(model, readTrainJsonl(a.evalData), obj, { seed, ...(a.vectorCache !== undefined ? { vectorCache: a.vectorCache } : {}) }) : null;
      if (a.evalEvery && !evalEx && !a.evalConcepts) throw new UsageError("--eval-every needs --eval-data FILE (held-out loss) and/or --eval-concepts a,b,... (the injection evaluation, vector adapters)");
      const protocolEval = a.evalConcepts
        ? {
            concepts: a.evalConcepts.split(",").map((x) => x.trim()).filter((x) => x !== ""),
            layers: a.evalLayers ? parseLayers(a.evalLayers, c.nLayers, "--eval-layers", { sorted: true }) : [Math.floor(c.nLayers / 2)],
            strengths: a.evalStrengths ? parseNumbers(a.evalStrengths, "--eval-strengths") : [4],
            trials: a.evalTrials ?? 2,
            maxTokens: a.maxTokens ?? 40,
            judge: makeJudge(a.judge?.[0] ?? "rule", { cacheDir: path.join(a.out, "eval-judge-cache") }),
          }
        : null;
      const evalRefs = evalEx && obj.reference ? await referenceLogps(model, params.map((p) => ({ ...p })), evalEx) : [];
      const evalFile = path.join(a.out, "eval.jsonl");
      result = await train({
        model,
        params,
        examples,
        config,
        modelHash: model.weightsHash(),
        meta,
        out: a.out,
        checkpointEvery: a.checkpointEvery ?? 50,
        resume: a.resume ?? false,
        ...(a.evalEvery ? { evalEvery: a.evalEvery } : {}),
        ...(evalEx || protocolEval
          ? {
              onEval: async (step: number, ps: TrainParam[]) => {
                const rec: Record<string, unknown> = { step };
                if (evalEx) rec.evalLoss = (await batchLossAndGrad(model, new ParamSet(ps), obj, hyper, evalEx, evalRefs)).loss;
                if (protocolEval) {
                  // The §7.4 injection evaluation (src/recipes/bias-eval.ts) on the model as trained so far: a vector as a
                  // standing plan; LoRA factors and deltas merged into a fresh load of the weights (as --adapter does).
                  const weightParams = ps.filter((p) => p.kind === "lora" || p.kind === "delta");
                  const evalModel = weightParams.length > 0
                    ? await Model.load(a.model, { device: (a.device ?? "cpu") as DeviceName, ...(a.threads !== undefined ? { threads: a.threads } : {}), merge: { params: weightParams, id: `${dataHash}:step${step}` } })
                    : null;
                  let m: Awaited<ReturnType<typeof evaluateBiasArm>>;
                  try {
                    const planParams = ps.filter((p) => p.kind === "vector" || p.kind === "scale");
                    const evalOn = evalModel ?? model;
                    m = await evaluateBiasArm(planParams.length > 0 ? evalOn.withPlan(adapterPlan(planParams)) : evalOn, { ...protocolEval, vectorCache: null });
                  } finally {
                    evalModel?.dispose();
                  }
                  rec.injection = { tpr: m.tpr.estimate, fpr: m.fpr.estimate, introspection: m.introspection_rate.estimate, forcedIdentification: m.forced_identification_rate.estimate, n: m.tpr.n };
                }
                fs.appendFileSync(evalFile, JSON.stringify(rec) + "\n");
                log(`eval step ${step}: ${JSON.stringify(rec)}`);
              },
            }
          : {}),
        onStep: (r) => {
          if (r.step % 10 === 0 || r.step === steps) log(`step ${r.step}/${steps} loss ${r.loss.toFixed(4)} |g| ${r.gradNorm.toExponential(2)} lr ${r.lr.toExponential(2)}`);
          hooks.onStep?.(r);
        },
      });
    }
    writeAdapter(adapterFile, result.params, describe);
    const results = { ...describe, stepsRun: result.step, resumedFrom: result.resumedFrom, finalLoss: result.curve.at(-1)?.loss ?? null, adapter: "adapter.safetensors" };
    writeAtomic(path.join(a.out, "results.json"), JSON.stringify(results, null, 2) + "\n");
    writeAtomic(path.join(a.out, "report.html"), trainReport(results, result.curve));
    return result;
  } finally {
    model.dispose();
  }
}

/** The loss curve as an inline SVG polyline (log-free, min–max scaled). */
export function lossCurveSvg(curve: StepRecord[], w = 640, h = 240): string {
  if (curve.length === 0) return "<p class=\"muted\">no training steps</p>";
  const xs = curve.map((r) => r.step);
  const ys = curve.map((r) => r.loss);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const px = (x: number) => 40 + ((x - x0) / Math.max(1e-12, x1 - x0)) * (w - 50);
  const py = (y: number) => h - 30 - ((y - y0) / Math.max(1e-12, y1 - y0)) * (h - 45);
  const pts = curve.map((r) => `${px(r.step).toFixed(1)},${py(r.loss).toFixed(1)}`).join(" ");
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" role="img" aria-label="training loss by step">
<line x1="40" y1="${h - 30}" x2="${w - 10}" y2="${h - 30}" stroke="#888"/><line x1="40" y1="15" x2="40" y2="${h - 30}" stroke="#888"/>
<text x="${w / 2}" y="${h - 8}" font-size="12" text-anchor="middle">step (${x0}–${x1})</text>
<text x="4" y="20" font-size="11">${y1.toPrecision(3)}</text><text x="4" y="${h - 32}" font-size="11">${y0.toPrecision(3)}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="${pts}"/></svg>`;
}

function trainReport(results: Record<string, unknown>, curve: StepRecord[]): string {
  const rows = Object.entries(results).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)] as [string, string]);
  return htmlPage("selfscope train", `${String(results.objective)} on ${String(results.model)}`, [
    { title: "Loss", html: lossCurveSvg(curve) },
    { title: "Run", html: htmlTable(["setting", "value"], rows) },
    { title: "Files", html: `<p>${escapeHtml("adapter.safetensors (params; config in its metadata), loss.jsonl (step, loss, grad norm, lr), checkpoint.bin (resume with --resume)")}</p>` },
  ]);
}

/** `selfscope merge`: an adapter's LoRA factors and deltas folded into the weights (src/model/export.ts). */
export async function mergeCommand(a: { model?: string; adapter?: string; out?: string; format?: string; force?: boolean }): Promise<{ files: string[] }> {
  if (!a.model || !a.adapter || !a.out) throw new UsageError("usage: selfscope merge --model PATH --adapter FILE --out OUT [--format safetensors|gguf] [--force]");
  const format = a.format ?? (a.out.endsWith(".gguf") ? "gguf" : "safetensors");
  if (format !== "safetensors" && format !== "gguf") throw new UsageError(`--format ${format}: use safetensors or gguf`);
  if (!fs.existsSync(a.adapter)) throw new UsageError(`--adapter ${a.adapter}: no such file (selfscope train writes OUT/adapter.safetensors)`);
  const { params } = readAdapter(a.adapter);
  const plan = params.filter((p) => p.kind === "vector" || p.kind === "scale");
  if (plan.length > 0) throw new UsageError(`--adapter ${a.adapter}: its ${plan.map((p) => p.kind).join(", ")} params act on activations, not weights, so they cannot be merged; run them with --adapter at inference`);
  const r = exportMerged(a.model, params, a.out, { format, ...(a.force ? { force: true } : {}) });
  process.stdout.write(`wrote ${a.out}${format === "safetensors" ? ` (${r.files.join(", ")})` : ""}\n`);
  return r;
}
