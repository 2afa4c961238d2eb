// What training changes: a list of TrainParams (src/engine/grad.ts) flattened into one vector for
// Adam and back. Every kind the engine differentiates slots in through `arraysOf` (its value arrays,
// in the order lossAndGrad returns their gradients): vector, scale, lora, and the full-weight
// "delta" kind the engine may add ({ kind: "delta"; name; value }, W + value in the pass).
import { UsageError } from "../core/errors.js";
import { Rng } from "../core/rng.js";
import type { LinearName, TrainParam } from "../engine/grad.js";
import type { ModelConfig } from "../engine/config.js";

export const LINEAR_NAMES: readonly LinearName[] = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"];

/** The value arrays of a param (views, not copies), in the order of its gradients. */
export function arraysOf(p: TrainParam): Float32Array[] {
  const q = p as TrainParam | { kind: "delta"; name: string; value: Float32Array };
  switch (q.kind) {
    case "vector":
      return [q.value];
    case "scale":
      return [];
    case "lora":
      return [q.a, q.b];
    case "delta":
      return [q.value];
    case "activation":
      throw new UsageError("an activation is not a trainable parameter");
  }
}

/** A stable name per param (checkpoint / safetensors keys). */
export function paramKey(p: TrainParam, i: number): string {
  const q = p as TrainParam | { kind: "delta"; name: string };
  switch (q.kind) {
    case "vector":
      return `vector.${i}.${q.at}`;
    case "scale":
      return `scale.${i}.${q.at}`;
    case "lora":
      return `lora.blocks.${q.layer}.${q.linear}`;
    case "delta":
      return `delta.${q.name}`;
    default:
      return `param.${i}`;
  }
}

/** The params as one float64 vector (Adam's space), written back into the params' own arrays by `set`. */
export class ParamSet {
  readonly size: number;
  constructor(readonly params: TrainParam[]) {
    let n = 0;
    for (const p of params) n += p.kind === "scale" ? 1 : arraysOf(p).reduce((s, a) => s + a.length, 0);
    this.size = n;
  }

  /** A float32 copy of the current values (float32 is what the engine runs, so nothing is lost). */
  get(): Float32Array {
    const out = new Float32Array(this.size);
    let o = 0;
    for (const p of this.params) {
      if (p.kind === "scale") out[o++] = p.value;
      else
        for (const a of arraysOf(p)) {
          out.set(a, o);
          o += a.length;
        }
    }
    return out;
  }

  set(x: ArrayLike<number>): void {
    if (x.length !== this.size) throw new Error(`ParamSet.set: ${x.length} values for ${this.size} parameters`);
    let o = 0;
    for (const p of this.params) {
      if (p.kind === "scale") p.value = Math.fround(x[o++]!);
      else for (const a of arraysOf(p)) for (let i = 0; i < a.length; i++) a[i] = x[o++]!;
    }
  }

  /** lossAndGrad's per-param gradient arrays, flattened in the same order as get(). */
  flattenGrads(grads: Float32Array[][]): Float64Array {
    const out = new Float64Array(this.size);
    let o = 0;
    this.params.forEach((p, k) => {
      const g = grads[k];
      if (!g) throw new Error(`lossAndGrad returned no gradient for param ${k} (${p.kind})`);
      for (const a of g) for (let i = 0; i < a.length; i++) out[o++] = a[i]!;
    });
    if (o !== this.size) throw new Error(`lossAndGrad returned ${o} gradient values for ${this.size} parameters`);
    return out;
  }
}

export interface LoraSpec {
  rank: number;
  /** PEFT's lora_alpha: the update is (alpha / rank) · B·A. */
  alpha: number;
  targets: LinearName[];
  /** Layers (absolute); default all. */
  layers?: number[];
  seed: number;
}

