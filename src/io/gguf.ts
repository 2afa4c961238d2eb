// GGUF v2/v3 reader and writer (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
// The header is parsed from a bounded prefix of the file; tensor data is read per tensor on
// demand, so multi-gigabyte files are never held in memory whole.
import fs from "node:fs";
import { ModelFileError } from "../core/errors.js";
import { ByteReader, bf16BytesToF32, f16BytesToF32 } from "./binary.js";
import { canDequantize, dequantize, quantizeQ8_0 } from "./gguf-quants.js";

export enum GgufValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

export enum GgmlType {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
}

/** Bytes per block and elements per block, per ggml type (ggml.c type_traits). */
const BLOCK: Partial<Record<GgmlType, [elems: number, bytes: number]>> = {
  [GgmlType.F32]: [1, 4],
  [GgmlType.F16]: [1, 2],
  [GgmlType.BF16]: [1, 2],
  [GgmlType.Q4_0]: [32, 18],
  [GgmlType.Q4_1]: [32, 20],
  [GgmlType.Q5_0]: [32, 22],
  [GgmlType.Q5_1]: [32, 24],
  [GgmlType.Q8_0]: [32, 34],
  [GgmlType.Q2_K]: [256, 84],
  [GgmlType.Q3_K]: [256, 110],
  [GgmlType.Q4_K]: [256, 144],
  [GgmlType.Q5_K]: [256, 176],
  [GgmlType.Q6_K]: [256, 210],
  [GgmlType.Q8_K]: [256, 292],
};

/** [elements, bytes] of one block of a ggml type this reader knows (ggml-common.h), or undefined. */
export function ggmlBlock(type: GgmlType): [elems: number, bytes: number] | undefined {
  return BLOCK[type];
}

export type GgufValue = number | bigint | boolean | string | GgufValue[];

export interface GgufTensorInfo {
  name: string;
  /** ggml order: ne[0] is the fastest-varying (row length). */
  ne: number[];
  type: GgmlType;
  /** Absolute byte offset of the data in the file. */
  offset: number;
  byteLength: number;
}

export interface GgufFile {
  path: string;
  version: number;
  metadata: Map<string, GgufValue>;
  tensors: Map<string, GgufTensorInfo>;
  fileSize: number;
  /** Each metadata value's stored type (and an array's item type), for writing a copy exactly. */
  metadataTypes?: Map<string, { type: GgufValueType; itemType?: GgufValueType }>;
}

const MAX_HEADER_BYTES = 1 << 30;
/** The first header window. Most headers fit; a longer one is read on in growing steps. */
const FIRST_HEADER_WINDOW = 1 << 20;

/** Parse a GGUF file's header (metadata and tensor directory). Reads a prefix of the file, never tensor data on purpose. */
export function readGguf(path: string): GgufFile {
  let fileSize: number;
  try {
    fileSize = fs.statSync(path).size;
  } catch {
    throw new ModelFileError(path, "cannot read the file", "check the path");
  }
  let bytes = readRange(path, 0, Math.min(fileSize, FIRST_HEADER_WINDOW));
  for (;;) {
    try {
      return parseHeader(bytes, path, fileSize);
    } catch (e) {
      // The header may simply be longer than the window read so far: read on and retry.
      const window = bytes.byteLength;
      if (e instanceof ModelFileError && /truncated/.test(e.message) && window < fileSize && window < MAX_HEADER_BYTES) {
        const grown = new Uint8Array(Math.min(fileSize, window * 4, MAX_HEADER_BYTES));
        grown.set(bytes);
        readRangeInto(path, window, grown.subarray(window));
        bytes = grown;
        continue;
      }
      throw e;
    }
  }
}

