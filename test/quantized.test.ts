// Q8_0, Q4_0, Q4_K, Q6_K and BF16 weights kept in their format on the CPU engine (issue 16 §1): the
// kernels against a float64 reference on ggml's dequantized values, the engine against its own f32
// path on the same file, and both against llama.cpp. K-quant files are quantized by ggml itself (src/reference/ggml.ts).
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { DEFAULT_KERNEL } from "../src/engine/cpu/kernels.js";
import { CpuRuntime } from "../src/engine/cpu/runtime.js";
import { GgmlType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf } from "../src/io/gguf.js";
import { dequantize, quantizeQ8_0, repackQ4_K, repackQ5_K, repackQ6_K, splitScaledBlocks } from "../src/io/gguf-quants.js";
import { loadGgml } from "../src/reference/ggml.js";
import type { LossAndGradRequest } from "../src/engine/grad.js";
import { loadHostModel, type FileFacts } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { PROTOCOL_RECIPE, vectorCacheKey } from "../src/vectors/extract.js";
import { compareLogits, llamaCppLogits } from "../src/reference/llamacpp.js";
import { fixture } from "./support/paths.js";
import { checkSameModel, type InjectArgs } from "../src/eval/inject.js";
import { readRun } from "../src/eval/runlog.js";
import { inject, resume } from "../src/recipes/inject.js";

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296 - 0.5;
  };
}

test("quantizeQ8_0 round-trips through dequantize within half a quantization step", () => {
  const r = rng(3);
  const x = Float32Array.from({ length: 32 * 40 }, () => r() * 4);
  x.fill(0, 64, 96); // an all-zero block: scale 0
  const y = dequantize(GgmlType.Q8_0, quantizeQ8_0(x), x.length);
  for (let b = 0; b < 40; b++) {
    const blk = x.subarray(b * 32, b * 32 + 32);
    const d = Math.max(...blk.map(Math.abs)) / 127;
    // Half a step, plus the scale's f16 rounding (2^-11 relative) times the largest quant.
    for (let j = 0; j < 32; j++) assert.ok(Math.abs(y[b * 32 + j]! - blk[j]!) <= d * (0.5 + 127 / 2048) + 1e-12, `block ${b} value ${j}`);
  }
  assert.throws(() => quantizeQ8_0(new Float32Array(33)), /whole number of 32-value blocks/);
});

for (const threads of [1, 2]) {
  test(`qgemm on Q8_0 rows equals the float64 product of the dequantized weights (${threads} thread${threads > 1 ? "s" : ""})`, async () => {
    const rt = await CpuRuntime.create({ threads });
    try {
      const r = rng(7);
      // M < 9: the direct kernels (every remainder of 4 rows); M >= 9: dequantized chunks + f32 gemm.
      for (const [M, N, K] of [[1, 5, 32], [2, 7, 64], [3, 9, 96], [4, 33, 128], [5, 17, 64], [9, 40, 96], [17, 77, 256], [1, 1000, 768], [33, 300, 768]] as const) {
        const wq = rt.allocBytes(N * K), ws = rt.allocBytes((N * K) / 8);
        const x = rt.alloc(M * K), y = rt.alloc(M * N);
        const q = Int8Array.from({ length: N * K }, () => Math.round(r() * 254));
        const d = Float32Array.from({ length: (N * K) / 32 }, () => r() * 0.02);
        const xs = Float32Array.from({ length: M * K }, () => r() * 2);
        new Int8Array(rt.memory.buffer).set(q, wq);
        rt.f32.set(d, ws / 4);
        rt.f32.set(xs, x);
        rt.f32.fill(1, y, y + M * N);
        rt.qgemm({ x, ldx: K, wq, ws, y, ldy: N, M, N, K, accumulate: true });
        const out = rt.f32.slice(y, y + M * N);
        for (let m = 0; m < M; m++)
          for (let n = 0; n < N; n++) {
            let s = 1, a = 1;
            for (let k = 0; k < K; k++) {
              const p = xs[m * K + k]! * q[n * K + k]! * d[(n * K + k) >> 5]!;
              s += p;
              a += Math.abs(p);
            }
            assert.ok(Math.abs(out[m * N + n]! - s) <= 1e-6 * a, `M ${M} N ${N} K ${K}: y[${m}][${n}] ${out[m * N + n]} vs ${s}`);
          }
      }
      assert.throws(() => rt.qgemm({ x: 0, ldx: 40, wq: 0, ws: 0, y: 0, ldy: 1, M: 1, N: 1, K: 40 }), /K a multiple of 32/);
    } finally {
      await rt.dispose();
    }
  });
}

const h16 = (v: number) => {
  const b = new Uint32Array(new Float32Array([v]).buffer)[0]!;
  return ((b >>> 16) & 0x8000) | ((((b >>> 23) & 255) - 112) << 10) | ((b >>> 13) & 0x3ff);
};

/** The K-quants: ggml block bytes, where d (and dmin) sit, and how our layout repacks them. */
const KQUANTS = [
  { type: "q4_k", ggml: GgmlType.Q4_K, elems: 256, bytes: 144, halves: [0, 2], wq: 128, ws: 24, repack: repackQ4_K },
  { type: "q5_k", ggml: GgmlType.Q5_K, elems: 256, bytes: 176, halves: [0, 2], wq: 160, ws: 24, repack: repackQ5_K },
  { type: "q6_k", ggml: GgmlType.Q6_K, elems: 256, bytes: 210, halves: [208], wq: 192, ws: 20, repack: repackQ6_K },
  { type: "q4_0", ggml: GgmlType.Q4_0, elems: 32, bytes: 18, halves: [0], wq: 16, ws: 4, repack: (b: Uint8Array, q: Uint8Array, m: Uint8Array) => splitScaledBlocks(b, 18, q, new Float32Array(m.buffer, m.byteOffset, m.byteLength / 4)) },
] as const;

for (const kq of KQUANTS)
for (const threads of [1, 2]) {
  test(`qgemm on ${kq.type.toUpperCase()} rows equals the float64 product of ggml's dequantized weights (${threads} thread${threads > 1 ? "s" : ""})`, async () => {
    const rt = await CpuRuntime.create({ threads });
    try {
      const r = rng(11);
      for (const [M, N, K] of [[1, 3, 256], [2, 5, 512], [3, 7, 256], [4, 9, 768], [5, 4, 256], [9, 20, 512], [17, 33, 768], [1, 300, 1024], [33, 100, 768]] as const) {
        // Random block bytes (every quant bit and scale code) with sane fp16 super-block scales.
        const nb = (N * K) / kq.elems;
        const blocks = Uint8Array.from({ length: nb * kq.bytes }, () => Math.floor((r() + 0.5) * 256) & 255);
        const dv = new DataView(blocks.buffer);
        for (let b = 0; b < nb; b++) for (const o of kq.halves) dv.setUint16(b * kq.bytes + o, h16(0.001 + (r() + 0.5) * 0.01), true);
        const ref = dequantize(kq.ggml, blocks, N * K);
        const wq = rt.allocBytes(nb * kq.wq), ws = rt.allocBytes(nb * kq.ws);
        const u8 = new Uint8Array(rt.memory.buffer);
        assert.equal(kq.repack(blocks, u8.subarray(wq, wq + nb * kq.wq), u8.subarray(ws, ws + nb * kq.ws)), -1);
        const x = rt.alloc(M * K), y = rt.alloc(M * N), deq = rt.alloc(N * K);
        const xs = Float32Array.from({ length: M * K }, () => r() * 2);
        rt.f32.set(xs, x);
        rt.qgemm({ type: kq.type, x, ldx: K, wq, ws, y, ldy: N, M, N, K });
        const out = rt.f32.slice(y, y + M * N);
        for (let m = 0; m < M; m++)
          for (let n = 0; n < N; n++) {
            let s = 0, a = 0;
            for (let k = 0; k < K; k++) {
              const p = xs[m * K + k]! * ref[n * K + k]!;
              s += p;
              a += Math.abs(p);
            }
            assert.ok(Math.abs(out[m * N + n]! - s) <= 1e-6 * a, `M ${M} N ${N} K ${K}: y[${m}][${n}] ${out[m * N + n]} vs ${s}`);
          }
        // The dequantization kernel (prefill chunks, f32 copies) is ggml's, bit for bit.
        rt.dequantRows(kq.type, wq, ws, N, K, deq);
        assert.deepEqual(rt.f32.slice(deq, deq + N * K), ref);
      }
      assert.throws(() => rt.qgemm({ type: kq.type, x: 0, ldx: 40, wq: 0, ws: 0, y: 0, ldy: 1, M: 1, N: 1, K: 40 }), new RegExp(`K a multiple of ${kq.elems}`));
    } finally {
      await rt.dispose();
    }
  });
}