/** [out, in] of a block's linear layer (weights blocks.{i}.{name}.weight). */
export function linearShape(c: ModelConfig, linear: LinearName): [number, number] {
  const D = c.dModel;
  const q = c.nHeads * c.dHead;
  const kv = c.nKvHeads * c.dHead;
  switch (linear) {
    case "attn.q":
      return [q, D];
    case "attn.k":
    case "attn.v":
      return [kv, D];
    case "attn.o":
      return [D, q];
    case "mlp.gate":
    case "mlp.up":
      return [c.dMlp, D];
    case "mlp.down":
      return [D, c.dMlp];
  }
}

export function parseLinearNames(s: string, flag = "--lora-targets"): LinearName[] {
  const names = s.split(",").map((x) => x.trim()).filter((x) => x !== "");
  for (const n of names) if (!LINEAR_NAMES.includes(n as LinearName)) throw new UsageError(`${flag}: unknown linear layer "${n}"; use some of ${LINEAR_NAMES.join(",")}`);
  if (names.length === 0) throw new UsageError(`${flag}: no linear layers given`);
  return names as LinearName[];
}

/**
 * LoRA params as PEFT initializes them: A from kaiming_uniform_(a=√5), i.e. U(−1/√in, 1/√in)
 * (bound = gain·√(3/fan_in) with gain √(2/(1+5)) = √(1/3)), B = 0, so training starts at the
 * base model. A is drawn from `seed` in a fixed order (layer, then target).
 */
export function initLora(c: ModelConfig, o: LoraSpec): TrainParam[] {
  if (!(Number.isInteger(o.rank) && o.rank >= 1)) throw new UsageError(`--lora-rank must be a positive integer, got ${o.rank}`);
  if (!(o.alpha > 0)) throw new UsageError(`--lora-alpha must be positive, got ${o.alpha}`);
  const layers = o.layers ?? Array.from({ length: c.nLayers }, (_, i) => i);
  for (const l of layers) if (!(Number.isInteger(l) && l >= 0 && l < c.nLayers)) throw new UsageError(`--layers: layer ${l} is out of range (the model has ${c.nLayers})`);
  const rng = new Rng(o.seed);
  const out: TrainParam[] = [];
  for (const layer of layers)
    for (const linear of o.targets) {
      const [dOut, dIn] = linearShape(c, linear);
      const bound = 1 / Math.sqrt(dIn);
      const a = Float32Array.from({ length: o.rank * dIn }, () => (rng.next() * 2 - 1) * bound);
      out.push({ kind: "lora", layer, linear, a, b: new Float32Array(dOut * o.rank), rank: o.rank, scale: o.alpha / o.rank });
    }
  return out;
}

/** ‖scale · B·A‖_F of one LoRA param (the weight update it makes), in float64. */
export function loraDeltaNorm(p: Extract<TrainParam, { kind: "lora" }>): number {
  const r = p.rank;
  const dIn = p.a.length / r;
  const dOut = p.b.length / r;
  let s = 0;
  for (let i = 0; i < dOut; i++)
    for (let j = 0; j < dIn; j++) {
      let v = 0;
      for (let k = 0; k < r; k++) v += p.b[i * r + k]! * p.a[k * dIn + j]!;
      s += v * v;
    }
  return (p.scale ?? 1) * Math.sqrt(s);
}

/**
 * The `random_lora` control: A and B both uniform from the seed (B no longer zero), then B rescaled
 * so each module's update ‖scale·B·A‖_F equals `norms[i]` (a trained adapter's, module by module).
 */
export function randomLora(params: TrainParam[], norms: number[], seed: number): TrainParam[] {
  const rng = new Rng(seed);
  return params.map((p, i) => {
    if (p.kind !== "lora") throw new UsageError("random_lora: only LoRA params can be randomized");
    const a = Float32Array.from(p.a, () => rng.next() * 2 - 1);
    const b = Float32Array.from(p.b, () => rng.next() * 2 - 1);
    const q = { ...p, a, b };
    const n = loraDeltaNorm(q);
    const want = norms[i]!;
    if (!(want >= 0)) throw new UsageError(`random_lora: no target norm for module ${paramKey(p, i)}`);
    const f = n > 0 ? want / n : 0;
    for (let j = 0; j < b.length; j++) b[j] = b[j]! * f;
    return q;
  });
}
