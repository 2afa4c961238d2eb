// `npm run bench -- --large`: the models researchers run on a laptop, at their real shapes, as the
// GGUF files they download (random weights, quantized by ggml's own quantizer): Q4_K_M by
// llama-quantize's recipe (quantRecipe below) for Llama-3.2-1B, Qwen2.5-3B and Llama-3.1-8B, and
// Q8_0 for the 1B shape. For each, llama.cpp and selfscope (the cpu engine as Model.load runs it:
// Q4_K, Q6_K and Q8_0 matrices kept in their format) load the same file and run a
// 32-token prefill and 16 greedy decode steps at batch 1, in child processes (bench/large-child.ts),
// one engine at a time. A model selfscope refuses before loading (its weights above 85% of RAM) is
// reported with the refusal. First, the machine's compute peaks at the same threads (bench/machine.ts
// --compute-only), which each file's native-int8 prefill is held to. The last line printed is the
// summary JSON: max_params_loaded, each model's decode and prefill ratios (selfscope ÷ llama.cpp)
// and its int8 prefill as a share of its peak.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { GgmlType, GgufValueType, writeGguf, type GgufWriteTensor, type GgufWriteValue } from "../src/io/gguf.js";
import { CACHE_DIR, RESULTS_DIR, cpuFlags, log, round, writeJson } from "./common.js";
import { Fill, SPECIAL, vocab } from "./model.js";

export interface LargeShape {
  name: string;
  arch: "llama" | "qwen2";
  dModel: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  dMlp: number;
  dVocab: number;
  tied: boolean;
  qkvBias: boolean;
  ropeTheta: number;
  /** The file type: llama-quantize's Q4_K_M recipe (default) or Q8_0 throughout. */
  quant?: "q4_k_m" | "q8_0";
}

/** The published configs' shapes (config.json of meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-3B, meta-llama/Llama-3.1-8B). */
export const LARGE: LargeShape[] = [
  { name: "llama-3.2-1b", arch: "llama", dModel: 2048, nLayers: 16, nHeads: 32, nKvHeads: 8, dMlp: 8192, dVocab: 128256, tied: true, qkvBias: false, ropeTheta: 500000 },
  { name: "qwen2.5-3b", arch: "qwen2", dModel: 2048, nLayers: 36, nHeads: 16, nKvHeads: 2, dMlp: 11008, dVocab: 151936, tied: true, qkvBias: true, ropeTheta: 1000000 },
  { name: "llama-3.1-8b", arch: "llama", dModel: 4096, nLayers: 32, nHeads: 32, nKvHeads: 8, dMlp: 14336, dVocab: 128256, tied: false, qkvBias: false, ropeTheta: 500000 },
  { name: "llama-3.2-1b-q8_0", arch: "llama", dModel: 2048, nLayers: 16, nHeads: 32, nKvHeads: 8, dMlp: 8192, dVocab: 128256, tied: true, qkvBias: false, ropeTheta: 500000, quant: "q8_0" },
];

// 2: Q4_K_M by llama-quantize's recipe (version 1 was Q4_K throughout), and the Q8_0 1B file.
export const LARGE_VERSION = 2;
export const largePath = (s: LargeShape) => path.join(CACHE_DIR, `large-${s.name}${s.quant === "q8_0" ? "" : "-q4_k_m"}-v${LARGE_VERSION}.gguf`);

/**
 * The type llama-quantize gives a matrix (llama.cpp src/llama-quant.cpp, llama_tensor_get_type,
 * for MOSTLY_Q4_K_M on these dense models): Q6_K for the output matrix (the token embedding when
 * tied) and for attn_v and ffn_down in the layers use_more_bits picks (the first and last eighth,
 * and every third in between), Q4_K elsewhere. Q8_0 files are Q8_0 throughout.
 */
