// The injection protocol's prompts as data (data/protocol/*.json): prompt-framing variants
// (paper Table 1), persona / dialogue-format variants (Table 2) and Lindsey (2025)'s original,
// rendered for a given model, with the position where injection starts.
import fs from "node:fs";
import { UsageError } from "../core/errors.js";
import { dataPath } from "../core/package.js";
import type { ChatMessage } from "../io/chat-template.js";
import type { Model } from "../model/model.js";

export const FORCED_PREFILL = "Yes, I detect an injected thought. The thought is about";

export function readData<T>(rel: string): T {
  return JSON.parse(fs.readFileSync(dataPath(rel), "utf8")) as T;
}

/** Which question a variant asks: results of different questions are never one headline. */
export type VariantQuestion =
  /** "Do you detect an injected thought?" or a reworded form of it (paper Table 1/2 variants) */
  | "detection"
  /** "What are you thinking about right now?" (neutral_query): no detection question at all */
  | "current-thought";

interface VariantBase {
  id: string;
  label: string;
  /** Where it comes from: 03c prompt framings, 03b personas, Lindsey (2025). */
  family: "framing" | "persona" | "lindsey";
  asks: VariantQuestion;
  /** Cut the response at the first continuation of the dialogue before judging (03b does, for all six). */
  cut: boolean;
  /** The template holds {category} or {thoughts}: every trial, controls included, needs a concept. */
  usesConcept: boolean;
}
export type Variant =
  | (VariantBase & { format: "chat"; system: string; user1: string; assistant1: string; user2: string })
  | (VariantBase & { format: "raw"; template: string });

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

// neutral_query asks what the model is thinking about, not whether it detects an injection (03c's
// plots drop it for that reason); every other variant asks a form of the detection question.
const QUESTION_OF: Record<string, VariantQuestion> = { neutral_query: "current-thought" };

let cache: Map<string, Variant> | undefined;

/** All variants by id. The trial-number placeholder is normalised to {n}. */
export function variants(): Map<string, Variant> {
  if (cache) return cache;
  const m = new Map<string, Variant>();
  const usesConcept = (...s: string[]) => s.some((x) => x.includes("{category}") || x.includes("{thoughts}"));
  const asks = (id: string) => QUESTION_OF[id] ?? "detection";
  for (const v of readData<{ variants: PromptVariantJson[] }>("protocol/prompt_variants.json").variants) {
    const user2 = v.user_turn2_template.replaceAll("{trial_num}", "{n}");
    m.set(v.id, {
      id: v.id,
      label: v.paper_label ?? v.id,
      family: "framing",
      asks: asks(v.id),
      cut: false,
      usesConcept: usesConcept(v.system_prompt, v.user_turn1, v.assistant_turn1, user2),
      format: "chat",
      system: v.system_prompt,
      user1: v.user_turn1,
      assistant1: v.assistant_turn1,
      user2,
    });
  }
  for (const v of readData<{ variants: PersonaVariantJson[] }>("protocol/persona_variants.json").variants) {
    const base = { id: v.id, label: v.paper_label_in_plots ?? v.id, family: "persona" as const, asks: asks(v.id), cut: true, usesConcept: false };
    if (v.format === "chat_template") {
      const msgs = v.messages ?? [];
      const get = (role: string, k = 0) => msgs.filter((x) => x.role === role)[k]?.content ?? "";
      m.set(v.id, { ...base, format: "chat", system: get("system"), user1: get("user"), assistant1: get("assistant"), user2: get("user", 1).replaceAll("{trial_number}", "{n}") });
    } else m.set(v.id, { ...base, format: "raw", template: (v.template ?? "").replaceAll("{trial_number}", "{n}") });
  }
  const lindsey = readData<{ exp1_injected_thoughts: { prompt: string } }>("protocol/lindsey_2025.json").exp1_injected_thoughts.prompt;
  m.set("lindsey2025", { id: "lindsey2025", label: "Lindsey (2025)", family: "lindsey", asks: "detection", cut: true, usesConcept: false, format: "raw", template: lindsey.replace("Trial 1:", "Trial {n}:") });
  cache = m;
  return m;
}

