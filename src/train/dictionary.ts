// Training a TopK transcoder (or SAE: targets = inputs) on a model's own activations (issue 15 §4):
// no transcoders exist for small models, so selfscope trains one. TopK (Gao et al. 2024) needs no
// sparsity-penalty tuning: a = TopK_k(ReLU(x·W_enc + b_enc)), ŷ = a·W_dec + b_dec, loss = mean
// squared error per output dimension. Decoder rows are kept at unit norm (activations carry the
// scale); features that have not fired for `deadAfter` steps are re-initialised toward the worst-
// reconstructed example of the current batch (dead-feature handling). Adam, seeded, deterministic.
import { adamInit, adamStep, type AdamState } from "../math/adam.js";
import { mulberry32 } from "../core/rng.js";
import { decode, encode, type Dictionary } from "../vectors/dictionary.js";
import type { HookName } from "../hooks/names.js";

export interface TrainDictionaryOptions {
  dSae: number;
  k: number;
  steps: number;
  batch: number;
  lr: number;
  seed: number;
  /** Re-initialise features idle for this many steps (0: never). */
  deadAfter?: number;
  inputSite: HookName;
  outputSite: HookName;
  log?: (s: string) => void;
}

export interface TrainDictionaryResult {
  dict: Dictionary;
  /** Fraction of target variance left unexplained on all examples, at the end. */
  fvu: number;
  /** Features re-initialised over training. */
  resampled: number;
  history: { step: number; mse: number }[];
}

function gauss(r: () => number): number {
  return Math.sqrt(-2 * Math.log(Math.max(r(), 1e-12))) * Math.cos(2 * Math.PI * r());
}

function normalizeRows(w: Float32Array, rows: number, cols: number): void {
  for (let f = 0; f < rows; f++) {
    let s = 0;
    for (let j = 0; j < cols; j++) s += w[f * cols + j]! ** 2;
    const n = Math.sqrt(s) || 1;
    for (let j = 0; j < cols; j++) w[f * cols + j] = w[f * cols + j]! / n;
  }
}

/** Fraction of variance unexplained of `y` [n, d] by `yh`. */
export function fvu(y: Float32Array, yh: Float32Array, n: number, d: number): number {
  const mean = new Float64Array(d);
  for (let r = 0; r < n; r++) for (let j = 0; j < d; j++) mean[j] = mean[j]! + y[r * d + j]! / n;
  let res = 0, tot = 0;
  for (let r = 0; r < n; r++)
    for (let j = 0; j < d; j++) {
      res += (y[r * d + j]! - yh[r * d + j]!) ** 2;
      tot += (y[r * d + j]! - mean[j]!) ** 2;
    }
  return tot > 0 ? res / tot : 0;
}