function parseHeader(bytes: Uint8Array, path: string, fileSize: number): GgufFile {
  const r = new ByteReader(bytes, path);
  if (bytes.byteLength < 4 || r.utf8(4, "magic") !== "GGUF") {
    throw new ModelFileError(path, "not a GGUF file (bad magic)", "pass a .gguf model file");
  }
  const version = r.u32();
  if (version !== 2 && version !== 3) {
    throw new ModelFileError(path, `unsupported GGUF version ${version}`, "convert it with a current llama.cpp (GGUF v3)");
  }
  const nTensors = r.u64("tensor count");
  const nKv = r.u64("metadata count");
  // Each entry needs at least 8+4 bytes, so a larger count cannot be real.
  if (nKv * 12 > fileSize || nTensors * 16 > fileSize) {
    throw new ModelFileError(path, `corrupt header: declares ${nKv} metadata entries and ${nTensors} tensors`);
  }
  const str = (what: string) => r.utf8(r.u64(`${what} length`), what);
  /** The item type of the top-level array value() last read (for metadataTypes). */
  let topItemType: GgufValueType | undefined;
  const value = (t: number, key: string, depth: number): GgufValue => {
    switch (t) {
      case GgufValueType.UINT8:
        return r.u8();
      case GgufValueType.INT8:
        return r.i8();
      case GgufValueType.UINT16:
        return r.u16();
      case GgufValueType.INT16:
        return r.i16();
      case GgufValueType.UINT32:
        return r.u32();
      case GgufValueType.INT32:
        return r.i32();
      case GgufValueType.FLOAT32:
        return r.f32();
      case GgufValueType.BOOL:
        return r.u8() !== 0;
      case GgufValueType.STRING:
        return str(`string value of ${key}`);
      case GgufValueType.UINT64:
        return r.u64(key);
      case GgufValueType.INT64:
        return r.i64(key);
      case GgufValueType.FLOAT64:
        return r.f64();
      case GgufValueType.ARRAY: {
        if (depth > 4) throw new ModelFileError(path, `corrupt metadata: arrays nested too deep in ${key}`);
        const at = r.u32();
        if (depth === 0) topItemType = at;
        const n = r.u64(`array length of ${key}`);
        if (n > fileSize) throw new ModelFileError(path, `corrupt metadata: ${key} declares ${n} elements`);
        const out: GgufValue[] = new Array<GgufValue>();
        for (let i = 0; i < n; i++) out.push(value(at, key, depth + 1));
        return out;
      }
      default:
        throw new ModelFileError(path, `corrupt metadata: unknown value type ${t} for ${key}`);
    }
  };
  const metadata = new Map<string, GgufValue>();
  const metadataTypes = new Map<string, { type: GgufValueType; itemType?: GgufValueType }>();
  for (let i = 0; i < nKv; i++) {
    const key = str("metadata key");
    if (metadata.has(key)) throw new ModelFileError(path, `corrupt metadata: duplicate key ${key}`);
    const type = r.u32() as GgufValueType;
    topItemType = undefined;
    metadata.set(key, value(type, key, 0));
    metadataTypes.set(key, topItemType === undefined ? { type } : { type, itemType: topItemType });
  }
  const infos: Omit<GgufTensorInfo, "offset" | "byteLength">[] = [];
  const rel: number[] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = str("tensor name");
    const nd = r.u32();
    if (nd < 1 || nd > 4) throw new ModelFileError(path, `corrupt tensor directory: ${name} has ${nd} dimensions`);
    const ne: number[] = [];
    for (let j = 0; j < nd; j++) ne.push(r.u64(`dimension of ${name}`));
    const type = r.u32() as GgmlType;
    rel.push(r.u64(`offset of ${name}`));
    infos.push({ name, ne, type });
  }
  const alignment = Number(metadata.get("general.alignment") ?? 32);
  if (!Number.isInteger(alignment) || alignment <= 0 || alignment > 1 << 20) {
    throw new ModelFileError(path, `corrupt metadata: general.alignment = ${alignment}`);
  }
  const base = Math.ceil(r.offset / alignment) * alignment;
  const tensors = new Map<string, GgufTensorInfo>();
  infos.forEach((t, i) => {
    if (tensors.has(t.name)) throw new ModelFileError(path, `corrupt tensor directory: duplicate tensor ${t.name}`);
    const block = BLOCK[t.type];
    if (!block) {
      throw new ModelFileError(path, `tensor ${t.name} has ggml type ${GgmlType[t.type] ?? t.type}, which selfscope cannot read`, "convert the model to F32, F16, BF16 or Q8_0");
    }
    const n = t.ne.reduce((a, b) => a * b, 1);
    if (!Number.isSafeInteger(n) || t.ne[0]! % block[0] !== 0) {
      throw new ModelFileError(path, `corrupt tensor directory: ${t.name} has shape [${t.ne}]`);
    }
    const byteLength = (n / block[0]) * block[1];
    const offset = base + rel[i]!;
    if (offset + byteLength > fileSize) {
      throw new ModelFileError(path, `truncated: tensor ${t.name} needs bytes ${offset}..${offset + byteLength} but the file has ${fileSize}`);
    }
    tensors.set(t.name, { ...t, offset, byteLength });
  });
  return { path, version, metadata, tensors, fileSize, metadataTypes };
}

export function readRange(path: string, offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  readRangeInto(path, offset, buf);
  return buf;
}

/** Fill `dst` with the file's bytes from `offset` (positioned reads; throws if the file ends first). */
const READ_CHUNK = 8 << 20;

