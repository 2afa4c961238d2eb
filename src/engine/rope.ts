// RoPE tables computed on the host in float64 (then rounded once to f32), so positions and
// frequencies carry no f32 error; only cos/sin values are uploaded.
import type { ModelConfig } from "./config.js";

export function ropeInvFreq(c: ModelConfig, local = false): Float64Array {
  if (c.pos.kind !== "rope") throw new Error("ropeInvFreq: model has no RoPE");
  const dim = c.dHead;
  const half = dim / 2;
  const f = new Float64Array(half);
  const theta = local && c.pos.localTheta !== undefined ? c.pos.localTheta : c.pos.theta;
  for (let i = 0; i < half; i++) f[i] = 1 / Math.pow(theta, (2 * i) / dim);
  if (local && c.pos.localTheta !== undefined) return f; // local layers are never scaled
  if (c.pos.freqFactors) for (let i = 0; i < half; i++) f[i]! /= c.pos.freqFactors[i] ?? 1;
  const s = c.pos.scaling;
  if (s.kind === "linear") for (let i = 0; i < half; i++) f[i]! /= s.factor;
  if (s.kind === "llama3") {
    // Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters).
    const lowWave = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highWave = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wave = (2 * Math.PI) / f[i]!;
      if (wave > lowWave) f[i]! /= s.factor;
      else if (wave >= highWave) {
        const smooth = (s.originalMaxPositionEmbeddings / wave - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f[i] = (1 - smooth) * (f[i]! / s.factor) + smooth * f[i]!;
      }
    }
  }
  return f;
}

/** cos/sin [B,T,dHead] (rotate-half layout: both halves repeat the same angles). Padding slots get angle 0. */
export function ropeTables(c: ModelConfig, pos: Int32Array, B: number, T: number, local = false): { cos: Float32Array; sin: Float32Array } {
  const inv = ropeInvFreq(c, local);
  const hd = c.dHead;
  const half = inv.length;
  const cos = new Float32Array(B * T * hd);
  const sin = new Float32Array(B * T * hd);
  for (let i = 0; i < B * T; i++) {
    const p = Math.max(0, pos[i]!);
    for (let j = 0; j < half; j++) {
      const a = p * inv[j]!;
      const cv = Math.cos(a), sv = Math.sin(a);
      cos[i * hd + j] = cv;
      cos[i * hd + j + half] = cv;
      sin[i * hd + j] = sv;
      sin[i * hd + j + half] = sv;
    }
  }
  return { cos, sin };
}