export function quantRecipe(s: LargeShape, tensor: string, layer: number | null): GgmlType {
  if (s.quant === "q8_0") return GgmlType.Q8_0;
  // use_more_bits, with C's integer divisions.
  const [e, l] = [Math.floor(s.nLayers / 8), Math.floor((7 * s.nLayers) / 8)];
  const moreBits = (i: number) => i < e || i >= l || (i - e) % 3 === 2;
  if (tensor === "output" || (tensor === "token_embd" && s.tied)) return GgmlType.Q6_K;
  if ((tensor === "attn_v" || tensor === "ffn_down") && layer !== null && moreBits(layer)) return GgmlType.Q6_K;
  return GgmlType.Q4_K;
}

/** Weights a token meets in the blocks' matrix products (one product each). */
export function blockProductsOf(s: LargeShape): number {
  const hd = s.dModel / s.nHeads;
  return s.nLayers * (s.dModel * s.nHeads * hd * 2 + s.dModel * s.nKvHeads * hd * 2 + 3 * s.dModel * s.dMlp);
}

export function paramsOf(s: LargeShape): number {
  const hd = s.dModel / s.nHeads;
  const D = s.dModel;
  const block = D * (s.nHeads * hd) * 2 + D * (s.nKvHeads * hd) * 2 + 3 * D * s.dMlp + 2 * D + (s.qkvBias ? (s.nHeads + 2 * s.nKvHeads) * hd : 0);
  return s.dVocab * D * (s.tied ? 1 : 2) + s.nLayers * block + D;
}

