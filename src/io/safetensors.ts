// safetensors reader (https://huggingface.co/docs/safetensors): an 8-byte header length, a JSON
// header, then raw little-endian tensor data. Single files and sharded checkpoints
// (model.safetensors.index.json). F32/F16/BF16 are widened to f32 when a tensor is read.
import fs from "node:fs";
import path from "node:path";
import { ModelFileError } from "../core/errors.js";
import { bf16BytesToF32, f16BytesToF32 } from "./binary.js";
import { readRange, readRangeInto } from "./gguf.js";

export type StDtype = "F32" | "F16" | "BF16" | "F64" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2";

const DTYPE_BYTES: Record<string, number> = { F32: 4, F16: 2, BF16: 2, F64: 8, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1 };

export interface StTensorInfo {
  file: string;
  dtype: StDtype;
  shape: number[];
  /** Absolute byte offset in `file`. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsSet {
  /** Where the checkpoint was named (a file or an index). */
  source: string;
  tensors: Map<string, StTensorInfo>;
  metadata: Record<string, string>;
}

const MAX_HEADER = 100 << 20; // the format itself caps headers at 100 MB

/** Parse one .safetensors file's header. */
export function readSafetensorsHeader(file: string): SafetensorsSet {
  let size: number;
  try {
    size = fs.statSync(file).size;
  } catch {
    throw new ModelFileError(file, "cannot read the file", "check the path");
  }
  if (size < 8) throw new ModelFileError(file, `truncated: ${size} bytes is too short for a safetensors header`);
  const n = new DataView(readRange(file, 0, 8).buffer).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER) || Number(n) + 8 > size) {
    throw new ModelFileError(file, `corrupt or truncated: header length ${n} exceeds the file size ${size}`);
  }
  const headerLen = Number(n);
  let header: unknown;
  const text = new TextDecoder().decode(readRange(file, 8, headerLen));
  try {
    header = JSON.parse(text);
  } catch (e) {
    throw new ModelFileError(file, `corrupt header JSON (${(e as Error).message})`);
  }
  // JSON.parse keeps the last of duplicate keys silently; a header naming a tensor twice is corrupt.
  const dup = duplicateTopLevelKey(text);
  if (dup !== null) throw new ModelFileError(file, `corrupt header: tensor ${dup} is listed twice`);
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new ModelFileError(file, "corrupt header: not a JSON object");
  }
  const base = 8 + headerLen;
  const tensors = new Map<string, StTensorInfo>();
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      metadata = (raw ?? {}) as Record<string, string>;
      continue;
    }
    const t = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    const bad = (why: string) => new ModelFileError(file, `corrupt header entry for tensor ${name}: ${why}`);
    if (typeof t.dtype !== "string" || !(t.dtype in DTYPE_BYTES)) throw bad(`unknown dtype ${String(t.dtype)}`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw bad("bad shape");
    const off = t.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0) || off[1] < off[0]) {
      throw bad("bad data_offsets");
    }
    const shape = t.shape as number[];
    const count = shape.reduce((a, b) => a * b, 1);
    const byteLength = (off[1] as number) - (off[0] as number);
    if (count * DTYPE_BYTES[t.dtype]! !== byteLength) throw bad(`shape [${shape}] of ${t.dtype} does not match ${byteLength} bytes`);
    const offset = base + (off[0] as number);
    if (offset + byteLength > size) {
      throw new ModelFileError(file, `truncated: tensor ${name} needs bytes up to ${offset + byteLength} but the file has ${size}`);
    }
    tensors.set(name, { file, dtype: t.dtype as StDtype, shape, offset, byteLength });
  }
  return { source: file, tensors, metadata };
}

