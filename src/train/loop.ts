// The training loop: seeded batches, Adam (src/math/adam.ts) with optional warmup and gradient-norm
// clipping, atomic checkpoints (params, Adam state, step, data order, config and model hashes) and
// exact resume: batches are a pure function of (seed, step), so a resumed run takes the same
// batches and reaches bit-identical parameters.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import type { LossAndGradRequest, LossAndGradResult, TrainParam } from "../engine/grad.js";
import type { Row } from "../engine/types.js";
import { adamInit, adamStep, type AdamState } from "../math/adam.js";
import { batchOf, type Example, type Seq } from "./data.js";
import { pairLoss, readsRejected, type Hyper, type Objective } from "./objectives.js";
import { ParamSet } from "./params.js";

/** What training needs of a model (Model satisfies it). */
export interface GradModel {
  lossAndGrad(rows: Row[], req: LossAndGradRequest): Promise<LossAndGradResult>;
}

export interface LoopConfig {
  objective: Objective;
  hyper: Hyper;
  lr: number;
  /** Linear warmup over this many steps (0: none). */
  warmup: number;
  /** Total optimizer steps. */
  steps: number;
  batch: number;
  seed: number;
  /** Clip the global gradient norm to this (0 or undefined: no clipping). */
  clip?: number;
  weightDecay?: number;
}

export interface TrainOptions {
  model: GradModel;
  params: TrainParam[];
  examples: Example[];
  config: LoopConfig;
  /** Identifies the model (its weights hash): a checkpoint of another model is refused. */
  modelHash: string;
  /** Extra settings that must match on resume (data hash, LoRA spec, ...). */
  meta?: Record<string, unknown>;
  out?: string;
  checkpointEvery?: number;
  resume?: boolean;
  evalEvery?: number;
  onEval?: (step: number, params: TrainParam[]) => Promise<void>;
  onStep?: (rec: StepRecord) => void;
}

export interface StepRecord {
  step: number;
  loss: number;
  gradNorm: number;
  lr: number;
}

export interface TrainResult {
  params: TrainParam[];
  step: number;
  resumedFrom: number | null;
  curve: StepRecord[];
}

/** The example indices of optimizer step `step` (0-based): epoch e walks a permutation drawn from (seed, e). */
export function batchIndices(step: number, batch: number, n: number, seed: number): number[] {
  const perEpoch = Math.ceil(n / batch);
  const epoch = Math.floor(step / perEpoch);
  const k = step % perEpoch;
  const perm = new Rng((seed ^ Math.imul(epoch + 1, 0x9e3779b1)) >>> 0).shuffle(Array.from({ length: n }, (_, i) => i));
  return perm.slice(k * batch, Math.min(n, (k + 1) * batch));
}

/** Σ log p over a sequence's targets, and its gradient (flattened), from one single-row lossAndGrad. */
async function seqLogp(model: GradModel, set: ParamSet, seq: Seq, inject: Example["inject"]): Promise<{ s: number; grad: Float64Array }> {
  const b = batchOf([{ seq, inject }]);
  const r = await model.lossAndGrad(b.rows, { targets: b.targets, params: set.params, plan: b.plan });
  const g = set.flattenGrads(r.grads);
  // loss = −s / n, so ∇s = −n ∇loss.
  for (let i = 0; i < g.length; i++) g[i] = -seq.nTargets * g[i]!;
  return { s: -r.loss * seq.nTargets, grad: g };
}

/** Reference sequence log-probs (the params at their initial values), once per example. */
export async function referenceLogps(model: GradModel, init: TrainParam[], examples: Example[]): Promise<{ rc: number; rr: number }[]> {
  const set = new ParamSet(init);
  const out: { rc: number; rr: number }[] = [];
  for (const e of examples) {
    if (e.kind !== "pair") {
      out.push({ rc: 0, rr: 0 });
      continue;
    }
    const c = await seqLogp(model, set, e.chosen, e.inject);
    const r = await seqLogp(model, set, e.rejected, e.inject);
    out.push({ rc: c.s, rr: r.s });
  }
  return out;
}

