// A recipe's resumable step log: DIR/steps.jsonl, a versioned header naming the recipe and the
// fingerprint of everything that determines its results (arguments, data, model identities), then
// one line per finished step (a key and its result). A killed run resumes by skipping the keys it
// finds; a run whose fingerprint differs is refused, never continued (it would mix two
// experiments). Lines are written with one write(2) each, so a kill leaves at most a torn last
// line, which is discarded on reopening. Binary payloads go beside it (written to a temporary name,
// then renamed) before the line that names them.
import fs from "node:fs";
import path from "node:path";
import { createHash } from "node:crypto";
import { SelfscopeError } from "../core/errors.js";

export const STEPS_FILE = "steps.jsonl";
export const STEPS_SCHEMA = "selfscope.steps";
export const STEPS_VERSION = 1;

export interface StepsHeader {
  schema: typeof STEPS_SCHEMA;
  version: number;
  recipe: string;
  /** sha256 of the canonical JSON of `inputs`. */
  fingerprint: string;
  inputs: unknown;
  created: string;
}

/** JSON with sorted object keys, so a fingerprint does not depend on key order. */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  if (v && typeof v === "object" && !ArrayBuffer.isView(v)) {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o).filter((k) => o[k] !== undefined).sort().map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(",")}}`;
  }
  return JSON.stringify(v) ?? "null";
}

export class StepLog {
  private fd: number;
  private readonly done = new Map<string, unknown>();
  /** Steps found on opening (a resumed run) — for the "resumed N steps" message. */
  readonly resumed: number;

  private constructor(readonly dir: string, readonly header: StepsHeader, prior: Map<string, unknown>) {
    for (const [k, v] of prior) this.done.set(k, v);
    this.resumed = prior.size;
    this.fd = fs.openSync(path.join(dir, STEPS_FILE), "a");
  }

  /**
   * Open DIR's step log for `recipe` with these inputs: a new one, or the existing one when its
   * recipe and fingerprint match (resume). A mismatch names what differs and how to proceed.
   */
  static open(dir: string, recipe: string, inputs: unknown): StepLog {
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, STEPS_FILE);
    const fingerprint = createHash("sha256").update(canonicalJson(inputs)).digest("hex");
    if (!fs.existsSync(file) || fs.statSync(file).size === 0) {
      const header: StepsHeader = { schema: STEPS_SCHEMA, version: STEPS_VERSION, recipe, fingerprint, inputs, created: new Date().toISOString() };
      fs.writeFileSync(file, JSON.stringify(header) + "\n");
      return new StepLog(dir, header, new Map());
    }
    const text = fs.readFileSync(file, "utf8");
    const lines = text.split("\n");
    // A torn last line (no newline after it) is a step that did not finish: cut it.
    const complete = lines.slice(0, -1);
    if (!text.endsWith("\n")) fs.truncateSync(file, Buffer.byteLength(complete.map((l) => l + "\n").join("")));
    let header: StepsHeader;
    try {
      header = JSON.parse(complete[0] ?? "") as StepsHeader;
    } catch {
      throw new SelfscopeError(`${file}: not a selfscope step log (its first line is not JSON); choose another --out`);
    }
    if (header.schema !== STEPS_SCHEMA) throw new SelfscopeError(`${file}: not a selfscope step log; choose another --out`);
    if (header.version > STEPS_VERSION) throw new SelfscopeError(`${file}: written by a newer selfscope (step log version ${header.version}); upgrade to continue it`);
    if (header.recipe !== recipe) throw new SelfscopeError(`${dir} holds a \`selfscope ${header.recipe}\` run, not \`${recipe}\`; choose another --out`);
    if (header.fingerprint !== fingerprint) {
      throw new SelfscopeError(
        `${dir} holds a \`selfscope ${recipe}\` run with different inputs (${describeDiff(header.inputs, inputs)}); ` +
          `resuming would mix two experiments — choose another --out, or delete ${dir} to start over`,
      );
    }
    const prior = new Map<string, unknown>();
    complete.slice(1).forEach((l, i) => {
      try {
        const r = JSON.parse(l) as { key: string; value: unknown };
        prior.set(r.key, r.value);
      } catch {
        throw new SelfscopeError(`${file}: line ${i + 2} is not JSON (edited by hand?); choose another --out`);
      }
    });
    return new StepLog(dir, header, prior);
  }

  has(key: string): boolean {
    return this.done.has(key);
  }

  get<T>(key: string): T | undefined {
    return this.done.get(key) as T | undefined;
  }

  /** Record a finished step. */
  put(key: string, value: unknown): void {
    if (this.done.has(key)) throw new SelfscopeError(`internal: step ${key} recorded twice`);
    const buf = Buffer.from(JSON.stringify({ key, value }) + "\n", "utf8");
    let off = 0;
    while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off);
    this.done.set(key, value);
  }

  /** The value of `key`, computing and recording it when this run has not yet. */
  async step<T>(key: string, compute: () => Promise<T> | T): Promise<T> {
    if (this.done.has(key)) return this.done.get(key) as T;
    const v = await compute();
    this.put(key, v);
    return v;
  }

  /** Write a binary payload under DIR atomically (temporary name, then rename); returns its relative path. */
  writeBinary(rel: string, data: ArrayBufferView): string {
    if (rel.includes("..") || path.isAbsolute(rel)) throw new SelfscopeError(`internal: payload path ${rel} leaves the run folder`);
    const file = path.join(this.dir, rel);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file + ".tmp", new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    fs.renameSync(file + ".tmp", file);
    return rel;
  }

  /** Read a payload written by writeBinary as float32, checking its length. */
  readF32(rel: string, length: number): Float32Array {
    const file = path.join(this.dir, rel);
    if (!fs.existsSync(file)) throw new SelfscopeError(`${file}: missing although ${STEPS_FILE} records it; delete ${this.dir} to start over`);
    const b = fs.readFileSync(file);
    if (b.byteLength !== length * 4) throw new SelfscopeError(`${file}: ${b.byteLength} bytes, expected ${length * 4}; delete ${this.dir} to start over`);
    return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

/** The first top-level input that differs, for the refusal message. */
function describeDiff(a: unknown, b: unknown): string {
  if (a && b && typeof a === "object" && typeof b === "object") {
    const ao = a as Record<string, unknown>, bo = b as Record<string, unknown>;
    for (const k of [...new Set([...Object.keys(ao), ...Object.keys(bo)])].sort()) {
      if (canonicalJson(ao[k]) !== canonicalJson(bo[k])) return `${k}: ${short(ao[k])} then, ${short(bo[k])} now`;
    }
  }
  return "inputs changed";
}

const short = (v: unknown) => {
  const s = canonicalJson(v);
  return s.length > 60 ? s.slice(0, 57) + "..." : s;
};
