// Where tests find the repository and the model fixtures vendored into it (test/fixtures/models, each folder with
// its PROVENANCE.md). Nothing here reaches outside the repository, so a fresh clone passes on its own.
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root. Compiled tests live in dist/test/support/, so walk up from this file. */
export function repoDir(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // dist/test/support -> repo root (three levels); the check keeps it right if the layout changes.
  const up = path.basename(path.resolve(here, "../..")) === "dist" ? "../../.." : "../..";
  return path.resolve(here, up);
}

/** A path under test/fixtures/models (stories260K-gguf/stories260K.gguf links to the bundled models/stories260K). */
export function fixture(...parts: string[]): string {
  return path.join(repoDir(), "test", "fixtures", "models", ...parts);
}