/** Train on `n` (input, target) rows: x [n, dIn], y [n, dOut]. */
export function trainTopK(x: Float32Array, y: Float32Array, n: number, dIn: number, dOut: number, o: TrainDictionaryOptions): TrainDictionaryResult {
  const S = o.dSae;
  if (o.k < 1 || o.k > S) throw new Error(`trainTopK: k ${o.k} must be in 1..${S}`);
  const r = mulberry32(o.seed);
  const wDec = Float32Array.from({ length: S * dOut }, () => gauss(r));
  normalizeRows(wDec, S, dOut);
  // Encoder starts as a random unit map too (the decoder's transpose only makes sense for an SAE).
  const wEnc = Float32Array.from({ length: dIn * S }, () => gauss(r) / Math.sqrt(dIn));
  const bEnc = new Float32Array(S);
  const bDec = new Float32Array(dOut);
  for (let i = 0; i < n; i++) for (let j = 0; j < dOut; j++) bDec[j] = bDec[j]! + y[i * dOut + j]! / n;
  const st: AdamState[] = [adamInit(wEnc.length), adamInit(S), adamInit(wDec.length), adamInit(dOut)];
  const dict: Dictionary = { kind: "transcoder", activation: "topk", dIn, dSae: S, dOut, wEnc, bEnc, wDec, bDec, threshold: null, k: o.k, wSkip: null, bDecToInput: false, inputSite: o.inputSite, outputSite: o.outputSite, source: "trained" };
  const lastFired = new Int32Array(S);
  const history: { step: number; mse: number }[] = [];
  let resampled = 0;
  const order = Array.from({ length: n }, (_, i) => i);
  let cursor = n;
  const gEnc = new Float64Array(wEnc.length), gbEnc = new Float64Array(S), gDec = new Float64Array(wDec.length), gbDec = new Float64Array(dOut);
  for (let step = 0; step < o.steps; step++) {
    const B = Math.min(o.batch, n);
    const idx: number[] = [];
    for (let b = 0; b < B; b++) {
      if (cursor >= n) {
        for (let i = n - 1; i > 0; i--) { const j = Math.floor(r() * (i + 1)); [order[i], order[j]] = [order[j]!, order[i]!]; }
        cursor = 0;
      }
      idx.push(order[cursor++]!);
    }
    const xb = new Float32Array(B * dIn), yb = new Float32Array(B * dOut);
    idx.forEach((i, b) => { xb.set(x.subarray(i * dIn, (i + 1) * dIn), b * dIn); yb.set(y.subarray(i * dOut, (i + 1) * dOut), b * dOut); });
    const a = encode(dict, xb, B);
    const yh = decode(dict, a, B);
    gEnc.fill(0); gbEnc.fill(0); gDec.fill(0); gbDec.fill(0);
    let mse = 0;
    const scale = 2 / (B * dOut);
    for (let b = 0; b < B; b++) {
      let err = 0;
      const dy = new Float64Array(dOut);
      for (let j = 0; j < dOut; j++) {
        const e = yh[b * dOut + j]! - yb[b * dOut + j]!;
        err += e * e;
        dy[j] = scale * e;
        gbDec[j] = gbDec[j]! + dy[j]!;
      }
      mse += err / (B * dOut);
      for (let f = 0; f < S; f++) {
        const af = a[b * S + f]!;
        if (af <= 0) continue;
        lastFired[f] = step;
        let da = 0;
        for (let j = 0; j < dOut; j++) {
          gDec[f * dOut + j] = gDec[f * dOut + j]! + af * dy[j]!;
          da += dy[j]! * wDec[f * dOut + j]!;
        }
        gbEnc[f] = gbEnc[f]! + da;
        for (let i = 0; i < dIn; i++) gEnc[i * S + f] = gEnc[i * S + f]! + xb[b * dIn + i]! * da;
      }
    }
    const lr = o.lr * Math.min(1, (step + 1) / 50);
    adamStep(wEnc, gEnc, st[0]!, { lr });
    adamStep(bEnc, gbEnc, st[1]!, { lr });
    adamStep(wDec, gDec, st[2]!, { lr });
    adamStep(bDec, gbDec, st[3]!, { lr });
    normalizeRows(wDec, S, dOut);
    if (o.deadAfter && step > 0 && step % o.deadAfter === 0) {
      // Dead features: each points its decoder at one of the batch's worst-reconstructed examples'
      // residual and its encoder at that example's input (a different example per feature).
      const errs = Array.from({ length: B }, (_, b) => {
        let e = 0;
        for (let j = 0; j < dOut; j++) e += (yb[b * dOut + j]! - yh[b * dOut + j]!) ** 2;
        return { b, e };
      }).sort((p, q) => q.e - p.e || p.b - q.b);
      let next = 0;
      for (let f = 0; f < S; f++) {
        if (step - lastFired[f]! < o.deadAfter) continue;
        const w = errs[next++ % B]!.b;
        const res = new Float64Array(dOut);
        for (let j = 0; j < dOut; j++) res[j] = yb[w * dOut + j]! - yh[w * dOut + j]!;
        const rn = Math.hypot(...res) || 1;
        const xn = Math.hypot(...xb.subarray(w * dIn, (w + 1) * dIn)) || 1;
        for (let j = 0; j < dOut; j++) wDec[f * dOut + j] = res[j]! / rn;
        for (let i = 0; i < dIn; i++) wEnc[i * S + f] = xb[w * dIn + i]! / xn;
        bEnc[f] = 0;
        // Fresh Adam moments for the re-initialised entries only.
        for (let i = 0; i < dIn; i++) st[0]!.m[i * S + f] = st[0]!.v[i * S + f] = 0;
        st[1]!.m[f] = st[1]!.v[f] = 0;
        for (let j = 0; j < dOut; j++) st[2]!.m[f * dOut + j] = st[2]!.v[f * dOut + j] = 0;
        lastFired[f] = step;
        resampled++;
      }
    }
    if (step % 100 === 0 || step === o.steps - 1) {
      history.push({ step, mse });
      o.log?.(`step ${step} mse ${mse.toExponential(3)}`);
    }
  }
  const all = decode(dict, encode(dict, x, n), n);
  return { dict, fvu: fvu(y, all, n, dOut), resampled, history };
}