/** The objective's loss and flattened gradient on one batch of examples. */
export async function batchLossAndGrad(model: GradModel, set: ParamSet, obj: Objective, hyper: Hyper, batch: Example[], refs: ({ rc: number; rr: number } | undefined)[]): Promise<{ loss: number; grad: Float64Array }> {
  if (obj.loss === "sft") {
    const items = batch.map((e) => {
      if (e.kind !== "sft") throw new Error(`internal: ${e.where} is a pair under an SFT loss`);
      return e;
    });
    const b = batchOf(items);
    const r = await model.lossAndGrad(b.rows, { targets: b.targets, params: set.params, plan: b.plan });
    return { loss: r.loss, grad: set.flattenGrads(r.grads) };
  }
  if (obj.loss === "none") throw new UsageError(`--objective ${obj.name} trains nothing`);
  const grad = new Float64Array(set.size);
  let loss = 0;
  for (let k = 0; k < batch.length; k++) {
    const e = batch[k]!;
    if (e.kind !== "pair") throw new Error(`internal: ${e.where} is not a pair under a pairwise loss`);
    const ref = refs[k] ?? { rc: 0, rr: 0 };
    const c = await seqLogp(model, set, e.chosen, e.inject);
    const r = readsRejected(obj.loss) ? await seqLogp(model, set, e.rejected, e.inject) : null;
    const l = pairLoss(obj.loss, { sc: c.s, sr: r?.s ?? 0, rc: obj.reference ? ref.rc : 0, rr: obj.reference ? ref.rr : 0, nc: e.chosen.nTargets }, hyper);
    loss += l.loss / batch.length;
    for (let i = 0; i < grad.length; i++) grad[i] = grad[i]! + (l.dc * c.grad[i]! + (r ? l.dr * r.grad[i]! : 0)) / batch.length;
  }
  return { loss, grad };
}

// ---- checkpoints ------------------------------------------------------------------------------

interface CkHeader {
  format: "selfscope-train-checkpoint/1";
  step: number;
  adamT: number;
  size: number;
  configHash: string;
  modelHash: string;
  /** Batches are a pure function of these (batchIndices). */
  dataOrder: { seed: number; nextStep: number };
}

export const CHECKPOINT_FILE = "checkpoint.bin";

