// ggml (llama.cpp's tensor library) as a reference: the libggml-base shared library of
// node-llama-cpp's prebuilt platform package (@node-llama-cpp/linux-x64 in CI; a devDependency),
// called through the koffi FFI (a devDependency too). Quantizes and dequantizes ggml block types
// exactly as llama.cpp does: the reference of test/quants.test.ts and the quantizer of the
// quantized test fixtures and bench models. SELFSCOPE_GGML_BASE=/path/to/libggml-base.so points at
// another build.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { GgmlType, ggmlBlock } from "../io/gguf.js";

/** Types under test, with the ggml symbol suffix of their dequantize_row_* function. */
export const TYPES: [GgmlType, string][] = [
  [GgmlType.Q4_0, "q4_0"],
  [GgmlType.Q4_1, "q4_1"],
  [GgmlType.Q5_0, "q5_0"],
  [GgmlType.Q5_1, "q5_1"],
  [GgmlType.Q8_0, "q8_0"],
  [GgmlType.Q2_K, "q2_K"],
  [GgmlType.Q3_K, "q3_K"],
  [GgmlType.Q4_K, "q4_K"],
  [GgmlType.Q5_K, "q5_K"],
  [GgmlType.Q6_K, "q6_K"],
];

/** Bytes of a row of n values of a quantized type (io/gguf.ts ggmlBlock). */
export function rowBytes(type: GgmlType, n: number): number {
  const [e, b] = ggmlBlock(type)!;
  return (n / e) * b;
}


export interface Ggml {
  lib: string;
  koffiVersion: string;
  quantize(type: GgmlType, src: Float32Array, nrows: number, nPerRow: number): Uint8Array;
  dequantize(type: GgmlType, bytes: Uint8Array, n: number): Float32Array;
}

/** node-llama-cpp's prebuilt CPU package for this platform (see its optionalDependencies). */
function platformPackage(): string {
  const sys = process.platform === "darwin" ? "mac" : process.platform === "win32" ? "win" : process.platform;
  const arch = process.arch === "arm" ? "armv7l" : process.arch;
  return `@node-llama-cpp/${sys}-${arch}${sys === "mac" && arch === "arm64" ? "-metal" : ""}`;
}

/** libggml-base from the installed node-llama-cpp prebuilt for this platform. */
function defaultLibrary(): string {
  const pkg = platformPackage();
  const require = createRequire(import.meta.url);
  let entry: string;
  try {
    entry = require.resolve(pkg);
  } catch (e) {
    throw new Error(`${pkg} is not installed (node-llama-cpp installs it on supported platforms; run npm ci): ${String(e)}`, { cause: e });
  }
  // The package's entry is dist/index.js; the libraries live in bins/<platform>/ beside dist/.
  const bins = path.resolve(path.dirname(entry), "..", "bins");
  for (const dir of fs.existsSync(bins) ? fs.readdirSync(bins) : []) {
    const name = fs.readdirSync(path.join(bins, dir)).find((f) => /^(lib)?ggml-base\.(so|dylib|dll)$/.test(f));
    if (name) return path.join(bins, dir, name);
  }
  throw new Error(`${pkg} has no ggml-base library under ${bins}`);
}

/**
 * Loaded once per library path: loading libggml-base a second time (after koffi let go of the
 * first handle) re-runs its static initializer, whose GGML_ASSERT that its terminate handler is
 * not already installed then aborts the process (seen when one bench run wrote two files).
 */
const loaded = new Map<string, Promise<Ggml>>();

export function loadGgml(): Promise<Ggml> {
  const lib = process.env.SELFSCOPE_GGML_BASE ?? defaultLibrary();
  let p = loaded.get(lib);
  if (!p) {
    p = load(lib);
    loaded.set(lib, p);
    p.catch(() => loaded.delete(lib));
  }
  return p;
}

async function load(lib: string): Promise<Ggml> {
  if (!fs.existsSync(lib)) throw new Error(`llama.cpp library not found at ${lib}`);
  let koffi: typeof import("koffi");
  try {
    koffi = await import("koffi");
  } catch (e) {
    throw new Error(`the koffi FFI package cannot be loaded (it is a devDependency; run npm ci): ${String(e)}`, { cause: e });
  }
  const h = koffi.load(lib);
  // ggml.h: size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
  //                                     int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
  // The enum is passed as int (its C ABI type); typed arrays are passed as pointers to their memory.
  const quantizeChunk = h.func(
    "size_t ggml_quantize_chunk(int type, const float *src, void *dst, int64_t start, int64_t nrows, int64_t n_per_row, const float *imatrix)",
  );
  // ggml-quants.h: void dequantize_row_<type>(const block_<type> * x, float * y, int64_t k);
  const dq = new Map(TYPES.map(([t, s]) => [t, h.func(`void dequantize_row_${s}(const void *x, float *y, int64_t k)`)]));
  return {
    lib,
    koffiVersion: koffi.version,
    quantize(type, src, nrows, nPerRow) {
      const dst = new Uint8Array(rowBytes(type, nPerRow) * nrows);
      const written = Number(quantizeChunk(type, src, dst, 0, nrows, nPerRow, null));
      if (written !== dst.byteLength) throw new Error(`ggml_quantize_chunk(${GgmlType[type]}) wrote ${written} bytes, expected ${dst.byteLength}`);
      return dst;
    },
    dequantize(type, bytes, n) {
      const y = new Float32Array(n);
      y.fill(Number.NaN); // anything ggml fails to write shows up as a mismatch
      dq.get(type)!(bytes, y, n);
      return y;
    },
  };
}
