// The JSONL inputs of the research recipes (probe data, articles, questions): one JSON object per
// non-blank line, every error naming the flag, the file and the line.
import fs from "node:fs";
import { UsageError } from "../core/errors.js";

export interface JsonlLine {
  /** `--flag FILE line N`, for the caller's own field errors. */
  where: string;
  value: Record<string, unknown>;
}

/** The objects of `file`, given with `flag`; `shape` describes a line for the "not JSON" error. */
export function readJsonlObjects(file: string, flag: string, shape = "one JSON object per line"): JsonlLine[] {
  if (!fs.existsSync(file)) throw new UsageError(`${flag} ${file}: no such file`);
  const out: JsonlLine[] = [];
  fs.readFileSync(file, "utf8").split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    const where = `${flag} ${file} line ${i + 1}`;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      throw new UsageError(`${where}: not JSON (${shape})`);
    }
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new UsageError(`${where}: not a JSON object (${shape})`);
    out.push({ where, value: v as Record<string, unknown> });
  });
  return out;
}
