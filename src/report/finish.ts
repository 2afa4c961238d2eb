// The last step of every sweep (inject, resume, rejudge, the recipes' injection runs): results.json
// and report.html written from the run log.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import type { RunData } from "../log/read.js";
import { computeResults, type Results } from "../eval/metrics.js";
import { readRun } from "../eval/runlog.js";
import { renderReport } from "./html.js";

/**
 * Compute results and write results.json + report.html into the run directory. `judge`: whose
 * verdicts count (default the run's first); `failedAsNo`: score failed judgments NO.
 */
export async function finishRun(runDir: string, opts: { failedAsNo?: boolean; judge?: string } = {}): Promise<{ run: RunData; results: Results }> {
  const run = readRun(runDir);
  if (opts.judge !== undefined && !run.judgments.some((j) => j.judge === opts.judge)) {
    const known = [...new Set(run.judgments.map((j) => j.judge))];
    throw new UsageError(`${runDir}: no judgments by judge "${opts.judge}" in the log; judges there: ${known.join(", ") || "none"} (selfscope rejudge ${runDir} --judge SPEC adds one)`);
  }
  const results = computeResults(run, { failedAsNo: opts.failedAsNo ?? false, ...(opts.judge !== undefined ? { judge: opts.judge } : {}) });
  // A run about a trained model organism carries that statement (and its contrast run) into results.json.
  const about = run.header.about;
  fs.writeFileSync(path.join(runDir, "results.json"), JSON.stringify(about ? { ...results, about } : results, null, 1) + "\n");
  fs.writeFileSync(path.join(runDir, "report.html"), await renderReport(run, results));
  return { run, results };
}

