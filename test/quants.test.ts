// GGUF quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) dequantize bit-exactly as
// llama.cpp does. The reference is llama.cpp itself: the libggml-base shared library of
// node-llama-cpp's prebuilt platform package (@node-llama-cpp/linux-x64 in CI), called through the
// koffi FFI. ggml quantizes deterministic random tensors (ggml_quantize_chunk), then both ggml's
// dequantize_row_<type> and ours widen them, and the f32 results are compared bit for bit; random
// block bytes cover the scale codes and fp16 patterns the quantizer never writes.
//
// Without the reference (koffi or the library missing or not loadable) the comparisons are skipped
// locally with the reason, and FAIL under CI. SELFSCOPE_GGML_BASE=/path/to/libggml-base.so points
// at another build; SELFSCOPE_QUANT_SEED changes the random data.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ModelFileError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { GgmlType, ggmlBlock, readGguf, readGgufTensor } from "../src/io/gguf.js";
import { dequantize, quantizeQ8_0 } from "../src/io/gguf-quants.js";
import { loadGgml, rowBytes, TYPES, type Ggml } from "../src/reference/ggml.js";

const SEED = Number(process.env.SELFSCOPE_QUANT_SEED ?? 1234567);
const N_PER_ROW = 768; // three 256-element super-blocks, 24 32-element blocks per row

// ---- test data ---------------------------------------------------------------------------------

function gaussian(rng: Rng): number {
  const u = 1 - rng.next();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
}

/** Rows that stress the quantizers: zeros, outliers, signs, offsets, tiny and huge magnitudes. */
const ROWS: [name: string, value: (rng: Rng, i: number) => number][] = [
  ["zeros", () => 0],
  ["gaussian", (r) => gaussian(r)],
  ["outliers", (r) => (r.next() < 0.02 ? (r.next() < 0.5 ? -1 : 1) * 10 ** (2 + 2 * r.next()) : gaussian(r))],
  ["tiny (fp16-subnormal scales)", (r) => (r.next() < 0.1 ? 0 : gaussian(r) * 1e-6)],
  ["f32-subnormal", (r) => (r.next() < 0.5 ? gaussian(r) * 1e-39 : gaussian(r) * 1e-30)],
  ["all negative", (r) => -Math.abs(gaussian(r)) - 0.5],
  ["positive offset", (r) => Math.abs(gaussian(r)) + 3],
  ["magnitude per block", (r, i) => gaussian(r) * 10 ** (-8 + 12 * frac(Math.sin((i >> 5) * 12.9898 + SEED) * 43758.5453))],
  ["large", (r) => gaussian(r) * 1e4],
  ["sparse and constant", (r, i) => ((i >> 5) % 3 === 0 ? 0.75 : r.next() < 0.05 ? gaussian(r) * 5 : 0)],
];

function frac(x: number): number {
  return x - Math.floor(x);
}

function testTensor(seed: number): Float32Array {
  const rng = new Rng(seed);
  const x = new Float32Array(ROWS.length * N_PER_ROW);
  ROWS.forEach(([, f], row) => {
    for (let i = 0; i < N_PER_ROW; i++) x[row * N_PER_ROW + i] = f(rng, i);
  });
  return x;
}

// ---- comparison --------------------------------------------------------------------------------

/** Index of the first value whose bits differ (NaNs equal only if `nanEqual`), or -1. */
function firstBitDifference(a: Float32Array, b: Float32Array, nanEqual = false): number {
  assert.equal(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) {
    if (ua[i] !== ub[i] && !(nanEqual && Number.isNaN(a[i]) && Number.isNaN(b[i]))) return i;
  }
  return -1;
}

function assertBitEqual(ours: Float32Array, ref: Float32Array, what: string, nanEqual = false): void {
  const i = firstBitDifference(ours, ref, nanEqual);
  if (i >= 0) {
    const bits = (v: number) => "0x" + (new Uint32Array(new Float32Array([v]).buffer)[0]! >>> 0).toString(16).padStart(8, "0");
    assert.fail(`${what}: element ${i} is ${ours[i]} (${bits(ours[i]!)}) but llama.cpp gives ${ref[i]} (${bits(ref[i]!)})`);
  }
}

// ---- a minimal GGUF writer for quantized tensors ------------------------------------------------

interface RawTensor {
  name: string;
  shape: number[]; // row-major
  type: GgmlType;
  bytes: Uint8Array;
}