describe("a Q8_0 GGUF (stories260K with every 32-aligned matrix in Q8_0)", () => {
  let file = "";
  let f32: Model, q8: Model;
  const ids = [1, 403, 407, 261, 378, 285, 263, 499, 29, 300, 301, 302];
  before(async () => {
    const src = fixture("stories260K-gguf", "stories260K.gguf");
    const g = readGguf(src);
    const tensors = [...g.tensors.keys()].map((name) => {
      const t = readGgufTensor(g, name);
      const cols = t.shape[t.shape.length - 1]!;
      return { name, shape: t.shape, type: t.shape.length === 2 && cols % 32 === 0 ? GgmlType.Q8_0 : GgmlType.F32, data: t.data } as const;
    });
    file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-q8-")), "stories260K-q8_0.gguf");
    writeGguf(file, ggufMetadataForWrite(g), tensors);
    f32 = await Model.load(file, { threads: 1, weights: "f32" });
    q8 = await Model.load(file, { threads: 1, weights: "native" });
  });
  after(() => {
    f32?.dispose();
    q8?.dispose();
  });

  test("keeps the Q8_0 matrices quantized and computes the f32 path's logits up to summation order", async () => {
    const engine = (q8 as unknown as { engine: { quantizedMats: number } }).engine;
    // Per block: qkv, o and gate/up are Q8_0 (down has 172 columns: F32 in the file); plus the embedding and output.
    assert.equal(engine.quantizedMats, 5 * 3 + 2);
    const a = (await f32.forward([{ ids }])).logits[0]!;
    const b = (await q8.forward([{ ids }])).logits[0]!;
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    assert.ok(worst <= 2e-5, `max |Δ| ${worst}`);
    const ga = await f32.generate([{ ids: [1] }], { maxTokens: 24 });
    const gb = await q8.generate([{ ids: [1] }], { maxTokens: 24 });
    assert.deepEqual(gb.tokens, ga.tokens);
  });

  test("agrees with llama.cpp on the same file as closely as the f32 path does", async (t) => {
    const lc = await llamaCppLogits(file, ids, { threads: 1 });
    const against = async (m: Model) => compareLogits((await m.forward([{ ids }])).logits[0]!, lc.logits, ids.length, 512, true);
    const a = await against(f32), b = await against(q8);
    t.diagnostic(`max |Δ log p| vs llama.cpp: f32 path ${a.maxAbs.toExponential(2)}, q8_0 ${b.maxAbs.toExponential(2)}; top-1 ${a.top1}, ${b.top1} of ${ids.length}`);
    // llama.cpp quantizes the activations to 8 bits per 32 for its Q8_0 dot products; we do not.
    assert.ok(Math.abs(b.maxAbs - a.maxAbs) <= 1e-3, `q8_0 ${b.maxAbs} vs f32 ${a.maxAbs}`);
    assert.ok(b.top1 >= ids.length - 1, `top-1 agreement ${b.top1}/${ids.length}`);
  });

  test("is the cpu default for Q8_0 files; a gradient first gives the matrices exact f32 copies", async () => {
    const engineOf = (m: Model) => (m as unknown as { engine: { quantizedMats: number } }).engine;
    const d = await Model.load(file, { threads: 1 });
    try {
      assert.equal(engineOf(d).quantizedMats, 17, "Q8_0 kept by default");
      assert.equal(engineOf(f32).quantizedMats, 0);
      const req: LossAndGradRequest = { params: [{ kind: "vector", at: "blocks.1.hook_resid_post", value: new Float32Array(64).fill(0.1) }], targets: [[-1, 7, 9, 5]] };
      const a = await f32.lossAndGrad([{ ids: ids.slice(0, 4) }], req);
      const b = await d.lossAndGrad([{ ids: ids.slice(0, 4) }], req);
      assert.equal(engineOf(d).quantizedMats, 0, "materialized as f32");
      assert.equal(b.loss, a.loss);
      assert.deepEqual([...b.grads[0]![0]!], [...a.grads[0]![0]!]);
      // After that, forward is the f32 path's exactly.
      assert.deepEqual([...(await d.forward([{ ids }])).logits[0]!], [...(await f32.forward([{ ids }])).logits[0]!]);
    } finally {
      d.dispose();
    }
    await assert.rejects(Model.load(file, { device: "wasm", weights: "native" }), /cpu device only/);
  });
});

/**
 * A llama with dModel 256 (K-quants need rows of 256), stories260K's tokenizer and random weights,
 * quantized by ggml like a Q4_K_M file: Q6_K for the embedding, the output and block 0's v and down
 * projections (so block 0's q, k, v mix Q4_K and Q6_K, as in half the layers of a real Q4_K_M file),
 * Q5_0 for block 1's v (llama-quantize's fallback for rows K-quants cannot take; the cpu kernels
 * lack Q5_0, so it is widened to f32 beside a quantized q and k), Q4_K for every other matrix;
 * norms F32.
 */
