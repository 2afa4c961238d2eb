// Dequantization of ggml block-quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) to f32, bit-identical to ggml's reference `dequantize_row_*`
// (ggml/src/ggml-quants.c; block layouts from ggml/src/ggml-common.h).
//
// Bit-exactness: C evaluates these formulas in float32, one rounding per operation. JS arithmetic
// is float64, so every intermediate that C holds in a `float` is rounded with Math.fround, mirroring
// the C expression. (In fact every product here is exact in float32: the scales are fp16, with
// 11-bit significands, times integers of at most 12 bits, and never leave the normal float32
// range. Only the final `+ m` / `- min` rounds, so the result is the correctly rounded value of the
// exact expression whatever the evaluation order, with or without FMA contraction. Only NaN
// payloads, from Inf/NaN scales that no real file has, are not reproduced bit for bit.)
//
// All fp16 fields (the block scales d, m, dmin) are little-endian IEEE half values, widened
// exactly (as ggml's fp16->fp32 conversion does for every non-NaN input).
import { ModelFileError } from "../core/errors.js";
// Type-only: gguf.ts imports this module, so a value import would be a cycle that leaves the enum
// undefined while this module initialises. The type ids below are ggml.h's `enum ggml_type`.
import type { GgmlType } from "./gguf.js";

const fround = Math.fround;

const Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14;

/** Name, elements per block and bytes per block (ggml-common.h) of the types this module dequantizes. */
const QUANT_BLOCK: ReadonlyMap<number, readonly [name: string, elems: number, bytes: number]> = new Map([
  [Q4_0, ["Q4_0", 32, 18]],
  [Q4_1, ["Q4_1", 32, 20]],
  [Q5_0, ["Q5_0", 32, 22]],
  [Q5_1, ["Q5_1", 32, 24]],
  [Q8_0, ["Q8_0", 32, 34]],
  [Q2_K, ["Q2_K", 256, 84]],
  [Q3_K, ["Q3_K", 256, 110]],
  [Q4_K, ["Q4_K", 256, 144]],
  [Q5_K, ["Q5_K", 256, 176]],
  [Q6_K, ["Q6_K", 256, 210]],
] as const);

/** Whether `dequantize` handles this ggml type. */
export function canDequantize(type: GgmlType): boolean {
  return QUANT_BLOCK.has(type);
}

/** Exact IEEE half -> float32 for all 65536 bit patterns, built from bits (no rounding involved). */
const HALF = (() => {
  const bits = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    let mant = h & 0x3ff;
    if (exp === 0x1f) {
      bits[h] = sign | 0x7f800000 | (mant << 13); // Inf / NaN
    } else if (exp !== 0) {
      bits[h] = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant === 0) {
      bits[h] = sign; // +-0
    } else {
      // Subnormal half: shift the mantissa up until its leading one is the implicit bit.
      let e = 113;
      while ((mant & 0x400) === 0) {
        mant <<= 1;
        e--;
      }
      bits[h] = sign | (e << 23) | ((mant & 0x3ff) << 13);
    }
  }
  return new Float32Array(bits.buffer);
})();

/** The fp16 value stored little-endian at bytes[o], as float32. */
function half(b: Uint8Array, o: number): number {
  return HALF[b[o]! | (b[o + 1]! << 8)]!;
}

/**
 * Quantize to Q8_0 blocks as ggml's quantize_row_q8_0_ref: per 32 values d = max|x| / 127, stored
 * as f16; quants round(x / d) (half away from zero) with the f32 d. `x.length` % 32 == 0.
 */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  if (x.length % 32 !== 0) throw new Error(`quantizeQ8_0: ${x.length} values is not a whole number of 32-value blocks`);
  const nb = x.length / 32;
  const out = new Uint8Array(nb * 34);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[i * 32 + j]!));
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    dv.setUint16(i * 34, f32ToF16(d), true);
    for (let j = 0; j < 32; j++) {
      const v = Math.fround(x[i * 32 + j]! * id);
      out[i * 34 + 2 + j] = (Math.sign(v) * Math.round(Math.abs(v))) & 0xff;
    }
  }
  return out;
}

