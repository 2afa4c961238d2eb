// Q8_0 on the CPU (issue 16 §1): the bench model's Q8_0 copy (every 2-D weight in Q8_0, as
// llama-quantize q8_0 makes it; norms F32) run by llama.cpp, by selfscope with its Q8_0 matrices
// kept quantized (--weights native) and by selfscope dequantizing to f32 at load (the default),
// same file, same threads, one after the other; prints the ratios and writes
// bench/results/q8-<time>.json and q8-latest.json with the host's CPU flags.
//
//   npm run build && node dist/bench/q8.js [--threads N] [--full]     (default: the quick shapes)
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { GgmlType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf } from "../src/io/gguf.js";
import { CACHE_DIR, F32_MODEL_PATH, MODEL_VERSION, RESULTS_DIR, log, round, writeJson, type EngineResult } from "./common.js";
import { ensureModel } from "./model.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const threads = Number(argv[argv.indexOf("--threads") + 1] ?? NaN) || os.availableParallelism();
const quick = !argv.includes("--full");
const Q8_PATH = path.join(CACHE_DIR, `bench768-q8_0-v${MODEL_VERSION}.gguf`);

function ensureQ8(): void {
  if (fs.existsSync(Q8_PATH)) return;
  ensureModel();
  const g = readGguf(F32_MODEL_PATH);
  const tensors = [...g.tensors.keys()].map((name) => {
    const t = readGgufTensor(g, name);
    const q = t.shape.length === 2 && t.shape[1]! % 32 === 0;
    return { name, shape: t.shape, type: q ? GgmlType.Q8_0 : GgmlType.F32, data: t.data } as const;
  });
  writeGguf(`${Q8_PATH}.tmp`, ggufMetadataForWrite(g), tensors);
  fs.renameSync(`${Q8_PATH}.tmp`, Q8_PATH);
  log("q8", `wrote ${Q8_PATH} (${(fs.statSync(Q8_PATH).size / 2 ** 20).toFixed(0)} MiB)`);
}

async function child(name: string, script: string, env: Record<string, string>): Promise<EngineResult & { cpuS?: number }> {
  const out = path.join(os.tmpdir(), `selfscope-q8-${process.pid}-${name}.json`);
  const args = [path.join(here, script), "--threads", String(threads), "--out", out, ...(quick ? ["--quick"] : [])];
  log("q8", `${name}: ${script} --threads ${threads}${quick ? " --quick" : ""} (${Object.entries(env).map(([k, v]) => `${k}=${path.basename(v)}`).join(" ")})`);
  const code = await new Promise<number | null>((resolve) => {
    const p = spawn(process.execPath, args, { stdio: ["ignore", "inherit", "inherit"], env: { ...process.env, ...env } });
    p.on("exit", (c) => resolve(c));
  });
  if (code !== 0) throw new Error(`${name} exited with code ${code}`);
  return JSON.parse(fs.readFileSync(out, "utf8")) as EngineResult;
}

function cpuFlags(): string[] {
  try {
    const line = fs.readFileSync("/proc/cpuinfo", "utf8").split("\n").find((l) => l.startsWith("flags"));
    return line ? line.split(":")[1]!.trim().split(/\s+/).filter((f) => /^(avx|fma|sse4|f16c|amx)/.test(f)) : [];
  } catch {
    return [];
  }
}

ensureQ8();
const env = { SELFSCOPE_BENCH_MODEL: Q8_PATH };
const lc = await child("llama.cpp", "llamacpp.js", env);
const q8 = await child("selfscope-q8_0", "selfscope.js", { ...env, SELFSCOPE_BENCH_WEIGHTS: "native" });
const f32 = await child("selfscope-f32", "selfscope.js", { ...env, SELFSCOPE_BENCH_WEIGHTS: "f32" });
const fileBytes = fs.statSync(Q8_PATH).size;
const row = (r: EngineResult) => ({ loadMs: round(r.loadMs), prefillTokPerS: r.prefill.tokPerS, decodeB1TokPerS: r.decode.b1.tokPerS, peakRssMiB: round(r.rss.peakBytes / 2 ** 20, 0), greedy: r.greedy });
const result = {
  time: new Date().toISOString(),
  model: path.basename(Q8_PATH),
  fileBytes,
  threads,
  quick,
  host: { cpu: os.cpus()[0]?.model ?? "?", flags: cpuFlags(), cores: os.availableParallelism(), node: process.version },
  llamacpp: row(lc),
  selfscopeQ8: row(q8),
  selfscopeF32: row(f32),
  q8_0_decode_b1_ratio: round(q8.decode.b1.tokPerS / lc.decode.b1.tokPerS, 3),
  q8_0_prefill_ratio: round(q8.prefill.tokPerS / lc.prefill.tokPerS, 3),
  q8_0_rss_over_file: round(q8.rss.peakBytes / fileBytes, 2),
  f32_weights_decode_b1_ratio: round(f32.decode.b1.tokPerS / lc.decode.b1.tokPerS, 3),
  greedyAgrees: JSON.stringify(q8.greedy) === JSON.stringify(lc.greedy),
};
const stamp = result.time.replace(/[:.]/g, "-");
writeJson(path.join(RESULTS_DIR, `q8-${stamp}.json`), result);
writeJson(path.join(RESULTS_DIR, "q8-latest.json"), result);
process.stdout.write(JSON.stringify(result) + "\n");