/** every: all matrices in `main` (otherwise llama-quantize's Q4_K_M picks: Q6_K for the embedding, output and two more, one Q5_0). */
async function writeQ4KLlama(file: string, main: GgmlType = GgmlType.Q4_K, every = false): Promise<void> {
  const ggml = await loadGgml();
  const g = readGguf(fixture("stories260K-gguf", "stories260K.gguf"));
  const D = 256, F = 512, V = 512, L = 2, H = 4, KV = 2, hd = 64;
  const meta = ggufMetadataForWrite(g, {
    "llama.embedding_length": { type: 4, value: D },
    "llama.feed_forward_length": { type: 4, value: F },
    "llama.block_count": { type: 4, value: L },
    "llama.attention.head_count": { type: 4, value: H },
    "llama.attention.head_count_kv": { type: 4, value: KV },
    "llama.rope.dimension_count": { type: 4, value: hd },
  });
  const r = rng(5);
  const tensors: { name: string; shape: number[]; type: GgmlType; data: Float32Array; raw?: Uint8Array }[] = [];
  const mat = (name: string, rows: number, cols: number) => {
    const data = Float32Array.from({ length: rows * cols }, () => (r() * 2 * Math.sqrt(3)) / Math.sqrt(cols));
    const type = every ? main : /^(token_embd|output|blk\.0\.ffn_down|blk\.0\.attn_v)\./.test(name) ? GgmlType.Q6_K : name === "blk.1.attn_v.weight" ? GgmlType.Q5_0 : main;
    tensors.push({ name, shape: [rows, cols], type, data, raw: ggml.quantize(type, data, rows, cols) });
  };
  const norm = (name: string) => tensors.push({ name, shape: [D], type: GgmlType.F32, data: Float32Array.from({ length: D }, () => 1 + r() * 0.2) });
  mat("token_embd.weight", V, D);
  for (let i = 0; i < L; i++) {
    norm(`blk.${i}.attn_norm.weight`);
    mat(`blk.${i}.attn_q.weight`, H * hd, D);
    mat(`blk.${i}.attn_k.weight`, KV * hd, D);
    mat(`blk.${i}.attn_v.weight`, KV * hd, D);
    mat(`blk.${i}.attn_output.weight`, D, H * hd);
    norm(`blk.${i}.ffn_norm.weight`);
    mat(`blk.${i}.ffn_gate.weight`, F, D);
    mat(`blk.${i}.ffn_up.weight`, F, D);
    mat(`blk.${i}.ffn_down.weight`, D, F);
  }
  norm("output_norm.weight");
  mat("output.weight", V, D);
  writeGguf(file, meta, tensors);
}

/** The logits after each prefix of ids, one forward per prefix (last row only): decode-size products for prefixes under packMinM rows. */
async function decodeRows(m: Model, ids: number[], V: number): Promise<Float32Array> {
  const out = new Float32Array(ids.length * V);
  for (let i = 0; i < ids.length; i++) out.set((await m.forward([{ ids: ids.slice(0, i + 1) }], { logits: "last" })).logits[0]!, i * V);
  return out;
}

/** Round half to even, as f32x4.nearest. */
const rne = (v: number) => {
  const r = Math.round(v);
  return Math.abs(v - Math.trunc(v)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
};

/**
 * The int8-activation quantization of one row, in JS: per block of `block` values d = max|x|/127
 * (through `scale`) and q = nearest(f32(x · f32(127/max))). qkernels.ts q8act: block 256, the f32
 * scale; q8act32 (the Q8_0 rows, llama.cpp's quantize_row_q8_0 on x86): block 32, d as f16.
 */
function q8act(x: Float32Array, block = 256, scale = (d: number) => d): { q: Int16Array; d: Float32Array } {
  const K = x.length;
  const q = new Int16Array(K), d = new Float32Array(K / block);
  for (let b = 0; b < K / block; b++) {
    let amax = 0;
    for (let i = 0; i < block; i++) amax = Math.max(amax, Math.abs(x[block * b + i]!));
    d[b] = scale(Math.fround(amax / 127));
    const inv = amax > 0 ? Math.fround(127 / amax) : 0;
    for (let i = 0; i < block; i++) q[block * b + i] = rne(Math.fround(x[block * b + i]! * inv));
  }
  return { q, d };
}

/** v rounded to the nearest binary16 (ties to even; subnormals; past the largest finite, Infinity), by scaling, not bit tricks. */
function f16round(v: number): number {
  const a = Math.abs(v);
  if (!Number.isFinite(a) || a === 0) return v;
  const ulp = a < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(a)) - 10);
  const r = rne(a / ulp) * ulp;
  return Math.sign(v) * (r > 65504 ? Infinity : r);
}

test("f16round, the tests' reference for q8act32's scales: binary16's values, ties to even, subnormals, overflow", () => {
  const h = (bits: number) => { const e = (bits >> 10) & 31, m = bits & 1023; return (e ? 1 + m / 1024 : m / 1024) * 2 ** ((e || 1) - 15); };
  for (const bits of [1, 2, 0x3ff, 0x400, 0x401, 0x3c00, 0x3c01, 0x7bfe, 0x7bff]) {
    const lo = h(bits), hi = h(bits + 1), mid = (lo + hi) / 2;
    assert.equal(f16round(lo), lo);
    assert.equal(f16round(lo + (hi - lo) * 0.3), lo);
    assert.equal(f16round(lo + (hi - lo) * 0.7), bits === 0x7bff ? Infinity : hi);
    assert.equal(f16round(mid), bits % 2 ? (bits === 0x7bff ? Infinity : hi) : lo, `tie above ${bits.toString(16)}`);
  }
  assert.equal(f16round(2 ** -26), 0);
  assert.equal(f16round(3 * 2 ** -26), 2 ** -24);
});

test("splitScaledBlocks: the 16-bit path and the byte path (odd offsets) give the blocks' quants and f16 scales exactly, and name the first non-finite scale", () => {
  const r = rng(3);
  for (const bb of [34, 18]) {
    const nb = 37, q = bb - 2;
    const blocks = Uint8Array.from({ length: nb * bb }, () => Math.floor((r() + 0.5) * 256) & 255);
    const dv = new DataView(blocks.buffer);
    for (let b = 0; b < nb; b++) dv.setUint16(b * bb, h16(0.01 + b * 0.001), true);
    dv.setUint16(20 * bb, 0x7c00, true); // +Inf in block 20
    dv.setUint16(30 * bb, 0x7e00, true); // NaN in block 30
    const run = (srcOffset: number, dstOffset: number) => {
      const src = new Uint8Array(nb * bb + 1).subarray(srcOffset, srcOffset + nb * bb);
      src.set(blocks);
      const quants = new Uint8Array(nb * q + 1).subarray(dstOffset, dstOffset + nb * q);
      const ds = new Float32Array(nb);
      return { bad: splitScaledBlocks(src, bb, quants, ds), quants: [...quants], ds: [...ds] };
    };
    const want = { quants: [] as number[], ds: [] as number[] };
    for (let b = 0; b < nb; b++) {
      want.quants.push(...blocks.subarray(b * bb + 2, (b + 1) * bb));
      // IEEE binary16, decoded independently of the library's table.
      const h = dv.getUint16(b * bb, true), e = (h >> 10) & 31, m = h & 1023, sign = h >> 15 ? -1 : 1;
      want.ds.push(e === 31 ? (m ? NaN : sign * Infinity) : sign * (e ? 1 + m / 1024 : m / 1024) * 2 ** ((e || 1) - 15));
    }
    for (const [so, dO] of [[0, 0], [1, 0], [0, 1], [1, 1]] as const) {
      const got = run(so, dO);
      assert.equal(got.bad, 20, `blocks of ${bb}, offsets ${so}/${dO}`);
      assert.deepEqual(got.quants, want.quants, `blocks of ${bb}, offsets ${so}/${dO}`);
      assert.deepEqual(got.ds, want.ds, `blocks of ${bb}, offsets ${so}/${dO}`);
    }
  }
});