/** Round-to-nearest-even f32 -> f16 bits (finite inputs in f16 range, as block scales are). */
function f32ToF16(v: number): number {
  const f = new Float32Array([v]);
  const b = new Uint32Array(f.buffer)[0]!;
  const sign = (b >>> 16) & 0x8000;
  const e = ((b >>> 23) & 0xff) - 127 + 15;
  const m = b & 0x7fffff;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const mm = m | 0x800000;
    const shift = 14 - e;
    let h = mm >>> shift;
    const rem = mm & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (m >>> 13);
  const rem = m & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

/** A byte array with 16- and 32-bit views of the same bytes where its offset allows them. */
interface Words {
  u8: Uint8Array;
  u16: Uint16Array | null;
  u32: Uint32Array | null;
}
function words(a: Uint8Array): Words {
  return {
    u8: a,
    u16: a.byteOffset % 2 === 0 ? new Uint16Array(a.buffer, a.byteOffset, a.byteLength >> 1) : null,
    u32: a.byteOffset % 4 === 0 ? new Uint32Array(a.buffer, a.byteOffset, a.byteLength >> 2) : null,
  };
}

/**
 * dst[d, d+n) = src[s, s+n), by the widest words both sides allow. A subarray + set per block
 * allocated a typed-array object per call: ~600 MB of short-lived garbage while repacking a 1B
 * Q4_K_M file (the heap sampler's top two sites), and scavenges all through the load.
 */
function copyBytes(src: Words, s: number, dst: Words, d: number, n: number): void {
  if (src.u32 && dst.u32 && ((s | d | n) & 3) === 0) {
    const a = src.u32, b = dst.u32, si = s >> 2, di = d >> 2;
    for (let j = 0; j < n >> 2; j++) b[di + j] = a[si + j]!;
  } else if (src.u16 && dst.u16 && ((s | d | n) & 1) === 0) {
    const a = src.u16, b = dst.u16, si = s >> 1, di = d >> 1;
    for (let j = 0; j < n >> 1; j++) b[di + j] = a[si + j]!;
  } else {
    const a = src.u8, b = dst.u8;
    for (let j = 0; j < n; j++) b[d + j] = a[s + j]!;
  }
}

/**
 * Split blocks of an f16 scale followed by quant bytes (Q8_0: 34-byte blocks of 32 int8; Q4_0: 18-byte
 * blocks of 16 nibble bytes), rows after rows, into the quant bytes back to back (`quants`) and the
 * scales as f32 (`ds`): the layout the CPU engine computes on (engine/cpu/qkernels.ts). Returns the
 * index of the first block whose scale is not finite, or -1.
 */
export function splitScaledBlocks(bytes: Uint8Array, blockBytes: number, quants: Uint8Array, ds: Float32Array): number {
  const nb = ds.length, q = blockBytes - 2;
  if (bytes.byteLength !== nb * blockBytes || quants.byteLength !== nb * q) throw new Error(`splitScaledBlocks: ${bytes.byteLength} bytes for ${nb} blocks of ${blockBytes}`);
  // Word copies (copyBytes): a subarray + set per block (the first version) cost 5.9 of the 8.4 s
  // a 1.3 GB Q8_0 file took to load.
  const src = words(bytes), dst = words(quants);
  let bad = -1;
  for (let i = 0; i < nb; i++) {
    const o = i * blockBytes;
    const d = half(bytes, o);
    if (bad < 0 && !Number.isFinite(d)) bad = i;
    ds[i] = d;
    copyBytes(src, o + 2, dst, i * q, q);
  }
  return bad;
}

/**
 * Repack Q4_K blocks (`bytes`, 144 each, rows after rows) into the CPU engine's layout
 * (engine/cpu/qkernels.ts): `nibbles` the blocks' 128 quant bytes each, back to back; `meta` 24
 * bytes per block: d and dmin as f32, then the 8 six-bit scales and the 8 mins as bytes. Returns
 * the index of the first block whose d or dmin is not finite, or -1.
 */
export function repackQ4_K(bytes: Uint8Array, nibbles: Uint8Array, meta: Uint8Array): number {
  const nb = bytes.byteLength / 144;
  if (!Number.isInteger(nb) || nibbles.byteLength !== nb * 128 || meta.byteLength !== nb * 24) throw new Error(`repackQ4_K: ${bytes.byteLength} bytes do not match the destinations`);
  const dv = new DataView(meta.buffer, meta.byteOffset, meta.byteLength);
  const sm = new Int32Array(2);
  const src = words(bytes), dst = words(nibbles);
  let bad = -1;
  for (let i = 0; i < nb; i++) {
    const o = i * 144;
    const d = half(bytes, o), dmin = half(bytes, o + 2);
    if (bad < 0 && !(Number.isFinite(d) && Number.isFinite(dmin))) bad = i;
    dv.setFloat32(i * 24, d, true);
    dv.setFloat32(i * 24 + 4, dmin, true);
    for (let j = 0; j < 8; j++) {
      scaleMinK4(bytes, o + 4, j, sm);
      meta[i * 24 + 8 + j] = sm[0]!;
      meta[i * 24 + 16 + j] = sm[1]!;
    }
    copyBytes(src, o + 16, dst, i * 128, 128);
  }
  return bad;
}

/**
 * Repack Q5_K blocks (`bytes`, 176 each) into the CPU engine's layout (engine/cpu/qkernels.ts): `quants`
 * per block the 128 low-nibble bytes (as Q4_K's) then the 32 high-bit bytes; `meta` 24 bytes per block as
 * Q4_K's (d, dmin as f32, the 8 scales, the 8 mins). Returns the first block whose d or dmin is not finite, or -1.
 */
export function repackQ5_K(bytes: Uint8Array, quants: Uint8Array, meta: Uint8Array): number {
  const nb = bytes.byteLength / 176;
  if (!Number.isInteger(nb) || quants.byteLength !== nb * 160 || meta.byteLength !== nb * 24) throw new Error(`repackQ5_K: ${bytes.byteLength} bytes do not match the destinations`);
  const dv = new DataView(meta.buffer, meta.byteOffset, meta.byteLength);
  const sm = new Int32Array(2);
  const src = words(bytes), dst = words(quants);
  let bad = -1;
  for (let i = 0; i < nb; i++) {
    const o = i * 176;
    const d = half(bytes, o), dmin = half(bytes, o + 2);
    if (bad < 0 && !(Number.isFinite(d) && Number.isFinite(dmin))) bad = i;
    dv.setFloat32(i * 24, d, true);
    dv.setFloat32(i * 24 + 4, dmin, true);
    for (let j = 0; j < 8; j++) {
      scaleMinK4(bytes, o + 4, j, sm);
      meta[i * 24 + 8 + j] = sm[0]!;
      meta[i * 24 + 16 + j] = sm[1]!;
    }
    copyBytes(src, o + 48, dst, i * 160, 128);
    copyBytes(src, o + 16, dst, i * 160 + 128, 32);
  }
  return bad;
}

/**
 * Repack Q6_K blocks (`bytes`, 210 each) into the CPU engine's layout (engine/cpu/qkernels.ts):
 * `quants` 192 bytes per block, the file's ql/qh bits rearranged into four steps of 64 consecutive
 * weights so that each code is one mask (or, for the step's last 16, three masked shifts) away:
 * with q0..q3 the codes of lane i of step s's groups of 16, A = q0 | (q3 & 3) << 6 at 48s + i,
 * B = q1 | (q3 >> 2 & 3) << 6 at 48s + 16 + i, C = q2 | (q3 >> 4) << 6 at 48s + 32 + i; `meta` 20
 * bytes per block: d as f32, then the 16 int8 scales. Returns the index of the first block whose d
 * is not finite, or -1.
 */
export function repackQ6_K(bytes: Uint8Array, quants: Uint8Array, meta: Uint8Array): number {
  const nb = bytes.byteLength / 210;
  if (!Number.isInteger(nb) || quants.byteLength !== nb * 192 || meta.byteLength !== nb * 20) throw new Error(`repackQ6_K: ${bytes.byteLength} bytes do not match the destinations`);
  const dv = new DataView(meta.buffer, meta.byteOffset, meta.byteLength);
  const sv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const qv = new DataView(quants.buffer, quants.byteOffset, quants.byteLength);
  const src = words(bytes), dm = words(meta);
  let bad = -1;
  for (let i = 0; i < nb; i++) {
    const o = i * 210, w = i * 192;
    const d = half(bytes, o + 208);
    if (bad < 0 && !Number.isFinite(d)) bad = i;
    // In the file, weight 128h + 32k + l (k = 0..3, l = 0..31) has its low four bits in
    // ql[64h + 32(k & 1) + l] (low nibble for k < 2, high for k >= 2) and its high two in
    // qh[32h + l] at bit 2k. Step s = 2h + e holds k = 2e (groups 0, 1: l < 16, l >= 16) and
    // k = 2e + 1 (groups 2, 3). Four l at a time, as bytes in a 32-bit word: every shift is
    // masked so that no bit crosses into another byte.
    for (let s = 0; s < 4; s++) {
      const h = s >> 1, sh = 4 * (s & 1);
      const ql = o + 64 * h, qh = o + 128 + 32 * h, out = w + 48 * s;
      for (let l = 0; l < 16; l += 4) {
        const Hlo = sv.getUint32(qh + l, true), Hhi = sv.getUint32(qh + 16 + l, true);
        const q0 = ((sv.getUint32(ql + l, true) >>> sh) & 0x0f0f0f0f) | (((Hlo >>> sh) & 0x03030303) << 4);
        const q1 = ((sv.getUint32(ql + 16 + l, true) >>> sh) & 0x0f0f0f0f) | (((Hhi >>> sh) & 0x03030303) << 4);
        const q2 = ((sv.getUint32(ql + 32 + l, true) >>> sh) & 0x0f0f0f0f) | (((Hlo >>> (sh + 2)) & 0x03030303) << 4);
        const q3 = ((sv.getUint32(ql + 48 + l, true) >>> sh) & 0x0f0f0f0f) | (((Hhi >>> (sh + 2)) & 0x03030303) << 4);
        qv.setUint32(out + l, q0 | ((q3 & 0x03030303) << 6), true);
        qv.setUint32(out + 16 + l, q1 | ((q3 & 0x0c0c0c0c) << 4), true);
        qv.setUint32(out + 32 + l, q2 | ((q3 & 0x30303030) << 2), true);
      }
    }
    dv.setFloat32(i * 20, d, true);
    copyBytes(src, o + 192, dm, i * 20 + 4, 16);
  }
  return bad;
}

/**
 * Widen `n` quantized values (`bytes`: n / blockElems consecutive ggml blocks, row after row) to
 * f32. `file` names the source in error messages.
 */
export function dequantize(type: GgmlType, bytes: Uint8Array, n: number, file = "quantized tensor"): Float32Array {
  const block = QUANT_BLOCK.get(type);
  if (!block) {
    throw new ModelFileError(
      file,
      `ggml type ${type} cannot be dequantized by this build`,
      "convert the model to F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant (Q2_K..Q6_K)",
    );
  }
  const [name, qk, bs] = block;
  if (!Number.isSafeInteger(n) || n < 0 || n % qk !== 0) {
    throw new ModelFileError(file, `${name} data of ${n} elements is not a whole number of ${qk}-element blocks`);
  }
  const nb = n / qk;
  if (bytes.byteLength < nb * bs) {
    throw new ModelFileError(file, `truncated: ${n} ${name} elements need ${nb * bs} bytes but only ${bytes.byteLength} are present`);
  }
  const y = new Float32Array(n);
  switch (type) {
    case Q4_0: q4_0(bytes, y, nb); break;
    case Q4_1: q4_1(bytes, y, nb); break;
    case Q5_0: q5_0(bytes, y, nb); break;
    case Q5_1: q5_1(bytes, y, nb); break;
    case Q8_0: q8_0(bytes, y, nb); break;
    case Q2_K: q2_K(bytes, y, nb); break;
    case Q3_K: q3_K(bytes, y, nb); break;
    case Q4_K: q4_K(bytes, y, nb); break;
    case Q5_K: q5_K(bytes, y, nb); break;
    case Q6_K: q6_K(bytes, y, nb); break;
    default: throw new Error(`unreachable: ${type}`);
  }
  return y;
}

// ---------------------------------------------------------------- 32-element blocks

// block_q4_0 (18 bytes): fp16 d, 16 bytes of nibbles. Element j is the low nibble of byte j,
// element j+16 the high nibble; value = (q - 8) * d.
function q4_0(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 18;
    const d = half(b, o);
    const yo = i * 32;
    for (let j = 0; j < 16; j++) {
      const q = b[o + 2 + j]!;
      y[yo + j] = fround(((q & 0x0f) - 8) * d);
      y[yo + j + 16] = fround(((q >> 4) - 8) * d);
    }
  }
}

