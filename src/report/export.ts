// Flat exports of a run: one row per trial with the chosen judge's verdicts, as CSV (RFC 4180)
// or Parquet (hyparquet-writer, pure JS). Verdict cells are YES, NO, "unjudged" (the criterion
// applies but there is no verdict) or empty/null (the criterion does not apply to the trial).
import fs from "node:fs";
import path from "node:path";
import { parquetWriteBuffer } from "hyparquet-writer";
import { trialVerdicts, type Results, type RunData } from "../eval/metrics.js";
import { CRITERIA } from "../log/schema.js";

/** Column names shared by the CSV and Parquet exports, in order. */
export const EXPORT_COLUMNS = [
  "id",
  "kind",
  "concept",
  "layer",
  "strength",
  "variant",
  "trial_number",
  "sample",
  "question",
  "detection",
  "identification",
  "forced_identification",
  "yes_answer",
  "flags",
  "output_tokens",
  "stop_reason",
  "seed",
  "ms",
  "judge",
  "output",
] as const;

export type ExportColumn = (typeof EXPORT_COLUMNS)[number];
type Cell = string | number | null;

/** One row per trial, in log order; null = no value. Flags are joined with ";". */
export function exportRows(run: RunData, results: Results): Record<ExportColumn, Cell>[] {
  const verdicts = trialVerdicts(run, results.judge);
  return run.trials.map((t) => {
    const v = verdicts.get(t.id)!;
    return {
      id: t.id,
      kind: t.kind,
      concept: t.concept,
      layer: t.layer,
      strength: t.strength,
      variant: t.variant,
      trial_number: t.trialNumber,
      sample: t.sample,
      question: t.question ?? null,
      detection: v.detection,
      identification: v.identification,
      forced_identification: v.forced_identification,
      yes_answer: v.yes_answer,
      flags: t.flags.join(";"),
      output_tokens: t.outputTokens,
      stop_reason: t.stopReason,
      seed: t.seed,
      ms: t.ms,
      judge: results.judge,
      output: t.output,
    };
  });
}

/** RFC 4180 field: quoted (with quotes doubled) when it holds a comma, quote, CR or LF. */
export function csvField(x: Cell): string {
  if (x === null) return "";
  const s = typeof x === "number" ? String(x) : x;
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** CSV text (RFC 4180: CRLF line ends, header row). */
export function toCsv(run: RunData, results: Results): string {
  const lines = [EXPORT_COLUMNS.join(",")];
  for (const r of exportRows(run, results)) lines.push(EXPORT_COLUMNS.map((c) => csvField(r[c])).join(","));
  return lines.join("\r\n") + "\r\n";
}

function writeAtomic(file: string, data: string | Uint8Array): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, file);
}

/** Write one row per trial (with its verdicts under results.judge) to `file` as CSV. */
export function exportCsv(run: RunData, results: Results, file: string): void {
  writeAtomic(file, toCsv(run, results));
}

const PARQUET_TYPES: Record<ExportColumn, "STRING" | "INT32" | "DOUBLE"> = {
  id: "STRING",
  kind: "STRING",
  concept: "STRING",
  layer: "INT32",
  strength: "DOUBLE",
  variant: "STRING",
  trial_number: "INT32",
  sample: "INT32",
  question: "STRING",
  detection: "STRING",
  identification: "STRING",
  forced_identification: "STRING",
  yes_answer: "STRING",
  flags: "STRING",
  output_tokens: "INT32",
  stop_reason: "STRING",
  seed: "DOUBLE",
  ms: "DOUBLE",
  judge: "STRING",
  output: "STRING",
};

/** Parquet bytes of the export rows (snappy-compressed; run header, judge and criteria in key-value metadata). */
export function toParquet(run: RunData, results: Results): Uint8Array {
  const rows = exportRows(run, results);
  const buf = parquetWriteBuffer({
    columnData: EXPORT_COLUMNS.map((name) => ({ name, type: PARQUET_TYPES[name], nullable: true, data: rows.map((r) => r[name]) })),
    kvMetadata: [
      { key: "selfscope.header", value: JSON.stringify(run.header) },
      { key: "selfscope.judge", value: results.judge },
      { key: "selfscope.criteria", value: CRITERIA.join(",") },
    ],
    createdBy: `${run.header.tool.name} ${run.header.tool.version} (hyparquet-writer)`,
  });
  return new Uint8Array(buf);
}

/** Write one row per trial (with its verdicts under results.judge) to `file` as Parquet. */
export function exportParquet(run: RunData, results: Results, file: string): void {
  writeAtomic(file, toParquet(run, results));
}