/** Open a single file, or a sharded checkpoint through its index JSON. */
export function openSafetensors(fileOrIndex: string): SafetensorsSet {
  if (!fileOrIndex.endsWith(".index.json")) return readSafetensorsHeader(fileOrIndex);
  let index: { weight_map?: Record<string, string> };
  try {
    index = JSON.parse(fs.readFileSync(fileOrIndex, "utf8")) as typeof index;
  } catch (e) {
    throw new ModelFileError(fileOrIndex, `cannot parse the shard index (${(e as Error).message})`);
  }
  if (!index.weight_map || typeof index.weight_map !== "object") {
    throw new ModelFileError(fileOrIndex, "shard index has no weight_map");
  }
  const dir = path.dirname(fileOrIndex);
  const shards = new Map<string, SafetensorsSet>();
  const tensors = new Map<string, StTensorInfo>();
  for (const [name, shard] of Object.entries(index.weight_map)) {
    if (path.basename(shard) !== shard) throw new ModelFileError(fileOrIndex, `shard name ${shard} must be a plain file name`);
    let set = shards.get(shard);
    if (!set) {
      set = readSafetensorsHeader(path.join(dir, shard));
      shards.set(shard, set);
    }
    const info = set.tensors.get(name);
    if (!info) throw new ModelFileError(path.join(dir, shard), `the index says it holds ${name}, but it does not`);
    tensors.set(name, info);
  }
  return { source: fileOrIndex, tensors, metadata: {} };
}

/** Throw the error readStTensor would give for a dtype selfscope does not read, without reading the tensor. */
export function checkStTensorReadable(set: SafetensorsSet, name: string): StTensorInfo {
  const t = set.tensors.get(name);
  if (!t) throw new ModelFileError(set.source, `missing tensor ${name}`);
  if (t.dtype !== "F32" && t.dtype !== "F16" && t.dtype !== "BF16") {
    throw new ModelFileError(t.file, `tensor ${name} has dtype ${t.dtype}; selfscope reads F32, F16 and BF16 weights`);
  }
  return t;
}

/** Read a tensor and widen it to f32 (positioned reads of its byte range only). */
export function readStTensor(set: SafetensorsSet, name: string): { data: Float32Array; shape: number[] } {
  const t = checkStTensorReadable(set, name);
  if (t.dtype === "F32") {
    // Read straight into the result's buffer: no second copy.
    const data = new Float32Array(t.byteLength / 4);
    readRangeInto(t.file, t.offset, new Uint8Array(data.buffer));
    return { data, shape: t.shape };
  }
  const bytes = readRange(t.file, t.offset, t.byteLength);
  return { data: t.dtype === "F16" ? f16BytesToF32(bytes) : bf16BytesToF32(bytes), shape: t.shape };
}

/** Write an F32 safetensors file (fixtures, exported checkpoints). */
export function writeSafetensors(file: string, tensors: Record<string, { data: Float32Array; shape: number[] }>, metadata: Record<string, string> = {}): void {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let off = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: "F32", shape: t.shape, data_offsets: [off, off + t.data.byteLength] };
    off += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((json.length + 8) % 8)) % 8);
  const hb = new TextEncoder().encode(json);
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(hb.length), true);
  const parts: Uint8Array[] = [len, hb, ...Object.values(tensors).map((t) => new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength))];
  fs.writeFileSync(file, Buffer.concat(parts));
}

/** The first top-level key of a JSON object text that occurs twice, or null. */
export function duplicateTopLevelKey(json: string): string | null {
  const seen = new Set<string>();
  let depth = 0;
  let expectKey = false;
  for (let i = 0; i < json.length; i++) {
    const ch = json[i];
    if (ch === '"') {
      let j = i + 1;
      while (j < json.length && json[j] !== '"') j += json[j] === "\\" ? 2 : 1;
      if (depth === 1 && expectKey) {
        const key = JSON.parse(json.slice(i, j + 1)) as string;
        if (seen.has(key)) return key;
        seen.add(key);
        expectKey = false;
      }
      i = j;
    } else if (ch === "{" || ch === "[") {
      depth++;
      if (depth === 1 && ch === "{") expectKey = true;
    } else if (ch === "}" || ch === "]") depth--;
    else if (ch === "," && depth === 1) expectKey = true;
  }
  return null;
}
