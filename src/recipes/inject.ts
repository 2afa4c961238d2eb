// `selfscope inject` / `resume` / `rejudge`: create (or reopen) the run directory, run the sweep or
// the judge, then write results.json and report.html. Above the report layer because they finish
// with the report; compare.ts runs them per model, the CLI calls them directly.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { announcePlan, buildConfig, checkSameModel, progressPrinter, runHeader, type InjectArgs, type JudgeCallOptions } from "../eval/inject.js";
import { judgeTrials, runSweep } from "../eval/run.js";
import { readRun } from "../eval/runlog.js";
import { getVariant } from "../eval/protocol.js";
import type { Results } from "../eval/metrics.js";
import { JudgeFailures } from "../judge/failures.js";
import { makeJudge, type Judge } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import { RunLogWriter, lockRun } from "../log/write.js";
import { loadWithAdapter } from "../train/adapter.js";
import { describeSampler } from "../model/sampling.js";
import type { DeviceName } from "../engine/device.js";
import { finishRun } from "../report/finish.js";

/** The run's judges; `note` (a default choice, said before any request) goes to stderr. */
function judgesFor(specs: readonly string[], runDir: string, opts: JudgeCallOptions = {}, note: string | null = null): Judge[] {
  const judges = specs.map((spec) => makeJudge(spec, { cacheDir: path.join(runDir, "judge-cache"), ...opts }));
  if (note !== null) process.stderr.write(note + "\n");
  return judges;
}

export async function inject(a: InjectArgs): Promise<{ runDir: string; results: Results }> {
  const { model, adapter } = await loadWithAdapter(a.model, a.adapter, { device: a.device ?? "cpu", ...(a.weights ? { weights: a.weights } : {}) });
  try {
    const cfg = buildConfig(a, model.config.nLayers, model.chatTemplate !== undefined);
    const runDir = a.out ?? path.join("runs", `${new Date().toISOString().replace(/[:.]/g, "-")}_${cfg.preset ?? "inject"}`);
    const header = runHeader(model, a.model, cfg, a.command ?? [], { ...(a.about ? { about: a.about } : {}), adapter, ...(a.weights ? { weights: a.weights } : {}) });
    // Printed even with --quiet: each changes what the numbers mean.
    if (a.promptFormat === undefined && cfg.promptFormat === "raw")
      process.stderr.write(`note: ${a.model} has no chat template: running the paper's base-model protocol (raw User:/Assistant: dialogue, concept vectors from raw ${JSON.stringify(cfg.vectorRecipe.userTemplate)}; --prompt-format raw)\n`);
    for (const w of header.warnings ?? []) process.stderr.write(`warning: ${w}\n`);
    if (!a.quiet) process.stderr.write(`sampler: ${describeSampler(header.sampler!)}\n`);
    // Validate everything that can be wrong before the run directory is created.
    for (const v of cfg.variants) getVariant(v);
    const judges = judgesFor(cfg.judges, runDir, a.judgeOptions, chooseJudges(a.judges).note);
    const failures = new JudgeFailures();
    const unlock = lockRun(runDir);
    try {
      const log = RunLogWriter.create(runDir, header);
      try {
        await announcePlan(model, cfg, new Set(), a.quiet ?? false);
        await runSweep(model, cfg, log, null, { judges, failures, vectorCache: a.vectorCache ?? null, progress: progressPrinter(a.quiet) });
      } finally {
        log.close();
        for (const j of judges) j.dispose?.();
      }
      const done = await finishRun(runDir, { failedAsNo: a.failedAsNo ?? false });
      failures.finish(`selfscope resume ${runDir}`);
      return { runDir, ...done };
    } finally {
      unlock();
    }
  } finally {
    model.dispose();
  }
}

export interface ResumeOptions {
  device?: DeviceName;
  quiet?: boolean;
  vectorCache?: string | null;
  /** Score failed judgments NO in results.json (default: exclude them). */
  failedAsNo?: boolean;
  judgeOptions?: JudgeCallOptions;
}

