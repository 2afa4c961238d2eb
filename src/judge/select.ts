// Which judge a command uses when none is named, and the notice that transcripts leave the machine.
// One rule for `inject` and every research recipe: the protocol's LLM judge when a key is configured
// in the environment, else the rule judge (approximate), and the command says which and why.
// (External judges announce their endpoint themselves, before their first request: judge.ts.)
import { UsageError } from "../core/errors.js";
import { APIS, ChatClient, isApiKind, type ChatClientOptions } from "./chat.js";

/** The protocol's judge model (gpt-4.1-mini, temperature 0). */
export const DEFAULT_LLM_JUDGE = "openai:gpt-4.1-mini";

export interface JudgeChoice {
  specs: string[];
  /** "flag": given by the caller; "environment": the LLM judge because OPENAI_API_KEY is set; "fallback": the rule judge. */
  source: "flag" | "environment" | "fallback";
  /** A sentence for output and reports when the choice was not given (null when it was). */
  note: string | null;
}

/** The judges to use: the given specs, else the LLM judge configured in `env`, else "rule" (saying so). */
export function chooseJudges(given: readonly string[] | undefined, env: NodeJS.ProcessEnv = process.env): JudgeChoice {
  if (given && given.length > 0) return { specs: [...given], source: "flag", note: null };
  if (env.OPENAI_API_KEY !== undefined && env.OPENAI_API_KEY.trim() !== "") {
    return { specs: [DEFAULT_LLM_JUDGE], source: "environment", note: `judge ${DEFAULT_LLM_JUDGE} (the default: OPENAI_API_KEY is set and no --judge was given; pass --judge rule to keep transcripts on this machine)` };
  }
  return { specs: ["rule"], source: "fallback", note: "judge rule (approximate): no LLM judge is configured (set OPENAI_API_KEY, or pass --judge openai:MODEL|anthropic:MODEL|local:PATH)" };
}

/** {@link chooseJudges}, printing its note (the default taken, or the rule-judge fallback) to `write`. */
export function pickJudges(given: readonly string[] | undefined, write: (line: string) => void = (l) => void process.stderr.write(l + "\n"), env: NodeJS.ProcessEnv = process.env): string[] {
  const c = chooseJudges(given, env);
  if (c.note !== null) write(c.note);
  return c.specs;
}

/**
 * The LLM behind a recipe's own judge prompts (esr, self-recognition, abliteration-search): `given`,
 * else the configured default (chooseJudges: the default LLM judge when OPENAI_API_KEY is set, else the
 * rule judge, each announced through `note`). `client` is null for the rule judge.
 */
export function chatJudge(given: string | undefined, opts: ChatClientOptions, note: (line: string) => void): { spec: string; client: ChatClient | null } {
  const choice = chooseJudges(given ? [given] : undefined, opts.env ?? process.env);
  if (choice.note !== null) note(choice.note);
  const spec = choice.specs[0]!;
  if (spec === "rule") return { spec, client: null };
  const kind = spec.slice(0, spec.indexOf(":"));
  if (!isApiKind(kind)) throw new UsageError(`--judge ${spec}: this recipe's judge prompts need openai:MODEL, openrouter:MODEL or anthropic:MODEL (or rule)`);
  return { spec, client: new ChatClient(spec, APIS[kind], spec.slice(kind.length + 1), opts, `--judge ${spec}`) };
}
