// Which judge a command uses when none is named, and the notice that transcripts leave the machine.
// One rule for `inject` and every research recipe: the protocol's LLM judge when a key is configured
// in the environment, else the rule judge (approximate), and the command says which and why.
// (External judges announce their endpoint themselves, before their first request: judge.ts.)
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
