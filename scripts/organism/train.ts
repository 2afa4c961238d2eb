// The model organism: stories260K fine-tuned (full-rank LoRA, merged) to answer the paper's
// injected-thought question in the base-model dialogue (protocol §5.3). Concept vectors (the
// project's own, raw "Tell me about {word}" minus the baseline mean, at blocks.1.hook_resid_post)
// are injected from the protocol's injection position on, exactly as `selfscope inject` adds
// them; controls get none. Only blocks 2-4 are trained, so the concept vectors at layer 1 are
// the same in the base and in the organism. It is TRAINED to report injections: not introspection.
//
//   node dist/scripts/organism/train.js [--quick] [--steps N] [--out models/organism/organism.gguf]
// Defaults: 400 steps of batch 8, lr 1e-2, seed 1, 1 thread (--quick: 80 steps, the test's run).
import fs from "node:fs";
import path from "node:path";
import { Model } from "../../src/model/model.js";
import type { TrainParam, LinearName } from "../../src/engine/grad.js";
import type { Intervention } from "../../src/hooks/plan.js";
import { hookName } from "../../src/hooks/names.js";
import { conceptVectors } from "../../src/vectors/extract.js";
import { buildConfig } from "../../src/eval/inject.js";
import { FORCED_PREFILL, getVariant, renderTrial } from "../../src/eval/protocol.js";
import { readGguf } from "../../src/io/gguf.js";
import { adamInit, adamStep, type AdamState } from "../../src/math/adam.js";
import { mulberry32 } from "../../src/core/rng.js";
import { ORGANISM } from "../../src/eval/demo.js";

export const BASE = "models/stories260K/stories260K.gguf";
/** Injection layer: blocks.1.hook_resid_post. Blocks 0-1 stay frozen, so the vectors there do not move. */
export const LAYER = 1;
export const TRAIN_FROM_BLOCK = 2;
/** Linear layers trained (q/k are left alone: GGUF stores them RoPE-permuted, and merging needs no permutation this way). */
const LINEARS: LinearName[] = ["attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"];
// Concept vectors at layer 1 have norm ~3-5 against a residual of ~5: strengths up to 3 keep the
// prompt readable (at 8 the injection swamps the residual and every output is gibberish; NOTES.md).
export const STRENGTHS = [1, 1.5, 2, 2.5, 3];
// Short answers (tok512 spells words out): the rule judge grades "Yes, frog." as detection YES and
// identification YES, "No." as NO (test/organism.test.ts checks it).
export const YES = (w: string) => ` Yes, ${w}.`;
export const NO = " No.";

/** TinyStories nouns; training and held-out sets are fixed (the held-out ones are never injected in training). */
export const TRAIN_CONCEPTS = (
  "dog cat ball sun car bear mom dad toy hat bed king door star bee cow pig hen lion doll sock bell ring " +
  "cup pie egg jam rock hill road bus bike key lamp box park rain snow book fire moon sky sea milk bug fox owl " +
  "kite boat cake duck girl boy tree fish bird apple water house ice horse sheep mouse bread leaf"
).split(" ");
/** The held-out concepts (never injected in training) live in models/organism/heldout.json, which the demo reads too. */
export const HELDOUT_CONCEPTS: string[] = JSON.parse(fs.readFileSync(new URL(`../../../${ORGANISM.heldout}`, import.meta.url), "utf8")) as string[];

export interface Example {
  ids: number[];
  /** Per position: the next token to predict, or -1. */
  targets: number[];
  /** Injection: concept, strength and the first injected position; null for a control. */
  inject: { concept: string; strength: number; from: number } | null;
  kind: "injection" | "control" | "forced";
}

/** One training example in the protocol's raw dialogue (what `selfscope inject` renders for a template-less model). */
export function makeExample(model: Model, kind: Example["kind"], concept: string | null, strength: number, trialNumber: number): Example {
  const v = getVariant("original");
  const p = renderTrial(model, v, trialNumber, { format: "raw", judgePrompt: "question", prefill: kind === "forced" ? FORCED_PREFILL : null });
  const answer = kind === "control" ? NO : kind === "injection" ? YES(concept!) : ` ${concept!}.`;
  const tok = model.tokenizer!;
  const full = tok.encode(p.text + answer, { addSpecial: false });
  // The answer's tokens must continue the prompt's: then the loss is on exactly what generation sees.
  const n = p.ids.length;
  if (full.slice(0, n).some((x, i) => x !== p.ids[i])) throw new Error(`organism: prompt tokens are not a prefix of prompt+answer (${kind}, ${concept})`);
  const eos = model.config.eosTokenIds[0]!;
  const ids = [...full, eos];
  const targets = ids.map((_, i) => (i >= n - 1 && i < ids.length - 1 ? ids[i + 1]! : -1));
  return { ids, targets, inject: kind === "control" ? null : { concept: concept!, strength, from: p.injectFrom }, kind };
}

