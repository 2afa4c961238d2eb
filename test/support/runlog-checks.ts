// Shared checks for run logs (harness and resume tests): every planned trial exactly once, every
// needed judgment present (identification only after a YES detection), nothing judged twice; plus a
// small seeded PRNG for reproducible kill points and helpers to drive the CLI as a child process.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { PlannedTrial } from "../../src/eval/plan.js";
import type { RunData } from "../../src/log/read.js";
import type { Criterion, TrialKind, TrialRecord } from "../../src/log/schema.js";
import { repoDir } from "./paths.js";

/** The criteria a trial needs from one judge, given that judge's detection verdict. */
export function neededCriteria(kind: TrialKind, detection: "YES" | "NO" | null | undefined): Criterion[] {
  switch (kind) {
    case "injection":
      return detection === "YES" ? ["detection", "identification"] : ["detection"];
    case "control":
      return ["detection"];
    case "forced":
      return ["forced_identification"];
    case "yesbias":
      return ["yes_answer"];
  }
}

export interface RunSummary {
  byKind: Record<TrialKind, number>;
  judgments: number;
  identifications: number;
}

/**
 * Assert the log holds exactly the planned trials (each once, none extra, fields matching the plan)
 * and, for every judge, exactly the needed judgments (no duplicates, none for criteria that do not apply).
 */
export function assertCompleteRun(run: RunData, plan: readonly PlannedTrial[], judges: readonly string[]): RunSummary {
  assert.equal(run.duplicateTrials.length, 0, `trials recorded twice: ${run.duplicateTrials.slice(0, 5).join(", ")}`);
  const planned = new Map(plan.map((t) => [t.id, t]));
  assert.equal(planned.size, plan.length, "planTrials produced duplicate ids");
  const seen = new Map<string, number>();
  for (const t of run.trials) seen.set(t.id, (seen.get(t.id) ?? 0) + 1);
  const missing = plan.filter((t) => !seen.has(t.id)).map((t) => t.id);
  const extra = run.trials.filter((t) => !planned.has(t.id)).map((t) => t.id);
  const twice = [...seen].filter(([, n]) => n > 1).map(([id]) => id);
  assert.deepEqual({ missing: missing.slice(0, 5), nMissing: missing.length, extra: extra.slice(0, 5), twice: twice.slice(0, 5) }, { missing: [], nMissing: 0, extra: [], twice: [] });
  assert.equal(run.trials.length, plan.length);
  for (const t of run.trials) {
    const p = planned.get(t.id)!;
    assert.deepEqual(
      { kind: t.kind, concept: t.concept, layer: t.layer, strength: t.strength, variant: t.variant, trialNumber: t.trialNumber, sample: t.sample, seed: t.seed, question: t.question },
      { kind: p.kind, concept: p.concept, layer: p.layer, strength: p.strength, variant: p.variant, trialNumber: p.trialNumber, sample: p.sample, seed: p.seed, question: p.question },
      `trial ${t.id} does not match its plan entry`,
    );
  }
  const trialIds = new Set(run.trials.map((t) => t.id));
  let identifications = 0;
  for (const judge of judges) {
    const mine = run.judgments.filter((j) => j.judge === judge);
    const keyCount = new Map<string, number>();
    for (const j of mine) {
      assert.ok(trialIds.has(j.trialId), `judgment for unknown trial ${j.trialId}`);
      const k = `${j.trialId}|${j.criterion}`;
      keyCount.set(k, (keyCount.get(k) ?? 0) + 1);
    }
    const dup = [...keyCount].filter(([, n]) => n > 1).map(([k]) => k);
    assert.deepEqual(dup, [], `${judge}: (trial, criterion) judged more than once`);
    const det = new Map(mine.filter((j) => j.criterion === "detection").map((j) => [j.trialId, j.verdict]));
    for (const t of run.trials) {
      const need = new Set(neededCriteria(t.kind, det.get(t.id)));
      const have = new Set(mine.filter((j) => j.trialId === t.id).map((j) => j.criterion));
      assert.deepEqual([...have].sort(), [...need].sort(), `${judge}: trial ${t.id} (${t.kind}, detection ${det.get(t.id) ?? "-"}) has judgments for [${[...have]}], needs [${[...need]}]`);
      if (need.has("identification")) identifications++;
    }
  }
  const byKind: Record<TrialKind, number> = { injection: 0, control: 0, forced: 0, yesbias: 0 };
  for (const t of run.trials) byKind[t.kind]++;
  return { byKind, judgments: run.judgments.length, identifications };
}

/** Expected trial counts per kind for a config (independent of planTrials). */
export function expectedCounts(c: { variants: unknown[]; layers: unknown[]; strengths: unknown[]; concepts: unknown[]; trialsPerConcept: number; controlsPerConfig: number; controlsPerConcept?: number; controlConcepts?: number | null; forced: boolean; yesBiasPerConcept: number }): Record<TrialKind, number> {
  const cfgs = c.variants.length * c.layers.length * c.strengths.length;
  const controlConcepts = Math.min(c.concepts.length, c.controlConcepts ?? c.concepts.length);
  return {
    injection: cfgs * c.concepts.length * c.trialsPerConcept,
    forced: c.forced ? cfgs * c.concepts.length * c.trialsPerConcept : 0,
    yesbias: cfgs * c.concepts.length * c.yesBiasPerConcept,
    control: cfgs * (c.controlsPerConfig + controlConcepts * (c.controlsPerConcept ?? 0)),
  };
}

export { prng } from "./prng.js";

/** Complete lines (records) in a file; 0 when it does not exist. */
export function countLines(file: string): number {
  let b: Buffer;
  try {
    b = fs.readFileSync(file);
  } catch {
    return 0;
  }
  let n = 0;
  for (const c of b) if (c === 0x0a) n++;
  return n;
}

export const CLI = (): string => path.join(repoDir(), "dist", "src", "cli", "main.js");

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Start `node dist/src/cli/main.js ...args`; `done` resolves when it exits (for any reason). */
export function startCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): { child: ChildProcess; done: Promise<CliResult> } {
  const t0 = performance.now();
  const child = spawn(process.execPath, [CLI(), ...args], { cwd: opts.cwd ?? repoDir(), env: { ...process.env, ...opts.env }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 }));
  });
  return { child, done };
}

/** Run the CLI to completion. */
export function runCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return startCli(args, opts).done;
}

/** Trial records by id (for comparing two runs of one config). */
export function outputsById(trials: readonly TrialRecord[]): Map<string, string> {
  return new Map(trials.map((t) => [t.id, t.output]));
}
