// Child process of `npm run bench -- --large` (bench/large.ts): one engine, one large Q4_K file.
// selfscope loads it the way a user does (Model.load, cpu device: the memory check first, then the
// Q4_K matrices kept in their format); llama.cpp through node-llama-cpp (CPU, no mmap, F32 KV).
//
//   node dist/bench/large-child.js --engine selfscope|llamacpp --model FILE --threads N --out FILE [--weights native|native-int8]
import path from "node:path";
import { Model } from "../src/model/model.js";
import { loadLlamaCpu } from "../src/reference/llamacpp.js";
import type { Token } from "node-llama-cpp";
import { RssSampler, cpuSeconds, log, median, promptIds, round, writeJson } from "./common.js";
import type { LargeRun } from "./large.js";

const argv = process.argv.slice(2);
const opt = (k: string) => {
  const i = argv.indexOf(k);
  if (i < 0 || argv[i + 1] === undefined) throw new Error(`${k} is required`);
  return argv[i + 1]!;
};
const engine = opt("--engine") as "selfscope" | "llamacpp";
const file = opt("--model");
const N = Number(opt("--threads"));
const out = opt("--out");
const weights = argv.includes("--weights") ? (opt("--weights") as "native" | "native-int8") : undefined;
const say = (m: string) => log(`large ${engine} ${path.basename(file)}`, m);
const PREFILL = 32;
const NEW = 16;
const prompt = promptIds(PREFILL);
const decodePrompt = promptIds(8, 3);
const rss = new RssSampler();

async function selfscope(): Promise<LargeRun> {
  const t0 = performance.now();
  let model: Model;
  try {
    model = await Model.load(file, { threads: N, ...(weights ? { weights } : {}) });
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    say(`refused: ${msg}`);
    return { engine, info: "selfscope cpu engine", refused: msg, cpuS: cpuSeconds() };
  }
  try {
    await model.forward([{ ids: [300] }], { logits: "last" });
    const loadMs = performance.now() - t0;
    say(`loaded in ${loadMs.toFixed(0)} ms`);
    const ms: number[] = [];
    for (let r = 0; r < 4; r++) {
      const t = performance.now();
      await model.forward([{ ids: prompt }], { logits: "last" });
      ms.push(performance.now() - t);
    }
    ms.shift();
    const pm = median(ms);
    await model.generate([{ ids: decodePrompt }], { maxTokens: 4, stop: [] });
    const stamps: number[] = [];
    const g = await model.generate([{ ids: decodePrompt }], { maxTokens: NEW, stop: [], onStep: () => stamps.push(performance.now()) });
    const steps = stamps.slice(1).map((x, i) => x - stamps[i]!);
    const dm = median(steps);
    return {
      engine,
      info: `selfscope cpu engine, ${"simd" in model.engine ? `${String(model.engine.simd)}, ` : ""}${N} threads, weights ${weights ?? "native (Model.load's default)"}`,
      loadMs: round(loadMs, 0),
      prefill: { tokens: PREFILL, msMedian: round(pm, 1), tokPerS: round((PREFILL / pm) * 1000, 2) },
      decode: { newTokens: NEW, msPerStepMedian: round(dm, 1), tokPerS: round(1000 / dm, 2) },
      peakRssBytes: rss.takePeak(),
      greedy: g.tokens[0]!,
      cpuS: cpuSeconds(),
    };
  } finally {
    model.dispose();
  }
}

async function llamacpp(): Promise<LargeRun> {
  const t0 = performance.now();
  const llama = await loadLlamaCpu(N);
  const model = await llama.loadModel({ modelPath: file, gpuLayers: 0, useMmap: false });
  const ctxOf = () => model.createContext({ contextSize: 64, sequences: 1, batchSize: 64, threads: { ideal: N, min: N }, flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" });
  const loadMs = performance.now() - t0;
  say(`loaded in ${loadMs.toFixed(0)} ms`);
  const ctx = await ctxOf();
  const ms: number[] = [];
  for (let r = 0; r < 4; r++) {
    const seq = ctx.getSequence();
    const t = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(prompt as Token[]);
    ms.push(performance.now() - t);
    seq.dispose();
  }
  ms.shift();
  const pm = median(ms);
  const run = async (n: number) => {
    const seq = ctx.getSequence();
    const stamps: number[] = [];
    const toks: number[] = [];
    for await (const tok of seq.evaluate(decodePrompt as Token[], { temperature: 0, yieldEogToken: true })) {
      stamps.push(performance.now());
      toks.push(tok);
      if (toks.length >= n) break;
    }
    seq.dispose();
    return { stamps, toks };
  };
  await run(4);
  const { stamps, toks } = await run(NEW);
  const dm = median(stamps.slice(1).map((x, i) => x - stamps[i]!));
  await ctx.dispose();
  await model.dispose();
  return {
    engine,
    info: `llama.cpp ${llama.llamaCppRelease.release} (${llama.buildType}), cpu, ${N} threads, no mmap, KV F32`,
    loadMs: round(loadMs, 0),
    prefill: { tokens: PREFILL, msMedian: round(pm, 1), tokPerS: round((PREFILL / pm) * 1000, 2) },
    decode: { newTokens: NEW, msPerStepMedian: round(dm, 1), tokPerS: round(1000 / dm, 2) },
    peakRssBytes: rss.takePeak(),
    greedy: toks,
    cpuS: cpuSeconds(),
  };
}

const result = engine === "selfscope" ? await selfscope() : await llamacpp();
rss.stop();
writeJson(out, result);
process.exit(0);