/** Writes the file unless it is there (minutes for the 8B shape: ggml's reference quantizer). */
export async function ensureLarge(s: LargeShape): Promise<string> {
  const file = largePath(s);
  if (fs.existsSync(file)) return file;
  const t = performance.now();
  const { loadGgml } = await import("../src/reference/ggml.js");
  const ggml = await loadGgml();
  const { dModel: D, nLayers: L, nHeads: H, nKvHeads: K, dMlp: F, dVocab: V } = s;
  const hd = D / H;
  const f = new Fill(20261206 + L);
  const tensors: GgufWriteTensor[] = [];
  const none = new Float32Array(0);
  const quantized = (name: string, rows: number, cols: number, std: number, edit?: (w: Float32Array) => void) => {
    const w = f.uniform(rows * cols, std);
    edit?.(w);
    const m = /^(?:blk\.(\d+)\.)?(\w+)\.weight$/.exec(name)!;
    const type = quantRecipe(s, m[2]!, m[1] === undefined ? null : Number(m[1]));
    tensors.push({ name, shape: [rows, cols], type, data: none, raw: ggml.quantize(type, w, rows, cols) });
  };
  const f32 = (name: string, data: Float32Array) => tensors.push({ name, shape: [data.length], type: GgmlType.F32, data });
  // Special tokens' rows are zero, so their logit is 0 and they are never the greedy choice.
  const zeroSpecials = (w: Float32Array) => {
    for (const id of Object.values(SPECIAL)) w.fill(0, id * D, (id + 1) * D);
  };
  quantized("token_embd.weight", V, D, s.tied ? 1 / Math.sqrt(D) : 1, s.tied ? zeroSpecials : undefined);
  for (let i = 0; i < L; i++) {
    const b = `blk.${i}`;
    f32(`${b}.attn_norm.weight`, new Float32Array(D).fill(1));
    quantized(`${b}.attn_q.weight`, H * hd, D, 1 / Math.sqrt(D));
    quantized(`${b}.attn_k.weight`, K * hd, D, 1 / Math.sqrt(D));
    quantized(`${b}.attn_v.weight`, K * hd, D, 1 / Math.sqrt(D));
    if (s.qkvBias) for (const [x, n] of [["q", H], ["k", K], ["v", K]] as const) f32(`${b}.attn_${x}.bias`, f.uniform(n * hd, 0.1));
    quantized(`${b}.attn_output.weight`, D, H * hd, 0.5 / Math.sqrt(H * hd));
    f32(`${b}.ffn_norm.weight`, new Float32Array(D).fill(1));
    quantized(`${b}.ffn_gate.weight`, F, D, 1 / Math.sqrt(D));
    quantized(`${b}.ffn_up.weight`, F, D, 1 / Math.sqrt(D));
    quantized(`${b}.ffn_down.weight`, D, F, 0.5 / Math.sqrt(F));
  }
  f32("output_norm.weight", new Float32Array(D).fill(1));
  if (!s.tied) quantized("output.weight", V, D, 1 / Math.sqrt(D), zeroSpecials);
  const a = s.arch;
  const u32 = (v: number): GgufWriteValue => ({ type: GgufValueType.UINT32, value: v });
  const fl = (v: number): GgufWriteValue => ({ type: GgufValueType.FLOAT32, value: v });
  const str = (v: string): GgufWriteValue => ({ type: GgufValueType.STRING, value: v });
  const bool = (v: boolean): GgufWriteValue => ({ type: GgufValueType.BOOL, value: v });
  const voc = vocab(V);
  const meta: Record<string, GgufWriteValue> = {
    "general.architecture": str(a),
    "general.type": str("model"),
    "general.name": str(`selfscope ${s.name}-shaped (random weights)`),
    "general.file_type": u32(s.quant === "q8_0" ? 7 : 15), // MOSTLY_Q8_0, MOSTLY_Q4_K_M
    [`${a}.block_count`]: u32(L),
    [`${a}.context_length`]: u32(4096),
    [`${a}.embedding_length`]: u32(D),
    [`${a}.feed_forward_length`]: u32(F),
    [`${a}.attention.head_count`]: u32(H),
    [`${a}.attention.head_count_kv`]: u32(K),
    [`${a}.rope.freq_base`]: fl(s.ropeTheta),
    [`${a}.attention.layer_norm_rms_epsilon`]: fl(1e-5),
    ...(a === "llama" ? { "llama.rope.dimension_count": u32(hd), "llama.vocab_size": u32(V) } : {}),
    "tokenizer.ggml.model": str("llama"),
    "tokenizer.ggml.pre": str("default"),
    "tokenizer.ggml.tokens": { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: voc.tokens },
    "tokenizer.ggml.scores": { type: GgufValueType.ARRAY, itemType: GgufValueType.FLOAT32, value: voc.scores },
    "tokenizer.ggml.token_type": { type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value: voc.types },
    "tokenizer.ggml.bos_token_id": u32(SPECIAL.bos),
    "tokenizer.ggml.eos_token_id": u32(SPECIAL.eos),
    "tokenizer.ggml.unknown_token_id": u32(SPECIAL.unk),
    "tokenizer.ggml.add_bos_token": bool(true),
    "tokenizer.ggml.add_eos_token": bool(false),
  };
  fs.mkdirSync(CACHE_DIR, { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  writeGguf(tmp, meta, tensors);
  fs.renameSync(tmp, file);
  log("large", `wrote ${path.relative(process.cwd(), file)} (${(fs.statSync(file).size / 2 ** 30).toFixed(2)} GiB) in ${((performance.now() - t) / 1000).toFixed(0)} s`);
  return file;
}

/** What one engine did with one file (bench/large-child.ts writes it). */
export interface LargeRun {
  engine: "selfscope" | "llamacpp";
  info: string;
  /** Set when the engine declined the file (selfscope's memory check); nothing else then. */
  refused?: string;
  loadMs?: number;
  prefill?: { tokens: number; msMedian: number; tokPerS: number };
  decode?: { newTokens: number; msPerStepMedian: number; tokPerS: number };
  peakRssBytes?: number;
  greedy?: number[];
  cpuS: number;
}

function runChild(engine: "selfscope" | "llamacpp", file: string, threads: number, out: string, extra: string[] = []): Promise<LargeRun | { error: string }> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const argv = [path.join(here, "large-child.js"), "--engine", engine, "--model", file, "--threads", String(threads), "--out", out, ...extra];
  log("large", `${engine}: node ${argv.map((x) => (path.isAbsolute(x) ? path.relative(process.cwd(), x) : x)).join(" ")}`);
  return new Promise((resolve) => {
    const p = spawn(process.execPath, argv, { stdio: ["ignore", "inherit", "inherit"] });
    p.on("exit", (code, sig) => {
      if (code === 0 && fs.existsSync(out)) resolve(JSON.parse(fs.readFileSync(out, "utf8")) as LargeRun);
      else resolve({ error: `${engine} child exited with ${sig ?? code}` });
    });
  });
}

type Peaks = { wasmPeakGflops: { tN: number }; wasmInt8PeakGmacs: { tN: number; relaxedDot: boolean } };

/** The compute peaks of this machine at `threads` (bench/machine.ts --compute-only), or null if that child failed. */
function runPeaks(threads: number, out: string): Promise<Peaks | null> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [path.join(here, "machine.js"), "--threads", String(threads), "--out", out, "--quick", "--compute-only"], { stdio: ["ignore", "inherit", "inherit"] });
    p.on("exit", (code) => resolve(code === 0 && fs.existsSync(out) ? (JSON.parse(fs.readFileSync(out, "utf8")) as Peaks) : null));
  });
}

