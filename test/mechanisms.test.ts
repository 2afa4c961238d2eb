// selfscope mechanisms: every analysis on the organism into one report (tiny settings: the point is
// the plumbing; each analysis has its own planted-truth test).
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { mechanismsCommand } from "../src/recipes/mechanisms.js";
import { repoDir } from "./support/paths.js";

test("selfscope mechanisms on the organism: one report linking every analysis; bad transcoder layers refused", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mechanisms-test-"));
  try {
    const model = path.join(repoDir(), "models", "organism", "organism.gguf");
    const texts = path.join(dir, "t.txt");
    fs.writeFileSync(texts, "Tell me about frogs\nTell me about the sea\nOnce upon a time there was a dog.\n");
    const concepts = path.join(dir, "c.json");
    fs.writeFileSync(concepts, JSON.stringify(["frog", "shoe"]));
    const out = path.join(dir, "m");
    const r = await mechanismsCommand({ model, out, layers: "1", concepts, trials: 1, transcoderSteps: 20, texts, quiet: true, threads: 1 });
    assert.deepEqual(r.transcoders.map((t) => t.layer), [2, 3]);
    assert.ok(r.steering.max_invariant_error <= 1e-4);
    assert.ok("logit_gap" in r.patch.necessary);
    for (const sub of ["patch", "gradients", "features", "steering"]) assert.ok(fs.existsSync(path.join(out, sub, "report.html")), sub);
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    for (const sub of ["patch", "gradients", "features", "steering"]) assert.match(html, new RegExp(`href="${sub}/report.html"`));
    await assert.rejects(mechanismsCommand({ model, out: path.join(dir, "bad"), layers: "1", concepts, trials: 1, transcoderLayers: "1", quiet: true, threads: 1 }), /--transcoder-layers: blocks after the injection layer 1/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
