// The benchmark model: a GPT-2-small-sized Llama with deterministic random weights, written as an
// F32 GGUF (arch "llama") that both selfscope and llama.cpp load. The vocabulary is the smallest
// one llama.cpp's SentencePiece loader accepts at 32000 entries: <unk>, <s>, </s>, the 256 byte
// pieces and unique filler words. Nothing here is trained; the numbers only need the real shapes.
//
//   node dist/bench/model.js [path]     (the orchestrator calls ensureModel() itself)
import fs from "node:fs";
import path from "node:path";
import { GgmlType, GgufValueType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf, type GgufWriteTensor, type GgufWriteValue } from "../src/io/gguf.js";
import { F32_MODEL_PATH, MODEL, MODEL_SEED, WEIGHT_BYTES, log } from "./common.js";

/** xorshift32 uniform fill with the given standard deviation: fast and identical on every machine. */
export class Fill {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 1;
  }
  uniform(n: number, std: number): Float32Array {
    const a = new Float32Array(n);
    const k = (std * Math.sqrt(12)) / 4294967296;
    let s = this.s;
    for (let i = 0; i < n; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      a[i] = ((s >>> 0) - 2147483648) * k;
    }
    this.s = s;
    return a;
  }
}

export const SPECIAL = { unk: 0, bos: 1, eos: 2 } as const;

/** A SentencePiece vocabulary of `size` entries: the specials, the 256 byte pieces and unique filler words. */
export function vocab(size: number = MODEL.dVocab): { tokens: string[]; scores: number[]; types: number[] } {
  const tokens = ["<unk>", "<s>", "</s>"];
  const types = [2, 3, 3]; // UNKNOWN, CONTROL, CONTROL
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    types.push(6); // BYTE
  }
  for (let i = tokens.length; i < size; i++) {
    tokens.push(`\u2581w${i.toString(36)}`);
    types.push(1); // NORMAL
  }
  const scores = tokens.map((_, i) => (types[i] === 1 ? -i : 0));
  return { tokens, scores, types };
}

export function writeBenchModel(file: string): void {
  const { dModel: D, nLayers: L, nHeads: H, nKvHeads: K, dHead: hd, dMlp: F, dVocab: V } = MODEL;
  const f = new Fill(MODEL_SEED);
  const tensors: GgufWriteTensor[] = [];
  const add = (name: string, shape: number[], data: Float32Array) => tensors.push({ name, shape, type: GgmlType.F32, data });
  const ones = (n: number) => new Float32Array(n).fill(1);
  add("token_embd.weight", [V, D], f.uniform(V * D, 1));
  for (let i = 0; i < L; i++) {
    const b = `blk.${i}`;
    add(`${b}.attn_norm.weight`, [D], ones(D));
    add(`${b}.attn_q.weight`, [H * hd, D], f.uniform(H * hd * D, 1 / Math.sqrt(D)));
    add(`${b}.attn_k.weight`, [K * hd, D], f.uniform(K * hd * D, 1 / Math.sqrt(D)));
    add(`${b}.attn_v.weight`, [K * hd, D], f.uniform(K * hd * D, 1 / Math.sqrt(D)));
    add(`${b}.attn_output.weight`, [D, H * hd], f.uniform(D * H * hd, 0.5 / Math.sqrt(H * hd)));
    add(`${b}.ffn_norm.weight`, [D], ones(D));
    add(`${b}.ffn_gate.weight`, [F, D], f.uniform(F * D, 1 / Math.sqrt(D)));
    add(`${b}.ffn_up.weight`, [F, D], f.uniform(F * D, 1 / Math.sqrt(D)));
    add(`${b}.ffn_down.weight`, [D, F], f.uniform(D * F, 0.5 / Math.sqrt(F)));
  }
  add("output_norm.weight", [D], ones(D));
  const out = f.uniform(V * D, 1 / Math.sqrt(D));
  // Special tokens score exactly 0 while every other logit is a random sum: they are never the
  // greedy choice, so no engine stops early on EOS and every run generates the same length.
  for (const id of Object.values(SPECIAL)) out.fill(0, id * D, (id + 1) * D);
  add("output.weight", [V, D], out);

  const u32 = (v: number): GgufWriteValue => ({ type: GgufValueType.UINT32, value: v });
  const f32 = (v: number): GgufWriteValue => ({ type: GgufValueType.FLOAT32, value: v });
  const str = (v: string): GgufWriteValue => ({ type: GgufValueType.STRING, value: v });
  const bool = (v: boolean): GgufWriteValue => ({ type: GgufValueType.BOOL, value: v });
  const v = vocab();
  const meta: Record<string, GgufWriteValue> = {
    "general.architecture": str("llama"),
    "general.type": str("model"),
    "general.name": str("selfscope bench768 (random weights)"),
    "general.file_type": u32(0), // ALL_F32
    "llama.block_count": u32(L),
    "llama.context_length": u32(MODEL.nCtx),
    "llama.embedding_length": u32(D),
    "llama.feed_forward_length": u32(F),
    "llama.attention.head_count": u32(H),
    "llama.attention.head_count_kv": u32(K),
    "llama.rope.freq_base": f32(MODEL.ropeTheta),
    "llama.attention.layer_norm_rms_epsilon": f32(MODEL.eps),
    "llama.attention.key_length": u32(hd),
    "llama.attention.value_length": u32(hd),
    "llama.rope.dimension_count": u32(hd),
    "llama.vocab_size": u32(V),
    "tokenizer.ggml.model": str("llama"),
    "tokenizer.ggml.pre": str("default"),
    "tokenizer.ggml.tokens": { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: v.tokens },
    "tokenizer.ggml.scores": { type: GgufValueType.ARRAY, itemType: GgufValueType.FLOAT32, value: v.scores },
    "tokenizer.ggml.token_type": { type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value: v.types },
    "tokenizer.ggml.bos_token_id": u32(SPECIAL.bos),
    "tokenizer.ggml.eos_token_id": u32(SPECIAL.eos),
    "tokenizer.ggml.unknown_token_id": u32(SPECIAL.unk),
    "tokenizer.ggml.add_bos_token": bool(true),
    "tokenizer.ggml.add_eos_token": bool(false),
  };
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  writeGguf(tmp, meta, tensors);
  fs.renameSync(tmp, file);
}