export function readRangeInto(path: string, offset: number, dst: Uint8Array): void {
  const length = dst.byteLength;
  const fd = fs.openSync(path, "r");
  try {
    let done = 0;
    while (done < length) {
      // Bounded reads: a destination in a SharedArrayBuffer (the CPU engine's memory with
      // threads) may go through a temporary buffer as large as the read.
      const n = fs.readSync(fd, dst, done, Math.min(length - done, READ_CHUNK), offset + done);
      if (n === 0) throw new ModelFileError(path, `truncated: expected ${length} bytes at offset ${offset}`);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Type-safe metadata access with a clear error when a required key is missing. */
export function ggufGet<T extends GgufValue>(f: GgufFile, key: string, kind: "number" | "string" | "array" | "boolean"): T {
  const v = f.metadata.get(key);
  if (v === undefined) throw new ModelFileError(f.path, `missing metadata key ${key}`);
  const ok = kind === "array" ? Array.isArray(v) : kind === "number" ? typeof v === "number" : typeof v === kind;
  if (!ok) throw new ModelFileError(f.path, `metadata key ${key} should be a ${kind}`);
  return v as T;
}

export function ggufOpt<T extends GgufValue>(f: GgufFile, key: string): T | undefined {
  return f.metadata.get(key) as T | undefined;
}

/** Row-major shape of a tensor (ne reversed), from the header alone. */
export function ggufTensorShape(t: GgufTensorInfo): number[] {
  return [...t.ne].reverse();
}

/** Throw the error readGgufTensor would give for a tensor of a type this build cannot widen, without reading it. */
export function checkGgufTensorReadable(f: GgufFile, name: string): GgufTensorInfo {
  const t = f.tensors.get(name);
  if (!t) throw new ModelFileError(f.path, `missing tensor ${name}`);
  if (t.type !== GgmlType.F32 && t.type !== GgmlType.F16 && t.type !== GgmlType.BF16 && !canDequantize(t.type)) {
    throw new ModelFileError(f.path, `tensor ${name} is ${GgmlType[t.type]}, which this build cannot dequantize`, "convert the model to F32/F16");
  }
  return t;
}

/** Read one tensor and widen it to f32. Shape is returned in row-major order (ne reversed). */
export function readGgufTensor(f: GgufFile, name: string): { data: Float32Array; shape: number[] } {
  const t = checkGgufTensorReadable(f, name);
  const shape = ggufTensorShape(t);
  if (t.type === GgmlType.F32) {
    // Read straight into the result's buffer: no second copy.
    const data = new Float32Array(t.byteLength / 4);
    readRangeInto(f.path, t.offset, new Uint8Array(data.buffer));
    return { data, shape };
  }
  const bytes = readRange(f.path, t.offset, t.byteLength);
  switch (t.type) {
    case GgmlType.F16:
      return { data: f16BytesToF32(bytes), shape };
    case GgmlType.BF16:
      return { data: bf16BytesToF32(bytes), shape };
    default:
      return { data: dequantize(t.type, bytes, t.ne.reduce((a, b) => a * b, 1), f.path), shape };
  }
}

// ---------------------------------------------------------------- writer (fixtures and tests)

export type GgufWriteValue =
  | { type: GgufValueType.STRING; value: string }
  | { type: GgufValueType.UINT32 | GgufValueType.INT32 | GgufValueType.FLOAT32 | GgufValueType.UINT64 | GgufValueType.BOOL; value: number | boolean }
  | { type: GgufValueType.ARRAY; itemType: GgufValueType; value: (string | number)[] };

export interface GgufWriteTensor {
  name: string;
  /** Row-major shape (written reversed as ggml ne). */
  shape: number[];
  type: GgmlType;
  /** The values; encoded here for F32, F16 and Q8_0. */
  data: Float32Array;
  /** Bytes already encoded in `type` (e.g. by ggml's quantizer, src/reference/ggml.ts): written as they are. */
  raw?: Uint8Array;
}

/** A parsed file's metadata as writeGguf takes it, each value with its stored type (`replace` overrides keys). */
export function ggufMetadataForWrite(g: GgufFile, replace: Record<string, GgufWriteValue> = {}): Record<string, GgufWriteValue> {
  const out: Record<string, GgufWriteValue> = {};
  for (const [k, v] of g.metadata) {
    if (k in replace) {
      out[k] = replace[k]!;
      continue;
    }
    const t = g.metadataTypes?.get(k);
    if (!t) throw new Error(`ggufMetadataForWrite: ${g.path} was not parsed by readGguf (no type for ${k})`);
    const toScalar = (x: GgufValue): string | number => (typeof x === "bigint" ? Number(x) : typeof x === "boolean" ? Number(x) : (x as string | number));
    if (t.type === GgufValueType.ARRAY) out[k] = { type: GgufValueType.ARRAY, itemType: t.itemType!, value: (v as GgufValue[]).map(toScalar) };
    else out[k] = { type: t.type, value: typeof v === "bigint" ? Number(v) : v } as GgufWriteValue;
  }
  return out;
}

export function writeGguf(path: string, metadata: Record<string, GgufWriteValue>, tensors: GgufWriteTensor[], alignment = 32): void {
  const parts: Uint8Array[] = [];
  const enc = new TextEncoder();
  const u32 = (v: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, v, true); parts.push(b); };
  const u64 = (v: number) => { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(v), true); parts.push(b); };
  const str = (s: string) => { const b = enc.encode(s); u64(b.length); parts.push(b); };
  const scalar = (t: GgufValueType, v: string | number | boolean) => {
    const b = new Uint8Array(8);
    const dv = new DataView(b.buffer);
    switch (t) {
      case GgufValueType.STRING: return str(String(v));
      case GgufValueType.UINT32: dv.setUint32(0, Number(v), true); return parts.push(b.subarray(0, 4));
      case GgufValueType.INT32: dv.setInt32(0, Number(v), true); return parts.push(b.subarray(0, 4));
      case GgufValueType.FLOAT32: dv.setFloat32(0, Number(v), true); return parts.push(b.subarray(0, 4));
      case GgufValueType.UINT64: return u64(Number(v));
      case GgufValueType.BOOL: return parts.push(new Uint8Array([v ? 1 : 0]));
      default: throw new Error(`writeGguf: unsupported scalar type ${t}`);
    }
  };
  parts.push(enc.encode("GGUF"));
  u32(3);
  u64(tensors.length);
  u64(Object.keys(metadata).length);
  for (const [k, v] of Object.entries({ ...metadata })) {
    str(k);
    u32(v.type);
    if (v.type === GgufValueType.ARRAY) {
      u32(v.itemType);
      u64(v.value.length);
      for (const item of v.value) scalar(v.itemType, item);
    } else scalar(v.type, v.value);
  }
  let off = 0;
  const datas: Uint8Array[] = [];
  for (const t of tensors) {
    str(t.name);
    u32(t.shape.length);
    for (const d of [...t.shape].reverse()) u64(d);
    u32(t.type);
    u64(off);
    const bytes = t.raw ?? (t.type === GgmlType.F32 ? new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) : t.type === GgmlType.Q8_0 ? quantizeQ8_0(t.data) : t.type === GgmlType.F16 ? f32ToF16Bytes(t.data) : undefined);
    if (!bytes) throw new Error(`writeGguf: ${t.name}: pass ${GgmlType[t.type]} data already encoded (raw)`);
    datas.push(bytes);
    off += Math.ceil(bytes.byteLength / alignment) * alignment;
  }
  const headerLen = parts.reduce((a, b) => a + b.byteLength, 0);
  parts.push(new Uint8Array(Math.ceil(headerLen / alignment) * alignment - headerLen));
  for (const d of datas) {
    parts.push(d);
    const p = Math.ceil(d.byteLength / alignment) * alignment - d.byteLength;
    if (p) parts.push(new Uint8Array(p));
  }
  // Part by part: a file over Node's largest Buffer (an 8B-parameter model) is written as well.
  const fd = fs.openSync(path, "w");
  try {
    for (const b of parts) for (let done = 0; done < b.byteLength; ) done += fs.writeSync(fd, b, done, Math.min(b.byteLength - done, 1 << 30));
  } finally {
    fs.closeSync(fd);
  }
}

/** Round-to-nearest-even f32 -> f16 bytes. */
export function f32ToF16Bytes(x: Float32Array): Uint8Array {
  const out = new Uint16Array(x.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < x.length; i++) {
    f[0] = x[i]!;
    const b = u[0]!;
    const sign = (b >>> 16) & 0x8000;
    const e = (b >>> 23) & 0xff;
    let m = b & 0x7fffff;
    if (e === 0xff) { out[i] = sign | 0x7c00 | (m ? 0x200 : 0); continue; }
    const ne = e - 127 + 15;
    if (ne >= 31) { out[i] = sign | 0x7c00; continue; }
    if (ne <= 0) {
      if (ne < -10) { out[i] = sign; continue; }
      m |= 0x800000;
      const shift = 14 - ne;
      let h = m >>> shift;
      const rem = m & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && h & 1)) h++;
      out[i] = sign | h;
      continue;
    }
    let h = (ne << 10) | (m >>> 13);
    const rem = m & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
    out[i] = sign | h;
  }
  return new Uint8Array(out.buffer);
}