/** Continue a killed run: every planned trial ends up in the log exactly once; failed judgments are retried. */

export async function resume(runDir: string, opts: ResumeOptions = {}): Promise<{ results: Results; generated: number; discardedBytes: number }> {
  if (!fs.existsSync(runDir)) throw new UsageError(`${runDir}: no such run directory`);
  const unlock = lockRun(runDir);
  try {
    return await resumeLocked(runDir, opts);
  } finally {
    unlock();
  }
}

async function resumeLocked(runDir: string, opts: ResumeOptions): Promise<{ results: Results; generated: number; discardedBytes: number }> {
  const prior = readRun(runDir, { repair: true });
  const h = prior.header;
  // The run's adapter, if it had one: the same file (checked by its sha256, then by checkSameModel's weights hash).
  const ad = h.model.adapter;
  if (ad && (!fs.existsSync(ad.path) || createHash("sha256").update(fs.readFileSync(ad.path)).digest("hex") !== ad.sha256)) {
    throw new UsageError(`${runDir}: the run used the adapter ${ad.path} (sha256 ${ad.sha256.slice(0, 12)}…), which is ${fs.existsSync(ad.path) ? "a different file now" : "gone"}; restore it to resume this run`);
  }
  // Loaded the way the run's was (--weights at inject), so checkSameModel sees the same arithmetic.
  const { model } = await loadWithAdapter(h.model.path, ad?.path, { device: opts.device ?? (h.backend.device as DeviceName), ...(h.backend.weights ? { weights: h.backend.weights } : {}) });
  try {
    checkSameModel(runDir, h, model);
    const judges = judgesFor(h.config.judges, runDir, opts.judgeOptions);
    const failures = new JudgeFailures();
    const log = RunLogWriter.reopen(runDir);
    let generated = 0;
    try {
      await announcePlan(model, h.config, new Set(prior.trials.map((t) => t.id)), opts.quiet ?? false);
      ({ generated } = await runSweep(model, h.config, log, prior, { judges, failures, vectorCache: opts.vectorCache ?? null, progress: progressPrinter(opts.quiet) }));
    } finally {
      log.close();
      for (const j of judges) j.dispose?.();
    }
    const { results } = await finishRun(runDir, { failedAsNo: opts.failedAsNo ?? false });
    failures.finish(`selfscope resume ${runDir}`);
    return { results, generated, discardedBytes: prior.discardedBytes };
  } finally {
    model.dispose();
  }
}

/**
 * Judge an existing run again with another judge (no model needed, except by a local: judge): every
 * trial's missing or failed judgments by that judge are appended to the log, and results.json and
 * report.html are recomputed with that judge's verdicts.
 */
export async function rejudge(runDir: string, spec: string, opts: { judgeOptions?: JudgeCallOptions; rubric?: string; failedAsNo?: boolean } = {}): Promise<{ results: Results; judge: string; judged: number }> {
  if (!fs.existsSync(runDir)) throw new UsageError(`${runDir}: no such run directory`);
  const unlock = lockRun(runDir);
  try {
    const run = readRun(runDir, { repair: true });
    const judge = makeJudge(spec, { cacheDir: path.join(runDir, "judge-cache"), ...(opts.rubric !== undefined ? { rubric: opts.rubric } : {}), ...opts.judgeOptions });
    const failures = new JudgeFailures();
    const log = RunLogWriter.reopen(runDir);
    let judged = 0;
    try {
      judged = await judgeTrials(run.trials, run.judgments, log, [judge], run.header.config.identifyAll === true, failures);
    } finally {
      log.close();
      judge.dispose?.();
    }
    const { results } = await finishRun(runDir, { judge: judge.name, failedAsNo: opts.failedAsNo ?? false });
    failures.finish(`selfscope rejudge ${runDir} --judge ${spec}`);
    return { results, judge: judge.name, judged };
  } finally {
    unlock();
  }
}

