// What a run log promises its readers: every trial record is a trial of the header's plan
// (anything else is an error naming file:line, for report, export and resume alike), and a logged
// prompt leads back to exactly the token ids the trial ran on. Runs are small sweeps of the bundled
// stories260K, whose prompts start with BOS as text. wasm backend.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { buildConfig, runHeader } from "../src/eval/inject.js";
import { inject, resume } from "../src/recipes/inject.js";
import { finishRun } from "../src/report/finish.js";
import { runSweep } from "../src/eval/run.js";
import { readRun } from "../src/eval/runlog.js";
import { RunLogError } from "../src/log/read.js";
import type { TrialRecord } from "../src/log/schema.js";
import { LOG_FILE, RunLogWriter } from "../src/log/write.js";
import { Model } from "../src/model/model.js";
import { repoDir } from "./support/paths.js";
import { runCli } from "./support/runlog-checks.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-runlog-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

describe("logged prompts", () => {
  let model: Model;
  before(async () => {
    model = await Model.load(STORIES, { device: "wasm" });
  });
  after(() => model?.dispose());

  test("a logged prompt round-trips to the ids the trial ran on: promptIds, and { text: prompt }", async () => {
    const cfg = buildConfig({ model: STORIES, layers: "2", strengths: "4", concepts: "2", trials: 1, controls: 1, forced: true, variants: "original,lindsey2025", judges: ["rule"], maxTokens: 2, batchSize: 4 }, model.config.nLayers, model.chatTemplate !== undefined);
    const dir = path.join(tmpRoot, "prompts");
    // The truth: the ids generate() was called with, row by row, in log order.
    const fed: number[][] = [];
    const spy = Object.create(model) as Model;
    Object.defineProperty(spy, "generate", {
      value: (prompts: Parameters<Model["generate"]>[0], opts: Parameters<Model["generate"]>[1]) => {
        for (const p of prompts) fed.push(model.encode(p).ids);
        return model.generate(prompts, opts);
      },
    });
    const log = RunLogWriter.create(dir, runHeader(model, STORIES, cfg, ["test"]));
    try {
      await runSweep(spy, cfg, log, null, { judges: [] });
    } finally {
      log.close();
    }
    const { trials } = readRun(dir);
    assert.equal(trials.length, fed.length);
    const bos = model.tokenizer!.bos!;
    const bosText = model.tokenizer!.idToToken(bos)!;
    trials.forEach((t, i) => {
      assert.ok(t.prompt.startsWith(bosText), `${t.id}: the logged prompt holds BOS as text`);
      assert.deepEqual(t.promptIds, fed[i], `${t.id}: promptIds are the ids the trial ran on`);
      assert.equal(fed[i]![0], bos);
      assert.notEqual(fed[i]![1], bos, `${t.id}: one BOS, not two`);
      assert.equal(t.injected === null || t.injected.promptTokens === fed[i]!.length, true);
      // The documented text form re-encodes to the same ids.
      assert.deepEqual(model.encode({ text: t.prompt }).ids, fed[i], `${t.id}: { text: prompt } re-encodes exactly`);
    });
    // Through forward: the logged prompt reproduces the trial's residual stream at its injection point.
    const t = trials.find((x) => x.kind === "injection")!;
    const at = "blocks.2.hook_resid_post" as const;
    const a = await model.forward([{ ids: t.promptIds! }], { plan: [{ op: "read", at }], logits: "none" });
    const b = await model.forward([{ text: t.prompt }], { plan: [{ op: "read", at }], logits: "none" });
    assert.deepEqual(b.rows[0]!.ids, t.promptIds);
    assert.deepEqual(b.cache.get(at).data, a.cache.get(at).data);
  });
});

describe("records outside the plan", () => {
  const out = path.join(tmpRoot, "plan-run");
  let lines: string[];
  before(async () => {
    await inject({ model: STORIES, layers: "2", strengths: "4", concepts: "2", trials: 2, controls: 2, forced: false, yesBias: 0, judges: ["rule"], maxTokens: 2, batchSize: 8, out, vectorCache: null, quiet: true, device: "wasm" });
    lines = fs.readFileSync(path.join(out, LOG_FILE), "utf8").split("\n").filter(Boolean);
  });

  /** A copy of the run whose log has `edit` applied; returns its directory and log file. */
  function edited(name: string, edit: (ls: string[]) => string[]): { dir: string; file: string } {
    const dir = path.join(tmpRoot, name);
    fs.mkdirSync(dir);
    const file = path.join(dir, LOG_FILE);
    fs.writeFileSync(file, edit([...lines]).join("\n") + "\n");
    return { dir, file };
  }

  const trialLine = (ls: string[], kind: string) => ls.findIndex((l) => (JSON.parse(l) as { type: string; kind?: string }).type === "trial" && (JSON.parse(l) as TrialRecord).kind === kind);

  test("an extra trial (an id the config does not plan) is rejected by report and resume, naming file:line", async () => {
    // A seventh control for a run planning 2 controls and 4 injections: the TPR/FPR n would move.
    let at = 0;
    const { dir, file } = edited("extra", (ls) => {
      const c = JSON.parse(ls[trialLine(ls, "control")]!) as TrialRecord;
      at = ls.length + 1;
      return [...ls, JSON.stringify({ ...c, id: c.id.replace(/#\d+$/, "#7"), sample: 7 })];
    });
    const before = fs.readFileSync(file);
    const msg = new RegExp(`${file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:${at}: trial "control\\|original\\|L2\\|s4\\|-\\|n1\\|#7" is not in this run's plan \\(6 trials planned from the header's config\\)`);
    await assert.rejects(finishRun(dir), (e: unknown) => e instanceof RunLogError && msg.test(e.message));
    await assert.rejects(resume(dir, { quiet: true, device: "wasm", vectorCache: null }), msg);
    assert.deepEqual(fs.readFileSync(file), before, "resume left the log as it was");
    const r = await runCli(["report", dir]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`${LOG_FILE}:${at}: trial .* is not in this run's plan`));
    assert.ok(!fs.existsSync(path.join(dir, "results.json")), "no results from a log that cannot be trusted");
  });

  test("a planned id recorded as something else, and a judgment of an unrecorded trial, are rejected with their line", () => {
    const { dir: d1, file: f1 } = edited("relabelled", (ls) => {
      const i = trialLine(ls, "injection");
      ls[i] = JSON.stringify({ ...(JSON.parse(ls[i]!) as TrialRecord), kind: "control" });
      return ls;
    });
    const i1 = trialLine(lines, "injection") + 1;
    assert.throws(() => readRun(d1), (e: unknown) => e instanceof RunLogError && e.message.startsWith(`${f1}:${i1}: trial "injection|`) && /has kind "control" but its planned trial has "injection"/.test(e.message));
    const { dir: d2, file: f2 } = edited("orphan-judgment", (ls) => [...ls, JSON.stringify({ type: "judgment", trialId: "injection|original|L2|s4|Ghost|n1|#0", judge: "rule", criterion: "detection", verdict: "YES", raw: "", error: null, approximate: true, attempts: 1, ms: 0 })]);
    assert.throws(() => readRun(d2), new RegExp(`${f2.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:${lines.length + 1}: a judgment of trial "injection\\|original\\|L2\\|s4\\|Ghost\\|n1\\|#0", which no earlier line records`));
    // The unedited run reads cleanly, and its every trial is planned.
    assert.equal(readRun(out).trials.length, 6);
  });
});