// block_q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; value = q * d + m.
function q4_1(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 20;
    const d = half(b, o);
    const m = half(b, o + 2);
    const yo = i * 32;
    for (let j = 0; j < 16; j++) {
      const q = b[o + 4 + j]!;
      y[yo + j] = fround(fround((q & 0x0f) * d) + m);
      y[yo + j + 16] = fround(fround((q >> 4) * d) + m);
    }
  }
}

/** The little-endian u32 at bytes[o] (unsigned). */
function u32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}

// block_q5_0 (22 bytes): fp16 d, u32 qh (fifth bits), 16 bytes of nibbles. Bit j of qh is the
// fifth bit of element j, bit j+16 that of element j+16; value = (q - 16) * d.
function q5_0(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 22;
    const d = half(b, o);
    const qh = u32(b, o + 2);
    const yo = i * 32;
    for (let j = 0; j < 16; j++) {
      const q = b[o + 6 + j]!;
      const h0 = ((qh >>> j) << 4) & 0x10;
      const h1 = (qh >>> (j + 12)) & 0x10;
      y[yo + j] = fround((((q & 0x0f) | h0) - 16) * d);
      y[yo + j + 16] = fround((((q >> 4) | h1) - 16) * d);
    }
  }
}

// block_q5_1 (24 bytes): fp16 d, fp16 m, u32 qh, 16 bytes of nibbles; value = q * d + m.
function q5_1(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 24;
    const d = half(b, o);
    const m = half(b, o + 2);
    const qh = u32(b, o + 4);
    const yo = i * 32;
    for (let j = 0; j < 16; j++) {
      const q = b[o + 8 + j]!;
      const h0 = ((qh >>> j) << 4) & 0x10;
      const h1 = (qh >>> (j + 12)) & 0x10;
      y[yo + j] = fround(fround(((q & 0x0f) | h0) * d) + m);
      y[yo + j + 16] = fround(fround(((q >> 4) | h1) * d) + m);
    }
  }
}

