// The repository stands alone: a fresh clone installs without engine warnings and tests nothing outside itself
// (issue 12 §1, §8), and the shipped examples run from any working directory.
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { test } from "node:test";
import semver from "semver";
import { fixture, repoDir } from "./support/paths.js";

const repo = repoDir();
const pkg = JSON.parse(fs.readFileSync(path.join(repo, "package.json"), "utf8")) as { engines: { node: string } };

test("every locked package accepts every Node version package.json promises (npm ci prints no EBADENGINE)", () => {
  const lock = JSON.parse(fs.readFileSync(path.join(repo, "package-lock.json"), "utf8")) as { packages: Record<string, { engines?: { node?: string } | string[] }> };
  const narrower: string[] = [];
  for (const [name, p] of Object.entries(lock.packages)) {
    const node = p.engines && !Array.isArray(p.engines) ? p.engines.node : undefined;
    if (name !== "" && node !== undefined && !semver.subset(pkg.engines.node, node)) narrower.push(`${name} wants node ${node}`);
  }
  assert.deepEqual(narrower, [], `package.json says node ${pkg.engines.node}`);
  const readme = fs.readFileSync(path.join(repo, "README.md"), "utf8");
  assert.ok(readme.includes(`Node \`${pkg.engines.node}\``), "README states package.json's Node range");
});

test("tests and sources read nothing outside the repository; every vendored fixture has its provenance", () => {
  const tracked = execFileSync("git", ["ls-files", "src", "test", "bench", "examples", "scripts", ".ci"], { cwd: repo, encoding: "utf8" }).trim().split("\n");
  // This file names the patterns, so it is the one file exempt from them.
  const outside = tracked.filter((f) => !f.startsWith("test/fixtures/") && f !== "test/repo.test.ts" && /\.\.\/shared|SELFSCOPE_SHARED/.test(fs.readFileSync(path.join(repo, f), "utf8")));
  assert.deepEqual(outside, []);
  const root = fixture();
  for (const d of fs.readdirSync(root)) assert.ok(fs.existsSync(path.join(root, d, "PROVENANCE.md")), `${d} has PROVENANCE.md`);
  for (const f of tracked.filter((f) => fs.lstatSync(path.join(repo, f)).isSymbolicLink())) {
    const target = fs.realpathSync(path.join(repo, f));
    assert.ok(target.startsWith(repo + path.sep), `${f} links inside the repository`);
  }
});

test("the examples run from any working directory (the bundled model is found from the package, not the cwd)", () => {
  const cwd = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-example-"));
  try {
    const r = spawnSync(process.execPath, [path.join(repo, "dist/examples/02-read-resid.js")], { cwd, encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /blocks\.4\.hook_resid_post shape \[\d+,64\]/);
  } finally {
    fs.rmSync(cwd, { recursive: true, force: true });
  }
});

test("the TypeScript examples in README.md and docs/api.md run as written (against the built package)", async () => {
  const ts = (await import("typescript")).default;
  const entry = pathToFileURL(path.join(repo, "dist/src/index.js")).href;
  for (const doc of ["README.md", "docs/api.md"]) {
    const text = fs.readFileSync(path.join(repo, doc), "utf8");
    const block = /```ts\n([\s\S]*?)```/.exec(text.slice(Math.max(0, text.indexOf("Model.load") - 400)));
    assert.ok(block, `${doc} has a ts example`);
    const js = ts.transpileModule(block[1]!.replaceAll('from "selfscope"', `from ${JSON.stringify(entry)}`), {
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    }).outputText;
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-doc-")), "example.mjs");
    fs.writeFileSync(file, `${js}\nconsole.log("ran to the end");\n`);
    const r = spawnSync(process.execPath, [file], { cwd: path.dirname(file), encoding: "utf8" });
    assert.equal(r.status, 0, `${doc}: ${r.stderr}`);
    assert.match(r.stdout, /ran to the end/, doc);
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
  }
});
