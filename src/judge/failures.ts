// Failed judgments, reported as they happen and summed up at the end. A run whose judgments all
// failed used to exit 0 with the causes only in the log; now each failure prints one line (the
// first few of each cause, then only counts) and a judge that judged nothing fails the command.
import { SelfscopeError } from "../core/errors.js";
import { redactSecrets } from "./secrets.js";

/** Raised when a judge could judge nothing at all in a command (the log keeps every trial). */
export class JudgeFailedError extends SelfscopeError {
  override name = "JudgeFailedError";
}

interface Tally {
  requested: number;
  failed: number;
  causes: Map<string, number>;
}

export interface FailureReportOptions {
  /** Where lines go (default: stderr). */
  write?: (line: string) => void;
  /** Lines printed per distinct cause before only counting it (default 3). */
  perCause?: number;
  /** Failure lines printed in all (default 20). */
  maxLines?: number;
}

/** The cause of a failure without what differs between trials (so repeated causes group). */
function causeOf(error: string): string {
  return error.replace(/\s+/g, " ").trim().slice(0, 240);
}

export class JudgeFailures {
  private readonly tallies = new Map<string, Tally>();
  private readonly write: (line: string) => void;
  private readonly perCause: number;
  private readonly maxLines: number;
  private printed = 0;
  private suppressedNoted = false;

  constructor(opts: FailureReportOptions = {}) {
    this.write = opts.write ?? ((l) => void process.stderr.write(l + "\n"));
    this.perCause = opts.perCause ?? 3;
    this.maxLines = opts.maxLines ?? 20;
  }

  private tally(judge: string): Tally {
    let t = this.tallies.get(judge);
    if (!t) this.tallies.set(judge, (t = { requested: 0, failed: 0, causes: new Map() }));
    return t;
  }

  /** Count one judgment; print a line for a failure (rate-limited per cause and in all). */
  record(judge: string, trialId: string, criterion: string, verdict: "YES" | "NO" | null, error: string | null): void {
    const t = this.tally(judge);
    t.requested++;
    if (verdict !== null) return;
    t.failed++;
    const cause = causeOf(redactSecrets(error ?? "no verdict"));
    const seen = (t.causes.get(cause) ?? 0) + 1;
    t.causes.set(cause, seen);
    if (seen <= this.perCause && this.printed < this.maxLines) {
      this.printed++;
      this.write(`judge failed: ${judge} ${criterion} ${trialId}: ${cause}`);
    } else if (!this.suppressedNoted) {
      this.suppressedNoted = true;
      this.write("judge failed: further failures are counted, not printed (summary at the end)");
    }
  }

  /** Judgments that failed, over all judges. */
  get failed(): number {
    let n = 0;
    for (const t of this.tallies.values()) n += t.failed;
    return n;
  }

  /** One line per judge with failures: how many of how many, and the causes by count. */
  summary(): string[] {
    const out: string[] = [];
    for (const [judge, t] of this.tallies) {
      if (t.failed === 0) continue;
      const causes = [...t.causes].sort((a, b) => b[1] - a[1]).slice(0, 3).map(([c, n]) => `${n}× ${c}`);
      const more = t.causes.size > 3 ? `; ${t.causes.size - 3} other causes` : "";
      out.push(`judge ${judge}: ${t.failed} of ${t.requested} judgments failed (${causes.join("; ")}${more})`);
    }
    return out;
  }

  /** Judges that were asked for judgments in this command and returned not one verdict. */
  nothingJudged(): string[] {
    return [...this.tallies].filter(([, t]) => t.requested > 0 && t.failed === t.requested).map(([j]) => j);
  }

  /** Print the summary (when anything failed); throw when a judge judged nothing. `retry`: the command that retries. */
  finish(retry: string): void {
    const lines = this.summary();
    for (const l of lines) this.write(l);
    if (lines.length > 0) this.write(`failed judgments are excluded from every rate (counted as unjudged); to retry them: ${retry}`);
    const none = this.nothingJudged();
    if (none.length > 0) {
      const t = this.tallies.get(none[0]!)!;
      const top = [...t.causes].sort((a, b) => b[1] - a[1])[0]?.[0] ?? "no verdict";
      throw new JudgeFailedError(`nothing could be judged: every judgment by ${none.join(", ")} failed (${t.failed} of ${t.requested}; e.g. ${top}); fix the judge, then retry: ${retry}`);
    }
  }
}