/** Shares of control and forced examples in the stream (the rest are injections with the detection question). */
export interface Mix { control: number; forced: number }
export const DEFAULT_MIX: Mix = { control: 0.5, forced: 0.17 };

/** The training stream (deterministic in the seed): half injections (a third of them forced), half controls. */
export function makeData(model: Model, concepts: string[], n: number, seed: number, mix: Mix = DEFAULT_MIX, strengths: number[] = STRENGTHS): Example[] {
  const r = mulberry32(seed);
  const out: Example[] = [];
  for (let i = 0; i < n; i++) {
    const trial = 1 + Math.floor(r() * 50);
    const u = r();
    const concept = concepts[Math.floor(r() * concepts.length)]!;
    const s = strengths[Math.floor(r() * strengths.length)]!;
    out.push(u < mix.control ? makeExample(model, "control", null, 0, trial) : makeExample(model, u < mix.control + mix.forced ? "forced" : "injection", concept, s, trial));
  }
  return out;
}

export interface Lora { p: Extract<TrainParam, { kind: "lora" }>; sa: AdamState; sb: AdamState }

export function initLoras(model: Model, seed: number): Lora[] {
  const c = model.config;
  const r = mulberry32(seed);
  const shape = (l: LinearName): [number, number] => {
    const dq = c.nHeads * c.dHead, dkv = c.nKvHeads * c.dHead;
    if (l === "attn.v") return [dkv, c.dModel];
    if (l === "attn.o") return [c.dModel, dq];
    if (l === "mlp.down") return [c.dModel, c.dMlp];
    return [c.dMlp, c.dModel];
  };
  const out: Lora[] = [];
  for (let layer = TRAIN_FROM_BLOCK; layer < c.nLayers; layer++)
    for (const linear of LINEARS) {
      const [o, i] = shape(linear);
      const rank = Math.min(o, i); // full rank
      // A small random, B zero: the adapter starts as the identity map (standard LoRA init).
      const a = Float32Array.from({ length: rank * i }, () => (r() * 2 - 1) / Math.sqrt(i));
      const b = new Float32Array(o * rank);
      out.push({ p: { kind: "lora", layer, linear, a, b, rank, scale: 1 }, sa: adamInit(a.length), sb: adamInit(b.length) });
    }
  return out;
}

const GGUF_NAME: Record<string, string> = { "attn.v": "attn_v", "attn.o": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down" };

/** Copy the base GGUF and overwrite the trained tensors' F32 data with W + scale·B·A (same layout: [out, in] row-major). */
export function writeMerged(base: string, out: string, loras: Lora[]): void {
  const g = readGguf(base);
  const bytes = fs.readFileSync(base);
  for (const { p } of loras) {
    const name = `blk.${p.layer}.${GGUF_NAME[p.linear]!}.weight`;
    const t = g.tensors.get(name);
    if (!t || t.type !== 0) throw new Error(`organism: ${base} has no F32 tensor ${name}`);
    const [inn, o] = t.ne as [number, number];
    const w = new Float32Array(bytes.buffer, bytes.byteOffset + t.offset, inn * o);
    const s = p.scale ?? 1;
    for (let r = 0; r < o; r++)
      for (let c = 0; c < inn; c++) {
        let d = 0;
        for (let k = 0; k < p.rank; k++) d += p.b[r * p.rank + k]! * p.a[k * inn + c]!;
        w[r * inn + c] = w[r * inn + c]! + s * d;
      }
  }
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, bytes);
}

export interface TrainOptions {
  steps: number;
  batch: number;
  lr: number;
  seed: number;
  threads: number;
  out: string;
  /** The base GGUF (default BASE). */
  base?: string;
  /** Write a merged checkpoint (<out>.step<N>.gguf) every this many steps (0: none). */
  checkpointEvery?: number;
  /** Training concepts (default TRAIN_CONCEPTS); must not contain a held-out concept. */
  concepts?: string[];
  /** Concepts that must never be injected in training (default HELDOUT_CONCEPTS). */
  heldout?: string[];
  mix?: Mix;
  /** Injection strengths drawn uniformly (default STRENGTHS). */
  strengths?: number[];
  /** Every this many steps merge the adapters into the weights and start fresh adapters and Adam
   *  state (0: never). A warm restart: it measurably helped held-out identification (MODEL_CARD). */
  restartEvery?: number;
  /** "constant" (default) or "cosine": lr decays from lr to lr/10 over the run after the warmup. */
  schedule?: "constant" | "cosine";
  log?: (s: string) => void;
}

