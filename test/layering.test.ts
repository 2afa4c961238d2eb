// The layering of src/ is enforced by ESLint (eslint.config.js: LAYERS, no-restricted-imports and
// no-restricted-syntax per folder), and `npm run lint` runs before the tests. These tests keep the
// rule itself from silently stopping working: crossings of every import form, linted as virtual
// files inside src/, must be reported; imports down the layers must not; and every folder of src/
// must be a layer (a new folder would otherwise be unrestricted).
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, test } from "node:test";
import { ESLint } from "eslint";
import { repoDir } from "./support/paths.js";

const repo = repoDir();
const eslint = new ESLint({ cwd: repo });

/** The rule ids and lines ESLint reports for `code` as if it were the file `file` (relative to the repository). */
async function reported(file: string, code: string): Promise<{ line: number; rule: string | null }[]> {
  const [r] = await eslint.lintText(code, { filePath: path.join(repo, file) });
  return r!.messages.filter((m) => m.ruleId === "no-restricted-imports" || m.ruleId === "no-restricted-syntax").map((m) => ({ line: m.line, rule: m.ruleId }));
}

describe("layering (eslint.config.js)", () => {
  test("every folder of src/ is a layer, and every layer a folder", async () => {
    const { LAYERS } = (await import(pathToFileURL(path.join(repo, "eslint.config.js")).href)) as { LAYERS: string[] };
    const folders = fs.readdirSync(path.join(repo, "src"), { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name);
    assert.deepEqual([...folders].sort(), [...LAYERS].sort());
  });

  test("an import of a higher layer is reported, in every import form", async () => {
    const code = [
      `import { renderReport } from "../report/html.js";`, // 1: value import
      `import type { RunHeader } from "../log/schema.js";`, // 2: type-only import
      `export { inject } from "../recipes/inject.js";`, // 3: re-export
      `export * from "../cli/recipes.js";`, // 4: export-all
      `type R = import("../eval/metrics.js").Results;`, // 5: TypeScript import type
      `export const f = async (): Promise<unknown> => [renderReport, await import("../judge/judge.js")];`, // 6: dynamic import
      `export type X = R | RunHeader;`,
    ].join("\n");
    const got = await reported("src/stats/layering-probe.ts", code);
    assert.deepEqual(got.map((m) => m.line), [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(got.map((m) => m.rule), ["no-restricted-imports", "no-restricted-imports", "no-restricted-imports", "no-restricted-imports", "no-restricted-syntax", "no-restricted-syntax"]);
  });

  test("imports of the same or lower layers are not reported", async () => {
    const code = [
      `import { Rng } from "../core/rng.js";`,
      `import type { Plan } from "../hooks/plan.js";`,
      `import { symEig } from "../math/linalg.js";`,
      `import { wilson } from "./stats.js";`,
      `import fs from "node:fs";`,
      `type C = import("../engine/config.js").ModelConfig;`,
      `export const g = async (): Promise<unknown> => [Rng, symEig, wilson, fs, await import("../model/model.js")];`,
      `export type Y = C | Plan;`,
    ].join("\n");
    assert.deepEqual(await reported("src/stats/layering-probe.ts", code), []);
  });

  test("one level down the tree counts the same (src/engine/cpu → model), and nothing in src imports the facade", async () => {
    assert.deepEqual(await reported("src/engine/cpu/layering-probe.ts", `import { Model } from "../../model/model.js";\nexport type M = Model;`), [{ line: 1, rule: "no-restricted-imports" }]);
    assert.deepEqual(await reported("src/eval/layering-probe.ts", `import { Model } from "../index.js";\nexport type M = Model;`), [{ line: 1, rule: "no-restricted-imports" }]);
    // The facade itself and the tests are not layered.
    assert.deepEqual(await reported("src/layering-probe.ts", `export { main } from "./cli/main.js";`), []);
    assert.deepEqual(await reported("test/layering-probe.ts", `export { renderReport } from "../src/report/html.js";`), []);
  });
});
