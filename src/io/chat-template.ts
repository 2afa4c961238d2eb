// Chat templates: the Jinja templates models ship in tokenizer_config.json (or GGUF
// `tokenizer.chat_template`), rendered with @huggingface/jinja the way transformers'
// apply_chat_template renders them (trim_blocks + lstrip_blocks, which the library sets).
import fs from "node:fs";
import nodePath from "node:path";
import { Environment as JinjaEnvironment, Interpreter as JinjaInterpreter, Template } from "@huggingface/jinja";
import { ModelFileError, UsageError } from "../core/errors.js";
import type { GgufFile } from "./gguf.js";

// The library's own Template.render declares raise_exception/strftime_now itself and refuses to
// redeclare them, so we run its interpreter on an environment we fill. Its runtime .d.ts uses
// extensionless imports that NodeNext cannot follow, hence these declared shapes.
interface Env {
  set(name: string, value: unknown): unknown;
}
const EnvCtor = JinjaEnvironment as unknown as new (parent?: Env) => Env;
const InterpreterCtor = JinjaInterpreter as unknown as new (env: Env) => { run(program: Template["parsed"]): { value: unknown } };

/** Python's range() for templates (`range(n)`, `range(a, b)`, `range(a, b, step)`). */
function range(a: unknown, b?: unknown, step?: unknown): number[] {
  const [start, stop] = b === undefined ? [0, Number(a)] : [Number(a), Number(b)];
  const st = step === undefined ? 1 : Number(step);
  if (!Number.isInteger(start) || !Number.isInteger(stop) || !Number.isInteger(st) || st === 0) {
    throw new UsageError(`range(${[a, b, step].filter((x) => x !== undefined).join(", ")}): arguments must be integers and step non-zero`);
  }
  const out: number[] = [];
  for (let i = start; st > 0 ? i < stop : i > stop; i += st) out.push(i);
  return out;
}

export interface ChatMessage {
  role: string;
  content: string;
}

export interface RenderChatOptions {
  /** Append the header that starts the assistant's turn (transformers' add_generation_prompt). */
  addGenerationPrompt: boolean;
  bosToken?: string;
  eosToken?: string;
  /** More template variables (tools, enable_thinking, date_string, ...). They override the
   * defaults above and the helpers, e.g. `strftime_now` for a fixed date. */
  extra?: Record<string, unknown>;
}

const MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/** Python's `date.strftime` for the C locale, for the codes chat templates use. Our own rather
 * than the library's, whose month names follow the host locale. Unknown codes pass through. */
export function strftime(date: Date, format: string): string {
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  const startOfYear = new Date(date.getFullYear(), 0, 1);
  const dayOfYear = Math.floor((date.getTime() - startOfYear.getTime()) / 86_400_000) + 1;
  const h12 = date.getHours() % 12 === 0 ? 12 : date.getHours() % 12;
  return format.replace(/%(-?)([a-zA-Z%])/g, (whole, dash: string, code: string) => {
    // "%-d" (glibc): no zero padding.
    const num = (n: number, w = 2) => (dash ? String(n) : pad(n, w));
    switch (code) {
      case "Y": return String(date.getFullYear());
      case "y": return pad(date.getFullYear() % 100);
      case "m": return num(date.getMonth() + 1);
      case "d": return num(date.getDate());
      case "e": return String(date.getDate()).padStart(2, " ");
      case "j": return num(dayOfYear, 3);
      case "H": return num(date.getHours());
      case "I": return num(h12);
      case "M": return num(date.getMinutes());
      case "S": return num(date.getSeconds());
      case "p": return date.getHours() < 12 ? "AM" : "PM";
      case "B": return MONTHS[date.getMonth()]!;
      case "b": return MONTHS[date.getMonth()]!.slice(0, 3);
      case "A": return DAYS[date.getDay()]!;
      case "a": return DAYS[date.getDay()]!.slice(0, 3);
      case "%": return "%";
      default: return whole;
    }
  });
}

// Parsing is the slow part and the same few templates are rendered over and over.
const parsed = new Map<string, Template>();

function compile(template: string): Template {
  let t = parsed.get(template);
  if (!t) {
    try {
      t = new Template(template);
    } catch (e) {
      throw new UsageError(`chat template does not parse: ${(e as Error).message}`);
    }
    if (parsed.size >= 32) parsed.clear();
    parsed.set(template, t);
  }
  return t;
}

