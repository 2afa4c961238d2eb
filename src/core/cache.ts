// Where selfscope keeps what it can recompute: concept vectors and weight-file hashes.
import os from "node:os";
import path from "node:path";

/**
 * The cache root: $SELFSCOPE_CACHE, else $XDG_CACHE_HOME/selfscope (an absolute path only, as the XDG spec says),
 * else ~/.cache/selfscope. `selfscope cache clear` empties it.
 */
export function cacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SELFSCOPE_CACHE) return path.resolve(env.SELFSCOPE_CACHE);
  const xdg = env.XDG_CACHE_HOME;
  return xdg && path.isAbsolute(xdg) ? path.join(xdg, "selfscope") : path.join(os.homedir(), ".cache", "selfscope");
}