// block_q8_0 (34 bytes): fp16 d, 32 int8 quants; value = q * d.
function q8_0(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 34;
    const d = half(b, o);
    const yo = i * 32;
    for (let j = 0; j < 32; j++) {
      y[yo + j] = fround(((b[o + 2 + j]! << 24) >> 24) * d);
    }
  }
}

// ---------------------------------------------------------------- K-quants (256-element super-blocks)

// block_q2_K (84 bytes): 16 bytes scales (low nibble: scale, high nibble: min, per 16 elements),
// 64 bytes of 2-bit quants, fp16 d, fp16 dmin. Each 128-element half reads 32 quant bytes four
// times at shifts 0, 2, 4, 6; value = (d * sc) * q - (dmin * m).
function q2_K(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 84;
    const d = half(b, o + 80);
    const dmin = half(b, o + 82);
    let is = 0;
    let yi = i * 256;
    for (let n = 0; n < 2; n++) {
      const q = o + 16 + n * 32;
      for (let shift = 0; shift < 8; shift += 2) {
        for (let half16 = 0; half16 < 32; half16 += 16) {
          const sc = b[o + is++]!;
          const dl = fround(d * (sc & 0x0f));
          const ml = fround(dmin * (sc >> 4));
          for (let l = 0; l < 16; l++) y[yi++] = fround(fround(dl * ((b[q + half16 + l]! >> shift) & 3)) - ml);
        }
      }
    }
  }
}