/** Render `messages` with a model's chat template into the prompt string (not yet tokenized). */
export function renderChat(template: string, messages: ChatMessage[], opts: RenderChatOptions): string {
  const t = compile(template);
  // Globals as the library's setupGlobals declares them, with our helpers in place of its own.
  const globals: Record<string, unknown> = {
    true: true,
    false: false,
    none: null,
    True: true,
    False: false,
    None: null,
    range,
    // Templates test `raise_exception(...)` for conversations they reject (roles that do not
    // alternate, tools without a user turn); surface the template's own message.
    raise_exception: (message: unknown): never => {
      throw new UsageError(`the chat template rejected the conversation: ${String(message)}`);
    },
    // Llama 3.2/3.3 and others print today's date into the system header.
    strftime_now: (format: unknown): string => strftime(new Date(), String(format)),
  };
  const vars: Record<string, unknown> = {
    messages: messages.map((m) => ({ role: m.role, content: m.content })),
    add_generation_prompt: opts.addGenerationPrompt,
  };
  // transformers passes special tokens only when they are set, so `bos_token is defined` works.
  if (opts.bosToken !== undefined) vars.bos_token = opts.bosToken;
  if (opts.eosToken !== undefined) vars.eos_token = opts.eosToken;
  Object.assign(vars, opts.extra ?? {});
  const env = new EnvCtor();
  for (const [k, v] of Object.entries(globals)) if (!(k in vars)) env.set(k, v);
  for (const [k, v] of Object.entries(vars)) env.set(k, v);
  try {
    const out = new InterpreterCtor(env).run(t.parsed).value;
    return String(out);
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`chat template failed to render: ${(e as Error).message}`);
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Pick a template out of a `chat_template` value: a string, or transformers' list of
 * `{name, template}` (where `name` selects; "default" unless asked otherwise). */
function pickTemplate(value: unknown, name: string, file: string): string {
  if (typeof value === "string") {
    if (name !== "default") throw new UsageError(`${file} has a single chat template, not one named "${name}"`);
    return value;
  }
  if (Array.isArray(value)) {
    const named = new Map<string, string>();
    for (const item of value) {
      if (!isObject(item) || typeof item.name !== "string" || typeof item.template !== "string") {
        throw new ModelFileError(file, "malformed chat_template: list entries must be {name, template} strings");
      }
      named.set(item.name, item.template);
    }
    const t = named.get(name);
    if (t === undefined) {
      throw new UsageError(`${file} has no chat template named "${name}" (it has: ${[...named.keys()].join(", ")})`);
    }
    return t;
  }
  throw new ModelFileError(file, "malformed chat_template: expected a string or a list of {name, template}");
}

/**
 * The chat template of a model directory's tokenizer_config.json. Newer checkpoints keep it in
 * chat_template.jinja (or chat_template.json) beside the config instead; those are read when the
 * config has none. Returns undefined when the model has no template (base models).
 */
export function chatTemplateFromTokenizerConfig(path: string, name = "default"): string | undefined {
  let text: string;
  try {
    text = fs.readFileSync(path, "utf8");
  } catch {
    throw new ModelFileError(path, "cannot read the tokenizer_config.json", "check the path");
  }
  let config: unknown;
  try {
    config = JSON.parse(text) as unknown;
  } catch (e) {
    throw new ModelFileError(path, `the tokenizer_config.json is not valid JSON (${(e as Error).message})`);
  }
  if (!isObject(config)) throw new ModelFileError(path, "malformed tokenizer_config.json: not a JSON object");
  if (config.chat_template !== undefined && config.chat_template !== null) return pickTemplate(config.chat_template, name, path);

  const dir = nodePath.dirname(path);
  const jinja = nodePath.join(dir, "chat_template.jinja");
  if (name === "default" && fs.existsSync(jinja)) return fs.readFileSync(jinja, "utf8");
  const json = nodePath.join(dir, "chat_template.json");
  if (fs.existsSync(json)) {
    let c: unknown;
    try {
      c = JSON.parse(fs.readFileSync(json, "utf8")) as unknown;
    } catch (e) {
      throw new ModelFileError(json, `not valid JSON (${(e as Error).message})`);
    }
    if (isObject(c) && c.chat_template !== undefined) return pickTemplate(c.chat_template, name, json);
  }
  return undefined;
}

/** The chat template stored in a GGUF (`tokenizer.chat_template`, or llama.cpp's
 * `tokenizer.chat_template.<name>` for named ones). Undefined when there is none. */
export function chatTemplateFromGguf(file: GgufFile, name = "default"): string | undefined {
  const key = name === "default" ? "tokenizer.chat_template" : `tokenizer.chat_template.${name}`;
  const v = file.metadata.get(key);
  if (v === undefined) return undefined;
  if (typeof v !== "string") throw new ModelFileError(file.path, `metadata key ${key} should be a string`);
  return v;
}
