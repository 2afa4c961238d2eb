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

export const LOCK_FILE = "run.lock";

/**
 * Take the run directory's lock (a file holding our pid, created with O_EXCL) so two processes
 * can never append to one log. A lock left by a killed process (its pid is gone) is taken over.
 * Returns the release function.
 */
export function lockRun(dir: string): () => void {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      fs.writeFileSync(file, String(process.pid), { flag: "wx" });
      return () => {
        try {
          if (fs.readFileSync(file, "utf8") === String(process.pid)) fs.unlinkSync(file);
        } catch {
          // already gone
        }
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      const pid = Number(fs.readFileSync(file, "utf8").trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isAlive(pid)) {
        throw new SelfscopeError(`${dir} is in use by another selfscope process (pid ${pid}); wait for it to finish or stop it, then resume`);
      }
      fs.rmSync(file, { force: true }); // stale: its owner was killed
    }
  }
  throw new SelfscopeError(`${dir}: could not take ${LOCK_FILE}`);
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}