test("the cpu runtime's Wasm repacks (the loader's, for Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) equal the JavaScript ones byte for byte: subnormal, signed-zero and negative scales, the first non-finite one, and views they cannot take declined", async () => {
  const rt = await CpuRuntime.create({ threads: 1 });
  const f32 = (m: Uint8Array) => new Float32Array(m.buffer, m.byteOffset, m.byteLength / 4);
  // Per type: block bytes, quant and meta bytes per block, the f16 scales' offsets, the JavaScript repack.
  const types = [
    { type: "q8_0", bb: 34, q: 32, m: 4, scales: [0], js: (b: Uint8Array, q: Uint8Array, m: Uint8Array) => splitScaledBlocks(b, 34, q, f32(m)) },
    { type: "q4_0", bb: 18, q: 16, m: 4, scales: [0], js: (b: Uint8Array, q: Uint8Array, m: Uint8Array) => splitScaledBlocks(b, 18, q, f32(m)) },
    { type: "q4_k", bb: 144, q: 128, m: 24, scales: [0, 2], js: repackQ4_K },
    { type: "q5_k", bb: 176, q: 160, m: 24, scales: [0, 2], js: repackQ5_K },
    { type: "q6_k", bb: 210, q: 192, m: 20, scales: [208], js: repackQ6_K },
  ] as const;
  try {
    const r = rng(4);
    for (const t of types) {
      const nb = 41;
      const io = rt.quantReadIo();
      const blocks = io.stage.subarray(0, nb * t.bb);
      for (let i = 0; i < blocks.length; i++) blocks[i] = Math.floor((r() + 0.5) * 256) & 255;
      const dv = new DataView(blocks.buffer, blocks.byteOffset, blocks.byteLength);
      const special = [0x0001, 0x03ff, 0x8000, 0x0000, 0x8001, 0xbc00, 0x7bff, 0xfbff, 0x0400];
      for (let b = 0; b < nb; b++) for (const [k, o] of t.scales.entries()) dv.setUint16(b * t.bb + o, b < special.length ? special[(b + k) % special.length]! : (b * 2654435761 + k) & 0x7bff, true);
      const wq = rt.allocBytes(nb * t.q), ws = rt.allocBytes(nb * t.m);
      const u8 = new Uint8Array(rt.memory.buffer);
      const gotQ = u8.subarray(wq, wq + nb * t.q), gotM = u8.subarray(ws, ws + nb * t.m);
      const wantQ = new Uint8Array(nb * t.q), wantM = new Uint8Array(nb * t.m);
      assert.equal(io.repack[t.type]!(blocks, gotQ, gotM), -1, t.type);
      assert.equal(t.js(blocks, wantQ, wantM), -1, t.type);
      // Bytes, not values: -0 and subnormal scales must come out bit for bit.
      assert.deepEqual([...gotQ], [...wantQ], `${t.type} quants`);
      assert.deepEqual([...gotM], [...wantM], `${t.type} scales`);
      dv.setUint16(33 * t.bb + t.scales.at(-1)!, 0xfc00, true); // -Inf in block 33 (dmin for the K-quants)
      dv.setUint16(35 * t.bb + t.scales[0]!, 0x7e01, true); // NaN in block 35
      assert.equal(io.repack[t.type]!(blocks, gotQ, gotM), 33, t.type);
      assert.equal(t.js(blocks, wantQ, wantM), 33, t.type);
      // A buffer outside the runtime's memory: declined, so the loader's JavaScript repack runs.
      assert.equal(io.repack[t.type]!(new Uint8Array(nb * t.bb), gotQ, gotM), null);
    }
  } finally {
    await rt.dispose();
  }
});

const Q8_0_BLOCKS = { type: "q8_0", ggml: GgmlType.Q8_0, elems: 32, bytes: 34, halves: [0], wq: 32, ws: 4, repack: (b: Uint8Array, q: Uint8Array, m: Uint8Array) => splitScaledBlocks(b, 34, q, new Float32Array(m.buffer, m.byteOffset, m.byteLength / 4)) } as const;

for (const kq of [...KQUANTS.filter((k) => k.type !== "q4_0"), Q8_0_BLOCKS])
for (const threads of [1, 2]) {
  test(`qgemm with int8 activations on ${kq.type.toUpperCase()} rows equals the float64 product of ggml's weights and the rounded activations (${threads} thread${threads > 1 ? "s" : ""})`, async () => {
    const rt = await CpuRuntime.create({ threads });
    try {
      const r = rng(12);
      let worstVsExact = 0;
      // M >= packMinM (9): prefill sizes, int8 rows for Q4_K/Q5_K/Q6_K; Q8_0 keeps the f32 GEMM there.
      for (const [M, N, K] of [[1, 3, 256], [2, 5, 512], [3, 7, 256], [4, 9, 768], [5, 4, 256], [6, 5, 512], [7, 3, 256], [8, 6, 768], [1, 300, 1024], [2, 64, 2048], [9, 5, 256], [13, 6, 512], [33, 40, 768]] as const) {
        const int8Here = M < DEFAULT_KERNEL.packMinM || kq.type !== "q8_0";
        const nb = (N * K) / kq.elems;
        const blocks = Uint8Array.from({ length: nb * kq.bytes }, () => Math.floor((r() + 0.5) * 256) & 255);
        const dv = new DataView(blocks.buffer);
        for (let b = 0; b < nb; b++) for (const o of kq.halves) dv.setUint16(b * kq.bytes + o, h16(0.001 + (r() + 0.5) * 0.01), true);
        const ref = dequantize(kq.ggml, blocks, N * K);
        const wq = rt.allocBytes(nb * kq.wq), ws = rt.allocBytes(nb * kq.ws);
        const u8 = new Uint8Array(rt.memory.buffer);
        assert.equal(kq.repack(blocks, u8.subarray(wq, wq + nb * kq.wq), u8.subarray(ws, ws + nb * kq.ws)), -1);
        const x = rt.alloc(M * K), y = rt.alloc(M * N), y32 = rt.alloc(M * N);
        // One all-zero block in row 0 (its scale is 0, its quants 0).
        const xs = Float32Array.from({ length: M * K }, (_, i) => (i < 256 && K > 256 ? 0 : r() * 2));
        rt.f32.set(xs, x);
        rt.qgemm({ type: kq.type, x, ldx: K, wq, ws, y, ldy: N, M, N, K, int8: true });
        rt.qgemm({ type: kq.type, x, ldx: K, wq, ws, y: y32, ldy: N, M, N, K });
        const out = rt.f32.slice(y, y + M * N), exact = rt.f32.slice(y32, y32 + M * N);
        if (!int8Here) {
          assert.deepEqual(out, exact, `M ${M}: ${kq.type} at prefill sizes is the f32 GEMM with or without the flag`);
          continue;
        }
        // Exactly the dot of ggml's dequantized weights with the dequantized activations q·d.
        for (let m = 0; m < M; m++) {
          const row = xs.subarray(m * K, (m + 1) * K);
          // Q8_0: per 32 with f16 scales (as llama.cpp's q8_0); the K-quants per 256 (its q8_K).
          const { q, d } = kq.type === "q8_0" ? q8act(row, 32, f16round) : q8act(row);
          const shift = kq.type === "q8_0" ? 5 : 8;
          for (let n = 0; n < N; n++) {
            let s = 0, a = 0;
            for (let k = 0; k < K; k++) {
              const p = ref[n * K + k]! * q[k]! * d[k >> shift]!;
              s += p;
              a += Math.abs(p);
            }
            assert.ok(Math.abs(out[m * N + n]! - s) <= 1e-6 * a, `M ${M} N ${N} K ${K}: y[${m}][${n}] ${out[m * N + n]} vs ${s}`);
            let e = 0;
            for (let k = 0; k < K; k++) e += Math.abs(row[k]! * ref[n * K + k]!);
            worstVsExact = Math.max(worstVsExact, Math.abs(out[m * N + n]! - exact[m * N + n]!) / e);
          }
        }
      }
      // The activation rounding is visible (so the flag does something) and small.
      assert.ok(worstVsExact > 1e-6 && worstVsExact < 1e-2, `int8 vs float activations: ${worstVsExact} of Σ|x·w|`);
    } finally {
      await rt.dispose();
    }
  });
}