/** GGUF v3 with `general.alignment` set and the tensors' raw block bytes; returns each tensor's data offset. */
function writeQuantGguf(file: string, tensors: RawTensor[], alignment = 64): number[] {
  const parts: Buffer[] = [];
  const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); parts.push(b); };
  const u64 = (v: number) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); parts.push(b); };
  const str = (s: string) => { const b = Buffer.from(s, "utf8"); u64(b.length); parts.push(b); };
  const pad = (n: number) => (alignment - (n % alignment)) % alignment;
  parts.push(Buffer.from("GGUF"));
  u32(3);
  u64(tensors.length);
  u64(1);
  str("general.alignment");
  u32(4); // GGUF UINT32
  u32(alignment);
  let rel = 0;
  const rels: number[] = [];
  for (const t of tensors) {
    str(t.name);
    u32(t.shape.length);
    for (const d of [...t.shape].reverse()) u64(d);
    u32(t.type);
    u64(rel);
    rels.push(rel);
    rel += t.bytes.byteLength + pad(t.bytes.byteLength);
  }
  const headerLen = parts.reduce((a, b) => a + b.byteLength, 0);
  parts.push(Buffer.alloc(pad(headerLen)));
  for (const t of tensors) parts.push(Buffer.from(t.bytes), Buffer.alloc(pad(t.bytes.byteLength)));
  fs.writeFileSync(file, Buffer.concat(parts));
  return rels.map((r) => headerLen + pad(headerLen) + r);
}

// ---- tests -------------------------------------------------------------------------------------

