// jax-js loads only when its backend is used. A child `node` imports the built package entry
// (dist/src/index.js), loads the bundled model and runs a forward; a module-resolution hook
// (module.register, installed with --import before anything else runs) logs every URL the ESM
// loader resolves, and the child also lists the CommonJS module cache (require() bypasses ESM
// hooks on Node 20). On the cpu device no module under node_modules/@jax-js may appear; the
// control runs the same script on the wasm device and must see @jax-js/jax, so the detector is
// shown to work.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { after, test } from "node:test";
import { repoDir } from "./support/paths.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-lazyjax-"));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const HOOKS = `import fs from "node:fs";
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  fs.appendFileSync(process.env.SELFSCOPE_RESOLVE_LOG, r.url + "\\n");
  return r;
}
`;
const REGISTER = `import { register } from "node:module";
register(${JSON.stringify(pathToFileURL(path.join(dir, "hooks.mjs")).href)});
`;
const SCRIPT = `import { createRequire } from "node:module";
const device = process.argv[2];
const { Model, BUNDLED_MODEL } = await import(${JSON.stringify(pathToFileURL(path.join(repoDir(), "dist/src/index.js")).href)});
const m = await Model.load(BUNDLED_MODEL, { device, threads: 1 });
const { logits } = await m.forward([{ ids: [1, 403, 407, 261] }]);
const finite = logits[0].every(Number.isFinite);
await (m.engine.close?.() ?? m.dispose());
console.log(JSON.stringify({ device: m.device.name, n: logits[0].length, finite, cjs: Object.keys(createRequire(import.meta.url).cache) }));
`;
fs.writeFileSync(path.join(dir, "hooks.mjs"), HOOKS);
fs.writeFileSync(path.join(dir, "register.mjs"), REGISTER);
fs.writeFileSync(path.join(dir, "script.mjs"), SCRIPT);

/** Run the script on `device`; returns every module it resolved (ESM URLs and CommonJS paths). */
function modulesLoaded(device: "cpu" | "wasm"): { modules: string[]; out: { device: string; n: number; finite: boolean } } {
  const log = path.join(dir, `resolved-${device}.log`);
  const stdout = execFileSync(process.execPath, ["--import", pathToFileURL(path.join(dir, "register.mjs")).href, path.join(dir, "script.mjs"), device], {
    env: { ...process.env, SELFSCOPE_RESOLVE_LOG: log },
    encoding: "utf8",
  });
  const out = JSON.parse(stdout.trim().split("\n").at(-1)!) as { device: string; n: number; finite: boolean; cjs: string[] };
  const esm = fs.existsSync(log) ? fs.readFileSync(log, "utf8").split("\n").filter((l) => l.length > 0) : [];
  return { modules: [...esm, ...out.cjs.map((f) => pathToFileURL(f).href)], out };
}

const isJax = (u: string) => /\/node_modules\/@jax-js\//.test(u);

test("a cpu-device forward through the package entry loads no module of @jax-js", () => {
  const { modules, out } = modulesLoaded("cpu");
  assert.equal(out.device, "cpu");
  assert.ok(out.n > 0 && out.finite, "the forward ran and gave finite logits");
  assert.ok(modules.some((u) => u.endsWith("/dist/src/index.js")), "the hook saw the package entry (the detector ran)");
  assert.ok(modules.some((u) => u.endsWith("/dist/src/engine/cpu/engine.js")), "the hook saw the cpu engine load");
  assert.deepEqual(modules.filter(isJax), [], "jax-js modules loaded on the cpu device");
  assert.ok(!modules.some((u) => u.endsWith("/dist/src/engine/jax/engine.js") || u.endsWith("/dist/src/core/polyfills.js")), "the jax engine and its polyfills stay unloaded");
});

test("control: the same script on the wasm device loads @jax-js/jax (the detector sees it)", () => {
  const { modules, out } = modulesLoaded("wasm");
  assert.equal(out.device, "wasm");
  assert.ok(out.n > 0 && out.finite);
  assert.ok(modules.some((u) => /\/node_modules\/@jax-js\/jax\/dist\/index\.js$/.test(u)), `@jax-js/jax not seen among ${modules.length} modules`);
  assert.ok(modules.some((u) => u.endsWith("/dist/src/core/polyfills.js")));
});
