// The per-layer trained-bias sweep (protocol §7.3 `train-bias-sweep`): one bias vector per layer
// m, each trained alone at blocks.{m}.mlp.hook_down on the same examples, and every adapter (and the
// model without one) evaluated as §7.4 describes (src/recipes/bias-eval.ts). The report plots the
// metrics against the adapter layer.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseLayers, parseNumbers } from "../core/parse.js";
import { VERSION } from "../eval/inject.js";
import type { HookName } from "../hooks/names.js";
import { makeJudge } from "../judge/judge.js";
import { pickJudges } from "../judge/select.js";
import { lockRun } from "../log/write.js";
import { Model } from "../model/model.js";
import { escapeHtml, htmlBodyPage, rateCell, rateText, renderSvg } from "../report/page.js";
import { BIAS_EVAL, biasEvalPrefill, EVAL74_DEVIATIONS, evaluateBiasArm, type BiasArmMetrics } from "./bias-eval.js";
import {
  BIAS_PROTOCOL,
  parseBiasSite,
  PROTOCOL_DEVIATIONS,
  protocolEvalLayers,
  protocolTrainingSet,
  siteDeviations,
  trainBiasVector,
  withBias,
  type BiasSite,
  type BiasTrainingArgs,
} from "./bias-vector.js";

// ---- the sweep command -------------------------------------------------------------------------

export interface BiasSweepArgs extends BiasTrainingArgs {
  /** Adapter layers, e.g. "0-25" or "3,5" (default every layer, as the paper's 0..61). */
  layers?: string;
}

export interface BiasSweepLayer extends BiasArmMetrics {
  layer: number;
  hook: HookName;
  steps: number;
  loss_curve: number[];
  final_loss: number | null;
  vector_norm: number;
  vector_file: string;
}

export interface BiasSweepResults {
  kind: "selfscope.bias-sweep";
  version: 1;
  tool: { name: "selfscope"; version: string };
  model: { path: string; hash: string; family: string; nLayers: number; dModel: number; blockNorm: string };
  site: BiasSite;
  protocol_deviations: string[];
  split: { seed: number; rng: string; train: string[]; held_out: string[]; train_used: number; held_out_used: number };
  training: { examples: number; injection_examples: number; control_examples: number; injection_layers: number[]; strengths: number[]; steps: number; batch_size: number; lr: number; weight_decay: number; seed: number };
  evaluation: { injection_layers: number[]; strengths: number[]; trials_per_concept: number; concepts: string[]; max_tokens: number; reply_tokens: number; temperature: 0; prefill: string; judge: string; judge_approximate: boolean };
  baseline: BiasArmMetrics;
  /** One entry per adapter layer, in layer order. */
  layers: BiasSweepLayer[];
  /** The adapter layer with the highest introspection rate (ties: the lower layer); null when none was judged. */
  best_layer: number | null;
}

/**
 * `selfscope train-bias-sweep`: the protocol's training examples (built once), one bias vector per
 * adapter layer (resumable: DIR/layer-{m}/checkpoints, and a finished layer's DIR/layer-{m}/metrics.json
 * is reused), each evaluated with §7.4 next to the model without an adapter (DIR/baseline);
 * DIR/results.json (one entry per layer) and DIR/report.html (metrics vs layer).
 */
export async function biasSweepCommand(args: BiasSweepArgs): Promise<BiasSweepResults> {
  if (!args.out) throw new UsageError("train-bias-sweep: --out DIR is required");
  const unlock = lockRun(args.out);
  try {
    return await sweepLocked(args);
  } finally {
    unlock();
  }
}