for (const kq of KQUANTS.filter((k) => k.type === "q4_k" || k.type === "q5_k" || k.type === "q6_k"))
  test(`${kq.type.toUpperCase()} int8-activation rows: the relaxed-dot kernels agree with the i16 kernels to f32 rounding (1 and 2 threads)`, async (t) => {
    let probe: CpuRuntime;
    try {
      probe = await CpuRuntime.create({ threads: 1, relaxedDot: true });
    } catch (e) {
      // Only an engine without a working relaxed dot gets here; runtime.ts then never uses it.
      return t.skip(String(e));
    }
    await probe.dispose();
    for (const threads of [1, 2]) {
      const runs: Float32Array[] = [];
      for (const relaxedDot of [false, true]) {
        const rt = await CpuRuntime.create({ threads, relaxedDot });
        try {
          assert.equal(rt.simd.includes("+relaxed-dot"), relaxedDot);
          const out: number[] = [];
          const rr = rng(7 + threads);
          for (const [M, N, K] of [[1, 3, 256], [2, 5, 512], [3, 7, 256], [4, 9, 768], [5, 4, 256], [8, 6, 768], [1, 300, 1024]] as const) {
            const nb = (N * K) / kq.elems;
            // Extreme codes included: all-0xff bytes make every nibble 15 (and every Q5_K fifth bit set).
            const blocks = Uint8Array.from({ length: nb * kq.bytes }, (_, i) => (i % 97 < 9 ? 255 : Math.floor((rr() + 0.5) * 256) & 255));
            const dv = new DataView(blocks.buffer);
            for (let b = 0; b < nb; b++) for (const o of kq.halves) dv.setUint16(b * kq.bytes + o, h16(0.001 + (rr() + 0.5) * 0.01), true);
            const wq = rt.allocBytes(nb * kq.wq), ws = rt.allocBytes(nb * kq.ws);
            const u8 = new Uint8Array(rt.memory.buffer);
            kq.repack(blocks, u8.subarray(wq, wq + nb * kq.wq), u8.subarray(ws, ws + nb * kq.ws));
            const x = rt.alloc(M * K), y = rt.alloc(M * N);
            // Each row's largest |x| lands on ±127 after quantization.
            rt.f32.set(Float32Array.from({ length: M * K }, () => rr() * 4), x);
            rt.qgemm({ type: kq.type, x, ldx: K, wq, ws, y, ldy: N, M, N, K, int8: true });
            out.push(...rt.f32.slice(y, y + M * N));
          }
          runs.push(Float32Array.from(out));
        } finally {
          await rt.dispose();
        }
      }
      // Each super-block's integer total is the same; it is spread over the four lanes differently,
      // so only the f32 accumulation across super-blocks may round differently.
      const [a, b] = [runs[0]!, runs[1]!];
      const scale = a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
      assert.ok(scale > 1);
      let worst = 0;
      for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
      assert.ok(worst <= 1e-6 * scale, `${threads} thread(s): ${worst} vs scale ${scale}`);
    }
  });

