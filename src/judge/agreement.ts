// `selfscope judge-agreement`: Cohen's kappa between two judges recorded in a run, or between
// one judge and a file of human labels, per criterion.
import fs from "node:fs";
import { UsageError } from "../core/errors.js";
import type { RunData } from "../log/read.js";
import type { Criterion } from "../log/schema.js";
import { cohensKappa } from "./judge.js";

type Labels = Map<string, "YES" | "NO" | null>; // key: trialId|criterion

function fromLog(run: RunData, judge: string): Labels {
  const m: Labels = new Map();
  for (const j of run.judgments) if (j.judge === judge) m.set(`${j.trialId}|${j.criterion}`, j.verdict);
  return m;
}

/** Human labels: JSONL or CSV rows with trialId, criterion, verdict (YES/NO). */
function fromFile(file: string): Labels {
  if (!fs.existsSync(file)) throw new UsageError(`${file}: no such file`);
  const m: Labels = new Map();
  const text = fs.readFileSync(file, "utf8");
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  const csv = !lines[0]!.trim().startsWith("{");
  const header = csv ? lines[0]!.split(",").map((s) => s.trim()) : [];
  lines.slice(csv ? 1 : 0).forEach((l, i) => {
    let row: Record<string, string>;
    try {
      row = csv ? Object.fromEntries(l.split(",").map((v, k) => [header[k] ?? `c${k}`, v.trim()])) : (JSON.parse(l) as Record<string, string>);
    } catch {
      throw new UsageError(`${file}: line ${i + 1 + (csv ? 1 : 0)} is not valid ${csv ? "CSV" : "JSON"}`);
    }
    const v = String(row.verdict ?? "").toUpperCase();
    if (!row.trialId || !row.criterion || (v !== "YES" && v !== "NO")) throw new UsageError(`${file}: line ${i + 1}: need trialId, criterion and verdict YES/NO`);
    m.set(`${row.trialId}|${row.criterion}`, v);
  });
  return m;
}

export function judgeAgreement(run: RunData, opts: { judges: string[]; human?: string }): string {
  const names = [...new Set(run.judgments.map((j) => j.judge))];
  let a: Labels, b: Labels, la: string, lb: string;
  if (opts.human) {
    la = opts.judges[0] ?? names[0] ?? "";
    if (!names.includes(la)) throw new UsageError(`judge "${la}" has no verdicts in this run (judges here: ${names.join(", ") || "none"})`);
    a = fromLog(run, la);
    b = fromFile(opts.human);
    lb = `human (${opts.human})`;
  } else {
    const [x, y] = opts.judges.length >= 2 ? opts.judges : names;
    if (!x || !y) throw new UsageError(`need two judges: this run has ${names.join(", ") || "none"}; pass --judge A --judge B, or --human FILE`);
    for (const j of [x, y]) if (!names.includes(j)) throw new UsageError(`judge "${j}" has no verdicts in this run (judges here: ${names.join(", ")}); add it to the run's --judge list`);
    a = fromLog(run, x);
    b = fromLog(run, y);
    la = x;
    lb = y;
  }
  const lines = [`agreement between ${la} and ${lb}`];
  const crits: Criterion[] = ["detection", "identification", "forced_identification", "yes_answer"];
  for (const c of ["all", ...crits]) {
    const keys = [...a.keys()].filter((k) => b.has(k) && (c === "all" || k.endsWith(`|${c}`)));
    if (keys.length === 0) continue;
    const r = cohensKappa(keys.map((k) => a.get(k) ?? null), keys.map((k) => b.get(k) ?? null));
    lines.push(`  ${c.padEnd(22)} kappa ${Number.isFinite(r.kappa) ? r.kappa.toFixed(3) : "n/a"}  agreement ${r.agree}/${r.n}`);
  }
  if (lines.length === 1) lines.push("  no trial was judged by both");
  return lines.join("\n");
}
