// The injection protocol's prompts as data (data/protocol/*.json): prompt-framing variants
// (paper Table 1), persona / dialogue-format variants (Table 2) and Lindsey (2025)'s original,
// rendered for a given model, with the position where injection starts.
import fs from "node:fs";
import { UsageError } from "../core/errors.js";
import type { ChatMessage } from "../io/chat-template.js";
import type { Model } from "../model/model.js";

export const FORCED_PREFILL = "Yes, I detect an injected thought. The thought is about";

/** Where data files live: <package>/data (this file is dist/src/eval/protocol.js). */
export function dataPath(rel: string): string {
  return new URL(`../../../data/${rel}`, import.meta.url).pathname;
}

export function readData<T>(rel: string): T {
  return JSON.parse(fs.readFileSync(dataPath(rel), "utf8")) as T;
}

export type Variant =
  | { id: string; label: string; format: "chat"; system: string; user1: string; assistant1: string; user2: string; judgeFullPrompt: boolean }
  | { id: string; label: string; format: "raw"; template: string; judgeFullPrompt: boolean };

interface PromptVariantJson {
  id: string;
  paper_label?: string;
  system_prompt: string;
  user_turn1: string;
  assistant_turn1: string;
  user_turn2_template: string;
}
interface PersonaVariantJson {
  id: string;
  paper_label_in_plots?: string;
  format: "chat_template" | "raw_text";
  messages?: ChatMessage[];
  template?: string;
}

let cache: Map<string, Variant> | undefined;

/** All variants by id. The trial-number placeholder is normalised to {n}. */
export function variants(): Map<string, Variant> {
  if (cache) return cache;
  const m = new Map<string, Variant>();
  for (const v of readData<{ variants: PromptVariantJson[] }>("protocol/prompt_variants.json").variants) {
    m.set(v.id, {
      id: v.id,
      label: v.paper_label ?? v.id,
      format: "chat",
      system: v.system_prompt,
      user1: v.user_turn1,
      assistant1: v.assistant_turn1,
      user2: v.user_turn2_template.replaceAll("{trial_num}", "{n}"),
      // 02 (the main experiment) judges on the trial question; 03c on the whole rendered prompt.
      judgeFullPrompt: v.id !== "original",
    });
  }
  for (const v of readData<{ variants: PersonaVariantJson[] }>("protocol/persona_variants.json").variants) {
    if (v.format === "chat_template") {
      const msgs = v.messages ?? [];
      const get = (role: string, k = 0) => msgs.filter((x) => x.role === role)[k]?.content ?? "";
      m.set(v.id, { id: v.id, label: v.paper_label_in_plots ?? v.id, format: "chat", system: get("system"), user1: get("user"), assistant1: get("assistant"), user2: get("user", 1).replaceAll("{trial_number}", "{n}"), judgeFullPrompt: true });
    } else m.set(v.id, { id: v.id, label: v.paper_label_in_plots ?? v.id, format: "raw", template: (v.template ?? "").replaceAll("{trial_number}", "{n}"), judgeFullPrompt: true });
  }
  const lindsey = readData<{ exp1_injected_thoughts: { prompt: string } }>("protocol/lindsey_2025.json").exp1_injected_thoughts.prompt;
  m.set("lindsey2025", { id: "lindsey2025", label: "Lindsey (2025)", format: "raw", template: lindsey.replace("Trial 1:", "Trial {n}:"), judgeFullPrompt: false });
  cache = m;
  return m;
}

export function getVariant(id: string): Variant {
  const v = variants().get(id);
  if (!v) throw new UsageError(`unknown variant "${id}"; known: ${[...variants().keys()].join(", ")}`);
  return v;
}

export interface TrialPrompt {
  /** Rendered text (special tokens as text) and its ids, tokenised without adding specials. */
  text: string;
  ids: number[];
  /** Token index where injection starts: the token before "Trial n" (protocol §2.2). */
  injectFrom: number;
  /** What the judge sees as {prompt}. */
  question: string;
}

/**
 * Render a trial prompt. `question` overrides the trial question (yes-bias controls ask an
 * unrelated yes/no question in the same slot). `prefill` is appended after the generation prompt.
 */
export function renderTrial(model: Model, v: Variant, n: number, opts: { question?: string; prefill?: string | null; concept?: string | null } = {}): TrialPrompt {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${model.files.path} has no tokenizer; the injection protocol needs text prompts`);
  const fill = (s: string) => s.replaceAll("{n}", String(n)).replaceAll("{category}", "other").replaceAll("{thoughts}", opts.concept ?? "");
  const qText = opts.question !== undefined ? `Trial ${n}: ${opts.question}` : undefined;
  let text: string;
  let question: string;
  if (v.format === "chat") {
    const user2 = qText ?? fill(v.user2);
    question = user2;
    if (model.chatTemplate) {
      const msgs: ChatMessage[] = [];
      // Gemma has no system role (and an empty one adds "\n\n"): the protocol drops it.
      if (!model.family.startsWith("gemma") && (v.system !== "" || v.id === "original")) msgs.push({ role: "system", content: fill(v.system) });
      msgs.push({ role: "user", content: fill(v.user1) }, { role: "assistant", content: fill(v.assistant1) }, { role: "user", content: user2 });
      text = model.encode({ messages: msgs, addGenerationPrompt: true }).text!;
    } else {
      // Protocol fallback for tokenizers without a chat template, with BOS as text.
      text = `${bosText(model)}${fill(v.user1)}\n\nAssistant: ${fill(v.assistant1)}\n\nUser: ${user2}\n\nAssistant:`;
    }
  } else {
    let t = fill(v.template);
    if (qText) t = t.replace(/Trial \d+: [^\n"]*/, qText);
    text = bosText(model) + t;
    question = qText ?? (/Trial \d+: [^\n"]*/.exec(t)?.[0] ?? "");
  }
  if (opts.prefill) text += opts.prefill;
  const ids = tok.encode(text, { addSpecial: false });
  const marker = text.indexOf(`Trial ${n}`);
  if (marker < 0) throw new UsageError(`variant ${v.id}: rendered prompt has no "Trial ${n}"`);
  const injectFrom = tok.encode(text.slice(0, marker), { addSpecial: false }).length - 1;
  return { text, ids, injectFrom: Math.max(0, injectFrom), question: v.judgeFullPrompt ? text : question };
}

function bosText(model: Model): string {
  const t = model.tokenizer;
  const bos = t?.bos;
  if (bos === undefined) return "";
  // Only when the model normally starts with BOS (SPM/Gemma/Llama), as the protocol prepends it.
  const probe = t!.encode("a", { addSpecial: true });
  return probe[0] === bos ? (t!.idToToken(bos) ?? "") : "";
}

/** Persona/raw runs cut the response at the earliest continuation marker (protocol §3.2). */
const CONTINUATION = ["\nUser:", "\nAssistant:", "\nSystem:", "\nAlice:", "\nBob:", "\nHuman:", "\n<start_of_turn>", "<end_of_turn>", "\nTrial ", "\n* User:", "\n* Assistant:", "\n- User:", "\n- Assistant:"];
export function firstResponse(s: string): string {
  let cut = s.length;
  for (const m of CONTINUATION) {
    const i = s.indexOf(m);
    if (i >= 0 && i < cut) cut = i;
  }
  return s.slice(0, cut).trim();
}
