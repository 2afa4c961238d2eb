// Load a checkpoint named by a path into host (Float32Array) weights under canonical names,
// checking every expected tensor exists with the expected shape and rejecting unexpected ones.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { ModelFileError, UnsupportedArchitectureError, UsageError, WeightShapeError } from "../core/errors.js";

/** A weight file holding NaN or Inf. */
export class NumericalWeightsError extends ModelFileError {
  override name = "NumericalWeightsError";
}
import { checkGgufTensorReadable, GgmlType, ggmlBlock, ggufTensorShape, readGguf, readGgufTensor, readRange, readRangeInto, type GgufFile } from "../io/gguf.js";
import { fileSha256, type FileHashOptions } from "../io/file-hash.js";
import { repackQ4_K, repackQ5_K, repackQ6_K, splitScaledBlocks } from "../io/gguf-quants.js";
import type { QuantReadIo, QuantType } from "../engine/weights.js";
import { quantBytes } from "../engine/cpu/qkernels.js";
import { resolveModelPath } from "../io/hub-cache.js";
import { checkStTensorReadable, openSafetensors, readStTensor, type SafetensorsSet } from "../io/safetensors.js";
import { expectedParams, validateConfigSource, validateModelConfig, type ModelConfig } from "../engine/config.js";
import type { Family, HfConfig, WeightSource, WeightTable } from "./family.js";
import { FAMILIES } from "./families/index.js";

export interface HostTensor {
  data: Float32Array;
  shape: number[];
}

export interface ModelFiles {
  /** What the user named. */
  path: string;
  format: "gguf" | "safetensors";
  /** The weight file (GGUF, single safetensors, or shard index). */
  weights: string;
  /** HF folder files, when present. */
  configJson?: string;
  generationConfig?: string;
  tokenizerJson?: string;
  tokenizerConfig?: string;
}

export interface HostModel {
  family: Family;
  config: ModelConfig;
  weights: Map<string, HostTensor>;
  files: ModelFiles;
  gguf?: GgufFile;
  /** Source dtype summary, e.g. "F32" or "F16+F32". */
  sourceDtype: string;
}

/** Work out which files make up the model at `p` (a folder, a .gguf, or a .safetensors). */
export function resolveModelFiles(p: string): ModelFiles {
  if (!fs.existsSync(p)) throw new ModelFileError(p, "no such file or folder", "pass a .gguf file or a Hugging Face model folder");
  const stat = fs.statSync(p);
  const side = (dir: string): Omit<ModelFiles, "path" | "format" | "weights"> => {
    const f = (n: string) => (fs.existsSync(path.join(dir, n)) ? path.join(dir, n) : undefined);
    const out: Omit<ModelFiles, "path" | "format" | "weights"> = {};
    const c = f("config.json"), g = f("generation_config.json"), t = f("tokenizer.json"), tc = f("tokenizer_config.json");
    if (c) out.configJson = c;
    if (g) out.generationConfig = g;
    if (t) out.tokenizerJson = t;
    if (tc) out.tokenizerConfig = tc;
    return out;
  };
  if (stat.isDirectory()) {
    const idx = path.join(p, "model.safetensors.index.json");
    const single = path.join(p, "model.safetensors");
    const weights = fs.existsSync(idx) ? idx : fs.existsSync(single) ? single : undefined;
    if (weights) {
      const s = side(p);
      if (!s.configJson) throw new ModelFileError(p, "folder has safetensors weights but no config.json", "download config.json with the weights");
      return { path: p, format: "safetensors", weights, ...s };
    }
    const ggufs = fs.readdirSync(p).filter((n) => n.endsWith(".gguf"));
    if (ggufs.length === 1) return { path: p, format: "gguf", weights: path.join(p, ggufs[0]!) };
    throw new ModelFileError(p, "folder has no model.safetensors(.index.json) and not exactly one .gguf", "pass the weight file itself");
  }
  if (p.endsWith(".gguf")) return { path: p, format: "gguf", weights: p };
  if (p.endsWith(".safetensors") || p.endsWith(".index.json")) {
    const s = side(path.dirname(p));
    if (!s.configJson) throw new ModelFileError(p, "no config.json beside the safetensors file", "put the model's config.json in the same folder");
    return { path: p, format: "safetensors", weights: p, ...s };
  }
  // Sniff the magic for extension-less files.
  const head = Buffer.alloc(4);
  const fd = fs.openSync(p, "r");
  fs.readSync(fd, head, 0, 4, 0);
  fs.closeSync(fd);
  if (head.toString("ascii") === "GGUF") return { path: p, format: "gguf", weights: p };
  throw new ModelFileError(p, "not a GGUF, safetensors file or model folder", "pass a .gguf file or a Hugging Face model folder");
}