describe("a Q4_K_M-like GGUF (a dModel-256 llama quantized by ggml: Q4_K and Q6_K)", () => {
  let file = "";
  let f32: Model, q4: Model;
  const ids = [1, 403, 407, 261, 378, 285, 263, 499, 29, 300, 301, 302];
  before(async () => {
    file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-q4k-")), "llama-q4_k.gguf");
    await writeQ4KLlama(file);
    f32 = await Model.load(file, { threads: 2, weights: "f32" });
    q4 = await Model.load(file, { threads: 2 });
  });
  after(() => {
    f32?.dispose();
    q4?.dispose();
  });

  test("the memory check before load counts the Q4_K and Q6_K matrices at their native size", () => {
    let facts: FileFacts | undefined;
    loadHostModel(file, (_c, _s, f) => void (facts = f), { lazy: true });
    const D = 256, F = 512, V = 512, L = 2;
    const q6 = 2 * V * D + D * F + 128 * D;
    const q50 = 128 * D; // held as f32
    const q4 = L * (D * D * 2 + 2 * 128 * D + 3 * D * F) - D * F - 128 * D - q50;
    assert.equal(facts?.nativeQuantBytes, (q4 * 152) / 256 + (q6 * 212) / 256 + q50 * 4 + (2 * L + 1) * D * 4);
  });

  test("keeps every matrix in its K-quant by default and computes the f32 path's logits up to summation order", async () => {
    const engine = (q4 as unknown as { engine: { quantizedMats: number } }).engine;
    // Block 0's q, k (Q4_K) and v (Q6_K) stay quantized as one stacked matrix of two types; block
    // 1's q and k stay Q4_K beside its v widened from Q5_0.
    assert.equal(engine.quantizedMats, 2 * 4 + 2, "qkv, o, gate/up, down per block, the embedding and the output");
    const a = (await f32.forward([{ ids }])).logits[0]!;
    const b = (await q4.forward([{ ids }])).logits[0]!;
    let worst = 0, scale = 0;
    for (let i = 0; i < a.length; i++) {
      worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
      scale = Math.max(scale, Math.abs(a[i]!));
    }
    assert.ok(worst <= 1e-5 * Math.max(1, scale), `max |Δ| ${worst} (logits up to ${scale})`);
    const ga = await f32.generate([{ ids: ids.slice(0, 3) }], { maxTokens: 24 });
    const gb = await q4.generate([{ ids: ids.slice(0, 3) }], { maxTokens: 24 });
    assert.deepEqual(gb.tokens, ga.tokens);
  });

  test("a gradient first gives the stacked Q4_K/Q6_K matrices exact f32 copies (then forward is the f32 path's)", async () => {
    const engineOf = (m: Model) => (m as unknown as { engine: { quantizedMats: number } }).engine;
    const d = await Model.load(file, { threads: 1 });
    try {
      const req: LossAndGradRequest = { params: [{ kind: "vector", at: "blocks.0.hook_resid_post", value: new Float32Array(256).fill(0.01) }], targets: [[-1, 7, 9, 5]] };
      const a = await f32.lossAndGrad([{ ids: ids.slice(0, 4) }], req);
      const b = await d.lossAndGrad([{ ids: ids.slice(0, 4) }], req);
      assert.equal(engineOf(d).quantizedMats, 0, "materialized as f32");
      assert.equal(b.loss, a.loss);
      assert.deepEqual([...(await d.forward([{ ids }])).logits[0]!], [...(await f32.forward([{ ids }])).logits[0]!]);
    } finally {
      d.dispose();
    }
  });

  test("agrees with llama.cpp on the same file as closely as the f32 path does", async (t) => {
    const lc = await llamaCppLogits(file, ids, { threads: 1 });
    const against = async (m: Model) => compareLogits((await m.forward([{ ids }])).logits[0]!, lc.logits, ids.length, 512, true);
    const a = await against(f32), b = await against(q4);
    t.diagnostic(`max |Δ log p| vs llama.cpp: f32 path ${a.maxAbs.toExponential(2)}, native Q4_K/Q6_K ${b.maxAbs.toExponential(2)}`);
    assert.ok(Math.abs(b.maxAbs - a.maxAbs) <= 1e-3, `native ${b.maxAbs} vs f32 ${a.maxAbs}`);
    assert.ok(b.maxAbs < 0.1, `max |Δ log p| ${b.maxAbs}`);
  });

  test("native-int8 is part of the model's identity: concept-vector cache keys differ from the f32 path's", async () => {
    const i8 = await Model.load(file, { threads: 1, weights: "native-int8" });
    try {
      assert.equal(i8.identity().arithmetic, "int8-activations");
      assert.equal(q4.identity().arithmetic, undefined);
      assert.equal(f32.identity().arithmetic, undefined, "f32 and native compute the same values up to summation order");
      assert.deepEqual({ ...i8.identity(), arithmetic: undefined }, { ...q4.identity(), arithmetic: undefined });
      assert.equal(i8.withPlan([]).identity().arithmetic, "int8-activations", "a view asks its base");
      const key = (m: Model) => vectorCacheKey(m, PROTOCOL_RECIPE, ["a", "b"]).key;
      assert.notEqual(key(i8), key(q4));
      assert.equal(key(f32), key(q4));
    } finally {
      i8.dispose();
    }
  });

  test("inject --weights native-int8: the run header records it, resume loads the model the same way, and a model loaded otherwise is refused", async () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-q4k-run-")), "run");
    const args: InjectArgs = { model: file, layers: "1", strengths: "4", concepts: "2", trials: 1, controls: 1, judges: ["rule"], maxTokens: 3, seed: 5, batchSize: 2, out, vectorCache: null, quiet: true, weights: "native-int8" };
    await inject(args);
    const h = readRun(out).header;
    assert.equal(h.backend.weights, "native-int8");
    assert.equal(h.model.identity?.arithmetic, "int8-activations");
    // Loaded the default way (the f32 path's numbers), the same file is not the run's model.
    assert.throws(() => checkSameModel(out, h, q4), /arithmetic \(--weights native-int8: int8-activations\) none ≠ int8-activations/);
    const i8 = await Model.load(file, { threads: 1, weights: "native-int8" });
    try {
      checkSameModel(out, h, i8);
    } finally {
      i8.dispose();
    }
    // resume reads the mode from the header: nothing left to generate, and no refusal.
    const r = await resume(out, { quiet: true });
    assert.equal(r.generated, 0);
    // A run without --weights keeps its header as before (no backend.weights, no arithmetic).
    const plain = path.join(path.dirname(out), "plain");
    await inject({ ...args, out: plain, weights: undefined });
    const hp = readRun(plain).header;
    assert.equal(hp.backend.weights, undefined);
    assert.equal(hp.model.identity?.arithmetic, undefined);
  });

  test("native-int8 (int8 activations in the quantized products): logits within llama.cpp's distance of the f32 path at decode and prefill sizes", async (t) => {
    const i8 = await Model.load(file, { threads: 2, weights: "native-int8" });
    try {
      const lc = await llamaCppLogits(file, ids, { threads: 1 });
      const V = 512;
      // Prefill (12 rows): the Q4_K products on int8 activations too, the Q6_K ones in the f32 GEMM.
      const pre = (await i8.forward([{ ids }])).logits[0]!, preExact = (await f32.forward([{ ids }])).logits[0]!;
      const preSelf = compareLogits(pre, preExact, ids.length, V, true), preLc = compareLogits(preExact, lc.logits, ids.length, V, true);
      t.diagnostic(`prefill: max |Δ log p| native-int8 vs f32 path ${preSelf.maxAbs.toExponential(2)}; f32 path vs llama.cpp ${preLc.maxAbs.toExponential(2)}`);
      assert.ok(preSelf.maxAbs > 0 && preSelf.maxAbs <= 2 * Math.max(preLc.maxAbs, 1e-3), `prefill: native-int8 moves ${preSelf.maxAbs}; llama.cpp is ${preLc.maxAbs} away`);
      // One row at a time (decode-size products): activation rounding, as llama.cpp's q8_K dot.
      const mine = await decodeRows(i8, ids, V), exact = await decodeRows(f32, ids, V);
      const a = compareLogits(exact, lc.logits, ids.length, V, true), b = compareLogits(mine, lc.logits, ids.length, V, true);
      const self = compareLogits(mine, exact, ids.length, V, true);
      t.diagnostic(`max |Δ log p|: native-int8 vs f32 path ${self.maxAbs.toExponential(2)}; vs llama.cpp: native-int8 ${b.maxAbs.toExponential(2)}, f32 path ${a.maxAbs.toExponential(2)}`);
      assert.ok(self.maxAbs > 0, "the activation rounding changes something");
      assert.ok(self.maxAbs <= 2 * Math.max(a.maxAbs, 1e-3), `native-int8 moves ${self.maxAbs} from the f32 path; llama.cpp is ${a.maxAbs} away`);
      assert.ok(b.top1 >= ids.length - 1, `top-1 agreement with llama.cpp ${b.top1}/${ids.length}`);
    } finally {
      i8.dispose();
    }
  });
});

/** Rewrite an HF folder's model.safetensors with every tensor in BF16 (round to nearest even). */
function toBf16(dir: string): void {
  const file = path.join(dir, "model.safetensors");
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8")) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const parts: Buffer[] = [];
  let off = 0;
  const out: Record<string, unknown> = { __metadata__: (header as Record<string, unknown>).__metadata__ ?? {} };
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset + 8 + n + t.data_offsets[0], buf.byteOffset + 8 + n + t.data_offsets[1]));
    const u32 = new Uint32Array(f32.buffer);
    const b = Buffer.alloc(f32.length * 2);
    for (let i = 0; i < f32.length; i++) b.writeUInt16LE(((u32[i]! + 0x7fff + ((u32[i]! >>> 16) & 1)) >>> 16) & 0xffff, 2 * i);
    out[name] = { dtype: "BF16", shape: t.shape, data_offsets: [off, off + b.length] };
    off += b.length;
    parts.push(b);
  }
  let json = JSON.stringify(out);
  json += " ".repeat((8 - ((json.length + 8) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json), ...parts]));
}

