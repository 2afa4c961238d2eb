// Chat-completion clients for the hosted APIs: OpenAI-compatible (any base URL), OpenRouter and
// Anthropic. The one transport both the judges and the sweeps that query hosted models
// (identity) use: keys from the environment only (never written, redacted from every message),
// the endpoint announced before the first transcript leaves the machine, a timeout covering the
// whole body, retries with exponential backoff and Retry-After for timeouts, connection errors,
// 408/429/5xx and malformed bodies, and no retry for 4xx answers that will not change.
import { UsageError } from "../core/errors.js";
import { REDACTED, redactSecrets } from "./secrets.js";

export type ApiKind = "openai" | "openrouter" | "anthropic";

export interface ApiSpec {
  kind: ApiKind;
  keyVar: string;
  baseVar: string;
  defaultBase: string;
  keyRequired: boolean;
}

export const APIS: Record<ApiKind, ApiSpec> = {
  openai: { kind: "openai", keyVar: "OPENAI_API_KEY", baseVar: "OPENAI_BASE_URL", defaultBase: "https://api.openai.com/v1", keyRequired: false },
  openrouter: { kind: "openrouter", keyVar: "OPENROUTER_API_KEY", baseVar: "OPENROUTER_BASE_URL", defaultBase: "https://openrouter.ai/api/v1", keyRequired: true },
  anthropic: { kind: "anthropic", keyVar: "ANTHROPIC_API_KEY", baseVar: "ANTHROPIC_BASE_URL", defaultBase: "https://api.anthropic.com", keyRequired: true },
};

export const isApiKind = (k: string): k is ApiKind => k in APIS;

export interface ChatTurn {
  role: "user" | "assistant" | "system";
  content: string;
}

export interface ChatClientOptions {
  /** Environment for API keys and base URLs (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Requests in flight at once (default 16). */
  concurrency?: number;
  /** Per-call timeout, covering the whole response body (default 30 000 ms). */
  timeoutMs?: number;
  /** Calls per request including the first (default 3). */
  maxAttempts?: number;
  /** First backoff delay; attempt k waits backoffMs·2^(k-1) with jitter (default 1000 ms). */
  backoffMs?: number;
  /** Cap on the exponential backoff delay (default 30 000 ms). */
  maxBackoffMs?: number;
  /** Cap on a server's Retry-After (default 60 000 ms). */
  maxRetryAfterMs?: number;
  /** Where the endpoint is announced, once, before the first request (default: stderr). */
  notice?: (line: string) => void;
  /** Sleep used between attempts (tests substitute one that records the delays). */
  sleep?: (ms: number) => Promise<void>;
}

export interface ChatReply {
  /** The reply text; null when no reply came (then `error` says why). */
  text: string | null;
  /** A reasoning trace when the API returned one (OpenAI-compatible `reasoning_content` / `reasoning`, Anthropic thinking blocks). */
  reasoning: string | null;
  /** The reply stopped at max_tokens. */
  truncated: boolean;
  error: string | null;
  /** Requests sent. */
  attempts: number;
  ms: number;
}

/** A failed attempt: retryable (timeouts, connection errors, 429, 5xx, bad bodies) or not. */
class AttemptError extends Error {
  constructor(
    message: string,
    readonly retry: boolean,
    readonly retryAfterMs: number | null = null,
  ) {
    super(message);
  }
}

/** Retry-After as milliseconds: delta-seconds or an HTTP-date; null when absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | null {
  if (value === null) return null;
  const v = value.trim();
  if (/^\d+(?:\.\d+)?$/.test(v)) return Math.round(Number(v) * 1000);
  const t = Date.parse(v);
  return Number.isNaN(t) ? null : Math.max(0, t - now);
}

/** URL for messages: origin and path only (no userinfo, query or fragment). */
export function safeUrl(u: string): string {
  try {
    const x = new URL(u);
    return `${x.origin}${x.pathname}`;
  } catch {
    return "<invalid URL>";
  }
}

function snippet(s: string, n = 300): string {
  const t = s.replace(/\s+/g, " ").trim();
  return t.length > n ? `${t.slice(0, n)}…` : t;
}

/** The connection-level reason behind an undici "fetch failed". */
function netReason(e: unknown): string {
  const err = e as { message?: string; cause?: { code?: string; message?: string } };
  const code = err.cause?.code;
  const msg = err.cause?.message ?? err.message ?? String(e);
  return code ? `${code} (${msg})` : msg;
}

export function positiveInt(v: number, what: string): number {
  if (!Number.isInteger(v) || v < 1) throw new UsageError(`option ${what} must be a positive integer (got ${v})`);
  return v;
}

/** Run `fn` over 0..count-1 with at most `n` in flight. */
export async function pool(n: number, count: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < count) await fn(next++);
  };
  await Promise.all(Array.from({ length: Math.min(n, count) }, worker));
}