async function sweepLocked(args: BiasSweepArgs): Promise<BiasSweepResults> {
  const site = parseBiasSite(args.site);
  const model = await Model.load(args.model, { device: args.device ?? "cpu" });
  const judgeSpecs = pickJudges(args.judges);
  const judge = makeJudge(judgeSpecs[0]!, { cacheDir: path.join(args.out, "judge-cache") });
  try {
    const nL = model.config.nLayers;
    const out = args.out;
    const log = (s: string) => {
      if (!args.quiet) process.stderr.write(s + "\n");
    };
    const adapterLayers = args.layers !== undefined ? parseLayers(args.layers, nL, "--layers", { sorted: true }) : Array.from({ length: nL }, (_, i) => i);
    const evalLayers = protocolEvalLayers(args.evalLayers, nL);
    const strengths = parseNumbers(args.evalStrengths ?? BIAS_PROTOCOL.evalStrengths.join(","), "--eval-strengths");
    const trials = args.evalTrials ?? BIAS_PROTOCOL.evalTrials;
    const maxTokens = args.maxTokens ?? BIAS_EVAL.maxTokens;
    const replyTokens = args.replyTokens ?? BIAS_EVAL.replyTokens;
    fs.mkdirSync(out, { recursive: true });
    const { splitSeed, split, train, heldOut, seed, injLayers, data } = await protocolTrainingSet(model, args);
    const batchSize = args.batchSize ?? BIAS_PROTOCOL.batchSize;
    const steps = args.steps ?? Math.ceil(data.length / batchSize);
    const lr = args.lr ?? BIAS_PROTOCOL.lr;
    const weightDecay = args.weightDecay ?? BIAS_PROTOCOL.weightDecay;
    const evalOpts = { concepts: heldOut, layers: evalLayers, strengths, trials, maxTokens, replyTokens, judge, batchSize: args.evalBatchSize ?? 16 };
    // A finished piece is reused only under the same settings (a changed flag recomputes it).
    const settings = JSON.stringify({ model: model.weightsHash(), site, train, heldOut, seed, steps, batchSize, lr, weightDecay, evalLayers, strengths, trials, maxTokens, replyTokens, judge: judge.name, data: data.length });
    const cached = <T>(file: string, make: () => Promise<T>): Promise<T> => {
      if (fs.existsSync(file)) {
        const prev = JSON.parse(fs.readFileSync(file, "utf8")) as { settings: string; value: T };
        if (prev.settings === settings) return Promise.resolve(prev.value);
      }
      return make().then((value) => {
        fs.writeFileSync(file, JSON.stringify({ settings, value }) + "\n");
        return value;
      });
    };
    log(`train-bias-sweep: ${adapterLayers.length} adapters at ${site} × ${steps} steps; evaluation per adapter: ${heldOut.length} concepts × ${trials} trials × ${evalLayers.length} layers × ${strengths.length} strengths (+ forced, + ${trials} controls)`);
    fs.mkdirSync(path.join(out, "baseline"), { recursive: true });
    const baseline = await cached(path.join(out, "baseline", "metrics.json"), () =>
      evaluateBiasArm(model, { ...evalOpts, ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}), transcript: path.join(out, "baseline", "trials.jsonl") }),
    );
    log(`baseline: TPR ${rateText(baseline.tpr)}, introspection ${rateText(baseline.introspection_rate)}, forced ID ${rateText(baseline.forced_identification_rate)}, FPR ${rateText(baseline.fpr)}`);
    const layers: BiasSweepLayer[] = [];
    for (const m of adapterLayers) {
      const dir = path.join(out, `layer-${m}`);
      fs.mkdirSync(dir, { recursive: true });
      const entry = await cached(path.join(dir, "metrics.json"), async (): Promise<BiasSweepLayer> => {
        const tr = await trainBiasVector(model, { layer: m, site, data, steps, lr, batchSize, seed, weightDecay, checkpointDir: path.join(dir, "checkpoints"), checkpointEvery: args.checkpointEvery ?? 50 });
        fs.writeFileSync(path.join(dir, "bias_vector.f32"), new Uint8Array(tr.vector.buffer, tr.vector.byteOffset, tr.vector.byteLength));
        // The adapter's own vectors: no cache (the wrapped model's identity is the bias, not the file).
        const metrics = await evaluateBiasArm(withBias(model, tr.hook, tr.vector), { ...evalOpts, vectorCache: null, transcript: path.join(dir, "trials.jsonl") });
        const tail = tr.losses.slice(-Math.max(1, Math.min(10, Math.ceil(tr.losses.length / 10))));
        return {
          layer: m,
          hook: tr.hook,
          steps: tr.step,
          loss_curve: tr.losses,
          final_loss: tail.length ? tail.reduce((a, b) => a + b, 0) / tail.length : null,
          vector_norm: Math.hypot(...tr.vector),
          vector_file: path.join(`layer-${m}`, "bias_vector.f32"),
          ...metrics,
        };
      });
      log(`layer ${m}: TPR ${rateText(entry.tpr)}, introspection ${rateText(entry.introspection_rate)}, forced ID ${rateText(entry.forced_identification_rate)}, FPR ${rateText(entry.fpr)}`);
      layers.push(entry);
    }
    let best: number | null = null;
    for (const e of layers) if (e.introspection_rate.estimate !== null && (best === null || e.introspection_rate.estimate > layers.find((x) => x.layer === best)!.introspection_rate.estimate!)) best = e.layer;
    const results: BiasSweepResults = {
      kind: "selfscope.bias-sweep",
      version: 1,
      tool: { name: "selfscope", version: VERSION },
      model: { path: path.resolve(args.model), hash: model.weightsHash(), family: model.family, nLayers: nL, dModel: model.config.dModel, blockNorm: model.config.blockNorm },
      site,
      protocol_deviations: [...PROTOCOL_DEVIATIONS, ...EVAL74_DEVIATIONS, ...siteDeviations(site, model.config.blockNorm)],
      split: { seed: splitSeed, rng: "concepts_500 in file order (deduplicated), Fisher–Yates with selfscope's xoshiro128** seeded by the split seed", train: split.train, held_out: split.heldOut, train_used: train.length, held_out_used: heldOut.length },
      training: {
        examples: data.length,
        injection_examples: data.filter((e) => e.inject).length,
        control_examples: data.filter((e) => !e.inject).length,
        injection_layers: [...new Set(injLayers)],
        strengths: [...BIAS_PROTOCOL.injectionStrengths],
        steps,
        batch_size: batchSize,
        lr,
        weight_decay: weightDecay,
        seed,
      },
      evaluation: { injection_layers: evalLayers, strengths, trials_per_concept: trials, concepts: heldOut, max_tokens: maxTokens, reply_tokens: replyTokens, temperature: 0, prefill: biasEvalPrefill(), judge: judge.name, judge_approximate: judge.approximate },
      baseline,
      layers,
      best_layer: best,
    };
    fs.writeFileSync(path.join(out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(out, "report.html"), await sweepReport(results));
    return results;
  } finally {
    judge.dispose?.();
    model.dispose();
  }
}

