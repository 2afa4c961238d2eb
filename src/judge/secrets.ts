// API keys must never be written anywhere, not even in part: servers echo keys partially
// ("sk-plant*****-123"), so every prefix and suffix of 4+ characters is redacted, not only the whole key.

export const REDACTED = "[REDACTED]";

/** Every API key configured in the environment (any *_API_KEY variable, e.g. OPENAI_API_KEY). */
export function configuredKeys(env: NodeJS.ProcessEnv = process.env): string[] {
  const keys: string[] = [];
  for (const [name, value] of Object.entries(env)) {
    if (!/_API_KEY$/i.test(name) || value === undefined) continue;
    const v = value.trim();
    // Shorter values ("x", "abc" for a local server) are not secrets and cannot be redacted without wrecking the text.
    if (v.length >= 4) keys.push(v);
  }
  return keys;
}

/** The pieces of a key to remove: the key, and its prefixes and suffixes of at least 4 characters. */
function fragments(key: string): string[] {
  const out = new Set<string>([key]);
  for (let len = 4; len < key.length; len++) {
    out.add(key.slice(0, len));
    out.add(key.slice(key.length - len));
  }
  return [...out];
}

/** `text` with every configured key (and any prefix or suffix of 4+ characters of one) replaced by [REDACTED]. */
export function redactKeys(text: string, keys: readonly string[]): string {
  keys = keys.filter((k) => k.length >= 4);
  if (keys.length === 0 || text === "") return text;
  // Longest first, so a whole key is never left half-replaced by one of its own prefixes.
  const all = [...new Set(keys.flatMap(fragments))].sort((a, b) => b.length - a.length);
  let out = text;
  for (const f of all) if (out.includes(f)) out = out.split(f).join(REDACTED);
  return out;
}

/** Redact with the keys of `env` (default process.env), plus any `extra` keys. */
export function redactSecrets(text: string, env: NodeJS.ProcessEnv = process.env, extra: readonly string[] = []): string {
  return redactKeys(text, [...extra, ...configuredKeys(env)]);
}