export async function runLarge(threads: number, only?: string[]): Promise<void> {
  const started = new Date();
  const t0 = performance.now();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-large-"));
  const shapes = only ? LARGE.filter((s) => only.includes(s.name)) : LARGE;
  // The limits the prefill is held to, measured in this run: native-int8 prefill runs the int8
  // rows on Q4_K/Q6_K matrices (limit: the int8 products' peak) and the dequantized f32 GEMM on
  // Q8_0 ones (limit: the f32 multiply-add peak).
  const peaks = await runPeaks(threads, path.join(tmp, "peaks.json"));
  const models: Record<string, unknown> = {};
  const summary: Record<string, number | string | null> = { max_params_loaded: 0 };
  for (const s of shapes) {
    const file = await ensureLarge(s);
    const fileBytes = fs.statSync(file).size;
    const llama = await runChild("llamacpp", file, threads, path.join(tmp, `${s.name}-llamacpp.json`));
    const self = await runChild("selfscope", file, threads, path.join(tmp, `${s.name}-selfscope.json`), ["--weights", "native"]);
    const int8 = await runChild("selfscope", file, threads, path.join(tmp, `${s.name}-selfscope-int8.json`), ["--weights", "native-int8"]);
    const ok = (r: LargeRun | { error: string }): r is LargeRun => !("error" in r) && !r.refused;
    const ratioOf = (mine: LargeRun | { error: string }, f: (r: LargeRun) => number | undefined) => (ok(mine) && ok(llama) && f(mine) && f(llama) ? round(f(mine)! / f(llama)!, 3) : null);
    const ratio = (f: (r: LargeRun) => number | undefined) => ratioOf(self, f);
    const agreement = (mine: LargeRun | { error: string }) => {
      if (!(ok(mine) && ok(llama) && mine.greedy && llama.greedy)) return null;
      let n = 0;
      while (n < mine.greedy.length && mine.greedy[n] === llama.greedy[n]) n++;
      return `${n}/${Math.min(mine.greedy.length, llama.greedy.length)}`;
    };
    const params = paramsOf(s);
    if (ok(self)) summary.max_params_loaded = Math.max(Number(summary.max_params_loaded), params);
    summary[`${s.name}_decode_b1_ratio`] = ratio((r) => r.decode?.tokPerS);
    summary[`${s.name}_int8_decode_b1_ratio`] = ratioOf(int8, (r) => r.decode?.tokPerS);
    summary[`${s.name}_int8_prefill_ratio`] = ratioOf(int8, (r) => r.prefill?.tokPerS);
    // Products per second of the 32-token prefill (the head runs on the last row only).
    const prefillGmacs = ok(int8) && int8.prefill ? round(((int8.prefill.tokens * blockProductsOf(s) + s.dModel * s.dVocab) / int8.prefill.msMedian) * 1e-6, 1) : null;
    const limit = s.quant === "q8_0" ? { name: "f32 multiply-add peak", gmacs: peaks ? peaks.wasmPeakGflops.tN / 2 : null } : { name: "int8 products peak", gmacs: peaks?.wasmInt8PeakGmacs.tN ?? null };
    summary[`${s.name}_int8_prefill_of_peak`] = prefillGmacs !== null && limit.gmacs ? round(prefillGmacs / limit.gmacs, 3) : null;
    models[s.name] = {
      file: path.relative(process.cwd(), file),
      fileBytes,
      params,
      shape: s,
      llamacpp: llama,
      selfscope: self,
      selfscopeInt8: int8,
      ratios: {
        load: ratio((r) => r.loadMs),
        prefill: ratio((r) => r.prefill?.tokPerS),
        decode_b1: ratio((r) => r.decode?.tokPerS),
        selfscope_rss_over_file: ok(self) && self.peakRssBytes ? round(self.peakRssBytes / fileBytes, 3) : null,
        llamacpp_rss_over_file: ok(llama) && llama.peakRssBytes ? round(llama.peakRssBytes / fileBytes, 3) : null,
        greedy_agreement: agreement(self),
        int8_load: ratioOf(int8, (r) => r.loadMs),
        int8_prefill: ratioOf(int8, (r) => r.prefill?.tokPerS),
        int8_decode_b1: ratioOf(int8, (r) => r.decode?.tokPerS),
        int8_greedy_agreement: agreement(int8),
      },
      int8Prefill: { gproductsPerS: prefillGmacs, limit: limit.name, limitGproductsPerS: limit.gmacs },
    };
  }
  const results = {
    schema: 1,
    kind: "large",
    timestamp: started.toISOString(),
    command: `npm run bench -- --large --threads ${threads}`,
    threads,
    host: { cpu: os.cpus()[0]?.model ?? "?", cores: os.availableParallelism(), memGiB: round(os.totalmem() / 2 ** 30, 1), node: process.version, cpuFlags: cpuFlags() },
    limits: peaks,
    note: "random weights at the published shapes, quantized by ggml's quantizer: Q4_K_M by llama-quantize's recipe (Q6_K for the output or tied embedding and for attn_v/ffn_down in use_more_bits layers, Q4_K elsewhere) or Q8_0 throughout, norms and biases F32; prefill 32 tokens (median of 3 after a warm-up), 16 greedy decode steps at batch 1 (median step); F32 KV cache; one engine at a time",
    summary,
    models,
    wallS: round((performance.now() - t0) / 1000, 1),
  };
  const stamp = started.toISOString().replace(/[:.]/g, "-");
  writeJson(path.join(RESULTS_DIR, `large-${stamp}.json`), results);
  writeJson(path.join(RESULTS_DIR, "large-latest.json"), results);
  fs.rmSync(tmp, { recursive: true, force: true });
  for (const [name, m] of Object.entries(models)) {
    const r = m as { llamacpp: LargeRun | { error: string }; selfscope: LargeRun | { error: string }; selfscopeInt8: LargeRun | { error: string }; ratios: Record<string, unknown> };
    const line = (x: LargeRun | { error: string }) => ("error" in x ? x.error : x.refused ? `refused: ${x.refused}` : `load ${x.loadMs?.toFixed(0)} ms, prefill ${x.prefill?.tokPerS} tok/s, decode ${x.decode?.tokPerS} tok/s, peak RSS ${((x.peakRssBytes ?? 0) / 2 ** 30).toFixed(2)} GiB`);
    process.stdout.write(`${name}\n  llama.cpp             ${line(r.llamacpp)}\n  selfscope native      ${line(r.selfscope)}\n  selfscope native-int8 ${line(r.selfscopeInt8)}\n  ratios                ${JSON.stringify(r.ratios)}\n`);
  }
  process.stdout.write(JSON.stringify(summary) + "\n");
}