test("a BF16 safetensors llama: BF16 matrices kept as BF16 by default, logits equal the f32 path's up to summation order", async () => {
  const { makeFixtures } = await import("../scripts/make-fixtures.js");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-bf16-"));
  const hf = makeFixtures(dir, ["llama"])[0]!.hf;
  toBf16(hf);
  const f32 = await Model.load(hf, { threads: 1, weights: "f32" });
  const bf = await Model.load(hf, { threads: 1 });
  try {
    assert.equal(bf.sourceDtype, "BF16");
    const engine = (bf as unknown as { engine: { quantizedMats: number } }).engine;
    assert.ok(engine.quantizedMats >= 4 * bf.config.nLayers, `${engine.quantizedMats} BF16 matrices`);
    const ids = [1, 5, 9, 13, 17, 21, 25, 29];
    const a = (await f32.forward([{ ids }])).logits[0]!, b = (await bf.forward([{ ids }])).logits[0]!;
    let worst = 0, scale = 0;
    for (let i = 0; i < a.length; i++) {
      worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
      scale = Math.max(scale, Math.abs(a[i]!));
    }
    assert.ok(worst <= 1e-5 * Math.max(1, scale), `max |Δ| ${worst} (logits up to ${scale})`);
    assert.deepEqual((await bf.generate([{ ids }], { maxTokens: 12 })).tokens, (await f32.generate([{ ids }], { maxTokens: 12 })).tokens);
  } finally {
    f32.dispose();
    bf.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("a Q4_0 GGUF (stories260K's 32-aligned matrices quantized by ggml): native equals the f32 path up to summation order", async () => {
  const ggml = await loadGgml();
  const g = readGguf(fixture("stories260K-gguf", "stories260K.gguf"));
  const tensors = [...g.tensors.keys()].map((name) => {
    const t = readGgufTensor(g, name);
    const q = t.shape.length === 2 && t.shape[1]! % 32 === 0;
    return q ? { name, shape: t.shape, type: GgmlType.Q4_0, data: t.data, raw: ggml.quantize(GgmlType.Q4_0, t.data, t.shape[0]!, t.shape[1]!) } : { name, shape: t.shape, type: GgmlType.F32, data: t.data };
  });
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-q40-")), "stories260K-q4_0.gguf");
  writeGguf(file, ggufMetadataForWrite(g), tensors);
  const f32 = await Model.load(file, { threads: 1, weights: "f32" });
  const q4 = await Model.load(file, { threads: 1 });
  try {
    assert.equal((q4 as unknown as { engine: { quantizedMats: number } }).engine.quantizedMats, 5 * 3 + 2);
    const ids = [1, 403, 407, 261, 378, 285, 263, 499];
    const a = (await f32.forward([{ ids }])).logits[0]!, b = (await q4.forward([{ ids }])).logits[0]!;
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    assert.ok(worst <= 2e-5, `max |Δ| ${worst}`);
    assert.deepEqual((await q4.generate([{ ids: [1] }], { maxTokens: 24 })).tokens, (await f32.generate([{ ids: [1] }], { maxTokens: 24 })).tokens);
  } finally {
    f32.dispose();
    q4.dispose();
  }
});

test("a quantized tensor larger than one read slice (8 MiB) is read in slices into exactly the whole tensor's layout", async () => {
  // A 1-layer llama whose Q8_0 token embedding is 40000 × 256 (10.6 MiB): rows of both slices are looked up.
  const g = readGguf(fixture("stories260K-gguf", "stories260K.gguf"));
  const D = 256, V = 40000, F = 256, H = 4, hd = 64;
  const meta = ggufMetadataForWrite(g, {
    "llama.embedding_length": { type: 4, value: D },
    "llama.feed_forward_length": { type: 4, value: F },
    "llama.block_count": { type: 4, value: 1 },
    "llama.attention.head_count": { type: 4, value: H },
    "llama.attention.head_count_kv": { type: 4, value: H },
    "llama.rope.dimension_count": { type: 4, value: hd },
  });
  for (const k of [...Object.keys(meta)]) if (k.startsWith("tokenizer.")) delete meta[k];
  const r = rng(8);
  const mat = (name: string, rows: number, cols: number) => ({ name, shape: [rows, cols], type: GgmlType.Q8_0, data: Float32Array.from({ length: rows * cols }, () => r() / 8) });
  const norm = (name: string) => ({ name, shape: [D], type: GgmlType.F32, data: new Float32Array(D).fill(1) });
  const tensors = [
    mat("token_embd.weight", V, D),
    norm("blk.0.attn_norm.weight"),
    ...["q", "k", "v", "output"].map((x) => mat(`blk.0.attn_${x}.weight`, D, D)),
    norm("blk.0.ffn_norm.weight"),
    mat("blk.0.ffn_gate.weight", F, D),
    mat("blk.0.ffn_up.weight", F, D),
    mat("blk.0.ffn_down.weight", D, F),
    norm("output_norm.weight"),
  ];
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-slices-")), "big-embed-q8_0.gguf");
  writeGguf(file, meta, tensors);
  assert.ok(fs.statSync(file).size > 10 << 20);
  const { CpuEngine } = await import("../src/engine/cpu/engine.js");
  const native = await CpuEngine.create(loadHostModel(file, undefined, { lazy: true }), { threads: 1, weights: "native" });
  const f32 = await CpuEngine.create(loadHostModel(file, undefined, { lazy: true }), { threads: 1, weights: "f32" });
  try {
    assert.equal(native.quantizedMats, 5, "qkv, o, gate|up, down and the tied embedding");
    const ids = [39999, 3, 30000, 20000, 31500, 12345, 39000];
    const plan = [{ op: "read" as const, at: "hook_embed" as const }];
    const a = await native.forward([ids], { plan }), b = await f32.forward([ids], { plan });
    // Embedding rows (both slices) dequantized bit for bit; logits (the tied embedding as unembedding) up to summation order.
    assert.deepEqual([...a.cache.get("hook_embed").data], [...b.cache.get("hook_embed").data]);
    let worst = 0;
    for (let i = 0; i < a.logits[0]!.length; i++) worst = Math.max(worst, Math.abs(a.logits[0]![i]! - b.logits[0]![i]!));
    assert.ok(worst <= 2e-5, `max |Δ logit| ${worst}`);
  } finally {
    await native.close();
    await f32.close();
  }
});

test("F16 rows: dequantization is exact for every finite f16 (subnormals and -0 included), qgemm equals the float64 product", async () => {
  const { f16ToF32 } = await import("../src/io/binary.js");
  const rt = await CpuRuntime.create({ threads: 2 });
  try {
    // Every finite f16 bit pattern (exponent < 31), as the rows of a [N, 8] matrix with padding.
    const finite = Array.from({ length: 65536 }, (_, h) => h).filter((h) => (h & 0x7c00) !== 0x7c00);
    const K = 8, N = Math.ceil(finite.length / K);
    const bits = new Uint16Array(N * K);
    bits.set(finite);
    const wq = rt.allocBytes(N * K * 2);
    new Uint8Array(rt.memory.buffer).set(new Uint8Array(bits.buffer), wq);
    const deq = rt.alloc(N * K);
    rt.dequantRows("f16", wq, 0, N, K, deq);
    const got = rt.f32.slice(deq, deq + N * K);
    for (let i = 0; i < N * K; i++) assert.ok(Object.is(got[i], f16ToF32(bits[i]!)), `f16 0x${bits[i]!.toString(16)}: ${got[i]} vs ${f16ToF32(bits[i]!)}`);
    const r = rng(21);
    for (const [M, Nn, Kk] of [[1, 7, 64], [3, 33, 256], [12, 40, 128]] as const) {
      const w = Uint16Array.from({ length: Nn * Kk }, () => { let h; do h = Math.floor((r() + 0.5) * 65536) & 0xffff; while ((h & 0x7c00) === 0x7c00 || (h & 0x7c00) > 0x4400); return h; });
      const p = rt.allocBytes(w.byteLength);
      new Uint8Array(rt.memory.buffer).set(new Uint8Array(w.buffer), p);
      const x = rt.alloc(M * Kk), y = rt.alloc(M * Nn);
      const xs = Float32Array.from({ length: M * Kk }, () => r() * 2);
      rt.f32.set(xs, x);
      rt.qgemm({ type: "f16", x, ldx: Kk, wq: p, ws: 0, y, ldy: Nn, M, N: Nn, K: Kk });
      for (let m = 0; m < M; m++)
        for (let n = 0; n < Nn; n++) {
          let s = 0, a = 0;
          for (let k = 0; k < Kk; k++) {
            const v = xs[m * Kk + k]! * f16ToF32(w[n * Kk + k]!);
            s += v;
            a += Math.abs(v);
          }
          assert.ok(Math.abs(rt.f32[y + m * Nn + n]! - s) <= 1e-6 * a, `M ${M}: y[${m}][${n}]`);
        }
    }
  } finally {
    await rt.dispose();
  }
});

test("an F16 GGUF (stories260K's matrices in F16): kept as F16 by default, logits equal the f32 path's up to summation order and agree with llama.cpp as closely", async (t) => {
  const g = readGguf(fixture("stories260K-gguf", "stories260K.gguf"));
  const tensors = [...g.tensors.keys()].map((name) => {
    const tt = readGgufTensor(g, name);
    return { name, shape: tt.shape, type: tt.shape.length === 2 ? GgmlType.F16 : GgmlType.F32, data: tt.data };
  });
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-f16-")), "stories260K-f16.gguf");
  writeGguf(file, ggufMetadataForWrite(g), tensors);
  const f32 = await Model.load(file, { threads: 1, weights: "f32" });
  const h = await Model.load(file, { threads: 1 });
  try {
    const engine = (h as unknown as { engine: { quantizedMats: number } }).engine;
    // Per block qkv, o and gate|up (down's rows are 172 long, not a multiple of 8: widened to f32), the embedding and the output.
    assert.equal(engine.quantizedMats, 5 * 3 + 2);
    const ids = [1, 403, 407, 261, 378, 285, 263, 499, 29, 300, 301, 302];
    const a = (await f32.forward([{ ids }])).logits[0]!, b = (await h.forward([{ ids }])).logits[0]!;
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    assert.ok(worst <= 2e-5, `max |Δ| ${worst}`);
    assert.deepEqual((await h.generate([{ ids: [1] }], { maxTokens: 24 })).tokens, (await f32.generate([{ ids: [1] }], { maxTokens: 24 })).tokens);
    const lc = await llamaCppLogits(file, ids, { threads: 1 });
    const ca = compareLogits(a, lc.logits, ids.length, 512, true), cb = compareLogits(b, lc.logits, ids.length, 512, true);
    t.diagnostic(`max |Δ log p| vs llama.cpp: f32 path ${ca.maxAbs.toExponential(2)}, native F16 ${cb.maxAbs.toExponential(2)}`);
    assert.ok(Math.abs(cb.maxAbs - ca.maxAbs) <= 1e-4, `native ${cb.maxAbs} vs f32 ${ca.maxAbs}`);
  } finally {
    f32.dispose();
    h.dispose();
  }
});

test("a Q5_K_M-like GGUF (Q5_K and Q6_K by ggml): native equals the f32 path up to summation order, native-int8 stays within llama.cpp's distance", async (t) => {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-q5k-")), "llama-q5_k.gguf");
  await writeQ4KLlama(file, GgmlType.Q5_K);
  const f32 = await Model.load(file, { threads: 2, weights: "f32" });
  const q5 = await Model.load(file, { threads: 2 });
  const i8 = await Model.load(file, { threads: 2, weights: "native-int8" });
  try {
    assert.equal((q5 as unknown as { engine: { quantizedMats: number } }).engine.quantizedMats, 2 * 4 + 2);
    const ids = [1, 403, 407, 261, 378, 285, 263, 499, 29, 300, 301, 302];
    const a = (await f32.forward([{ ids }])).logits[0]!, b = (await q5.forward([{ ids }])).logits[0]!;
    let worst = 0, scale = 0;
    for (let i = 0; i < a.length; i++) {
      worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
      scale = Math.max(scale, Math.abs(a[i]!));
    }
    assert.ok(worst <= 1e-5 * Math.max(1, scale), `max |Δ| ${worst} (logits up to ${scale})`);
    assert.deepEqual((await q5.generate([{ ids: ids.slice(0, 3) }], { maxTokens: 24 })).tokens, (await f32.generate([{ ids: ids.slice(0, 3) }], { maxTokens: 24 })).tokens);
    const lc = await llamaCppLogits(file, ids, { threads: 1 });
    const V = 512;
    const exact = await decodeRows(f32, ids, V), mine = await decodeRows(i8, ids, V);
    const vsLc = compareLogits(b, lc.logits, ids.length, V, true), f32Lc = compareLogits(a, lc.logits, ids.length, V, true);
    const self = compareLogits(mine, exact, ids.length, V, true);
    t.diagnostic(`max |Δ log p| vs llama.cpp: f32 path ${f32Lc.maxAbs.toExponential(2)}, native Q5_K/Q6_K ${vsLc.maxAbs.toExponential(2)}, native-int8 ${compareLogits(mine, lc.logits, ids.length, V, true).maxAbs.toExponential(2)}; native-int8 vs f32 path ${self.maxAbs.toExponential(2)}`);
    assert.ok(Math.abs(vsLc.maxAbs - f32Lc.maxAbs) <= 1e-3, `native ${vsLc.maxAbs} vs f32 ${f32Lc.maxAbs}`);
    assert.ok(self.maxAbs > 0 && self.maxAbs <= 2 * Math.max(f32Lc.maxAbs, 1e-3), `native-int8 moves ${self.maxAbs}; llama.cpp is ${f32Lc.maxAbs} away`);
  } finally {
    f32.dispose();
    q5.dispose();
    i8.dispose();
  }
});

for (const type of [GgmlType.Q8_0, GgmlType.Q4_K, GgmlType.Q5_K, GgmlType.Q6_K])
test(`native-int8 decode rows are llama.cpp's arithmetic: a ${GgmlType[type]} GGUF (every matrix, by ggml's quantizer) gives llama.cpp's logits up to f32 rounding, where the f32 path's are ~0.1 away`, async (t) => {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-i8-")), `llama-${GgmlType[type]}.gguf`);
  await writeQ4KLlama(file, type, true);
  const f32 = await Model.load(file, { threads: 2, weights: "f32" });
  const i8 = await Model.load(file, { threads: 2, weights: "native-int8" });
  try {
    // At most 8 rows per forward (packMinM is 9): every product takes the int8 rows (Q8_0 prefill
    // stays in the f32 GEMM). Their activations are rounded as llama.cpp rounds them: per 256 as
    // its q8_K for the K-quants, per 32 with f16 scales as its q8_0 for Q8_0.
    const ids = [1, 403, 407, 261, 378, 285, 263, 499];
    const lc = await llamaCppLogits(file, ids, { threads: 1 });
    const V = 512;
    const exact = await decodeRows(f32, ids, V), mine = await decodeRows(i8, ids, V);
    const f32Lc = compareLogits(exact, lc.logits, ids.length, V, true), mineLc = compareLogits(mine, lc.logits, ids.length, V, true);
    t.diagnostic(`max |Δ log p| vs llama.cpp: f32 path ${f32Lc.maxAbs.toExponential(2)}, native-int8 ${mineLc.maxAbs.toExponential(2)}`);
    // 1.0-1.8e-6 on the developers' host. The bound leaves room for another CPU's summation order,
    // which can flip the rounding of an activation here and there. (Q8_0 with per-256
    // activations, before 2026-12-07: 0.11.)
    assert.ok(f32Lc.maxAbs > 0.02, `the f32 path is ${f32Lc.maxAbs} from llama.cpp: the activation rounding should show`);
    assert.ok(mineLc.maxAbs < 1e-2, `native-int8 is ${mineLc.maxAbs} from llama.cpp, the f32 path ${f32Lc.maxAbs}`);
  } finally {
    f32.dispose();
    i8.dispose();
  }
});