// block_q3_K (110 bytes): 32 bytes hmask (third bit), 64 bytes of 2-bit quants, 12 bytes of
// sixteen 6-bit scales (low 4 bits in bytes 0..7, high 2 bits packed in bytes 8..11), fp16 d.
// value = (d * (scale - 32)) * (q - (high bit set ? 0 : 4)).
function q3_K(b: Uint8Array, y: Float32Array, nb: number): void {
  const scales = new Int32Array(16);
  for (let i = 0; i < nb; i++) {
    const o = i * 110;
    const hm = o;
    const s = o + 96;
    const dAll = half(b, o + 108);
    for (let k = 0; k < 16; k++) {
      const low = k < 8 ? b[s + k]! & 0x0f : b[s + k - 8]! >> 4;
      const high = (b[s + 8 + (k & 3)]! >> (2 * (k >> 2))) & 3;
      scales[k] = (low | (high << 4)) - 32;
    }
    let is = 0;
    let m = 1;
    let yi = i * 256;
    for (let n = 0; n < 2; n++) {
      const q = o + 32 + n * 32;
      for (let shift = 0; shift < 8; shift += 2) {
        for (let half16 = 0; half16 < 32; half16 += 16) {
          const dl = fround(dAll * scales[is++]!);
          for (let l = 0; l < 16; l++) {
            const v = ((b[q + half16 + l]! >> shift) & 3) - (b[hm + half16 + l]! & m ? 0 : 4);
            y[yi++] = fround(dl * v);
          }
        }
        m <<= 1;
      }
    }
  }
}

