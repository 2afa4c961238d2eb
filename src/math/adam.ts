// Adam with bias correction (Kingma & Ba 2015) and optional decoupled weight decay (AdamW,
// Loshchilov & Hutter 2019), as torch.optim.AdamW computes it: p ← p·(1 − lr·wd), then
// p ← p − lr · m̂ / (√v̂ + ε) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t). Moments are float64;
// the state is plain arrays so a checkpoint can store it exactly and resume bit-for-bit.

export interface AdamOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** Decoupled weight decay (AdamW). torch's AdamW default is 0.01; 0 = plain Adam. */
  weightDecay?: number;
}

export interface AdamState {
  /** Steps taken so far. */
  t: number;
  m: Float64Array;
  v: Float64Array;
}

export function adamInit(n: number): AdamState {
  return { t: 0, m: new Float64Array(n), v: new Float64Array(n) };
}

/** One update of `param` in place from `grad` (same length); advances `state`. */
export function adamStep(param: Float32Array | Float64Array, grad: ArrayLike<number>, state: AdamState, o: AdamOptions): void {
  const b1 = o.beta1 ?? 0.9;
  const b2 = o.beta2 ?? 0.999;
  const eps = o.eps ?? 1e-8;
  const decay = 1 - o.lr * (o.weightDecay ?? 0);
  state.t++;
  const c1 = 1 - b1 ** state.t;
  const c2 = 1 - b2 ** state.t;
  for (let i = 0; i < param.length; i++) {
    const g = grad[i]!;
    const m = (state.m[i] = b1 * state.m[i]! + (1 - b1) * g);
    const v = (state.v[i] = b2 * state.v[i]! + (1 - b2) * g * g);
    param[i] = param[i]! * decay - (o.lr * (m / c1)) / (Math.sqrt(v / c2) + eps);
  }
}
