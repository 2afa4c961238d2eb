// Append-only, crash-safe run log writer. One record = one line written with a single write(2),
// so a SIGKILL leaves at most one torn last line, which the reader detects and discards.
import fs from "node:fs";
import path from "node:path";
import { SelfscopeError } from "../core/errors.js";
import type { LogRecord, RunHeader } from "./schema.js";

export const LOG_FILE = "log.jsonl";

export class RunLogWriter {
  private fd: number;
  private constructor(readonly file: string) {
    this.fd = fs.openSync(file, "a");
  }

  /** Start a new run directory (it must not already hold a log). */
  static create(dir: string, header: RunHeader): RunLogWriter {
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, LOG_FILE);
    if (fs.existsSync(file) && fs.statSync(file).size > 0) {
      throw new SelfscopeError(`${dir} already holds a run log; continue it with \`selfscope resume ${dir}\` or choose another --out`);
    }
    const w = new RunLogWriter(file);
    w.append(header);
    return w;
  }

  /** Reopen for appending after `readRunLog` checked it (and cut any torn tail). */
  static reopen(dir: string): RunLogWriter {
    return new RunLogWriter(path.join(dir, LOG_FILE));
  }

  append(rec: LogRecord): void {
    const line = JSON.stringify(rec) + "\n";
    const buf = Buffer.from(line, "utf8");
    let off = 0;
    try {
      while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new SelfscopeError(
        `${this.file}: could not write a record (${code ?? (e as Error).message})` +
          (code === "ENOSPC" ? "; the disk is full — free space, then `selfscope resume` continues where it stopped" : ""),
      );
    }
  }

  /** Flush to stable storage (called at batch boundaries, not per record). */
  sync(): void {
    try {
      fs.fsyncSync(this.fd);
    } catch {
      // fsync can fail on some filesystems (e.g. pipes); the data is still in the page cache.
    }
  }

  close(): void {
    this.sync();
    fs.closeSync(this.fd);
  }
}
