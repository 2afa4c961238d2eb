// Reading a run log against its plan: every trial record must be one the header's config plans
// (docs/log-format.md), so report, export and resume never count or judge anything else.
import { readRunLog, type ReadOptions, type RunData } from "../log/read.js";
import { planTrials } from "./plan.js";

/** readRunLog with the plan check: a record outside the plan is an error naming its file:line. */
export function readRun(dir: string, opts: Omit<ReadOptions, "plan"> = {}): RunData {
  return readRunLog(dir, { ...opts, plan: (h) => planTrials(h.config) });
}