export class ChatClient {
  private readonly key: string | undefined;
  private readonly env: NodeJS.ProcessEnv;
  /** Where transcripts are sent: origin and path, nothing secret. */
  readonly endpoint: string;
  /** The full endpoint, query included. */
  readonly url: string;
  private readonly secrets: string[];
  readonly concurrency: number;
  private readonly timeoutMs: number;
  readonly maxAttempts: number;
  private readonly backoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly maxRetryAfterMs: number;
  private readonly sleep: (ms: number) => Promise<void>;
  private readonly notice: (line: string) => void;
  private announced = false;

  /** `name` prefixes every call's error ("openai:m"); `what` the configuration errors ("judge openai:m"). */
  constructor(
    readonly name: string,
    readonly api: ApiSpec,
    readonly model: string,
    opts: ChatClientOptions = {},
    what = name,
  ) {
    const env = opts.env ?? process.env;
    this.env = env;
    const key = env[api.keyVar];
    this.key = key !== undefined && key.trim() !== "" ? key.trim() : undefined;
    if (api.keyRequired && this.key === undefined) throw new UsageError(`${what}: set ${api.keyVar} in the environment (the ${api.kind} API needs a key)`);
    const base = env[api.baseVar];
    let url: URL;
    try {
      url = new URL(base !== undefined && base.trim() !== "" ? base.trim() : api.defaultBase);
    } catch {
      throw new UsageError(`${what}: ${api.baseVar} is not a valid URL`);
    }
    if (url.username !== "" || url.password !== "") throw new UsageError(`${what}: ${api.baseVar} must not contain credentials; put the key in ${api.keyVar}`);
    // Query values (e.g. an api-version, or a key some proxies take in the URL) are kept on requests
    // but never shown.
    this.secrets = [...url.searchParams.values()].filter((v) => v.length >= 4);
    url.pathname = url.pathname.replace(/\/+$/, "") + (api.kind === "anthropic" ? "/v1/messages" : "/chat/completions");
    this.url = url.href;
    this.endpoint = safeUrl(this.url);
    this.concurrency = positiveInt(opts.concurrency ?? 16, "concurrency");
    this.timeoutMs = positiveInt(opts.timeoutMs ?? 30_000, "timeoutMs");
    this.maxAttempts = positiveInt(opts.maxAttempts ?? 3, "maxAttempts");
    this.backoffMs = opts.backoffMs ?? 1000;
    this.maxBackoffMs = opts.maxBackoffMs ?? 30_000;
    this.maxRetryAfterMs = opts.maxRetryAfterMs ?? 60_000;
    this.sleep = opts.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
    this.notice = opts.notice ?? ((l) => void process.stderr.write(l + "\n"));
  }

  /** Say where transcripts go (once), before the first request. */
  announce(what: string): void {
    if (this.announced) return;
    this.announced = true;
    this.notice(`${what} ${this.endpoint}${this.key !== undefined ? ` (key from ${this.api.keyVar})` : ""}`);
  }

  /** Remove the key, query secrets and any configured key from a text. */
  redact(s: string): string {
    let out = s.split(this.url).join(safeUrl(this.url));
    for (const v of this.secrets) out = out.split(v).join(REDACTED);
    return redactSecrets(out, this.env, this.key !== undefined ? [this.key] : []);
  }

  private request(messages: readonly ChatTurn[], temperature: number, maxTokens: number): { url: string; headers: Record<string, string>; body: string } {
    const headers: Record<string, string> = { "content-type": "application/json", accept: "application/json" };
    if (this.api.kind === "anthropic") {
      if (this.key) headers["x-api-key"] = this.key;
      headers["anthropic-version"] = "2023-06-01";
      const system = messages.filter((m) => m.role === "system").map((m) => m.content).join("\n\n");
      const body = {
        model: this.model,
        max_tokens: maxTokens,
        temperature,
        ...(system ? { system } : {}),
        messages: messages.filter((m) => m.role !== "system").map((m) => ({ role: m.role, content: [{ type: "text", text: m.content }] })),
      };
      return { url: this.url, headers, body: JSON.stringify(body) };
    }
    if (this.key) headers.authorization = `Bearer ${this.key}`;
    if (this.api.kind === "openrouter") headers["x-title"] = "selfscope";
    const body = { model: this.model, messages, temperature, max_tokens: maxTokens };
    return { url: this.url, headers, body: JSON.stringify(body) };
  }

