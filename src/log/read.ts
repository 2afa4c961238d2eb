// Run log reader and validator. A torn last line (the process was killed mid-write, or the disk
// filled) is discarded and reported; damage anywhere else is an error naming the line.
import fs from "node:fs";
import path from "node:path";
import { SelfscopeError } from "../core/errors.js";
import { LOG_SCHEMA, LOG_VERSION, type JudgmentRecord, type LogRecord, type RunHeader, type TrialRecord } from "./schema.js";
import { LOG_FILE } from "./write.js";

export interface RunData {
  dir: string;
  header: RunHeader;
  trials: TrialRecord[];
  judgments: JudgmentRecord[];
  /** Bytes of a half-written last record that were discarded (0 if none). */
  discardedBytes: number;
  /** Trials recorded more than once (should never happen; kept for validation). */
  duplicateTrials: string[];
  /** 1-based line of each record in log.jsonl, parallel to `trials` and `judgments` (for messages). */
  lines: { trials: number[]; judgments: number[] };
}

/** A planned trial as the reader checks it: a record must carry its id and these fields unchanged. */
export type PlanEntry = Pick<TrialRecord, "id" | "kind" | "concept" | "layer" | "strength" | "variant" | "trialNumber" | "sample">;

export interface ReadOptions {
  /** Cut a torn last record off the file (resume does, before appending). */
  repair?: boolean;
  /**
   * The trials the header's config plans (src/eval/plan.ts; passed in, as the log layer does not
   * plan). With it, a trial outside the plan, one whose fields differ from its planned trial, or a
   * judgment before (or without) the trial it judges is an error naming its line.
   */
  plan?: (header: RunHeader) => readonly PlanEntry[];
}

export class RunLogError extends SelfscopeError {
  override name = "RunLogError";
}

const isStr = (x: unknown) => typeof x === "string";
const isNum = (x: unknown) => typeof x === "number" && Number.isFinite(x);

/** Throws a message naming what is wrong if a record does not match the schema. */
export function validateRecord(r: unknown): asserts r is LogRecord {
  const o = r as Record<string, unknown>;
  const need = (cond: boolean, what: string) => {
    if (!cond) throw new Error(what);
  };
  need(typeof r === "object" && r !== null, "not an object");
  if (o.type === "header") {
    need(o.schema === LOG_SCHEMA, `schema is ${String(o.schema)}, expected ${LOG_SCHEMA}`);
    need(isNum(o.version), "version missing");
    need(typeof o.config === "object" && o.config !== null, "config missing");
    need(isNum(o.plannedTrials), "plannedTrials missing");
  } else if (o.type === "trial") {
    need(isStr(o.id), "id missing");
    need(["injection", "control", "forced", "yesbias"].includes(o.kind as string), `unknown kind ${String(o.kind)}`);
    need(isStr(o.output) && isStr(o.prompt) && isStr(o.variant), "prompt/output/variant missing");
    need(isNum(o.trialNumber) && isNum(o.sample), "trialNumber/sample missing");
    need(Array.isArray(o.flags), "flags missing");
    need(o.promptIds === undefined || (Array.isArray(o.promptIds) && o.promptIds.every((x) => Number.isSafeInteger(x) && (x as number) >= 0)), "promptIds is not a list of token ids");
  } else if (o.type === "judgment") {
    need(isStr(o.trialId) && isStr(o.judge) && isStr(o.criterion), "trialId/judge/criterion missing");
    need(o.verdict === "YES" || o.verdict === "NO" || o.verdict === null, `bad verdict ${String(o.verdict)}`);
  } else need(false, `unknown record type ${String(o.type)}`);
}

export function readRunLog(dir: string, opts: ReadOptions = {}): RunData {
  const file = path.join(dir, LOG_FILE);
  if (!fs.existsSync(file)) throw new RunLogError(`${dir}: no ${LOG_FILE} here; is this a selfscope run directory?`);
  const buf = fs.readFileSync(file);
  let end = buf.length;
  let discardedBytes = 0;
  // A complete record ends with "\n"; anything after the last newline is a torn write.
  const lastNl = buf.lastIndexOf(0x0a);
  if (lastNl !== buf.length - 1) {
    end = lastNl + 1;
    discardedBytes = buf.length - end;
  }
  const lines = buf.subarray(0, end).toString("utf8").split("\n");
  lines.pop();
  let header: RunHeader | undefined;
  const trials: TrialRecord[] = [];
  const judgments: JudgmentRecord[] = [];
  const seen = new Set<string>();
  const duplicateTrials: string[] = [];
  const lineNo = { trials: [] as number[], judgments: [] as number[] };
  let planned: Map<string, PlanEntry> | null = null;
  const where = (i: number) => `${file}:${i + 1}`;
  lines.forEach((line, i) => {
    let rec: unknown;
    try {
      rec = JSON.parse(line);
      validateRecord(rec);
    } catch (e) {
      // The final line may be a torn write that happened to end in a newline of its own data.
      if (i === lines.length - 1) {
        discardedBytes += Buffer.byteLength(line) + 1;
        end -= Buffer.byteLength(line) + 1;
        return;
      }
      throw new RunLogError(`${file}: line ${i + 1} is damaged (${(e as Error).message}); the log cannot be trusted past it`);
    }
    if (i === 0) {
      if (rec.type !== "header") throw new RunLogError(`${file}: the first line is not a header`);
      if (rec.version > LOG_VERSION) throw new RunLogError(`${file}: log version ${rec.version} is newer than this selfscope (${LOG_VERSION}); upgrade selfscope`);
      header = rec;
      if (opts.plan) planned = new Map(opts.plan(rec).map((t) => [t.id, t]));
    } else if (rec.type === "trial") {
      if (planned) checkPlanned(rec, planned, where(i), header!);
      if (seen.has(rec.id)) duplicateTrials.push(rec.id);
      seen.add(rec.id);
      trials.push(rec);
      lineNo.trials.push(i + 1);
    } else if (rec.type === "judgment") {
      if (planned && !seen.has(rec.trialId)) throw new RunLogError(`${where(i)}: a judgment of trial ${JSON.stringify(rec.trialId)}, which no earlier line records; the log was edited or damaged: remove the line, or start the run again`);
      judgments.push(rec);
      lineNo.judgments.push(i + 1);
    } else throw new RunLogError(`${file}: line ${i + 1}: a second header`);
  });
  if (!header) throw new RunLogError(`${file}: empty log (no header); delete the directory and start again`);
  if (opts.repair && discardedBytes > 0) fs.truncateSync(file, end);
  return { dir, header, trials, judgments, discardedBytes, duplicateTrials, lines: lineNo };
}

const PLAN_FIELDS = ["kind", "concept", "layer", "strength", "variant", "trialNumber", "sample"] as const;

/** A trial record must be a planned trial, recorded as planned (else it would be counted and judged as something it is not). */
function checkPlanned(rec: TrialRecord, planned: Map<string, PlanEntry>, at: string, header: RunHeader): void {
  const p = planned.get(rec.id);
  const fix = `the log was edited or written by another version (header: ${header.tool.name} ${header.tool.version}); remove the line, or start a new run`;
  if (!p) throw new RunLogError(`${at}: trial ${JSON.stringify(rec.id)} is not in this run's plan (${planned.size} trials planned from the header's config); ${fix}`);
  const k = PLAN_FIELDS.find((f) => rec[f] !== p[f]);
  if (k) throw new RunLogError(`${at}: trial ${JSON.stringify(rec.id)} has ${k} ${JSON.stringify(rec[k])} but its planned trial has ${JSON.stringify(p[k])}; ${fix}`);
}