/** Write atomically: a temp file in the same folder, fsync'd, then renamed over the old one. */
export function writeAtomic(file: string, data: Uint8Array | string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, "w");
  try {
    fs.writeSync(fd, typeof data === "string" ? Buffer.from(data, "utf8") : data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

function writeCheckpoint(file: string, h: CkHeader, params: Float32Array, adam: AdamState): void {
  const head = Buffer.from(JSON.stringify(h), "utf8");
  // 8-byte aligned sections after [u32 length][header].
  const off = Math.ceil((4 + head.length) / 8) * 8;
  const buf = new Uint8Array(off + params.byteLength + adam.m.byteLength + adam.v.byteLength);
  new DataView(buf.buffer).setUint32(0, head.length, true);
  buf.set(head, 4);
  buf.set(new Uint8Array(params.buffer, params.byteOffset, params.byteLength), off);
  buf.set(new Uint8Array(adam.m.buffer), off + params.byteLength);
  buf.set(new Uint8Array(adam.v.buffer), off + params.byteLength + adam.m.byteLength);
  writeAtomic(file, buf);
}

export function readCheckpoint(file: string): { header: CkHeader; params: Float32Array; adam: AdamState } {
  const buf = fs.readFileSync(file);
  const n = buf.readUInt32LE(0);
  const header = JSON.parse(buf.subarray(4, 4 + n).toString("utf8")) as CkHeader;
  if (header.format !== "selfscope-train-checkpoint/1") throw new UsageError(`${file}: not a selfscope training checkpoint`);
  const off = Math.ceil((4 + n) / 8) * 8;
  const S = header.size;
  const copy = (a: number, bytes: number) => buf.buffer.slice(buf.byteOffset + a, buf.byteOffset + a + bytes);
  return {
    header,
    params: new Float32Array(copy(off, 4 * S)),
    adam: { t: header.adamT, m: new Float64Array(copy(off + 4 * S, 8 * S)), v: new Float64Array(copy(off + 12 * S, 8 * S)) },
  };
}

export function configHash(c: LoopConfig, meta: Record<string, unknown>): string {
  // steps is left out so a finished run can be extended; everything else changes the trajectory.
  const { steps: _s, ...rest } = c;
  return createHash("sha256").update(JSON.stringify({ ...rest, meta })).digest("hex");
}

/** Train; with `out`, checkpoints there and appends loss.jsonl; with `resume`, continues from its checkpoint. */
export async function train(o: TrainOptions): Promise<TrainResult> {
  const c = o.config;
  const n = o.examples.length;
  if (n === 0) throw new UsageError("no training examples");
  if (!(Number.isInteger(c.batch) && c.batch >= 1)) throw new UsageError(`--batch must be a positive integer, got ${c.batch}`);
  if (!(Number.isInteger(c.steps) && c.steps >= 0)) throw new UsageError(`--steps must be a non-negative integer, got ${c.steps}`);
  if (!(c.lr > 0)) throw new UsageError(`--lr must be positive, got ${c.lr}`);
  const set = new ParamSet(o.params);
  const init = set.get();
  const hash = configHash(c, o.meta ?? {});
  let x: Float32Array = init.slice();
  let adam = adamInit(set.size);
  let step = 0;
  let resumedFrom: number | null = null;
  const ckFile = o.out ? path.join(o.out, CHECKPOINT_FILE) : null;
  const curveFile = o.out ? path.join(o.out, "loss.jsonl") : null;
  let curve: StepRecord[] = [];
  if (o.out) fs.mkdirSync(o.out, { recursive: true });
  if (ckFile && fs.existsSync(ckFile)) {
    if (!o.resume) throw new UsageError(`${o.out} already holds a training checkpoint; pass --resume to continue it, or use another --out`);
    const ck = readCheckpoint(ckFile);
    if (ck.header.modelHash !== o.modelHash) throw new UsageError(`${ckFile} was trained on another model (weights ${ck.header.modelHash.slice(0, 12)}…, this one ${o.modelHash.slice(0, 12)}…); resume with the same --model`);
    if (ck.header.configHash !== hash) throw new UsageError(`${ckFile} was written with other training settings or data (config hash differs); resume with the same flags and --data, or use another --out`);
    if (ck.header.size !== set.size) throw new UsageError(`${ckFile} holds ${ck.header.size} parameters, this run has ${set.size}`);
    x = ck.params;
    adam = ck.adam;
    step = ck.header.step;
    resumedFrom = step;
    if (curveFile && fs.existsSync(curveFile)) {
      curve = fs.readFileSync(curveFile, "utf8").split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l) as StepRecord).filter((r) => r.step <= step);
      writeAtomic(curveFile, curve.map((r) => JSON.stringify(r) + "\n").join(""));
    }
  } else if (o.resume && o.out) throw new UsageError(`--resume: ${o.out} holds no checkpoint (${CHECKPOINT_FILE})`);
  else if (curveFile) writeAtomic(curveFile, "");
  const refs = o.config.objective.reference ? await referenceLogps(o.model, paramsAt(set, init), o.examples) : [];
  set.set(x);
  const every = o.checkpointEvery ?? 0;
  const save = () => ckFile && writeCheckpoint(ckFile, { format: "selfscope-train-checkpoint/1", step, adamT: adam.t, size: set.size, configHash: hash, modelHash: o.modelHash, dataOrder: { seed: c.seed, nextStep: step } }, x, adam);
  while (step < c.steps) {
    const idx = batchIndices(step, c.batch, n, c.seed);
    const { loss, grad } = await batchLossAndGrad(o.model, set, c.objective, c.hyper, idx.map((i) => o.examples[i]!), idx.map((i) => refs[i]));
    let norm = 0;
    for (let i = 0; i < grad.length; i++) norm += grad[i]! * grad[i]!;
    norm = Math.sqrt(norm);
    if (!Number.isFinite(loss) || !Number.isFinite(norm)) throw new UsageError(`training diverged at step ${step + 1} (loss ${loss}, gradient norm ${norm}); lower --lr or add --clip`);
    if (c.clip && norm > c.clip) for (let i = 0; i < grad.length; i++) grad[i] = (grad[i]! * c.clip) / norm;
    const lr = c.warmup > 0 ? c.lr * Math.min(1, (step + 1) / c.warmup) : c.lr;
    adamStep(x, grad, adam, { lr, ...(c.weightDecay ? { weightDecay: c.weightDecay } : {}) });
    set.set(x);
    step++;
    const rec = { step, loss, gradNorm: norm, lr };
    curve.push(rec);
    if (curveFile) fs.appendFileSync(curveFile, JSON.stringify(rec) + "\n");
    o.onStep?.(rec);
    if (every > 0 && step % every === 0) save();
    if (o.onEval && o.evalEvery && step % o.evalEvery === 0) await o.onEval(step, set.params);
  }
  if (every > 0 && step % every !== 0) save();
  return { params: set.params, step, resumedFrom, curve };
}

/** Copies of `set`'s params holding the values `x`. */
function paramsAt(set: ParamSet, x: Float32Array): TrainParam[] {
  const copy = new ParamSet(set.params.map(cloneParam));
  copy.set(x);
  return copy.params;
}

export function cloneParam(p: TrainParam): TrainParam {
  const q = p as TrainParam | { kind: "delta"; name: string; value: Float32Array };
  switch (q.kind) {
    case "vector":
      return { ...q, value: q.value.slice() };
    case "lora":
      return { ...q, a: q.a.slice(), b: q.b.slice() };
    case "delta":
      return { ...q, value: q.value.slice() } as unknown as TrainParam;
    default:
      return { ...q } as TrainParam;
  }
}
