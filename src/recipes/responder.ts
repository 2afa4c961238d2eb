// Models that answer conversations, hosted or local, behind one interface: the sweeps that talk to
// models (identity, self-recognition) take `--model [LABEL=]SPEC[@OFFICIAL NAME]` with SPEC
// openai:MODEL, openrouter:MODEL, anthropic:MODEL (judge/chat.ts) or a local checkpoint (PATH or
// local:PATH, run by selfscope's engine).
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { APIS, ChatClient, isApiKind, type ChatTurn } from "../judge/chat.js";
import { Model, type Prompt } from "../model/model.js";

export interface ModelSpec {
  label: string;
  /** openai:MODEL, openrouter:MODEL, anthropic:MODEL, or local:PATH. */
  spec: string;
  official: string;
}

/** "[LABEL=]SPEC[@OFFICIAL]"; a bare path is local:PATH. */
export function parseModelSpec(s: string): ModelSpec {
  const eq = s.indexOf("=");
  const label0 = eq > 0 && !s.slice(0, eq).includes(":") ? s.slice(0, eq) : null;
  let rest = label0 ? s.slice(eq + 1) : s;
  const at = rest.lastIndexOf("@");
  const official = at > 0 ? rest.slice(at + 1).trim() : "";
  if (at > 0) rest = rest.slice(0, at);
  const colon = rest.indexOf(":");
  const kind = colon > 0 ? rest.slice(0, colon) : "";
  const spec = isApiKind(kind) || kind === "local" ? rest : `local:${rest}`;
  const id = spec.slice(spec.indexOf(":") + 1);
  if (!id) throw new UsageError(`--model ${s}: names no model (use openai:MODEL, openrouter:MODEL, anthropic:MODEL, local:PATH or a path, optionally LABEL=... and @OFFICIAL NAME)`);
  return { label: label0 ?? (spec.startsWith("local:") ? path.basename(id) : id), spec, official: official || (spec.startsWith("local:") ? path.basename(id).replace(/\.(gguf|safetensors)$/, "") : id.split("/").pop()!) };
}

/** A model that answers conversations: a hosted endpoint or a local checkpoint. */
export interface Responder {
  endpoint: string | null;
  identity: unknown;
  reply(turns: ChatTurn[], seed: number, temperature: number, maxTokens: number): Promise<{ text: string | null; reasoning: string | null; error: string | null }>;
  /**
   * Local models only: the log-probability of each option as the reply's beginning (the sum over
   * its tokens, teacher-forced after the rendered conversation). Hosted models have none: their
   * choices are read from the reply's text.
   */
  scoreOptions?(turns: ChatTurn[], options: readonly string[]): Promise<number[]>;
  concurrency: number;
  dispose(): void;
}

export async function responder(m: ModelSpec, o: { env?: NodeJS.ProcessEnv; concurrency?: number; timeoutMs?: number; maxAttempts?: number; backoffMs?: number; threads?: number }): Promise<Responder> {
  const kind = m.spec.slice(0, m.spec.indexOf(":"));
  const id = m.spec.slice(kind.length + 1);
  if (isApiKind(kind)) {
    const client = new ChatClient(m.spec, APIS[kind], id, { ...o, concurrency: o.concurrency ?? 8 }, `--model ${m.spec}`);
    return {
      endpoint: client.endpoint,
      identity: { spec: m.spec, endpoint: client.endpoint },
      concurrency: client.concurrency,
      reply: async (turns, _seed, temperature, maxTokens) => {
        client.announce(`${m.label}: sending prompts to`);
        const r = await client.complete(turns, { temperature, maxTokens });
        return { text: r.text, reasoning: r.reasoning, error: r.error };
      },
      dispose: () => undefined,
    };
  }
  if (!fs.existsSync(id)) throw new UsageError(`--model ${m.spec}: ${id} does not exist`);
  const model = await Model.load(id, o.threads ? { threads: o.threads } : {});
  // Without a chat template, the protocol's raw dialogue format (docs/protocol.md §2.5).
  const render = (turns: ChatTurn[]): Prompt =>
    model.chatTemplate !== undefined ? { messages: turns } : turns.map((t) => `${t.role === "user" ? "User" : "Assistant"}: ${t.content}`).join("\n\n") + "\n\nAssistant:";
  return {
    endpoint: null,
    identity: model.identity(),
    concurrency: 1,
    scoreOptions: async (turns, options) => {
      const ids = model.encode(render(turns)).ids;
      const scores: number[] = [];
      for (const o of options) {
        const opt = model.encode({ text: o }).ids;
        const { logits } = await model.forward([{ ids: [...ids, ...opt] }], { logits: "all" });
        const V = model.config.dVocab, row = logits[0] as Float32Array;
        let lp = 0;
        opt.forEach((t, j) => {
          const base = (ids.length - 1 + j) * V;
          let mx = -Infinity;
          for (let v = 0; v < V; v++) mx = Math.max(mx, row[base + v]!);
          let z = 0;
          for (let v = 0; v < V; v++) z += Math.exp(row[base + v]! - mx);
          lp += row[base + t]! - mx - Math.log(z);
        });
        scores.push(lp);
      }
      return scores;
    },
    reply: async (turns, seed, temperature, maxTokens) => {
      const prompt = render(turns);
      const room = model.config.nCtx - model.encode(prompt).ids.length - 1;
      if (room < 1) return { text: null, reasoning: null, error: `the conversation does not fit ${m.label}'s context of ${model.config.nCtx} tokens` };
      const g = await model.generate([prompt], { maxTokens: Math.min(maxTokens, room), temperature, seed });
      const raw = g.texts[0]!;
      // A reasoning model's <think>…</think> is its trace, not its reply.
      const think = /<think>([\s\S]*?)(<\/think>|$)/.exec(raw);
      return { text: think ? raw.replace(think[0], "").trim() : raw, reasoning: think ? think[1]!.trim() : null, error: null };
    },
    dispose: () => model.dispose(),
  };
}