/** Every file holding the weights: the GGUF or safetensors file, or a shard index and each shard it names. */
export function weightFiles(files: ModelFiles): string[] {
  if (!files.weights.endsWith(".index.json")) return [files.weights];
  let index: { weight_map?: unknown };
  try {
    index = JSON.parse(fs.readFileSync(files.weights, "utf8")) as typeof index;
  } catch (e) {
    throw new ModelFileError(files.weights, `cannot parse the shard index (${(e as Error).message})`);
  }
  const map = index.weight_map;
  if (typeof map !== "object" || map === null) throw new ModelFileError(files.weights, "shard index has no weight_map");
  const shards = [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort();
  for (const s of shards) if (path.basename(s) !== s) throw new ModelFileError(files.weights, `shard name ${s} must be a plain file name`);
  return [files.weights, ...shards.map((s) => path.join(path.dirname(files.weights), s))];
}

/**
 * The weights' identity: sha256 over every byte of every weight file (GGUF: the whole file, its
 * tokenizer and template included; safetensors: header and every tensor; sharded: the index and
 * every shard). Cached per file by size, mtime, ctime and inode (see io/file-hash.ts).
 */
export function weightsDigest(files: ModelFiles, opts: FileHashOptions = {}): string {
  const list = weightFiles(files);
  if (list.length === 1) return fileSha256(list[0]!, opts);
  const h = createHash("sha256");
  for (const f of list) h.update(`${path.basename(f)}\0${fileSha256(f, opts)}\n`);
  return h.digest("hex");
}

/**
 * The identity selfscope 0.1 logged (sha256 of the size and the first and last MiB of the weight
 * file, 16 hex digits): blind to the middle of the file and to shards. Only for recognising a run
 * started by that version.
 */
export function legacyWeightsHash(files: ModelFiles): string {
  const f = files.weights;
  const h = createHash("sha256");
  const size = fs.statSync(f).size;
  h.update(String(size));
  const n = Math.min(size, 1 << 20);
  h.update(readRange(f, 0, n));
  h.update(readRange(f, size - n, n));
  return h.digest("hex").slice(0, 16);
}

export function readJson(file: string): HfConfig {
  let v: unknown;
  try {
    v = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    throw new ModelFileError(file, `not valid JSON (${(e as Error).message})`, "re-download the file");
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new ModelFileError(file, "expected a JSON object");
  return v as HfConfig;
}

function pickFamily(kind: "hf" | "gguf", arch: string, file: string): Family {
  const f = FAMILIES.find((fam) => fam.matches[kind].includes(arch));
  if (!f) {
    const known = FAMILIES.flatMap((fam) => fam.matches[kind]).join(", ");
    throw new UnsupportedArchitectureError(file, `architecture "${arch}" is not supported`, `supported: ${known}`);
  }
  return f;
}

export interface LoadOptions {
  /**
   * Read each weight from the file only when it is asked for (default false). Everything that can
   * be checked from the headers (architecture, config, missing / unexpected tensors, shapes after
   * transposes and splits, readable dtypes) is still checked at load; the NaN/Inf check moves to the
   * read. `weights` is then a {@link LazyWeights}: `get` reads, and does not keep, the tensor.
   */
  lazy?: boolean;
}

/** Where the loader finds source tensors: header facts, and the data on demand. */
interface TensorSource {
  file: string;
  names: Set<string>;
  /** Row-major shape from the header. */
  shape(name: string): number[];
  /** Throw the read's dtype error now, without reading. */
  checkReadable(name: string): void;
  read(name: string): HostTensor;
  /** Where an F32 tensor's bytes are (a read straight into caller memory), or null for other dtypes. */
  f32Range(name: string): { file: string; offset: number; byteLength: number } | null;
  /** Where a Q8_0, Q4_K (GGUF) or BF16 (GGUF, safetensors) tensor's bytes are, or null for other dtypes. */
  quantRange?(name: string): { file: string; offset: number; byteLength: number; type: QuantType } | null;
}

/**
 * Load config and host weights. `check` runs on the config before any weight is read.
 * With `{ lazy: true }` no tensor data is read at load (see {@link LoadOptions}).
 */
export function loadHostModel(p: string, check?: (c: ModelConfig, source: string, info?: FileFacts) => void, opts: LoadOptions = {}): HostModel {
  const lazy = opts.lazy ?? false;
  const files = resolveModelFiles(resolveModelPath(p));
  if (files.format === "gguf") {
    const g = readGguf(files.weights);
    const arch = g.metadata.get("general.architecture");
    if (typeof arch !== "string") throw new ModelFileError(files.weights, "missing general.architecture");
    const family = pickFamily("gguf", arch, files.weights);
    if (!family.fromGguf || !family.gguf) throw new UnsupportedArchitectureError(files.weights, `family ${family.id} has no GGUF mapping`);
    validateConfigSource(files.weights, { format: "gguf", arch, get: (k) => g.metadata.get(k) }, configError);
    const config = withConfigErrors(files.weights, () => family.fromGguf!(g));
    check?.(config, files.weights, { nativeQuantBytes: ggufNativeQuantBytes(g) });
    const dtypes = new Set([...g.tensors.values()].map((t) => String(t.type)));
    const source: TensorSource = {
      file: files.weights,
      names: new Set(g.tensors.keys()),
      shape: (n) => ggufTensorShape(g.tensors.get(n)!),
      checkReadable: (n) => void checkGgufTensorReadable(g, n),
      read: (n) => readGgufTensor(g, n),
      f32Range: (n) => {
        const t = g.tensors.get(n);
        return t && t.type === GgmlType.F32 ? { file: g.path, offset: t.offset, byteLength: t.byteLength } : null;
      },
      quantRange: (n) => {
        const t = g.tensors.get(n);
        const type = t ? nativeTypeOf(t.type) : null;
        return t && type ? { file: g.path, offset: t.offset, byteLength: t.byteLength, type } : null;
      },
    };
    const weights = mapWeights(config, family.gguf, [], family.ggufIgnore, source, lazy);
    const typeNames = [...dtypes].map((t) => GgmlType[Number(t)] ?? `ggml type ${t}`);
    return { family, config, weights, files, gguf: g, sourceDtype: typeNames.join("+") };
  }
  const hf = readJson(files.configJson!);
  const archs = hf.architectures;
  const arch = Array.isArray(archs) && typeof archs[0] === "string" ? archs[0] : String(hf.model_type ?? "unknown");
  const family = pickFamily("hf", arch, files.configJson!);
  if (!family.fromHf || !family.safetensors) throw new UnsupportedArchitectureError(files.configJson!, `family ${family.id} has no safetensors mapping`);
  validateConfigSource(files.configJson!, { format: "hf", get: (k) => hf[k] }, configError);
  const text = hf.text_config;
  if (typeof text === "object" && text !== null && !Array.isArray(text)) validateConfigSource(files.configJson!, { format: "hf", get: (k) => (text as Record<string, unknown>)[k], prefix: "text_config." }, configError);
  const config = withConfigErrors(files.configJson!, () => family.fromHf!(hf));
  // The headers give the native size for the memory check; a file that cannot be opened fails after the check.
  let st0: SafetensorsSet | undefined;
  let openError: unknown;
  try {
    st0 = openSafetensors(files.weights);
  } catch (e) {
    openError = e;
  }
  check?.(config, files.path, st0 ? { nativeQuantBytes: [...st0.tensors.values()].reduce((a, t) => a + (t.dtype === "BF16" || t.dtype === "F16" ? t.byteLength : 4 * t.shape.reduce((x, y) => x * y, 1)), 0) } : undefined);
  if (!st0) throw openError;
  if (files.generationConfig) {
    const gen = readJson(files.generationConfig);
    const eos = gen.eos_token_id;
    const list = typeof eos === "number" ? [eos] : Array.isArray(eos) ? eos.filter((x): x is number => typeof x === "number") : [];
    config.eosTokenIds = [...new Set([...list, ...config.eosTokenIds])];
  }
  const st: SafetensorsSet = st0;
  const dtypes = [...new Set([...st.tensors.values()].map((t) => t.dtype))];
  const source: TensorSource = {
    file: files.weights,
    names: new Set(st.tensors.keys()),
    shape: (n) => [...st.tensors.get(n)!.shape],
    checkReadable: (n) => void checkStTensorReadable(st, n),
    read: (n) => readStTensor(st, n),
    f32Range: (n) => {
      const t = st.tensors.get(n);
      return t && t.dtype === "F32" ? { file: t.file, offset: t.offset, byteLength: t.byteLength } : null;
    },
    quantRange: (n) => {
      const t = st.tensors.get(n);
      return t && (t.dtype === "BF16" || t.dtype === "F16") ? { file: t.file, offset: t.offset, byteLength: t.byteLength, type: t.dtype === "BF16" ? "bf16" : "f16" } : null;
    },
  };
  const weights = mapWeights(config, family.safetensors, family.safetensorsAliases ?? [], family.safetensorsIgnore, source, lazy);
  return { family, config, weights, files, sourceDtype: dtypes.join("+") };
}

/** What the memory check may know of a file before any weight is read. */
export interface FileFacts {
  /**
   * Bytes the cpu engine needs for the weights kept in their format ("native": Q8_0 1.125,
   * Q4_K 0.59375 and BF16 2 bytes per weight, engine/cpu/qkernels.ts) with every other tensor as f32.
   */
  nativeQuantBytes: number;
}

/** BF16 values as they are; returns the index of the first NaN/Inf (exponent bits all ones), or -1. */
function copyBf16(bytes: Uint8Array, dst: Uint8Array): number {
  if (dst.byteLength !== bytes.byteLength) throw new UsageError(`internal: ${bytes.byteLength} BF16 bytes for ${dst.byteLength}`);
  dst.set(bytes);
  for (let i = 1; i < bytes.length; i += 2) if ((bytes[i]! & 0x7f) === 0x7f && (bytes[i - 1]! & 0x80) === 0x80) return (i - 1) / 2;
  return -1;
}

/** F16 values as they are; returns the index of the first NaN/Inf (exponent bits all ones), or -1. */
function copyF16(bytes: Uint8Array, dst: Uint8Array): number {
  if (dst.byteLength !== bytes.byteLength) throw new UsageError(`internal: ${bytes.byteLength} F16 bytes for ${dst.byteLength}`);
  dst.set(bytes);
  for (let i = 1; i < bytes.length; i += 2) if ((bytes[i]! & 0x7c) === 0x7c) return (i - 1) / 2;
  return -1;
}

/** The ggml type of each layout the cpu engine computes on without widening (engine/cpu/qkernels.ts). */
const NATIVE_GGML: Record<QuantType, GgmlType> = { q8_0: GgmlType.Q8_0, q4_0: GgmlType.Q4_0, q4_k: GgmlType.Q4_K, q6_k: GgmlType.Q6_K, bf16: GgmlType.BF16, f16: GgmlType.F16, q5_k: GgmlType.Q5_K };

/** The cpu engine's native layout for tensors of ggml type `t`, or null (they are widened to f32). */
function nativeTypeOf(t: GgmlType): QuantType | null {
  return (Object.keys(NATIVE_GGML) as QuantType[]).find((q) => NATIVE_GGML[q] === t) ?? null;
}

/** Whether a checkpoint's dtypes (HostModel.sourceDtype: names joined by "+") include one the cpu engine keeps native. */
export function hasNativeMatrices(sourceDtype: string): boolean {
  const names = new Set(Object.values(NATIVE_GGML).map((t) => GgmlType[t]));
  return sourceDtype.split("+").some((d) => names.has(d));
}

const f32View = (b: Uint8Array) => new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
/** Bytes of a quantized tensor read per slice (readQuantInto). */
const READ_SLICE = 8 << 20;

/** File bytes (rows of blocks) into the cpu engine's layout; each returns the first block (or value) that is not finite, or -1. */
const REPACK: Record<QuantType, (bytes: Uint8Array, wq: Uint8Array, ws: Uint8Array) => number> = {
  q8_0: (b, q, s) => splitScaledBlocks(b, 34, q, f32View(s)),
  q4_0: (b, q, s) => splitScaledBlocks(b, 18, q, f32View(s)),
  q4_k: repackQ4_K,
  q5_k: repackQ5_K,
  q6_k: repackQ6_K,
  bf16: (b, q) => copyBf16(b, q),
  f16: (b, q) => copyF16(b, q),
};

function ggufNativeQuantBytes(g: GgufFile): number {
  let total = 0;
  for (const t of g.tensors.values()) {
    const n = t.ne.reduce((a, b) => a * b, 1);
    const q = nativeTypeOf(t.type);
    const native = q ? quantBytes(q, 1, n) : null;
    total += native ? native.wq + native.ws : n * 4;
  }
  return total;
}

function withConfigErrors(file: string, f: () => ModelConfig): ModelConfig {
  let c: ModelConfig;
  try {
    c = f();
  } catch (e) {
    throw new ModelFileError(file, (e as Error).message, "check the model's configuration");
  }
  const bad = validateModelConfig(c);
  if (bad !== null) throw new ModelFileError(file, bad, "check the model's configuration");
  return c;
}

const configError = (file: string, problem: string, fix: string) => new ModelFileError(file, problem, fix);

/** One canonical weight's recipe: which source tensor, how to transform it, and its checked shape. */
interface Planned {
  canon: string;
  name: string;
  src: WeightSource;
  layer: string | undefined;
  shape: number[];
}

function mapWeights(
  config: ModelConfig,
  table: WeightTable,
  aliases: ((name: string) => string)[],
  ignore: RegExp | undefined,
  source: TensorSource,
  lazy: boolean,
): Map<string, HostTensor> {
  const { file, names: available } = source;
  const expected = expectedParams(config);
  const out = new Map<string, HostTensor>();
  const plan: Planned[] = [];
  const used = new Set<string>();
  const cache = new Map<string, HostTensor>(); // eager: fused tensors are read once for their parts
  for (const [canon, shape] of expected) {
    const tmpl = canon.replace(/^blocks\.\d+\./, "blocks.{i}.").replace(/\.experts\.\d+\./, ".experts.{e}.");
    const layer = /^blocks\.(\d+)\./.exec(canon)?.[1];
    const expert = /\.experts\.(\d+)\./.exec(canon)?.[1];
    const declared = table[tmpl];
    if (!declared) throw new UnsupportedArchitectureError(file, `no source declared for ${canon}`, "this is a bug in the family file");
    const src: WeightSource = declared.experts ? { ...declared, slab: Number(expert) } : declared;
    const base = (layer === undefined ? src.name : src.name.replaceAll("{i}", layer)).replaceAll("{e}", expert ?? "");
    const name = [base, ...aliases.map((f) => f(base))].find((n) => available.has(n));
    if (!name) throw new WeightShapeError(file, `missing tensor ${base} (for ${canon})`, `this checkpoint does not match its config (${config.family}, ${config.nLayers} layers)`);
    used.add(name);
    let t: HostTensor | undefined;
    if (lazy) source.checkReadable(name);
    else {
      t = cache.get(name);
      if (!t) {
        t = source.read(name);
        checkFinite(t, file, name, canon, layer);
        cache.set(name, t);
      }
    }
    const stored = t?.shape ?? source.shape(name);
    if (src.slab !== undefined && config.mlp.kind === "moe" && stored[0] !== config.mlp.nExperts) {
      throw new WeightShapeError(file, `tensor ${name} stacks ${stored[0]} experts but the config has ${config.mlp.nExperts}`, "the weights do not match the config");
    }
    const got = transformedShape(stored, src, file, name);
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      throw new WeightShapeError(file, `tensor ${name} has shape [${got}] but the config implies [${shape}] for ${canon}`, "the weights do not match the config");
    }
    if (t) out.set(canon, transform(t, src, config));
    else plan.push({ canon, name, src, layer, shape: got });
  }
  if (config.tieEmbeddings) {
    const lm = table["unembed.weight"];
    if (lm) for (const n of [lm.name, ...aliases.map((f) => f(lm.name))]) used.add(n); // a stored tied copy is the embedding
  }
  const unexpected = [...available].filter((n) => !used.has(n) && !(ignore && ignore.test(n)));
  if (unexpected.length > 0) {
    throw new WeightShapeError(file, `unexpected tensor${unexpected.length > 1 ? "s" : ""} ${unexpected.slice(0, 5).join(", ")}${unexpected.length > 5 ? ", …" : ""}`, `this does not look like a ${config.family} checkpoint with ${config.nLayers} layers`);
  }
  return lazy ? new LazyWeights(plan, config, source) : out;
}

function checkFinite(t: HostTensor, file: string, name: string, canon: string, layer: string | undefined): void {
  // x·0 is 0 for finite x and NaN for NaN/±Inf: one multiply-add per element, and only a
  // tensor that fails pays for the search.
  const d = t.data;
  let acc = 0;
  for (let i = 0; i < d.length; i++) acc += d[i]! * 0;
  if (acc === 0) return;
  const bad = d.findIndex((x) => !Number.isFinite(x));
  if (bad >= 0) throw new NumericalWeightsError(file, `tensor ${name} holds ${t.data[bad]} at element ${bad} (for ${canon}, layer ${layer ?? "-"})`, "the file is corrupt or was saved after training diverged; re-download or re-export it");
}

/** The shape `transform` gives a source tensor of shape `shape`, with its errors, from the header alone. */
function transformedShape(shape: number[], src: WeightSource, file: string, name: string): number[] {
  if (src.slab !== undefined) {
    if (shape.length < 2 || src.slab >= shape[0]!) throw new WeightShapeError(file, `tensor ${name} of shape [${shape}] has no expert ${src.slab}`);
    shape = shape.slice(1);
  }
  if (src.transpose) {
    if (shape.length !== 2) throw new WeightShapeError(file, `tensor ${name} should be 2-D, has shape [${shape}]`);
    shape = [shape[1]!, shape[0]!];
  }
  if (src.split) {
    const rows = shape[0]!;
    if (rows % src.split.parts !== 0) throw new WeightShapeError(file, `tensor ${name} with ${rows} rows cannot be split in ${src.split.parts}`);
    shape = [rows / src.split.parts, ...shape.slice(1)];
  }
  return shape;
}

/** Apply a source's transpose / split / RoPE unpermute (shapes already checked by transformedShape). */
function transform(t: HostTensor, src: WeightSource, c: ModelConfig): HostTensor {
  let { data, shape } = t;
  if (src.slab !== undefined) {
    const n = data.length / shape[0]!;
    data = data.slice(src.slab * n, (src.slab + 1) * n);
    shape = shape.slice(1);
  }
  if (src.transpose && src.split) {
    // Rows [s*n, (s+1)*n) of the transpose, without building the whole transpose.
    const [r, k] = shape as [number, number];
    const n = k / src.split.parts;
    const j0 = src.split.index * n;
    const o = new Float32Array(n * r);
    for (let j = 0; j < n; j++) for (let i = 0; i < r; i++) o[j * r + i] = data[i * k + j0 + j]!;
    data = o;
    shape = [n, r];
  } else {
    if (src.transpose) {
      const [r, k] = shape as [number, number];
      const o = new Float32Array(data.length);
      for (let i = 0; i < r; i++) for (let j = 0; j < k; j++) o[j * r + i] = data[i * k + j]!;
      data = o;
      shape = [k, r];
    }
    if (src.split) {
      const rows = shape[0]!;
      const n = rows / src.split.parts;
      const rowLen = data.length / rows;
      data = data.slice(src.split.index * n * rowLen, (src.split.index + 1) * n * rowLen);
      shape = [n, ...shape.slice(1)];
    }
  }
  if (src.unpermuteRope) {
    const nh = src.unpermuteRope === "q" ? c.nHeads : c.nKvHeads;
    data = unpermuteRows(data, nh, c.dHead, shape[1] ?? 1);
  }
  return { data, shape };
}

type LazySlot = { kind: "file"; p: Planned } | { kind: "held"; t: HostTensor };

/**
 * `HostModel.weights` of a lazy load: a Map whose values are read from the checkpoint when asked
 * for. `get` (and iteration, `values`, `entries`, `forEach`) reads the tensor, checks it for
 * NaN/Inf (NumericalWeightsError), transforms it and hands it over without keeping it: every call
 * reads afresh and returns arrays the caller owns, so a caller that consumes weights one at a time
 * holds one at a time. A source tensor that feeds several weights (GPT-2's fused c_attn -> q, k, v)
 * is kept only until each of those weights has been read once, then dropped. `set` stores a
 * caller's tensor, which is kept. `delete` / `clear` drop entries (and any source kept for them).
 */
export class LazyWeights extends Map<string, HostTensor> {
  readonly #slots = new Map<string, LazySlot>();
  /** Source name -> weights fed by it that have not read it yet (only for sources feeding several). */
  readonly #waiting = new Map<string, Set<string>>();
  readonly #kept = new Map<string, HostTensor>();
  readonly #config: ModelConfig;
  readonly #source: TensorSource;
  /**
   * readQuantInto's slice buffer, reused across tensors (a fresh one per tensor left ~100 buffers of
   * up to 8 MiB to the garbage collector during a 1B load).
   */
  #slice: Uint8Array | null = null;

  constructor(plan: Planned[], config: ModelConfig, source: TensorSource) {
    super();
    this.#config = config;
    this.#source = source;
    const feeds = new Map<string, Set<string>>();
    for (const p of plan) {
      this.#slots.set(p.canon, { kind: "file", p });
      feeds.set(p.name, (feeds.get(p.name) ?? new Set<string>()).add(p.canon));
    }
    for (const [name, canons] of feeds) if (canons.size > 1) this.#waiting.set(name, canons);
  }

  /** How many source tensors are held for weights not yet read (0 once every fused part was read). */
  get keptSources(): number {
    return this.#kept.size;
  }

  /** The weight's shape, from the header (no read). */
  shapeOf(key: string): number[] | undefined {
    const s = this.#slots.get(key);
    return s === undefined ? undefined : s.kind === "held" ? s.t.shape : [...s.p.shape];
  }

  override get size(): number {
    return this.#slots.size;
  }

  /**
   * Read weight `key` into `dst` (its exact length), with the same checks as get(). An F32
   * tensor used as stored goes from the file straight into `dst` (e.g. an engine's WebAssembly
   * memory), so no host copy is ever made; anything else is read, transformed and copied.
   */
  readInto(key: string, dst: Float32Array): void {
    const s = this.#slots.get(key);
    if (s === undefined) throw new UsageError(`internal: no weight ${key}`);
    const p = s.kind === "file" ? s.p : null;
    // An expert's slab of a stacked tensor is a contiguous range too (the experts axis is outermost).
    const slab = p?.src.slab;
    const whole = p && !p.src.transpose && !p.src.split && (slab !== undefined || !this.#waiting.has(p.name)) ? this.#source.f32Range(p.name) : null;
    const range = whole && slab !== undefined ? { ...whole, offset: whole.offset + slab * dst.byteLength, byteLength: dst.byteLength } : whole;
    if (p && range && range.byteLength === dst.byteLength) {
      readRangeInto(range.file, range.offset, new Uint8Array(dst.buffer, dst.byteOffset, dst.byteLength));
      checkFinite({ data: dst, shape: p.shape }, this.#source.file, p.name, p.canon, p.layer);
      if (p.src.unpermuteRope) {
        const c = this.#config;
        unpermuteInPlace(dst, p.src.unpermuteRope === "q" ? c.nHeads : c.nKvHeads, c.dHead, p.shape[1] ?? 1);
      }
      return;
    }
    const t = this.get(key)!;
    if (t.data.length !== dst.length) throw new UsageError(`internal: weight ${key} has ${t.data.length} values, destination ${dst.length}`);
    dst.set(t.data);
  }

  /**
   * The quantized type weight `key` can be read in without dequantizing (readQuantInto): a GGUF
   * Q8_0 or Q4_K tensor used as stored or with whole rows selected or reordered (a split, a RoPE
   * unpermute), never transposed; null otherwise.
   */
  quantOf(key: string): QuantType | null {
    const s = this.#slots.get(key);
    if (s?.kind !== "file" || s.p.src.transpose || (this.#waiting.has(s.p.name) && s.p.src.slab === undefined)) return null;
    return this.#source.quantRange?.(s.p.name)?.type ?? null;
  }

  /**
   * Read a quantized weight (quantOf) into the CPU engine's layout (engine/cpu/qkernels.ts): Q8_0
   * as int8 quants `wq` and f32 scales `ws`; Q4_K as nibbles `wq` and 24-byte metas `ws`. Block
   * scales are checked for NaN/Inf as get() checks values.
   */
  readQuantInto(key: string, wq: Uint8Array, ws: Uint8Array, io?: QuantReadIo): void {
    const type = this.quantOf(key);
    if (!type) throw new UsageError(`internal: weight ${key} is not readable as quantized rows`);
    const p = (this.#slots.get(key) as { kind: "file"; p: Planned }).p;
    const range = this.#source.quantRange!(p.name)!;
    const rows = p.shape[0]!, cols = p.shape[1] ?? 1;
    const [elems, bytesPer] = ggmlBlock(NATIVE_GGML[type])!;
    const rowBytes = (cols / elems) * bytesPer;
    const first = p.src.split ? p.src.split.index * rows : p.src.slab !== undefined ? p.src.slab * rows : 0;
    const fail = (bad: number, base: number) => new NumericalWeightsError(this.#source.file, `tensor ${p.name} holds a non-finite ${type === "bf16" || type === "f16" ? "value at element" : "block scale at block"} ${base + bad} (for ${p.canon}, layer ${p.layer ?? "-"})`, "the file is corrupt or was saved after training diverged; re-download or re-export it");
    const per = quantBytes(type, 1, cols);
    const unit = type === "bf16" || type === "f16" ? 1 : elems; // what the repack's bad index counts: values or blocks
    // One reused read buffer (#slice), never a fresh one per tensor: the engine's reads allocate
    // next to nothing on the JS heap, so nothing would collect discarded buffers until the end.
    const slice = (bytes: number) => (this.#slice && this.#slice.byteLength >= bytes ? this.#slice : (this.#slice = new Uint8Array(Math.max(bytes, READ_SLICE))));
    if (!p.src.unpermuteRope) {
      // Rows in slices of at most READ_SLICE bytes, each repacked into its part of wq / ws: the
      // host never holds more than one slice (a 128k-token embedding is ~150 MB in Q4_K).
      // With a backend's repack for this type, the slices go to its stage (in its memory) instead.
      const own = io?.repack[type] && io.stage.byteLength >= rowBytes ? io : null;
      const sliceRows = Math.max(1, Math.floor((own ? own.stage.byteLength : READ_SLICE) / rowBytes));
      const buf = own ? own.stage : slice(Math.min(rows, sliceRows) * rowBytes);
      for (let r0 = 0; r0 < rows; r0 += sliceRows) {
        const n = Math.min(sliceRows, rows - r0);
        const bytes = buf.subarray(0, n * rowBytes);
        readRangeInto(range.file, range.offset + (first + r0) * rowBytes, bytes);
        const q = wq.subarray(r0 * per.wq, (r0 + n) * per.wq), sc = ws.subarray(r0 * per.ws, (r0 + n) * per.ws);
        const bad = own?.repack[type]!(bytes, q, sc) ?? REPACK[type](bytes, q, sc);
        if (bad >= 0) throw fail(bad, (r0 * cols) / unit);
      }
      return;
    }
    // A RoPE unpermute (q/k of a GGUF converted from HF) reorders whole rows: read the tensor once,
    // repack each destination row from its source row.
    const bytes = slice(rows * rowBytes).subarray(0, rows * rowBytes);
    readRangeInto(range.file, range.offset + first * rowBytes, bytes);
    const c = this.#config;
    const nh = p.src.unpermuteRope === "q" ? c.nHeads : c.nKvHeads;
    const order = unpermuteRows(Float32Array.from({ length: rows }, (_, i) => i), nh, c.dHead, 1);
    for (let to = 0; to < rows; to++) {
      const from = order[to]!;
      const bad = REPACK[type](bytes.subarray(from * rowBytes, (from + 1) * rowBytes), wq.subarray(to * per.wq, (to + 1) * per.wq), ws.subarray(to * per.ws, (to + 1) * per.ws));
      if (bad >= 0) throw fail(bad, (from * cols) / unit);
    }
  }

  override has(key: string): boolean {
    return this.#slots.has(key);
  }

  override get(key: string): HostTensor | undefined {
    const s = this.#slots.get(key);
    if (s === undefined) return undefined;
    return s.kind === "held" ? s.t : this.#read(s.p);
  }

  override set(key: string, value: HostTensor): this {
    this.#forget(key);
    this.#slots.set(key, { kind: "held", t: value });
    return this;
  }

  override delete(key: string): boolean {
    this.#forget(key);
    return this.#slots.delete(key);
  }

  override clear(): void {
    this.#slots.clear();
    this.#waiting.clear();
    this.#kept.clear();
  }

  override keys(): MapIterator<string> {
    return this.#slots.keys();
  }

  override *values(): MapIterator<HostTensor> {
    for (const k of this.#slots.keys()) yield this.get(k)!;
  }

  override *entries(): MapIterator<[string, HostTensor]> {
    for (const k of this.#slots.keys()) yield [k, this.get(k)!];
  }

  override [Symbol.iterator](): MapIterator<[string, HostTensor]> {
    return this.entries();
  }

  override forEach(fn: (value: HostTensor, key: string, map: Map<string, HostTensor>) => void, thisArg?: unknown): void {
    for (const [k, v] of this.entries()) fn.call(thisArg, v, k, this);
  }

  #read(p: Planned): HostTensor {
    const waiting = this.#waiting.get(p.name);
    let t = this.#kept.get(p.name);
    if (!t) {
      t = this.#source.read(p.name);
      checkFinite(t, this.#source.file, p.name, p.canon, p.layer);
    }
    const stillNeeded = waiting !== undefined && (waiting.delete(p.canon), waiting.size > 0);
    if (stillNeeded) this.#kept.set(p.name, t);
    else {
      this.#kept.delete(p.name);
      if (waiting) this.#waiting.delete(p.name);
    }
    const w = transform(t, p.src, this.#config);
    // Never hand out the array that is still kept for another weight.
    return stillNeeded && w.data === t.data ? { data: t.data.slice(), shape: w.shape } : w;
  }

  /** Stop waiting on `key`'s source for it; drop the kept source when nobody else waits. */
  #forget(key: string): void {
    const s = this.#slots.get(key);
    if (s?.kind !== "file") return;
    const waiting = this.#waiting.get(s.p.name);
    if (!waiting) return;
    waiting.delete(key);
    if (waiting.size === 0) {
      this.#waiting.delete(s.p.name);
      this.#kept.delete(s.p.name);
    }
  }
}

/** unpermuteRows in place, one head at a time through a head-sized temporary. */
function unpermuteInPlace(data: Float32Array, nHeads: number, dHead: number, rowLen: number): void {
  const head = dHead * rowLen;
  const tmp = new Float32Array(head);
  for (let h = 0; h < nHeads; h++) {
    tmp.set(data.subarray(h * head, (h + 1) * head));
    for (let j = 0; j < dHead; j++) {
      const src = j < dHead / 2 ? 2 * j : 2 * (j - dHead / 2) + 1;
      data.set(tmp.subarray(src * rowLen, (src + 1) * rowLen), h * head + j * rowLen);
    }
  }
}

/** llama.cpp interleaved-pair rows -> rotate-half rows (inverse of HF->GGUF `permute`). */
export function unpermuteRows(data: Float32Array, nHeads: number, dHead: number, rowLen: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let h = 0; h < nHeads; h++)
    for (let j = 0; j < dHead; j++) {
      const src = h * dHead + (j < dHead / 2 ? 2 * j : 2 * (j - dHead / 2) + 1);
      out.set(data.subarray(src * rowLen, (src + 1) * rowLen), (h * dHead + j) * rowLen);
    }
  return out;
}
