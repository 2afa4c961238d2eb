// `selfscope compare` (src/recipes/compare.ts) on the bundled stories260K and the tiny-random-gpt2 fixture
// with the rule judge and tiny settings: one run directory per model with the same planned trials, each
// model's block equal to what computeResults gives for its own log, the side-by-side report, resuming
// after a torn log, and the refusals (layers that differ without --per-model-layers, a changed comparison).
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { computeResults } from "../src/eval/metrics.js";
import { readRunLog } from "../src/log/read.js";
import { compareCommand, planCompare, type CompareArgs, type CompareResults } from "../src/recipes/compare.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const GPT2 = fixture("tiny-random-gpt2");
const LLAMA1 = fixture("llama2-tiny-random-gguf", "llama-2-tiny-random.gguf"); // 1 layer
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-compare-"));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

const tiny = (out: string, extra: Partial<CompareArgs> = {}): CompareArgs => ({
  model: [STORIES, GPT2],
  label: "stories,gpt2",
  out,
  preset: "macar2026",
  concepts: "2",
  trials: 2,
  controls: 2,
  maxTokens: 6,
  judges: ["rule"],
  quiet: true,
  ...extra,
});

const trialIds = (dir: string) => readRunLog(dir).trials.map((t) => t.id).sort();

describe("compare: one preset on several models, side by side", () => {
  const out = path.join(tmp, "cmp");
  let res: CompareResults;

  test("stories260K vs tiny-random-gpt2: a run per model, the same planned trials, results and report side by side", async () => {
    res = await compareCommand(tiny(out));
    for (const f of ["results.json", "report.html", "compare.json", "runs/stories/log.jsonl", "runs/stories/report.html", "runs/gpt2/log.jsonl", "runs/gpt2/results.json"]) assert.ok(fs.existsSync(path.join(out, f)), f);
    assert.deepEqual(res.models.map((m) => m.label), ["stories", "gpt2"]);
    // macar2026's layer fraction 37/62 on 5 layers: round(2.98) = 3 on both.
    assert.deepEqual(res.models.map((m) => m.layers), [[3], [3]]);
    assert.deepEqual(res.models.map((m) => m.family), ["llama", "gpt2"]);
    // 2 concepts × 2 trials + 2 controls, the same trials on both models.
    assert.equal(res.planned_trials_per_model, 6);
    assert.deepEqual(trialIds(path.join(out, "runs/stories")), trialIds(path.join(out, "runs/gpt2")));
    assert.equal(trialIds(path.join(out, "runs/stories")).length, 6);
    // Each block is that model's own results, as computeResults gives them from its log.
    for (const m of res.models) {
      const own = computeResults(readRunLog(path.join(out, m.run_dir)));
      assert.deepEqual(m.results, own, m.label);
      assert.deepEqual(JSON.parse(fs.readFileSync(path.join(out, m.run_dir, "results.json"), "utf8")), own);
    }
    assert.equal(res.side_by_side.length, 1);
    const row = res.side_by_side[0]!;
    assert.deepEqual([row.strength, row.variant, row.models.map((c) => c.layer)], [4, "original", [3, 3]]);
    row.models.forEach((c, i) => {
      const bc = res.models[i]!.results.by_config[0]!;
      assert.deepEqual([c.tpr, c.fpr, c.introspection_rate], [bc.tpr, bc.fpr, bc.introspection_rate]);
      assert.equal(c.tpr.n, 4);
      assert.equal(c.fpr.n, 2);
    });
    assert.deepEqual(JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")), JSON.parse(JSON.stringify(res)));
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    assert.ok(html.startsWith("<!doctype html>"));
    for (const s of ["stories", "gpt2", "runs/stories/report.html", "runs/gpt2/report.html", "stories L3, gpt2 L3"]) assert.ok(html.includes(s), s);
    assert.ok((html.match(/<svg/g) ?? []).length >= 1, "the side-by-side chart is drawn");
    assert.ok(!/<script/i.test(html));
  });

  test("rerunning the command finishes a torn run and leaves finished ones as they are", async () => {
    const log = path.join(out, "runs/gpt2/log.jsonl");
    const before = fs.readFileSync(log, "utf8");
    const lines = before.split("\n").filter(Boolean);
    // Keep the header and the first trial (and anything before it); cut the rest mid-record, as a kill would.
    const firstTrial = lines.findIndex((l) => l.includes('"type":"trial"'));
    fs.writeFileSync(log, lines.slice(0, firstTrial + 1).join("\n") + "\n" + lines[firstTrial + 1]!.slice(0, 20));
    const storiesLog = fs.readFileSync(path.join(out, "runs/stories/log.jsonl"), "utf8");
    const again = await compareCommand(tiny(out));
    assert.equal(fs.readFileSync(path.join(out, "runs/stories/log.jsonl"), "utf8"), storiesLog, "the finished model is not rerun");
    assert.deepEqual(trialIds(path.join(out, "runs/gpt2")), trialIds(path.join(out, "runs/stories")));
    assert.equal(again.models[1]!.results.n_trials.total, 6);
  });

  test("a changed comparison in the same directory is refused", async () => {
    await assert.rejects(compareCommand(tiny(out, { trials: 3 })), /compare\.json: this directory holds a comparison of other models or with other flags; use a new --out/);
  });
});

describe("compare refuses what would silently differ", () => {
  test("a preset that resolves to different layers needs --per-model-layers, and records each model's layer", () => {
    assert.throws(() => planCompare(tiny(path.join(tmp, "x"), { model: [STORIES, LLAMA1], label: "stories,llama1" })), /resolves to different layers on these models \(stories: layer 3 of 5; llama1: layer 0 of 1\); pass --per-model-layers/);
    const { planned, notes } = planCompare(tiny(path.join(tmp, "x"), { model: [STORIES, LLAMA1], label: "stories,llama1", perModelLayers: true }));
    assert.deepEqual(planned.map((p) => p.cfg.layers), [[3], [0]]);
    assert.match(notes[0]!, /Layers differ between models/);
  });

  test("explicit layer indices on models of different depth run as given, with a note", () => {
    const { planned, notes } = planCompare(tiny(path.join(tmp, "x"), { model: [STORIES, LLAMA1], label: "stories,llama1", layers: "0" }));
    assert.deepEqual(planned.map((p) => p.cfg.layers), [[0], [0]]);
    assert.match(notes[0]!, /different fractions of depth/);
  });

  test("one model, duplicate labels, bad labels", () => {
    assert.throws(() => planCompare(tiny(path.join(tmp, "x"), { model: [STORIES], label: "a" })), /at least two --model/);
    assert.throws(() => planCompare(tiny(path.join(tmp, "x"), { model: [STORIES, STORIES], label: undefined })), /two models get the label "stories260K"/);
    assert.throws(() => planCompare(tiny(path.join(tmp, "x"), { label: "a/b,c" })), /--label "a\/b"/);
    assert.throws(() => planCompare(tiny(path.join(tmp, "x"), { label: "a" })), /1 labels for 2 models/);
  });
});

describe("the compare and refusal command lines", () => {
  const cli = (...args: string[]) => spawnSync(process.execPath, [path.join(repoDir(), "dist/src/cli/main.js"), ...args], { encoding: "utf8" });

  test("--help names the new flags", () => {
    const c = cli("compare", "--help");
    assert.equal(c.status, 0);
    for (const f of ["--model A --model B", "--per-model-layers", "--label"]) assert.ok(c.stdout.includes(f), f);
    const r = cli("refusal", "--help");
    for (const f of ["--harmful FILE", "--harmless FILE", "--n-instructions 512", "--held-out", "CC BY-NC 4.0"]) assert.ok(r.stdout.includes(f), f);
  });

  test("errors are one line and exit 1, before any run directory is made", () => {
    const out = path.join(tmp, "cli-out");
    const one = cli("compare", "--model", STORIES, "--out", out, "--judge", "rule");
    assert.equal(one.status, 1);
    assert.equal(one.stderr.trim(), "selfscope compare: compare needs at least two --model flags (for one model use selfscope inject)");
    const layers = cli("compare", "--model", STORIES, "--model", LLAMA1, "--out", out, "--judge", "rule");
    assert.equal(layers.status, 1);
    assert.match(layers.stderr, /^selfscope compare: preset macar2026 resolves to different layers on these models \(stories260K: layer 3 of 5; llama-2-tiny-random: layer 0 of 1\)/);
    assert.equal(layers.stderr.trim().split("\n").length, 1);
    assert.ok(!fs.existsSync(out));
  });
});
