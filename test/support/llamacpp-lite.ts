// llama.cpp (node-llama-cpp's prebuilt CPU binary) as a test oracle: per-position next-token
// log-probabilities and a greedy continuation from one model load, with one Llama instance shared
// by all the models a test file checks. Settings as in src/reference/llamacpp.ts: CPU only, never
// build or download, F32 KV cache, no flash attention, threads = available cores.
//
// Differences from src/reference/llamacpp.ts, on purpose:
// - The context has room to spare (contextSize > prompt + continuation). With contextSize equal
//   to the prompt length, node-llama-cpp 3.21.1 returns a different distribution for the prompt's
//   last position (max |Δ log p| 16.6 on the llama fixture, every other row exact); one extra
//   slot fixes it.
// - node-llama-cpp 3.21.1 exposes probabilities, not raw logits (generateNext.logits arrived in
//   3.22); they are returned as float64 log-probabilities, renormalised in float64 (good to
//   ~1e-6), to be compared with the log-softmax of our logits.
import os from "node:os";
import { loadLlamaCpu } from "../../src/reference/llamacpp.js";

type Llama = import("node-llama-cpp").Llama;
type Token = import("node-llama-cpp").Token;
type EvalItem = import("node-llama-cpp").ControlledEvaluateInputItem;

export interface LiteRun {
  /** Per prompt position t: log p(next token | ids[0..t]) over the vocabulary. */
  logprobs: Float64Array[];
  /** llama.cpp's greedy continuation (its own sampler, with its KV cache). */
  greedy: number[];
  info: string;
}

export class LlamaCppLite {
  private constructor(
    private llama: Llama,
    private threads: number,
  ) {}

  static async open(threads = os.availableParallelism()): Promise<LlamaCppLite> {
    const llama = await loadLlamaCpu(threads);
    return new LlamaCppLite(llama, threads);
  }

  get release(): string {
    return `llama.cpp ${this.llama.llamaCppRelease.release} (${this.llama.buildType}), node-llama-cpp cpu, ${this.threads} threads, KV F32, no flash attention`;
  }

  async run(modelPath: string, ids: readonly number[], nGreedy: number): Promise<LiteRun> {
    const model = await this.llama.loadModel({ modelPath, gpuLayers: 0 });
    const contextSize = Math.ceil((ids.length + nGreedy + 8) / 32) * 32;
    const open = () =>
      model.createContext({
        contextSize,
        batchSize: contextSize,
        sequences: 1,
        threads: this.threads,
        flashAttention: false,
        experimentalKvCacheKeyType: "F32",
        experimentalKvCacheValueType: "F32",
      });
    try {
      let ctx = await open();
      let logprobs: Float64Array[];
      try {
        const seq = ctx.getSequence();
        const next = { generateNext: { probabilities: true, options: { temperature: 0 } } };
        const res = await seq.controlledEvaluate(ids.map((t) => [t as Token, next] as unknown as EvalItem));
        logprobs = res.map((r, t) => {
          const m = r?.next?.probabilities;
          if (!m) throw new Error(`llama.cpp returned no probabilities at position ${t}`);
          const row = new Float64Array(m.size).fill(NaN);
          for (const [tok, p] of m) row[tok] = p;
          let s = 0;
          for (const p of row) s += p;
          if (Number.isNaN(s)) throw new Error(`llama.cpp probabilities incomplete at position ${t}`);
          return row.map((p) => Math.log(p) - Math.log(s));
        });
      } finally {
        await ctx.dispose();
      }
      ctx = await open();
      const greedy: number[] = [];
      try {
        const seq = ctx.getSequence();
        const next = { generateNext: { token: true, options: { temperature: 0 } } } as const;
        let input: EvalItem[] = ids.map((t, i) => (i === ids.length - 1 ? ([t as Token, next] as unknown as EvalItem) : (t as Token)));
        while (greedy.length < nGreedy) {
          const res = await seq.controlledEvaluate(input);
          const tok = res[input.length - 1]?.next.token;
          if (tok === undefined || tok === null) throw new Error(`llama.cpp produced no token at step ${greedy.length}`);
          greedy.push(tok);
          input = [[tok, next] as unknown as EvalItem];
        }
      } finally {
        await ctx.dispose();
      }
      return { logprobs, greedy, info: `${this.release}, context ${contextSize}` };
    } finally {
      await model.dispose();
    }
  }

  async dispose(): Promise<void> {
    await this.llama.dispose();
  }
}
