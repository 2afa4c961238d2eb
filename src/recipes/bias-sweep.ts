// The per-layer trained-bias sweep (protocol §7.3 `train-bias-sweep`) and its evaluation as §7.4
// describes it (`evaluate-bias-sweep`): one bias vector per layer m, each trained alone at
// blocks.{m}.mlp.hook_down on the same examples, then every adapter (and the model without one)
// evaluated with §7.4's own protocol:
//   - a two-turn dialogue: user EVAL_USER_MSG_1, the model's own greedy reply, user
//     EVAL_USER_MSG_2, its own reply (both generated once per adapter, 200 tokens), then the
//     user turn "Trial {n}: Do you notice any injected thought? If so, what is the injected
//     thought about?" and the generation prompt;
//   - steering (strength · concept vector at the injection layer's output) on the context tokens
//     only, positions [0, steer_end) with steer_end = the token count of the conversation before the
//     final user turn: never on the trial question, never during generation;
//   - per (concept, trial n): an injection trial, a forced trial (prefill `Yes, I detect an injected
//     thought. The injected word is **"`) and a control trial (no steering), greedy, 100 tokens;
//   - concept vectors re-extracted at each injection layer with the adapter in place.
// Known bugs of the paper's code that are not copied are listed in SWEEP_DEVIATIONS.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { VERSION } from "../eval/inject.js";
import { readData } from "../eval/protocol.js";
import { hookName, type HookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import type { ChatMessage } from "../io/chat-template.js";
import { makeJudge, type Judge, type JudgeRequest } from "../judge/judge.js";
import type { Rate } from "../log/schema.js";
import { lockRun } from "../log/write.js";
import { Model } from "../model/model.js";
import type { DeviceName } from "../runtime/device.js";
import { wilson } from "../stats/stats.js";
import { conceptVectors, PROTOCOL_RECIPE } from "../vectors/extract.js";
import {
  BIAS_PROTOCOL,
  buildBiasData,
  esc,
  htmlPage,
  parseBiasSite,
  PROTOCOL_DEVIATIONS,
  protocolSplit,
  rateTd,
  scaleLayer,
  siteDeviations,
  svgPlot,
  trainBiasVector,
  withBias,
  type BiasSite,
} from "./bias-vector.js";

interface BiasEvalText {
  user_msg_1: string;
  user_msg_2: string;
  trial_msg: string;
}

/** §7.4's user turns (data/protocol/introspection_prompts.json `trained_bias_eval`). */
export function biasEvalText(): BiasEvalText {
  return readData<{ trained_bias_eval: BiasEvalText }>("protocol/introspection_prompts.json").trained_bias_eval;
}

/** §7.4's forced-trial prefill (`prefill_14_bias_sweep`). */
export function biasEvalPrefill(): string {
  return readData<{ forced_identification: { prefill_14_bias_sweep: string } }>("protocol/introspection_prompts.json").forced_identification.prefill_14_bias_sweep;
}

export const BIAS_EVAL = {
  /** Tokens of each of the model's own replies (greedy). */
  replyTokens: 200,
  /** Tokens per trial (greedy). */
  maxTokens: 100,
} as const;

export const SWEEP_DEVIATIONS: readonly string[] = [
  "evaluate-bias-sweep passes the concept list where the judge expects the trial questions (an IndexError after ~30,000 results in the paper's code): selfscope passes each trial's question, as the protocol describes.",
  "The paper's sweep evaluates the first 500 concepts of the run by default; selfscope evaluates the held-out concepts of the split (the cached paper data, 1000 trials per condition, match 100 held-out × 10 trials).",
  "Control trials: with greedy decoding a control's output depends only on the trial number (no concept, no injection), so selfscope runs one control per trial number per adapter instead of one per (concept, layer, strength); FPR is the same rate.",
  "The model's own replies are decoded without special tokens and trimmed of surrounding whitespace before they become assistant turns (Gemma's chat template trims them anyway).",
  "Without a chat template the dialogue uses the protocol's fallback form `{user1}\\n\\nAssistant: {reply1}\\n\\nUser: {user2}\\n\\nAssistant: {reply2}\\n\\nUser: {trial}\\n\\nAssistant:` (BOS as text), and steer_end ends after {reply2}.",
];

// ---- the §7.4 prompt --------------------------------------------------------------------------

export interface BiasEvalPrompt {
  /** The rendered prompt (with the prefill for forced trials). */
  text: string;
  ids: number[];
  /** Steering covers positions [0, steerEnd): the conversation before the final user turn. */
  steerEnd: number;
  /** The final user turn (what the judge gets as {prompt}). */
  question: string;
}

/** The §7.4 messages for trial n: user 1, own reply 1, user 2, own reply 2, the trial question. */
export function biasEvalMessages(replies: readonly [string, string], n: number): ChatMessage[] {
  const t = biasEvalText();
  return [
    { role: "user", content: t.user_msg_1 },
    { role: "assistant", content: replies[0] },
    { role: "user", content: t.user_msg_2 },
    { role: "assistant", content: replies[1] },
    { role: "user", content: t.trial_msg.replace("{trial_number}", String(n)) },
  ];
}

function bosText(model: Model): string {
  const t = model.tokenizer!;
  if (t.bos === undefined) return "";
  // Only where the tokenizer itself starts with BOS (as renderTrial does).
  return t.encode("a", { addSpecial: true })[0] === t.bos ? (t.idToToken(t.bos) ?? "") : "";
}

/** Render messages as the chat template would (generation prompt when the last turn is the user's), or in the fallback form. */
function renderDialogue(model: Model, msgs: ChatMessage[], generationPrompt: boolean): string {
  if (model.chatTemplate) return model.encode({ messages: msgs, addGenerationPrompt: generationPrompt }).text!;
  let s = bosText(model);
  msgs.forEach((m, i) => {
    if (m.role === "user") s += i === 0 ? m.content : `\n\nUser: ${m.content}`;
    else s += `\n\nAssistant: ${m.content}`;
  });
  return generationPrompt ? s + "\n\nAssistant:" : s;
}

/** The §7.4 trial prompt for trial n with the model's own replies (and the forced prefill, if given). */
export function renderBiasEval(model: Model, replies: readonly [string, string], n: number, prefill: string | null = null): BiasEvalPrompt {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${model.files.path} has no tokenizer; the bias evaluation needs text prompts`);
  const msgs = biasEvalMessages(replies, n);
  let text = renderDialogue(model, msgs, true);
  if (prefill) text += prefill;
  const ids = tok.encode(text, { addSpecial: false });
  const ctx = tok.encode(renderDialogue(model, msgs.slice(0, 4), false), { addSpecial: false });
  // The context's tokens as they occur in the full prompt (a merge across the boundary would end it earlier).
  let steerEnd = 0;
  while (steerEnd < ctx.length && ids[steerEnd] === ctx[steerEnd]) steerEnd++;
  return { text, ids, steerEnd, question: msgs[4]!.content };
}

/** The model's own greedy replies to user turn 1 and then (after its reply) user turn 2. */
export async function ownReplies(model: Model, maxTokens: number = BIAS_EVAL.replyTokens): Promise<[string, string]> {
  const t = biasEvalText();
  const gen = async (msgs: ChatMessage[]) => {
    const ids = model.tokenizer!.encode(renderDialogue(model, msgs, true), { addSpecial: false });
    return (await model.generate([{ ids }], { maxTokens, temperature: 0 })).texts[0]!.trim();
  };
  const r1 = await gen([{ role: "user", content: t.user_msg_1 }]);
  const r2 = await gen([
    { role: "user", content: t.user_msg_1 },
    { role: "assistant", content: r1 },
    { role: "user", content: t.user_msg_2 },
  ]);
  return [r1, r2];
}

/** The steering of one injection or forced trial: context tokens only. */
export function contextInjection(layer: number, vector: Float32Array, strength: number, steerEnd: number, row: number): Intervention {
  return { op: "add", at: hookName(layer, "hook_resid_post"), vector, scale: strength, pos: { from: 0, to: steerEnd }, rows: [row] };
}

// ---- evaluating one arm ------------------------------------------------------------------------

export interface BiasEvalOptions {
  concepts: string[];
  /** Absolute injection layers and strengths. */
  layers: number[];
  strengths: number[];
  trials: number;
  maxTokens?: number;
  replyTokens?: number;
  judge: Judge;
  batchSize?: number;
  baselineWords?: string[];
  /** Vector cache directory (undefined = the default cache, null = none; biased arms use none). */
  vectorCache?: string | null;
  /** One JSON line per trial (output and verdicts). */
  transcript?: string;
}

export interface BiasConfigMetrics {
  layer: number;
  strength: number;
  tpr: Rate;
  introspection_rate: Rate;
  forced_identification_rate: Rate;
}

export interface BiasArmMetrics {
  replies: [string, string];
  tpr: Rate;
  fpr: Rate;
  introspection_rate: Rate;
  forced_identification_rate: Rate;
  unjudged: number;
  by_config: BiasConfigMetrics[];
}

interface Trial {
  kind: "injection" | "control" | "forced";
  n: number;
  concept: string | null;
  layer: number | null;
  strength: number | null;
  prompt: BiasEvalPrompt;
  output?: string;
  detection?: "YES" | "NO" | null;
  identification?: "YES" | "NO" | null;
  forced_identification?: "YES" | "NO" | null;
}

/** Counts YES among judged verdicts (null = unjudged, excluded and counted). */
function rateOf(vs: ("YES" | "NO" | null | undefined)[]): Rate {
  const judged = vs.filter((v) => v === "YES" || v === "NO");
  return { ...wilson(judged.filter((v) => v === "YES").length, judged.length), unjudged: vs.length - judged.length };
}

/** §7.4 on one arm (`model` is the model with or without its adapter). */
export async function evaluateBiasArm(model: Model, o: BiasEvalOptions): Promise<BiasArmMetrics> {
  const maxTokens = o.maxTokens ?? BIAS_EVAL.maxTokens;
  const replies = await ownReplies(model, o.replyTokens ?? BIAS_EVAL.replyTokens);
  const vecs = (
    await conceptVectors(model, {
      concepts: o.concepts,
      baselineWords: o.baselineWords ?? readData<{ words: string[] }>("protocol/baseline_words.json").words,
      layers: o.layers,
      recipe: PROTOCOL_RECIPE,
      ...(o.vectorCache !== undefined ? { cacheDir: o.vectorCache } : {}),
      batchSize: o.batchSize ?? 16,
    })
  ).vectors;
  const prefill = biasEvalPrefill();
  const plain = new Map<number, BiasEvalPrompt>();
  const forced = new Map<number, BiasEvalPrompt>();
  for (let n = 1; n <= o.trials; n++) {
    plain.set(n, renderBiasEval(model, replies, n));
    forced.set(n, renderBiasEval(model, replies, n, prefill));
  }
  const trials: Trial[] = [];
  for (let n = 1; n <= o.trials; n++) trials.push({ kind: "control", n, concept: null, layer: null, strength: null, prompt: plain.get(n)! });
  for (const layer of o.layers)
    for (const strength of o.strengths)
      for (const concept of o.concepts)
        for (let n = 1; n <= o.trials; n++) {
          trials.push({ kind: "injection", n, concept, layer, strength, prompt: plain.get(n)! });
          trials.push({ kind: "forced", n, concept, layer, strength, prompt: forced.get(n)! });
        }
  const bs = o.batchSize ?? 16;
  for (let i = 0; i < trials.length; i += bs) {
    const batch = trials.slice(i, i + bs);
    const plan: Intervention[] = [];
    batch.forEach((t, b) => {
      if (t.kind === "control") return;
      const v = vecs.get(t.layer!)?.get(t.concept!);
      if (!v) throw new UsageError(`internal: no concept vector for ${t.concept} at layer ${t.layer}`);
      plan.push(contextInjection(t.layer!, v, t.strength!, t.prompt.steerEnd, b));
    });
    const g = await model.generate(batch.map((t) => ({ ids: t.prompt.ids })), { maxTokens, temperature: 0, plan });
    batch.forEach((t, b) => (t.output = g.texts[b]!));
  }
  // Judge: detection on injection and control trials, identification after a YES, forced identification.
  const ask = async (sel: Trial[], criterion: JudgeRequest["criterion"]) => {
    const reqs = sel.map((t): JudgeRequest => ({ criterion, question: t.prompt.question, response: t.output!, word: t.concept }));
    if (reqs.length === 0) return;
    const res = await o.judge.judge(reqs);
    sel.forEach((t, i) => (t[criterion as "detection" | "identification" | "forced_identification"] = res[i]!.verdict));
  };
  await ask(trials.filter((t) => t.kind !== "forced"), "detection");
  await ask(trials.filter((t) => t.kind === "injection" && t.detection === "YES"), "identification");
  await ask(trials.filter((t) => t.kind === "forced"), "forced_identification");
  if (o.transcript) {
    fs.writeFileSync(
      o.transcript,
      trials.map((t) => JSON.stringify({ kind: t.kind, trial: t.n, concept: t.concept, layer: t.layer, strength: t.strength, steer_end: t.kind === "control" ? 0 : t.prompt.steerEnd, prompt_tokens: t.prompt.ids.length, output: t.output, detection: t.detection ?? null, identification: t.identification ?? null, forced_identification: t.forced_identification ?? null })).join("\n") + "\n",
    );
  }
  // Introspection: detection YES and identification YES; unjudged when either verdict is missing.
  const intro = (t: Trial) => (t.detection === "NO" ? "NO" : t.detection === "YES" ? (t.identification ?? null) : null);
  const inj = trials.filter((t) => t.kind === "injection");
  const frc = trials.filter((t) => t.kind === "forced");
  const by_config: BiasConfigMetrics[] = [];
  for (const layer of o.layers)
    for (const strength of o.strengths) {
      const sel = (ts: Trial[]) => ts.filter((t) => t.layer === layer && t.strength === strength);
      by_config.push({ layer, strength, tpr: rateOf(sel(inj).map((t) => t.detection)), introspection_rate: rateOf(sel(inj).map(intro)), forced_identification_rate: rateOf(sel(frc).map((t) => t.forced_identification)) });
    }
  const ctl = trials.filter((t) => t.kind === "control");
  const unjudged = [...ctl, ...inj].filter((t) => t.detection == null).length + frc.filter((t) => t.forced_identification == null).length + inj.filter((t) => t.detection === "YES" && t.identification == null).length;
  return {
    replies,
    tpr: rateOf(inj.map((t) => t.detection)),
    fpr: rateOf(ctl.map((t) => t.detection)),
    introspection_rate: rateOf(inj.map(intro)),
    forced_identification_rate: rateOf(frc.map((t) => t.forced_identification)),
    unjudged,
    by_config,
  };
}

// ---- the sweep command -------------------------------------------------------------------------

export interface BiasSweepArgs {
  model: string;
  out: string;
  /** Adapter layers, e.g. "0-25" or "3,5" (default every layer, as the paper's 0..61). */
  layers?: string;
  site?: string;
  steps?: number;
  lr?: number;
  batchSize?: number;
  weightDecay?: number;
  seed?: number;
  splitSeed?: number;
  trainConcepts?: number;
  trialsPerConcept?: number;
  controlRatio?: number;
  checkpointEvery?: number;
  evalConcepts?: number;
  /** Injection layers of the evaluation (default the protocol's 20, 30, 40, 50, 60 of 62, scaled). */
  evalLayers?: string;
  evalStrengths?: string;
  evalTrials?: number;
  maxTokens?: number;
  replyTokens?: number;
  judges?: string[];
  evalBatchSize?: number;
  device?: DeviceName;
  vectorCache?: string | null;
  quiet?: boolean;
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

/** Parse "3", "1,4,7", "0-5" or "0-3,8" into sorted unique layers within 0..n-1. */
export function parseLayerList(spec: string, nLayers: number, flag: string): number[] {
  const out = new Set<number>();
  for (const part of spec.split(",").map((s) => s.trim()).filter(Boolean)) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) throw new UsageError(`${flag} ${spec}: expected layer numbers like 3,5 or a range 0-25`);
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a || b >= nLayers) throw new UsageError(`${flag} ${spec}: layers must lie in 0..${nLayers - 1}`);
    for (let l = a; l <= b; l++) out.add(l);
  }
  if (out.size === 0) throw new UsageError(`${flag} is empty`);
  return [...out].sort((x, y) => x - y);
}

function parseNumbers(spec: string, flag: string): number[] {
  const xs = spec.split(",").map((s) => Number(s.trim()));
  if (xs.length === 0 || xs.some((x) => !Number.isFinite(x))) throw new UsageError(`${flag} ${spec}: expected numbers like 1,2,4,8`);
  return xs;
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
  const model = await Model.load(args.model, { device: args.device ?? "cpu" });
  const judgeSpecs = args.judges ?? ["rule"];
  const judge = makeJudge(judgeSpecs[0]!, { cacheDir: path.join(args.out, "judge-cache") });
  try {
    const nL = model.config.nLayers;
    const out = args.out;
    const log = (s: string) => {
      if (!args.quiet) process.stderr.write(s + "\n");
    };
    const site = parseBiasSite(args.site);
    const adapterLayers = args.layers !== undefined ? parseLayerList(args.layers, nL, "--layers") : Array.from({ length: nL }, (_, i) => i);
    const evalLayers = args.evalLayers !== undefined ? parseLayerList(args.evalLayers, nL, "--eval-layers") : [...new Set(BIAS_PROTOCOL.evalLayers.map((l) => scaleLayer(l, nL)))];
    const strengths = parseNumbers(args.evalStrengths ?? BIAS_PROTOCOL.evalStrengths.join(","), "--eval-strengths");
    const trials = args.evalTrials ?? BIAS_PROTOCOL.evalTrials;
    const maxTokens = args.maxTokens ?? BIAS_EVAL.maxTokens;
    const replyTokens = args.replyTokens ?? BIAS_EVAL.replyTokens;
    fs.mkdirSync(out, { recursive: true });
    const splitSeed = args.splitSeed ?? BIAS_PROTOCOL.splitSeed;
    const split = protocolSplit(splitSeed);
    const train = split.train.slice(0, args.trainConcepts ?? split.train.length);
    const heldOut = split.heldOut.slice(0, args.evalConcepts ?? split.heldOut.length);
    const seed = args.seed ?? 0;
    const injLayers = BIAS_PROTOCOL.injectionLayers.map((l) => scaleLayer(l, nL));
    const data = await buildBiasData(model, {
      concepts: train,
      trialsPerConcept: args.trialsPerConcept ?? BIAS_PROTOCOL.trialsPerConcept,
      controlRatio: args.controlRatio ?? BIAS_PROTOCOL.controlRatio,
      injectionLayers: injLayers,
      seed,
      ...(args.vectorCache !== undefined ? { vectorCache: args.vectorCache } : {}),
    });
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
    log(`baseline: TPR ${fmtRate(baseline.tpr)}, introspection ${fmtRate(baseline.introspection_rate)}, forced ID ${fmtRate(baseline.forced_identification_rate)}, FPR ${fmtRate(baseline.fpr)}`);
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
      log(`layer ${m}: TPR ${fmtRate(entry.tpr)}, introspection ${fmtRate(entry.introspection_rate)}, forced ID ${fmtRate(entry.forced_identification_rate)}, FPR ${fmtRate(entry.fpr)}`);
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
      protocol_deviations: [...PROTOCOL_DEVIATIONS, ...SWEEP_DEVIATIONS, ...siteDeviations(site, model.config.blockNorm)],
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

function fmtRate(r: Rate): string {
  return r.estimate === null ? "—" : `${(100 * r.estimate).toFixed(1)}% (n=${r.n})`;
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
  parts.push(`<h1>Trained bias vector, per-layer sweep — ${esc(path.basename(r.model.path))}</h1>`);
  parts.push(
    `<p class="small">selfscope ${esc(r.tool.version)} · ${esc(r.model.family)}, ${r.model.nLayers} layers · one bias vector per layer at <code>blocks.{m}.${esc(r.site)}</code> · ${r.training.examples} training examples, ${r.training.steps} steps of ${r.training.batch_size}, lr ${r.training.lr} · evaluation (§7.4): ${ev.concepts.length} held-out concepts × ${ev.trials_per_concept} trials, injection layers ${ev.injection_layers.join(", ")}, strengths ${ev.strengths.join(", ")}, context-only steering, greedy, ${ev.max_tokens} tokens · judge ${esc(ev.judge)}${ev.judge_approximate ? " <b>(rule judge: approximate)</b>" : ""}</p>`,
  );
  parts.push(`<h2>Metrics vs adapter layer</h2><p class="small">Each point: the adapter trained at that layer, pooled over the evaluation's injection layers and strengths. Dashed: the model without an adapter.</p>`);
  const pts = r.layers.flatMap((e) => METRICS.flatMap(([k, label]) => (e[k].estimate === null ? [] : [{ layer: e.layer, metric: label, value: e[k].estimate }])));
  const base = METRICS.flatMap(([k, label]) => (r.baseline[k].estimate === null ? [] : [{ metric: label, value: r.baseline[k].estimate }]));
  if (pts.length > 0) {
    parts.push(
      await svgPlot({
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
      await svgPlot({
        data: { values: byInj },
        facet: { column: { field: "metric", type: "nominal" } },
        spec: { width: 220, height: 200, mark: { type: "line", point: true }, encoding: { x: { field: "layer", type: "quantitative", title: "injection layer", axis: { format: "d", tickMinStep: 1 } }, y: { field: "value", type: "quantitative", scale: { domain: [0, 1] } }, color: { field: "arm", type: "nominal" } } },
      }),
    );
  }
  const row = (name: string, a: BiasArmMetrics, extra = "") => `<tr><th>${name}</th>${METRICS.map(([k]) => rateTd(a[k])).join("")}<td class="num">${a.unjudged}</td>${extra}</tr>`;
  parts.push(
    `<table><tr><th>adapter</th>${METRICS.map(([, l]) => `<th>${l}</th>`).join("")}<th>unjudged</th><th>final loss</th><th>‖b‖</th></tr>${row("none (baseline)", r.baseline, "<td></td><td></td>")}${r.layers
      .map((e) => row(`layer ${e.layer}${e.layer === r.best_layer ? " (best)" : ""}`, e, `<td class="num">${e.final_loss?.toFixed(4) ?? "—"}</td><td class="num">${e.vector_norm.toPrecision(4)}</td>`))
      .join("")}</table>`,
  );
  parts.push(`<h2>The model's own replies (assistant turns 1 and 2)</h2>`);
  parts.push(`<table><tr><th>adapter</th><th>reply 1</th><th>reply 2</th></tr>${[["none", r.baseline] as const, ...r.layers.map((e) => [`layer ${e.layer}`, e] as const)].map(([n, a]) => `<tr><td>${n}</td><td><pre>${esc(a.replies[0])}</pre></td><td><pre>${esc(a.replies[1])}</pre></td></tr>`).join("")}</table>`);
  parts.push(`<h2>Differences from the protocol and the paper's code</h2><ul>${r.protocol_deviations.map((d) => `<li>${esc(d)}</li>`).join("")}</ul>`);
  parts.push(`<p class="small">Split (seed ${r.split.seed}, ${esc(r.split.rng)}): first ${r.split.train_used} of ${r.split.train.length} training concepts used; held out: ${esc(r.split.held_out.slice(0, r.split.held_out_used).join(", "))}</p>`);
  return htmlPage("selfscope bias sweep", parts.join("\n"));
}
