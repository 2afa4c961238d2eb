// Where selfscope keeps what it can recompute: concept vectors and weight-file hashes.
import os from "node:os";
import path from "node:path";

/** The cache root: $SELFSCOPE_CACHE, else ~/.cache/selfscope. `selfscope cache clear` empties it. */
export function cacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  return env.SELFSCOPE_CACHE ? path.resolve(env.SELFSCOPE_CACHE) : path.join(os.homedir(), ".cache", "selfscope");
}
