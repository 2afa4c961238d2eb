// Writing a model back out: the HF folder writer (config.json + model.safetensors + tokenizer
// files, shared with the refusal recipe's orthogonalised checkpoint) and exportMerged, which
// folds trained LoRA adapters and full-weight deltas (src/engine/grad.ts TrainParam) into the
// weights so the result loads with Model.load and gives the same logits as the base model with
// the params applied.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { expectedParams, type ModelConfig } from "../engine/config.js";
import { trainableWeights, type TrainParam } from "../engine/grad.js";
import { GgmlType } from "../io/gguf.js";
import { writeSafetensors } from "../io/safetensors.js";
import { loadHostModel, type HostModel, type HostTensor } from "./load.js";

const HF_SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model"];

/** config.json for a Llama-layout model read from GGUF (the only GGUF family we can describe in HF terms). */
function llamaHfConfig(c: ModelConfig, what: string): Record<string, unknown> {
  if (c.pos.kind !== "rope") throw new UsageError("internal: llama without RoPE");
  if (c.pos.freqFactors) throw new UsageError(`${what}: this GGUF stores RoPE frequency factors (Llama 3 scaling), which the HF export does not describe; export from the HF checkpoint instead`);
  if (c.slidingWindow) throw new UsageError(`${what}: sliding-window GGUF models are not supported by the HF export; export from the HF checkpoint instead`);
  const s = c.pos.scaling;
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: c.dModel,
    num_attention_heads: c.nHeads,
    num_key_value_heads: c.nKvHeads,
    num_hidden_layers: c.nLayers,
    head_dim: c.dHead,
    intermediate_size: c.dMlp,
    vocab_size: c.dVocab,
    max_position_embeddings: c.nCtx,
    rms_norm_eps: c.norm.eps,
    rope_theta: c.pos.theta,
    ...(s.kind === "linear" ? { rope_scaling: { rope_type: "linear", factor: s.factor } } : {}),
    ...(s.kind === "llama3"
      ? { rope_scaling: { rope_type: "llama3", factor: s.factor, low_freq_factor: s.lowFreqFactor, high_freq_factor: s.highFreqFactor, original_max_position_embeddings: s.originalMaxPositionEmbeddings } }
      : {}),
    attention_bias: c.bias === "qkv",
    hidden_act: "silu",
    tie_word_embeddings: c.tieEmbeddings,
    ...(c.bosTokenId !== undefined ? { bos_token_id: c.bosTokenId } : {}),
    eos_token_id: c.eosTokenIds.length === 1 ? c.eosTokenIds[0] : c.eosTokenIds,
    torch_dtype: "float32",
  };
}

/**
 * Write canonical weights as an HF folder (config.json + model.safetensors, F32) using the
 * family's safetensors names: split parts are concatenated and Conv1D tensors transposed back.
 * Tokenizer files are copied when the source is an HF folder; a GGUF source's embedded vocabulary
 * cannot be written as tokenizer.json here, so such an export takes token ids only.
 */