  /** The reply of a 200 body, or a retryable error when the body is not what the API returns. */
  private reply(body: string): { text: string; reasoning: string | null; truncated: boolean } {
    let doc: unknown;
    try {
      doc = JSON.parse(body);
    } catch {
      throw new AttemptError(`malformed JSON in the response body (${body.length} bytes: ${snippet(body, 80)})`, true);
    }
    if (this.api.kind === "anthropic") {
      const d = doc as { content?: unknown; stop_reason?: unknown };
      if (!Array.isArray(d.content)) throw new AttemptError(`response JSON has no "content" array: ${snippet(body, 120)}`, true);
      const blocks = d.content as { type?: unknown; text?: unknown; thinking?: unknown }[];
      const text = blocks.filter((b) => b?.type === "text" && typeof b.text === "string").map((b) => b.text as string).join("");
      const thinking = blocks.filter((b) => b?.type === "thinking" && typeof b.thinking === "string").map((b) => b.thinking as string);
      return { text, reasoning: thinking.length ? thinking.join("\n") : null, truncated: d.stop_reason === "max_tokens" };
    }
    const d = doc as { choices?: { message?: { content?: unknown; reasoning_content?: unknown; reasoning?: unknown }; finish_reason?: unknown }[]; error?: { message?: unknown } };
    if (d.error && !d.choices) throw new AttemptError(`API error in a 200 body: ${snippet(String(d.error.message ?? JSON.stringify(d.error)), 200)}`, true);
    const c = d.choices?.[0];
    if (!c || typeof c.message?.content !== "string") throw new AttemptError(`response JSON has no choices[0].message.content: ${snippet(body, 120)}`, true);
    const r = c.message.reasoning_content ?? c.message.reasoning;
    return { text: c.message.content, reasoning: typeof r === "string" && r !== "" ? r : null, truncated: c.finish_reason === "length" };
  }

  private httpError(status: number, statusText: string, body: string, headers: Headers): AttemptError {
    const what = `HTTP ${status}${statusText ? ` ${statusText}` : ""} from ${safeUrl(this.url)}`;
    const detail = body ? `: ${snippet(body, 200)}` : "";
    if (status === 408 || status === 429 || status >= 500) {
      const ms = headers.get("retry-after-ms");
      const after = ms !== null && /^\d+(?:\.\d+)?$/.test(ms.trim()) ? Math.round(Number(ms)) : parseRetryAfter(headers.get("retry-after"));
      return new AttemptError(`${what}${detail}`, true, after);
    }
    if (status === 401 || status === 403) {
      const how = this.key === undefined ? `${this.api.keyVar} is not set; set it to a valid key` : `check ${this.api.keyVar} (the key was rejected)`;
      return new AttemptError(`${what}: ${how}${detail}`, false);
    }
    if (status === 404) return new AttemptError(`${what}: check the model name "${this.model}" and ${this.api.baseVar}${detail}`, false);
    return new AttemptError(`${what}${detail}`, false);
  }

  /** One HTTP call with a timeout covering headers and body. */
  private async attempt(messages: readonly ChatTurn[], temperature: number, maxTokens: number): Promise<{ text: string; reasoning: string | null; truncated: boolean }> {
    const { url, headers, body } = this.request(messages, temperature, maxTokens);
    const ctrl = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ctrl.abort();
    }, this.timeoutMs);
    try {
      let res: Response;
      try {
        res = await fetch(url, { method: "POST", headers, body, signal: ctrl.signal });
      } catch (e) {
        if (timedOut) throw new AttemptError(`timed out after ${this.timeoutMs} ms waiting for ${safeUrl(url)}`, true);
        throw new AttemptError(`connection error to ${safeUrl(url)}: ${netReason(e)}`, true);
      }
      let text: string;
      try {
        text = await res.text();
      } catch (e) {
        if (timedOut) throw new AttemptError(`timed out after ${this.timeoutMs} ms reading the response from ${safeUrl(url)}`, true);
        throw new AttemptError(`response body cut off (${netReason(e)}) from ${safeUrl(url)}`, true);
      }
      if (!res.ok) throw this.httpError(res.status, res.statusText, text, res.headers);
      return this.reply(text);
    } finally {
      clearTimeout(timer);
    }
  }

  /** One conversation's next reply, with retries; never rejects for a failed call (`error` says why; redacted). */
  async complete(messages: readonly ChatTurn[], o: { temperature: number; maxTokens: number }): Promise<ChatReply> {
    const t0 = performance.now();
    let last = "";
    for (let k = 1; k <= this.maxAttempts; k++) {
      try {
        const r = await this.attempt(messages, o.temperature, o.maxTokens);
        return { text: this.redact(r.text), reasoning: r.reasoning === null ? null : this.redact(r.reasoning), truncated: r.truncated, error: null, attempts: k, ms: performance.now() - t0 };
      } catch (e) {
        if (!(e instanceof AttemptError)) throw e;
        last = e.message;
        if (!e.retry) return { text: null, reasoning: null, truncated: false, error: this.redact(`${this.name}: ${last} (not retried)`), attempts: k, ms: performance.now() - t0 };
        if (k < this.maxAttempts) {
          const backoff = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** (k - 1));
          const delay = e.retryAfterMs !== null ? Math.min(this.maxRetryAfterMs, e.retryAfterMs) : backoff * (0.5 + 0.5 * Math.random());
          await this.sleep(delay);
        }
      }
    }
    return { text: null, reasoning: null, truncated: false, error: this.redact(`${this.name}: gave up after ${this.maxAttempts} attempts; last error: ${last}`), attempts: this.maxAttempts, ms: performance.now() - t0 };
  }
}