describe("GGUF quantized tensors dequantize bit-exactly as llama.cpp", () => {
  let ggml: Ggml | undefined;
  let skipReason = "";
  let tmp = "";

  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-quants-"));
    try {
      ggml = await loadGgml();
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (process.env.CI) throw new Error(`the llama.cpp reference must run in CI, but: ${msg}`, { cause: e });
      skipReason = `no llama.cpp reference: ${msg}`;
    }
  });

  after(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** A test that needs llama.cpp: skipped with the reason outside CI when it is unavailable. */
  function refTest(name: string, fn: (g: Ggml, t: TestContext) => void): void {
    test(name, (t) => {
      if (!ggml) {
        if (process.env.CI) assert.fail("the llama.cpp reference failed to load (see the before hook)");
        t.skip(skipReason);
        return;
      }
      fn(ggml, t);
    });
  }

  refTest("the reference is loaded", (g, t) => {
    t.diagnostic(`koffi ${g.koffiVersion}, ${g.lib}, seed ${SEED}`);
  });

  refTest("quantizeQ8_0 (the fixture and bench writer) writes ggml's Q8_0 bytes", (g, t) => {
    for (const seed of [SEED, SEED + 1]) {
      const x = testTensor(seed);
      const ref = g.quantize(GgmlType.Q8_0, x, ROWS.length, N_PER_ROW);
      const ours = quantizeQ8_0(x);
      const bad = ours.findIndex((b, i) => b !== ref[i]);
      assert.equal(bad, -1, `seed ${seed}: byte ${bad} (block ${Math.floor(bad / 34)}) is ${ours[bad]}, ggml writes ${ref[bad]}`);
    }
    t.diagnostic(`${2 * ROWS.length * N_PER_ROW} values quantized byte-identically`);
  });

  for (const [type] of TYPES) {
    refTest(`${GgmlType[type]}: ggml-quantized rows dequantize to the same f32 bits`, (g, t) => {
      let compared = 0;
      for (const seed of [SEED, SEED + 1, SEED + 2]) {
        const x = testTensor(seed);
        const q = g.quantize(type, x, ROWS.length, N_PER_ROW);
        const ref = g.dequantize(type, q, x.length);
        const ours = dequantize(type, q, x.length);
        // Row by row, so a failure names the kind of data that broke it.
        ROWS.forEach(([rowName], r) => {
          const s = r * N_PER_ROW;
          assertBitEqual(ours.subarray(s, s + N_PER_ROW), ref.subarray(s, s + N_PER_ROW), `${GgmlType[type]} seed ${seed} row "${rowName}"`);
        });
        compared += x.length;
        // The comparison means something only if ggml really quantized: the gaussian row survives
        // with a bounded error (Q2_K is the coarsest) and the zero row stays zero.
        const g1 = N_PER_ROW;
        let err = 0;
        let norm = 0;
        for (let i = g1; i < g1 + N_PER_ROW; i++) {
          err += (ref[i]! - x[i]!) ** 2;
          norm += x[i]! ** 2;
        }
        assert.ok(Math.sqrt(err / norm) < 0.5, `${GgmlType[type]}: llama.cpp's round trip error ${Math.sqrt(err / norm)} is implausible`);
        assert.ok(ref.subarray(0, N_PER_ROW).every((v) => v === 0), `${GgmlType[type]}: zeros do not round-trip`);
      }
      t.diagnostic(`${GgmlType[type]}: ${compared} values bit-identical`);
    });

    refTest(`${GgmlType[type]}: arbitrary block bytes (every scale, nibble and fp16 pattern) dequantize identically`, (g, t) => {
      // Random bytes reach what the quantizer never writes: fp16 subnormal, Inf and NaN scales,
      // every 6-bit scale/min code. NaN payloads are not portable through JS, so any NaN matches any NaN.
      const rng = new Rng(SEED ^ (type * 7919));
      const nBlocks = 512;
      const [e, b] = ggmlBlock(type)!;
      const bytes = new Uint8Array(nBlocks * b);
      for (let i = 0; i < bytes.length; i++) bytes[i] = rng.nextU32() & 0xff;
      const ref = g.dequantize(type, bytes, nBlocks * e);
      const ours = dequantize(type, bytes, nBlocks * e);
      assertBitEqual(ours, ref, `${GgmlType[type]} random blocks`, true);
      const nan = ref.reduce((a, v) => a + (Number.isNaN(v) ? 1 : 0), 0);
      t.diagnostic(`${GgmlType[type]}: ${ref.length} values from random blocks bit-identical (${nan} NaN)`);
    });
  }

  refTest("readGgufTensor dequantizes quantized tensors of a GGUF file as llama.cpp does", (g) => {
    const x = testTensor(SEED + 99);
    const tensors: RawTensor[] = TYPES.map(([type]) => ({
      name: `blk.0.${GgmlType[type]}.weight`,
      shape: type === GgmlType.Q4_K ? [2, 5, N_PER_ROW] : [ROWS.length, N_PER_ROW],
      type,
      bytes: g.quantize(type, x, ROWS.length, N_PER_ROW),
    }));
    const file = path.join(tmp, "quants.gguf");
    const offsets = writeQuantGguf(file, tensors);
    const f = readGguf(file);
    tensors.forEach((t, i) => {
      const info = f.tensors.get(t.name)!;
      assert.equal(info.type, t.type);
      assert.equal(info.offset, offsets[i]);
      assert.equal(info.byteLength, t.bytes.byteLength);
      const { data, shape } = readGgufTensor(f, t.name);
      assert.deepEqual(shape, t.shape);
      assertBitEqual(data, g.dequantize(t.type, t.bytes, x.length), `readGgufTensor ${t.name}`);
    });
  });

  test("a truncated quantized tensor is a ModelFileError, not garbage", () => {
    // Block bytes need not be valid for this: only the sizes are checked.
    const rng = new Rng(SEED);
    const tensors: RawTensor[] = TYPES.map(([type]) => {
      const bytes = new Uint8Array(rowBytes(type, N_PER_ROW) * 2);
      for (let i = 0; i < bytes.length; i++) bytes[i] = rng.nextU32() & 0xff;
      return { name: GgmlType[type]!, shape: [2, N_PER_ROW], type, bytes };
    });
    const file = path.join(tmp, "truncated.gguf");
    const offsets = writeQuantGguf(file, tensors);
    const last = tensors.at(-1)!;
    fs.truncateSync(file, offsets.at(-1)! + last.bytes.byteLength - 1);
    assert.throws(() => readGguf(file), (e: unknown) => e instanceof ModelFileError && /truncated/.test(e.message) && e.message.includes(last.name));

    // Direct calls validate too: too few bytes, and element counts that are not whole blocks.
    for (const [type] of TYPES) {
      const [e, b] = ggmlBlock(type)!;
      assert.throws(() => dequantize(type, new Uint8Array(2 * b - 1), 2 * e), ModelFileError);
      assert.throws(() => dequantize(type, new Uint8Array(2 * b), 2 * e - 1), ModelFileError);
      assert.equal(dequantize(type, new Uint8Array(0), 0).length, 0);
    }
    assert.throws(() => dequantize(GgmlType.Q8_K, new Uint8Array(292), 256), ModelFileError);
  });

  test("a K-quant row that is not a whole number of 256-element super-blocks is rejected", () => {
    const file = path.join(tmp, "badshape.gguf");
    writeQuantGguf(file, [{ name: "w", shape: [2, 128], type: GgmlType.Q4_K, bytes: new Uint8Array(144) }]);
    assert.throws(() => readGguf(file), (e: unknown) => e instanceof ModelFileError && /shape/.test(e.message));
  });
});