/** Writes the model into bench/.cache/ unless a complete copy is already there. */
export function ensureModel(file = F32_MODEL_PATH): string {
  if (fs.existsSync(file) && fs.statSync(file).size > WEIGHT_BYTES) return file;
  const t = performance.now();
  log("model", `writing ${path.relative(process.cwd(), file)} (${(WEIGHT_BYTES / 1e6).toFixed(0)} MB of F32 weights, seed ${MODEL_SEED})`);
  writeBenchModel(file);
  log("model", `written in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  return file;
}

/** The bench model's quantized copies: every 2-D weight in one ggml type, norms F32. */
export type BenchQuant = "q8_0" | "q4_k";

export function quantModelPath(type: BenchQuant): string {
  return path.join(path.dirname(F32_MODEL_PATH), path.basename(F32_MODEL_PATH).replace("-f32-", `-${type}-`));
}

/**
 * Writes the bench model's `type` copy unless it is there: Q8_0 by our quantizer (byte-identical
 * to ggml's, test/quants.test.ts), Q4_K by ggml's own (src/reference/ggml.ts: node-llama-cpp's
 * libggml-base through koffi). Like llama-quantize's pure types (no mixed Q4_K_M recipe).
 */
export async function ensureQuantModel(type: BenchQuant): Promise<string> {
  const file = quantModelPath(type);
  if (fs.existsSync(file)) return file;
  ensureModel();
  const t = performance.now();
  const g = readGguf(F32_MODEL_PATH);
  const ggml = type === "q4_k" ? await (await import("../src/reference/ggml.js")).loadGgml() : null;
  const tensors: GgufWriteTensor[] = [...g.tensors.keys()].map((name) => {
    const { data, shape } = readGgufTensor(g, name);
    if (shape.length !== 2) return { name, shape, type: GgmlType.F32, data };
    if (!ggml) return { name, shape, type: GgmlType.Q8_0, data };
    return { name, shape, type: GgmlType.Q4_K, data, raw: ggml.quantize(GgmlType.Q4_K, data, shape[0]!, shape[1]!) };
  });
  const tmp = `${file}.${process.pid}.tmp`;
  writeGguf(tmp, ggufMetadataForWrite(g), tensors);
  fs.renameSync(tmp, file);
  log("model", `wrote ${path.relative(process.cwd(), file)} (${(fs.statSync(file).size / 2 ** 20).toFixed(0)} MiB) in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  return file;
}

if (process.argv[1] && path.resolve(process.argv[1]).endsWith(path.join("bench", "model.js"))) {
  ensureModel(process.argv[2] ?? F32_MODEL_PATH);
}
