// judge-agreement: Cohen's kappa between two judges recorded in a run, and against human labels.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { judgeAgreement } from "../src/judge/agreement.js";
import { readRunLog } from "../src/log/read.js";
import { LOG_SCHEMA, LOG_VERSION, type JudgmentRecord, type RunHeader, type TrialRecord } from "../src/log/schema.js";
import { RunLogWriter } from "../src/log/write.js";

test("kappa per criterion between two judges and between a judge and human labels", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-agree-"));
  const header = { type: "header", schema: LOG_SCHEMA, version: LOG_VERSION, createdAt: "", tool: { name: "selfscope", version: "t" }, model: { path: "m", hash: "h", family: "llama", nLayers: 1, dModel: 1, dtype: "F32", chatTemplate: false }, backend: { device: "wasm", adapter: "wasm" }, config: { judges: ["a", "b"] }, plannedTrials: 10, command: [] } as unknown as RunHeader;
  const w = RunLogWriter.create(dir, header);
  // The textbook 2x2 table: both YES 20, a-only 5, b-only 10, both NO 15 (n = 50): kappa = 0.4.
  const pairs: ["YES" | "NO", "YES" | "NO"][] = [...Array(20).fill(["YES", "YES"]), ...Array(5).fill(["YES", "NO"]), ...Array(10).fill(["NO", "YES"]), ...Array(15).fill(["NO", "NO"])];
  const human: string[] = ["trialId,criterion,verdict"];
  pairs.forEach(([va, vb], i) => {
    const id = `t${i}`;
    w.append({ type: "trial", id, kind: "injection", concept: "x", layer: 0, strength: 1, variant: "original", trialNumber: 1, sample: i, injected: null, prompt: "", judgePrompt: "", prefill: null, output: "", outputTokens: 0, stopReason: "length", flags: [], seed: 0, ms: 0 } satisfies TrialRecord);
    const j = (judge: string, verdict: "YES" | "NO"): JudgmentRecord => ({ type: "judgment", trialId: id, judge, criterion: "detection", verdict, raw: null, error: null, approximate: false, attempts: 1, ms: 0 });
    w.append(j("a", va));
    w.append(j("b", vb));
    human.push(`${id},detection,${vb}`);
  });
  w.close();
  const run = readRunLog(dir);
  const out = judgeAgreement(run, { judges: ["a", "b"] });
  assert.match(out, /detection\s+kappa 0\.400\s+agreement 35\/50/);
  fs.writeFileSync(path.join(dir, "human.csv"), human.join("\n"));
  assert.match(judgeAgreement(run, { judges: ["a"], human: path.join(dir, "human.csv") }), /kappa 0\.400/);
  assert.throws(() => judgeAgreement(run, { judges: ["a", "zzz"] }), /judge "zzz" has no verdicts/);
});