export function writeHfCheckpoint(host: HostModel, weights: ReadonlyMap<string, HostTensor>, config: ModelConfig, dir: string, meta: Record<string, string> = {}, what = "orthogonalize"): { files: string[]; tokenizer: boolean } {
  const table = host.family.safetensors;
  if (!table) throw new UsageError(`${what}: family ${host.family.id} has no safetensors layout`);
  const groups = new Map<string, { index: number; transpose: boolean; t: HostTensor }[]>();
  for (const canon of expectedParams(config).keys()) {
    const tmpl = canon.replace(/^blocks\.\d+\./, "blocks.{i}.");
    const layer = /^blocks\.(\d+)\./.exec(canon)?.[1];
    const src = table[tmpl];
    if (!src) throw new UsageError(`${what}: no safetensors name for ${canon} in family ${host.family.id}`);
    if (src.unpermuteRope) throw new UsageError(`${what}: ${canon} needs a RoPE permutation the export does not implement`);
    const t = weights.get(canon);
    if (!t) throw new UsageError(`${what}: missing weight ${canon}`);
    const name = layer === undefined ? src.name : src.name.replaceAll("{i}", layer);
    const g = groups.get(name) ?? [];
    g.push({ index: src.split?.index ?? 0, transpose: src.transpose ?? false, t });
    groups.set(name, g);
  }
  const tensors: Record<string, { data: Float32Array; shape: number[] }> = {};
  for (const [name, parts] of groups) {
    parts.sort((a, b) => a.index - b.index);
    let data: Float32Array;
    let shape: number[];
    if (parts.length === 1) ({ data, shape } = parts[0]!.t);
    else {
      data = new Float32Array(parts.reduce((a, p) => a + p.t.data.length, 0));
      let off = 0;
      for (const p of parts) {
        data.set(p.t.data, off);
        off += p.t.data.length;
      }
      shape = [parts.reduce((a, p) => a + p.t.shape[0]!, 0), ...parts[0]!.t.shape.slice(1)];
    }
    if (parts[0]!.transpose) {
      const [r, k] = shape as [number, number];
      const o = new Float32Array(data.length);
      for (let i = 0; i < r; i++) for (let j = 0; j < k; j++) o[j * r + i] = data[i * k + j]!;
      data = o;
      shape = [k, r];
    }
    tensors[name] = { data, shape };
  }
  fs.mkdirSync(dir, { recursive: true });
  let cfgJson: Record<string, unknown>;
  if (host.files.configJson) {
    cfgJson = JSON.parse(fs.readFileSync(host.files.configJson, "utf8")) as Record<string, unknown>;
    cfgJson.tie_word_embeddings = config.tieEmbeddings;
    cfgJson.torch_dtype = "float32";
  } else if (host.family.id === "llama") cfgJson = llamaHfConfig(config, what);
  else throw new UsageError(`${what}: cannot write config.json for a ${host.family.id} GGUF; export from the HF checkpoint instead`);
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt", ...meta });
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfgJson, null, 2) + "\n");
  const files = ["config.json", "model.safetensors"];
  let tokenizer = false;
  if (host.files.configJson) {
    const srcDir = path.dirname(host.files.configJson);
    for (const f of HF_SIDE_FILES) {
      const p = path.join(srcDir, f);
      if (fs.existsSync(p)) {
        fs.copyFileSync(p, path.join(dir, f));
        fs.chmodSync(path.join(dir, f), 0o644);
        files.push(f);
        if (f === "tokenizer.json") tokenizer = true;
      }
    }
  }
  return { files, tokenizer };
}


export interface ExportOptions {
  format: "safetensors" | "gguf";
  /** Replace an existing output folder. */
  force?: boolean;
}

/**
 * The model's canonical weights with `params` merged: W + value for a delta, W + scale·B·A for a
 * LoRA adapter (the same products the engine applies). Other param kinds have no weight to merge
 * into and are an error. Only changed tensors are copied.
 */
export function mergeParams(host: HostModel, params: readonly TrainParam[]): Map<string, HostTensor> {
  return mergeParamsTracked(host, params).weights;
}

function mergeParamsTracked(host: HostModel, params: readonly TrainParam[]): { weights: Map<string, HostTensor>; changed: Set<string> } {
  const valid = trainableWeights(host);
  const out = new Map(host.weights);
  const changed = new Set<string>();
  const target = (name: string, i: number): Float32Array => {
    if (!valid.some((w) => w.name === name)) throw new UsageError(`export: params[${i}] names unknown weight "${name}"; this model's weights are ${valid.map((w) => w.name).join(", ")}`);
    if (!changed.has(name)) {
      const t = host.weights.get(name)!;
      out.set(name, { data: t.data.slice(), shape: [...t.shape] });
      changed.add(name);
    }
    return out.get(name)!.data;
  };
  params.forEach((p, i) => {
    if (p.kind === "delta") {
      const w = target(p.name, i);
      if (p.value.length !== w.length) throw new UsageError(`export: params[${i}] (delta on ${p.name}) has length ${p.value.length}, expected ${w.length}`);
      for (let j = 0; j < w.length; j++) w[j] = w[j]! + p.value[j]!;
    } else if (p.kind === "lora") {
      const name = `blocks.${p.layer}.${p.linear}.weight`;
      const w = target(name, i);
      const [outN, inN] = host.weights.get(name)!.shape as [number, number];
      if (p.a.length !== p.rank * inN || p.b.length !== outN * p.rank) throw new UsageError(`export: params[${i}] (lora on ${name}): a, b do not match rank ${p.rank} and [${outN}, ${inN}]`);
      const s = p.scale ?? 1;
      for (let o = 0; o < outN; o++)
        for (let k = 0; k < p.rank; k++) {
          const bk = s * p.b[o * p.rank + k]!;
          if (bk === 0) continue;
          for (let j = 0; j < inN; j++) w[o * inN + j] = w[o * inN + j]! + bk * p.a[k * inN + j]!;
        }
    } else throw new UsageError(`export: params[${i}] is a ${p.kind} parameter, which has no weight to merge into (export merges lora and delta params only)`);
  });
  return { weights: out, changed };
}