const METRICS = [
  ["tpr", "TPR (detection)"],
  ["introspection_rate", "introspection"],
  ["forced_identification_rate", "forced ID"],
  ["fpr", "FPR"],
] as const;

async function sweepReport(r: BiasSweepResults): Promise<string> {
  const ev = r.evaluation;
  const parts: string[] = [];
  parts.push(`<h1>Trained bias vector, per-layer sweep — ${escapeHtml(path.basename(r.model.path))}</h1>`);
  parts.push(
    `<p class="small">selfscope ${escapeHtml(r.tool.version)} · ${escapeHtml(r.model.family)}, ${r.model.nLayers} layers · one bias vector per layer at <code>blocks.{m}.${escapeHtml(r.site)}</code> · ${r.training.examples} training examples, ${r.training.steps} steps of ${r.training.batch_size}, lr ${r.training.lr} · evaluation (§7.4): ${ev.concepts.length} held-out concepts × ${ev.trials_per_concept} trials, injection layers ${ev.injection_layers.join(", ")}, strengths ${ev.strengths.join(", ")}, context-only steering, greedy, ${ev.max_tokens} tokens · judge ${escapeHtml(ev.judge)}${ev.judge_approximate ? " <b>(rule judge: approximate)</b>" : ""}</p>`,
  );
  parts.push(`<h2>Metrics vs adapter layer</h2><p class="small">Each point: the adapter trained at that layer, pooled over the evaluation's injection layers and strengths. Dashed: the model without an adapter.</p>`);
  const pts = r.layers.flatMap((e) => METRICS.flatMap(([k, label]) => (e[k].estimate === null ? [] : [{ layer: e.layer, metric: label, value: e[k].estimate }])));
  const base = METRICS.flatMap(([k, label]) => (r.baseline[k].estimate === null ? [] : [{ metric: label, value: r.baseline[k].estimate }]));
  if (pts.length > 0) {
    parts.push(
      await renderSvg({
        width: 640,
        height: 300,
        layer: [
          { data: { values: pts }, mark: { type: "line", point: true }, encoding: { x: { field: "layer", type: "quantitative", title: "adapter layer", axis: { format: "d", tickMinStep: 1 } }, y: { field: "value", type: "quantitative", title: "rate", scale: { domain: [0, 1] } }, color: { field: "metric", type: "nominal" } } },
          { data: { values: base }, mark: { type: "rule", strokeDash: [4, 4] }, encoding: { y: { field: "value", type: "quantitative" }, color: { field: "metric", type: "nominal" } } },
        ],
      }),
    );
  } else parts.push(`<p>no judged trials</p>`);
  // The paper's figure: metrics vs injection layer for the model without an adapter and the best adapter (pooled over strengths).
  const arms: [string, BiasArmMetrics][] = [["no adapter", r.baseline]];
  const bestEntry = r.layers.find((e) => e.layer === r.best_layer);
  if (bestEntry) arms.push([`adapter at layer ${bestEntry.layer}`, bestEntry]);
  const byInj = arms.flatMap(([arm, a]) =>
    ev.injection_layers.flatMap((L) =>
      (["tpr", "introspection_rate", "forced_identification_rate"] as const).flatMap((k) => {
        const cs = a.by_config.filter((c) => c.layer === L);
        const n = cs.reduce((s, c) => s + c[k].n, 0);
        const yes = cs.reduce((s, c) => s + (c[k].estimate ?? 0) * c[k].n, 0);
        return n === 0 ? [] : [{ arm, metric: METRICS.find(([m]) => m === k)![1], layer: L, value: yes / n }];
      }),
    ),
  );
  if (byInj.length > 0 && ev.injection_layers.length > 1) {
    parts.push(`<h2>Metrics vs injection layer</h2>`);
    parts.push(
      await renderSvg({
        data: { values: byInj },
        facet: { column: { field: "metric", type: "nominal" } },
        spec: { width: 220, height: 200, mark: { type: "line", point: true }, encoding: { x: { field: "layer", type: "quantitative", title: "injection layer", axis: { format: "d", tickMinStep: 1 } }, y: { field: "value", type: "quantitative", scale: { domain: [0, 1] } }, color: { field: "arm", type: "nominal" } } },
      }),
    );
  }
  const row = (name: string, a: BiasArmMetrics, extra = "") => `<tr><th>${name}</th>${METRICS.map(([k]) => rateCell(a[k])).join("")}<td class="num">${a.unjudged}</td>${extra}</tr>`;
  parts.push(
    `<table><tr><th>adapter</th>${METRICS.map(([, l]) => `<th>${l}</th>`).join("")}<th>unjudged</th><th>final loss</th><th>‖b‖</th></tr>${row("none (baseline)", r.baseline, "<td></td><td></td>")}${r.layers
      .map((e) => row(`layer ${e.layer}${e.layer === r.best_layer ? " (best)" : ""}`, e, `<td class="num">${e.final_loss?.toFixed(4) ?? "—"}</td><td class="num">${e.vector_norm.toPrecision(4)}</td>`))
      .join("")}</table>`,
  );
  parts.push(`<h2>The model's own replies (assistant turns 1 and 2)</h2>`);
  parts.push(`<table><tr><th>adapter</th><th>reply 1</th><th>reply 2</th></tr>${[["none", r.baseline] as const, ...r.layers.map((e) => [`layer ${e.layer}`, e] as const)].map(([n, a]) => `<tr><td>${n}</td><td><pre>${escapeHtml(a.replies[0])}</pre></td><td><pre>${escapeHtml(a.replies[1])}</pre></td></tr>`).join("")}</table>`);
  parts.push(`<h2>Differences from the protocol and the paper's code</h2><ul>${r.protocol_deviations.map((d) => `<li>${escapeHtml(d)}</li>`).join("")}</ul>`);
  parts.push(`<p class="small">Split (seed ${r.split.seed}, ${escapeHtml(r.split.rng)}): first ${r.split.train_used} of ${r.split.train.length} training concepts used; held out: ${escapeHtml(r.split.held_out.slice(0, r.split.held_out_used).join(", "))}</p>`);
  return htmlBodyPage("selfscope bias sweep", parts);
}
