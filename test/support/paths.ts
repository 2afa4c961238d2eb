// Where tests find the repository and the shared model data.
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root. Compiled tests live in dist/test/support/, so walk up from this file. */
export function repoDir(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // dist/test/support -> repo root (three levels); the check keeps it right if the layout changes.
  const up = path.basename(path.resolve(here, "../..")) === "dist" ? "../../.." : "../..";
  return path.resolve(here, up);
}

/** The shared data directory (models, docs): $SELFSCOPE_SHARED, or ../shared beside the repo. */
export function sharedDir(): string {
  const env = process.env.SELFSCOPE_SHARED;
  return env && env.length > 0 ? path.resolve(process.cwd(), env) : path.resolve(repoDir(), "../shared");
}
