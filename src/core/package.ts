// Files shipped inside the package (models/, data/), found from this module's own location so that they resolve
// the same from any working directory, from a checkout or from node_modules (this file is dist/src/core/package.js).
import fs from "node:fs";
import { fileURLToPath } from "node:url";

/** An absolute path to `rel` inside the installed package (e.g. "data/protocol/defaults.json"). */
export function packagePath(rel: string): string {
  return fileURLToPath(new URL(`../../../${rel}`, import.meta.url));
}

/** An absolute path to `rel` inside the package's data/ folder (e.g. "protocol/concepts_500.json"). */
export function dataPath(rel = ""): string {
  return packagePath(`data/${rel}`);
}

/** The bundled model (stories260K, GGUF F32): what `selfscope demo` runs, usable with no download. */
export const BUNDLED_MODEL: string = packagePath("models/stories260K/stories260K.gguf");

/** selfscope's version (package.json). */
export const VERSION: string = (JSON.parse(fs.readFileSync(packagePath("package.json"), "utf8")) as { version: string }).version;