/** Inverse of load.ts's unpermuteRows: back to llama.cpp's interleaved q/k rows. */
function permuteRows(data: Float32Array, nHeads: number, dHead: number, rowLen: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let h = 0; h < nHeads; h++)
    for (let j = 0; j < dHead; j++) {
      const dst = h * dHead + (j < dHead / 2 ? 2 * j : 2 * (j - dHead / 2) + 1);
      out.set(data.subarray((h * dHead + j) * rowLen, (h * dHead + j + 1) * rowLen), dst * rowLen);
    }
  return out;
}

/**
 * A copy of the source GGUF (metadata, tokenizer, every other tensor byte for byte) with the merged
 * tensors' data replaced. Each changed tensor must be F32 in the source: a quantized or F16 tensor
 * would have to be requantized, which changes the logits the merge promises.
 */
function writeMergedGguf(host: HostModel, weights: ReadonlyMap<string, HostTensor>, changed: ReadonlySet<string>, out: string): { files: string[]; tokenizer: boolean } {
  if (host.files.format !== "gguf" || !host.gguf || !host.family.gguf) {
    throw new UsageError(`export: --format gguf copies a GGUF source and replaces the merged tensors; ${host.files.path} is ${host.files.format}: use --format safetensors`);
  }
  const g = host.gguf;
  const bytes = fs.readFileSync(host.files.weights);
  for (const canon of changed) {
    const t = weights.get(canon)!;
    const tmpl = canon.replace(/^blocks\.\d+\./, "blocks.{i}.");
    const layer = /^blocks\.(\d+)\./.exec(canon)?.[1];
    const src = host.family.gguf[tmpl];
    if (!src) throw new Error(`internal: no GGUF source for ${canon}`);
    const name = layer === undefined ? src.name : src.name.replaceAll("{i}", layer);
    const info = g.tensors.get(name);
    if (!info) throw new Error(`internal: ${host.files.weights} has no tensor ${name}`);
    if (info.type !== GgmlType.F32) {
      throw new UsageError(`export: ${host.files.weights} stores ${name} as ${GgmlType[info.type] ?? info.type}; a merged GGUF keeps each tensor's type, and requantizing would change the logits: export --format safetensors, or start from an F32 GGUF`);
    }
    if (src.transpose || src.split) throw new UsageError(`export: ${name} is stored transposed or fused in GGUF; use --format safetensors`);
    const c = host.config;
    const data = src.unpermuteRope ? permuteRows(t.data, src.unpermuteRope === "q" ? c.nHeads : c.nKvHeads, c.dHead, t.shape[1] ?? 1) : t.data;
    if (data.byteLength !== info.byteLength) throw new Error(`internal: ${name} has ${info.byteLength} bytes in the GGUF, the merge ${data.byteLength}`);
    bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), info.offset);
  }
  fs.mkdirSync(path.dirname(path.resolve(out)), { recursive: true });
  const tmp = `${out}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, bytes);
  fs.renameSync(tmp, out);
  return { files: [path.basename(out)], tokenizer: true };
}

/**
 * Write the model at `source` with `params` merged into its weights: `safetensors` writes the folder
 * `out` (config.json, model.safetensors, the source's tokenizer files); `gguf` writes the file `out`,
 * a copy of a GGUF source with the merged tensors replaced. Either loads with Model.load.
 */
export function exportMerged(source: string | HostModel, params: readonly TrainParam[], out: string, opts: ExportOptions): { files: string[]; tokenizer: boolean } {
  if (opts.format !== "safetensors" && opts.format !== "gguf") throw new UsageError(`export: --format ${String(opts.format)}: use safetensors or gguf`);
  if (fs.existsSync(out) && !opts.force) throw new UsageError(`export: ${out} already exists; pass --force (force: true) to replace it, or choose another path`);
  const host = typeof source === "string" ? loadHostModel(source) : source;
  const { weights, changed } = mergeParamsTracked(host, params);
  if (opts.format === "gguf") {
    if (fs.existsSync(out) && fs.statSync(out).isDirectory()) throw new UsageError(`export: ${out} is a folder; --format gguf writes one file (e.g. ${path.join(out, "model.gguf")})`);
    return writeMergedGguf(host, weights, changed, out);
  }
  if (fs.existsSync(out)) fs.rmSync(out, { recursive: true, force: true });
  return writeHfCheckpoint(host, weights, host.config, out, { selfscope: "merged fine-tune", source: host.files.path }, "export");
}