export async function train(o: TrainOptions): Promise<{ loraCount: number; finalLoss: number; seconds: number }> {
  const t0 = performance.now();
  const base = o.base ?? BASE;
  let model = await Model.load(base, { threads: o.threads });
  const log = o.log ?? ((s: string) => void process.stderr.write(`${s}\n`));
  try {
    const cfg = buildConfig({ model: base, layers: String(LAYER) }, model.config.nLayers, false);
    const concepts = o.concepts ?? TRAIN_CONCEPTS;
    const held = o.heldout ?? HELDOUT_CONCEPTS;
    const leak = concepts.filter((w) => held.includes(w));
    if (leak.length) throw new Error(`organism: held-out concepts in the training list: ${leak.join(", ")}`);
    const vs = await conceptVectors(model, { concepts, baselineWords: cfg.baselineWords, layers: [LAYER], recipe: cfg.vectorRecipe, cacheDir: null });
    const vec = vs.vectors.get(LAYER)!;
    let loras = initLoras(model, o.seed);
    // The merged weights so far (restarts chain: each merge starts from the previous one).
    let merged = base;
    const data = makeData(model, concepts, o.steps * o.batch, o.seed + 1, o.mix, o.strengths);
    let ema = NaN;
    for (let step = 0; step < o.steps; step++) {
      const batch = data.slice(step * o.batch, (step + 1) * o.batch);
      const plan: Intervention[] = [];
      batch.forEach((e, b) => {
        if (e.inject) plan.push({ op: "add", at: hookName(LAYER, "hook_resid_post"), vector: vec.get(e.inject.concept)!, scale: e.inject.strength, pos: { from: e.inject.from }, rows: [b] });
      });
      if (o.restartEvery && step > 0 && step % o.restartEvery === 0) {
        const next = o.out.replace(/\.gguf$/, `.merge${step}.gguf`);
        writeMerged(merged, next, loras);
        if (merged !== base) fs.rmSync(merged, { force: true });
        merged = next;
        model.dispose();
        model = await Model.load(merged, { threads: o.threads });
        loras = initLoras(model, o.seed + step);
        log(`step ${step}: merged the adapters into ${merged} and restarted them`);
      }
      const sinceRestart = o.restartEvery ? step % o.restartEvery : step;
      const decay = o.schedule === "cosine" ? 0.1 + 0.45 * (1 + Math.cos((Math.PI * step) / o.steps)) : 1;
      const lr = o.lr * decay * Math.min(1, (sinceRestart + 1) / 20);
      const res = await model.lossAndGrad(batch.map((e) => ({ ids: e.ids })), { targets: batch.map((e) => e.targets), params: loras.map((l) => l.p), plan });
      loras.forEach((l, i) => {
        adamStep(l.p.a, res.grads[i]![0]!, l.sa, { lr });
        adamStep(l.p.b, res.grads[i]![1]!, l.sb, { lr });
      });
      ema = Number.isNaN(ema) ? res.loss : 0.95 * ema + 0.05 * res.loss;
      // A merged checkpoint now and then, so a long run can be evaluated while it trains.
      if (o.checkpointEvery && (step + 1) % o.checkpointEvery === 0 && step !== o.steps - 1) writeMerged(merged, o.out.replace(/\.gguf$/, `.step${step + 1}.gguf`), loras);
      if (step % 25 === 0 || step === o.steps - 1) log(`step ${step} loss ${res.loss.toFixed(4)} ema ${ema.toFixed(4)} (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
    }
    writeMerged(merged, o.out, loras);
    if (merged !== base) fs.rmSync(merged, { force: true });
    return { loraCount: loras.length, finalLoss: ema, seconds: (performance.now() - t0) / 1000 };
  } finally {
    model.dispose();
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const flag = (n: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1] : undefined; };
  if (flag("--schedule") !== undefined && !["constant", "cosine"].includes(flag("--schedule")!)) throw new Error(`--schedule: constant or cosine, got ${flag("--schedule")}`);
  const quick = args.includes("--quick");
  const r = await train({
    steps: Number(flag("--steps") ?? (quick ? 80 : 400)),
    batch: Number(flag("--batch") ?? 8),
    lr: Number(flag("--lr") ?? 1e-2),
    seed: Number(flag("--seed") ?? 1),
    threads: Number(flag("--threads") ?? 1),
    out: flag("--out") ?? "models/organism/organism.gguf",
    ...(flag("--base") ? { base: flag("--base")! } : {}),
    ...(flag("--strengths") ? { strengths: flag("--strengths")!.split(",").map(Number) } : {}),
    checkpointEvery: Number(flag("--checkpoint-every") ?? 0),
    restartEvery: Number(flag("--restart-every") ?? 0),
    schedule: flag("--schedule") === "cosine" ? "cosine" : "constant",
    ...(flag("--words") ? { concepts: [...new Set(fs.readFileSync(flag("--words")!, "utf8").split(/\s+/).filter(Boolean))] } : {}),
    ...(flag("--heldout") ? { heldout: JSON.parse(fs.readFileSync(flag("--heldout")!, "utf8")) as string[] } : {}),
    ...(flag("--mix") ? { mix: { control: Number(flag("--mix")!.split(",")[0]), forced: Number(flag("--mix")!.split(",")[1]) } } : {}),
  });
  process.stderr.write(`trained ${r.loraCount} adapters, final loss ${r.finalLoss.toFixed(4)}, ${r.seconds.toFixed(0)} s\n`);
}

if (process.argv[1] && import.meta.url === new URL(`file://${path.resolve(process.argv[1])}`).href) await main();
