// Resolve Hugging Face model names ("org/name", optionally "@revision") to a snapshot folder in
// the local HF cache — offline only: selfscope never downloads at run time.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ModelFileError } from "../core/errors.js";

/** The hub cache folders to search, in the order huggingface_hub uses. */
export function hubCacheDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  const dirs: string[] = [];
  if (env.HF_HUB_CACHE) dirs.push(env.HF_HUB_CACHE);
  if (env.HUGGINGFACE_HUB_CACHE) dirs.push(env.HUGGINGFACE_HUB_CACHE);
  const home = env.HF_HOME ?? path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "huggingface");
  dirs.push(path.join(home, "hub"));
  return [...new Set(dirs)];
}

const NAME = /^([A-Za-z0-9][\w.-]*)\/([\w.-]+)(?:@([\w.-]+))?$/;

/**
 * A path that exists is returned as is. Otherwise "org/name[@rev]" is looked up in the cache:
 * models--org--name/refs/<rev or main> gives the snapshot commit; without refs the newest snapshot.
 */
export function resolveModelPath(nameOrPath: string, env: NodeJS.ProcessEnv = process.env): string {
  if (fs.existsSync(nameOrPath)) return nameOrPath;
  const m = NAME.exec(nameOrPath);
  if (!m) throw new ModelFileError(nameOrPath, "no such file or folder", "pass a .gguf file, a Hugging Face model folder, or a cached model name like org/name");
  const [, org, name, rev] = m;
  const looked: string[] = [];
  for (const dir of hubCacheDirs(env)) {
    const repo = path.join(dir, `models--${org}--${name}`);
    looked.push(repo);
    if (!fs.existsSync(repo)) continue;
    const snapshots = path.join(repo, "snapshots");
    const ref = path.join(repo, "refs", rev ?? "main");
    let commit: string | undefined;
    if (fs.existsSync(ref)) commit = fs.readFileSync(ref, "utf8").trim();
    else if (rev && /^[0-9a-f]{40}$/.test(rev)) commit = rev;
    if (commit && fs.existsSync(path.join(snapshots, commit))) return path.join(snapshots, commit);
    if (!rev && fs.existsSync(snapshots)) {
      const snaps = fs.readdirSync(snapshots).map((s) => path.join(snapshots, s)).filter((s) => fs.statSync(s).isDirectory());
      snaps.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
      if (snaps[0]) return snaps[0];
    }
  }
  throw new ModelFileError(
    nameOrPath,
    `not found locally (looked in ${looked.join(", ")})`,
    `download it first, e.g. \`huggingface-cli download ${org}/${name}\` (set HF_HOME or HF_HUB_CACHE if your cache is elsewhere); selfscope never downloads at run time`,
  );
}
