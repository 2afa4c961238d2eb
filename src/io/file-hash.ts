// The sha256 of a whole file, read once in large sequential chunks, with the digest cached so a
// multi-GB checkpoint is hashed once. A cache entry is trusted only while the file's size, mtime,
// ctime, inode and device are unchanged, and only if its own seal checks out; otherwise the file
// is hashed again and the reason is reported (never silently).
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { ModelFileError } from "../core/errors.js";

export const HASH_ENTRY_SCHEMA = "selfscope.file-sha256";
const CHUNK = 1 << 20; // read size: fits in L2, so sha256 hashes bytes still in cache (measured faster than 4-16 MiB)

export interface FileHashOptions {
  /** Files smaller than this are hashed every time and never cached (default 64 MiB: that costs < 0.2 s). */
  minCacheBytes?: number;
  /**
   * Where entries go when the file's own folder is not writable (default: none, i.e. no fallback).
   * null turns caching off entirely.
   */
  cacheDir?: string | null;
  /** Told when an entry is stale or corrupt and the file is hashed again. */
  onNote?: (message: string) => void;
}

/** What identifies the file's contents without reading them (ctime changes on any write, even one that restores mtime). */
interface Stamp {
  size: string;
  mtimeNs: string;
  ctimeNs: string;
  ino: string;
  dev: string;
}

interface Entry extends Stamp {
  schema: typeof HASH_ENTRY_SCHEMA;
  version: 1;
  file: string;
  sha256: string;
  /** sha256 of the other fields: a torn or edited entry fails it. */
  seal: string;
}

function stampOf(file: string): Stamp {
  const s = fs.statSync(file, { bigint: true });
  return { size: String(s.size), mtimeNs: String(s.mtimeNs), ctimeNs: String(s.ctimeNs), ino: String(s.ino), dev: String(s.dev) };
}

const sealOf = (e: Omit<Entry, "seal">) =>
  createHash("sha256").update(JSON.stringify([e.schema, e.version, e.file, e.size, e.mtimeNs, e.ctimeNs, e.ino, e.dev, e.sha256])).digest("hex");

/** The entry beside the file (a hidden sibling) and the one in the fallback folder, keyed by the real path. */
export function hashEntryPaths(file: string, cacheDir: string | null | undefined): string[] {
  const real = fs.realpathSync(file);
  const out = [path.join(path.dirname(file), `.${path.basename(file)}.selfscope-sha256`)];
  if (cacheDir) out.push(path.join(cacheDir, `${createHash("sha256").update(real).digest("hex").slice(0, 32)}.json`));
  return out;
}

/** Hash every byte of the file (no cache). */
export function sha256File(file: string): string {
  const h = createHash("sha256");
  const fd = fs.openSync(file, "r");
  try {
    const buf = Buffer.allocUnsafe(CHUNK);
    for (;;) {
      const n = fs.readSync(fd, buf, 0, CHUNK, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest("hex");
}

type Lookup = { sha256: string } | { problem: string } | null;

function readEntry(entryFile: string, real: string, stamp: Stamp): Lookup {
  let text: string;
  try {
    text = fs.readFileSync(entryFile, "utf8");
  } catch {
    return null;
  }
  let e: Partial<Entry>;
  try {
    e = JSON.parse(text) as Partial<Entry>;
  } catch {
    return { problem: `${entryFile} is corrupt (not JSON)` };
  }
  if (e.schema !== HASH_ENTRY_SCHEMA || e.version !== 1 || typeof e.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(e.sha256) || e.seal !== sealOf(e as Entry)) {
    return { problem: `${entryFile} is corrupt (its seal does not match)` };
  }
  if (e.file !== real) return null; // another file's entry (a copied folder): not ours
  const k = (Object.keys(stamp) as (keyof Stamp)[]).find((key) => e[key] !== stamp[key]);
  if (k) return { problem: `${real} changed since it was hashed (${k} differs)` };
  return { sha256: e.sha256 };
}

function writeEntry(entryFile: string, e: Entry): boolean {
  const tmp = `${entryFile}.${process.pid}.tmp`;
  try {
    fs.mkdirSync(path.dirname(entryFile), { recursive: true });
    fs.writeFileSync(tmp, JSON.stringify(e) + "\n");
    fs.renameSync(tmp, entryFile); // atomic: a reader sees the old entry or the new one, never half
    return true;
  } catch {
    fs.rmSync(tmp, { force: true });
    return false;
  }
}

/**
 * sha256 (hex) of every byte of `file`. Large files use a cached digest when its entry matches the
 * file's current stamp; the entry lives beside the file, or in `cacheDir` when that folder is not
 * writable. A file that changes while it is hashed is not cached.
 */
export function fileSha256(file: string, opts: FileHashOptions = {}): string {
  let before: Stamp;
  try {
    before = stampOf(file);
  } catch {
    throw new ModelFileError(file, "cannot read the file", "check the path");
  }
  const cacheDir = opts.cacheDir;
  if (cacheDir === null || Number(before.size) < (opts.minCacheBytes ?? 64 << 20)) return sha256File(file);
  const real = fs.realpathSync(file);
  const places = hashEntryPaths(file, cacheDir);
  const problems: string[] = [];
  for (const p of places) {
    const got = readEntry(p, real, before);
    if (got && "sha256" in got) return got.sha256;
    if (got) problems.push(got.problem);
  }
  for (const p of problems) opts.onNote?.(`${p}; hashing it again`);
  const sha256 = sha256File(file);
  const after = stampOf(file);
  if (JSON.stringify(after) !== JSON.stringify(before)) return sha256; // modified while we read it
  const body: Omit<Entry, "seal"> = { schema: HASH_ENTRY_SCHEMA, version: 1, file: real, ...before, sha256 };
  const entry: Entry = { ...body, seal: sealOf(body) };
  for (const p of places) if (writeEntry(p, entry)) break;
  return sha256;
}