/**
 * The j-th (0..7) 6-bit scale and min of a Q4_K/Q5_K block's 12-byte `scales` field at bytes[s]
 * (ggml's get_scale_min_k4): j < 4 are the low 6 bits of bytes j and j+4; j >= 4 take their low
 * 4 bits from byte j+4 and their top 2 bits from the spare top bits of bytes j-4 and j.
 */
function scaleMinK4(b: Uint8Array, s: number, j: number, out: Int32Array): void {
  if (j < 4) {
    out[0] = b[s + j]! & 63;
    out[1] = b[s + j + 4]! & 63;
  } else {
    out[0] = (b[s + j + 4]! & 0x0f) | ((b[s + j - 4]! >> 6) << 4);
    out[1] = (b[s + j + 4]! >> 4) | ((b[s + j]! >> 6) << 4);
  }
}

// block_q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes scales/mins, 128 bytes of nibbles. Each
// 64-element chunk uses 32 quant bytes: low nibbles with scale pair 2c, high nibbles with 2c+1;
// value = (d * sc) * q - (dmin * m).
function q4_K(b: Uint8Array, y: Float32Array, nb: number): void {
  const sm = new Int32Array(2);
  for (let i = 0; i < nb; i++) {
    const o = i * 144;
    const d = half(b, o);
    const dmin = half(b, o + 2);
    let yi = i * 256;
    for (let c = 0; c < 4; c++) {
      const q = o + 16 + c * 32;
      scaleMinK4(b, o + 4, 2 * c, sm);
      const d1 = fround(d * sm[0]!);
      const m1 = fround(dmin * sm[1]!);
      scaleMinK4(b, o + 4, 2 * c + 1, sm);
      const d2 = fround(d * sm[0]!);
      const m2 = fround(dmin * sm[1]!);
      for (let l = 0; l < 32; l++) y[yi++] = fround(fround(d1 * (b[q + l]! & 0x0f)) - m1);
      for (let l = 0; l < 32; l++) y[yi++] = fround(fround(d2 * (b[q + l]! >> 4)) - m2);
    }
  }
}