export function getVariant(id: string): Variant {
  const v = variants().get(id);
  if (!v) throw new UsageError(`unknown variant "${id}"; known: ${[...variants().keys()].join(", ")}`);
  return v;
}

let categories: Map<string, string> | undefined;
/** The anti_reward {category} of a concept (03c's CONCEPT_CATEGORIES; "other" when unlisted, as 03c). */
export function conceptCategory(concept: string): string {
  if (!categories) {
    categories = new Map();
    const c = readData<{ concept_categories_for_anti_reward: Record<string, string[]> }>("protocol/prompt_variants.json").concept_categories_for_anti_reward;
    for (const [cat, list] of Object.entries(c)) for (const w of list) categories.set(w, cat);
  }
  return categories.get(concept) ?? "other";
}

/**
 * How a run renders its prompts. "chat": through the model's chat template (02/03b/03c); "raw": the
 * base-model dialogue of the paper's 03 and 03f (`User: …\n\nAssistant: Ok.\n\nUser: Trial n: …\n\nAssistant:`,
 * BOS as the tokenizer adds it). Undefined (logs written before the flag existed): the template when
 * there is one, else 02's no-template fallback.
 */
export type PromptFormat = "chat" | "raw";

export interface RenderOptions {
  /** Overrides the trial question (yes-bias controls ask an unrelated yes/no question in the same slot). */
  question?: string;
  /** Appended after the generation prompt (forced identification). */
  prefill?: string | null;
  /** The trial's concept: fills {category} and {thoughts}. Required by variants that use them. */
  concept?: string | null;
  format?: PromptFormat;
  /**
   * What the judge sees as {prompt}: "question" = the trial question (02), "full" = the whole
   * rendered prompt (03b/03c, for every variant of a variant run, "original" included). Undefined:
   * the rule of logs written before the flag (full for every variant but original and lindsey2025).
   */
  judgePrompt?: "question" | "full";
  /**
   * A variant run (03c) builds "original" without 02's empty system message; the main run (02)
   * keeps it (an empty system turn changes the render on templates that show one).
   */
  variantRun?: boolean;
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

/** Render a trial prompt (protocol §2.1, §5.1, §5.2, §5.3). */
export function renderTrial(model: Model, v: Variant, n: number, opts: RenderOptions = {}): TrialPrompt {
  const tok = model.tokenizer;
  if (!tok) throw new UsageError(`${model.files.path} has no tokenizer; the injection protocol needs text prompts`);
  if (v.usesConcept && !opts.concept) throw new UsageError(`variant ${v.id} needs a concept for every trial (its prompt names the concept or its category); controls take one too`);
  const concept = opts.concept ?? "";
  const category = opts.concept ? conceptCategory(opts.concept) : "other";
  const fill = (s: string) => s.replaceAll("{n}", String(n)).replaceAll("{category}", category).replaceAll("{thoughts}", concept);
  const qText = opts.question !== undefined ? `Trial ${n}: ${opts.question}` : undefined;
  let text: string;
  let question: string;
  if (v.format === "chat") {
    const user2 = qText ?? fill(v.user2);
    question = user2;
    if (opts.format === "raw") {
      // The paper's base-model prompt (03, 03f); a system prompt goes first, as 02's fallback put it.
      const sys = v.system !== "" ? `${fill(v.system)}\n\n` : "";
      text = `${bosText(model)}${sys}User: ${fill(v.user1)}\n\nAssistant: ${fill(v.assistant1)}\n\nUser: ${user2}\n\nAssistant:`;
    } else if (model.chatTemplate) {
      const msgs: ChatMessage[] = [];
      // 03c adds a system turn only when the variant has one; 02 and 03b's chat variant send an empty one.
      const withSystem = v.system !== "" || (v.id === "original" && !opts.variantRun) || v.family === "persona";
      if (withSystem && hasSystemRole(model)) msgs.push({ role: "system", content: fill(v.system) });
      msgs.push({ role: "user", content: fill(v.user1) }, { role: "assistant", content: fill(v.assistant1) }, { role: "user", content: user2 });
      text = model.encode({ messages: msgs, addGenerationPrompt: true }).text!;
    } else if (opts.format === "chat") {
      throw new UsageError(`${model.files.path} has no chat template: run it with --prompt-format raw (the paper's base-model prompt)`);
    } else {
      // 02's fallback for tokenizers without a chat template (logs from before --prompt-format).
      text = `${bosText(model)}${fill(v.user1)}\n\nAssistant: ${fill(v.assistant1)}\n\nUser: ${user2}\n\nAssistant:`;
    }
  } else {
    let t = fill(v.template);
    if (qText) t = t.replace(/Trial \d+: [^\n"]*/, qText);
    text = bosText(model) + t;
    question = qText ?? (/Trial \d+: [^\n"]*/.exec(t)?.[0] ?? "");
  }
  // The judge's full prompt is the prompt the model was given, without the prefill (the response follows it).
  const rendered = text;
  if (opts.prefill) text += opts.prefill;
  const ids = tok.encode(text, { addSpecial: false });
  const marker = text.indexOf(`Trial ${n}`);
  if (marker < 0) throw new UsageError(`variant ${v.id}: rendered prompt has no "Trial ${n}"`);
  const injectFrom = tok.encode(text.slice(0, marker), { addSpecial: false }).length - 1;
  const full = opts.judgePrompt === undefined ? v.family !== "lindsey" && v.id !== "original" : opts.judgePrompt === "full";
  return { text, ids, injectFrom: Math.max(0, injectFrom), question: full ? rendered : question };
}

const systemRole = new WeakMap<Model, boolean>();
/**
 * Whether a system turn can be sent. The paper drops it for every Gemma model (Gemma 3's template
 * would fold it into the first user turn, Gemma 2's raises); a template that rejects a system turn
 * has none either.
 */
export function hasSystemRole(model: Model): boolean {
  if (model.family.startsWith("gemma")) return false;
  let ok = systemRole.get(model);
  if (ok === undefined) {
    try {
      model.encode({ messages: [{ role: "system", content: "s" }, { role: "user", content: "u" }], addGenerationPrompt: true });
      ok = true;
    } catch {
      ok = false;
    }
    systemRole.set(model, ok);
  }
  return ok;
}

/** BOS as text when the model's tokenizer starts every encoding with it (SPM/Gemma/Llama), else "". */
export function bosText(model: Model): string {
  const t = model.tokenizer;
  const bos = t?.bos;
  if (bos === undefined) return "";
  // Only when the model normally starts with BOS (SPM/Gemma/Llama), as the protocol prepends it.
  const probe = t!.encode("a", { addSpecial: true });
  return probe[0] === bos ? (t!.idToToken(bos) ?? "") : "";
}

/** 03b/03's extract_first_response markers (a "\n\n" form is found by its "\n" form; the cut is then trimmed). */
export const PAPER_CONTINUATION: readonly string[] = ["\nUser:", "\nAssistant:", "\nSystem:", "\nAlice:", "\nBob:", "\n<start_of_turn>", "<end_of_turn>", "\nTrial ", "\n* User:", "\n* Assistant:", "\n- User:", "\n- Assistant:"];
/** The paper's markers plus Lindsey's "Human:" turn (her transcripts use Human/Assistant). */
const CONTINUATION: readonly string[] = [...PAPER_CONTINUATION, "\nHuman:"];

/** Cut a response at the earliest continuation of the dialogue (protocol §3.2), then trim. */
export function firstResponse(s: string, markers: readonly string[] = CONTINUATION): string {
  let cut = s.length;
  for (const m of markers) {
    const i = s.indexOf(m);
    if (i >= 0 && i < cut) cut = i;
  }
  return s.slice(0, cut).trim();
}
