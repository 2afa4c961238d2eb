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
  } else if (o.type === "judgment") {
    need(isStr(o.trialId) && isStr(o.judge) && isStr(o.criterion), "trialId/judge/criterion missing");
    need(o.verdict === "YES" || o.verdict === "NO" || o.verdict === null, `bad verdict ${String(o.verdict)}`);
  } else need(false, `unknown record type ${String(o.type)}`);
}

export function readRunLog(dir: string, opts: { repair?: boolean } = {}): RunData {
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
    } else if (rec.type === "trial") {
      if (seen.has(rec.id)) duplicateTrials.push(rec.id);
      seen.add(rec.id);
      trials.push(rec);
    } else if (rec.type === "judgment") judgments.push(rec);
    else throw new RunLogError(`${file}: line ${i + 1}: a second header`);
  });
  if (!header) throw new RunLogError(`${file}: empty log (no header); delete the directory and start again`);
  if (opts.repair && discardedBytes > 0) fs.truncateSync(file, end);
  return { dir, header, trials, judgments, discardedBytes, duplicateTrials };
}