// block_q5_K (176 bytes): fp16 d, fp16 dmin, 12 bytes scales/mins, 32 bytes qh (fifth bits),
// 128 bytes of nibbles. Chunk c takes its fifth bits from qh bits 2c (low nibbles) and 2c+1
// (high nibbles); value = (d * sc) * (q + 16 * bit) - (dmin * m).
function q5_K(b: Uint8Array, y: Float32Array, nb: number): void {
  const sm = new Int32Array(2);
  for (let i = 0; i < nb; i++) {
    const o = i * 176;
    const d = half(b, o);
    const dmin = half(b, o + 2);
    const qh = o + 16;
    let yi = i * 256;
    for (let c = 0; c < 4; c++) {
      const ql = o + 48 + c * 32;
      const u1 = 1 << (2 * c);
      const u2 = 2 << (2 * c);
      scaleMinK4(b, o + 4, 2 * c, sm);
      const d1 = fround(d * sm[0]!);
      const m1 = fround(dmin * sm[1]!);
      scaleMinK4(b, o + 4, 2 * c + 1, sm);
      const d2 = fround(d * sm[0]!);
      const m2 = fround(dmin * sm[1]!);
      for (let l = 0; l < 32; l++) y[yi++] = fround(fround(d1 * ((b[ql + l]! & 0x0f) + (b[qh + l]! & u1 ? 16 : 0))) - m1);
      for (let l = 0; l < 32; l++) y[yi++] = fround(fround(d2 * ((b[ql + l]! >> 4) + (b[qh + l]! & u2 ? 16 : 0))) - m2);
    }
  }
}

// block_q6_K (210 bytes): 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales,
// fp16 d. Each 128-element half uses 64 ql bytes, 32 qh bytes and 8 scales; element l + 32k
// (k = 0..3) combines a nibble of ql[l] / ql[l+32] with bits 2k..2k+1 of qh[l];
// value = (d * scale) * (q - 32), evaluated left to right as in C.
function q6_K(b: Uint8Array, y: Float32Array, nb: number): void {
  for (let i = 0; i < nb; i++) {
    const o = i * 210;
    const d = half(b, o + 208);
    for (let n = 0; n < 2; n++) {
      const ql = o + n * 64;
      const qh = o + 128 + n * 32;
      const sc = o + 192 + n * 8;
      const yo = i * 256 + n * 128;
      for (let l = 0; l < 32; l++) {
        const is = l >> 4;
        const lo = b[ql + l]!;
        const hi = b[ql + l + 32]!;
        const h = b[qh + l]!;
        const q1 = ((lo & 0x0f) | ((h & 3) << 4)) - 32;
        const q2 = ((hi & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
        const q3 = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32;
        const q4 = ((hi >> 4) | (((h >> 6) & 3) << 4)) - 32;
        y[yo + l] = fround(fround(d * ((b[sc + is]! << 24) >> 24)) * q1);
        y[yo + l + 32] = fround(fround(d * ((b[sc + is + 2]! << 24) >> 24)) * q2);
        y[yo + l + 64] = fround(fround(d * ((b[sc + is + 4]! << 24) >> 24)) * q3);
        y[yo + l + 96] = fround(fround(d * ((b[sc + is + 6]! << 24) >> 24)) * q4);
      }
    }
  }
}
