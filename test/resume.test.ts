// The crash test: `selfscope inject` is SIGKILLed at seeded-random points (mostly when log.jsonl
// reaches a random record count, sometimes after a random delay, which also hits model loading and
// vector extraction), then `selfscope resume` continues it — and is itself killed again and again —
// until the run completes. Afterwards the log must validate, hold every planned trial exactly once
// with all of its judgments, and produce the same trial outputs as an uninterrupted run (per-trial
// seeds). Also: a torn last record is discarded by resume, a damaged line in the middle is an
// error naming the line, and a full disk (ENOSPC) stops the run cleanly so that resume finishes it.
//
// Kill points are reproducible: set SELFSCOPE_KILL_SEED to replay a sequence (default below); they
// are printed as a table. Process timing still varies with machine load, so "killed at" (the
// record count when the kill landed) may differ by a record or two between replays.
import { after, describe, mock, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { SelfscopeError } from "../src/core/errors.js";
import type { InjectArgs } from "../src/eval/inject.js";
import { inject, resume } from "../src/recipes/inject.js";
import { planTrials } from "../src/eval/plan.js";
import { readRunLog, RunLogError } from "../src/log/read.js";
import { LOG_SCHEMA, LOG_VERSION, type RunHeader } from "../src/log/schema.js";
import { LOG_FILE, RunLogWriter } from "../src/log/write.js";
import { repoDir } from "./support/paths.js";
import { assertCompleteRun, countLines, expectedCounts, outputsById, prng, runCli, startCli, type CliResult } from "./support/runlog-checks.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const SEED = Number(process.env.SELFSCOPE_KILL_SEED ?? 20261123);
const MIN_KILLS = 22;

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-resume-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
// Vector cache shared by every process of this file (so restarts do not recompute vectors).
const env = { SELFSCOPE_CACHE: path.join(tmpRoot, "cache") };

// 10 concepts × 2 strengths × (6 injection + 6 forced + 1 yes-bias) + 2 × 6 controls = 272 trials,
// batches of 4. On the cpu engine a record lands every few ms, so the run must be this long for
// ≥ 22 kills to land before it completes.
const SWEEP = ["--model", STORIES, "--layers", "2", "--strengths", "4,8", "--concepts", "10", "--trials", "6", "--controls", "6", "--forced", "--yes-bias", "1", "--judge", "rule", "--max-tokens", "8", "--temperature", "1", "--seed", "3", "--quiet"];
const PLANNED = 272;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Kill {
  cycle: number;
  cmd: "inject" | "resume";
  mode: string;
  linesBefore: number;
  killedAtLines: number;
  ms: number;
}

/** Run the CLI and SIGKILL it at `when`; resolves with what happened. */
async function runAndKill(args: string[], log: string, when: { delayMs: number } | { lines: number }): Promise<{ res: CliResult; killed: boolean }> {
  const { child, done } = startCli(args, { env });
  let exited = false;
  void done.then(() => (exited = true));
  let killed = false;
  if ("delayMs" in when) {
    const t0 = performance.now();
    while (!exited && performance.now() - t0 < when.delayMs) await sleep(Math.min(10, when.delayMs));
  } else {
    while (!exited && countLines(log) < when.lines) await sleep(10);
  }
  if (!exited) killed = child.kill("SIGKILL");
  const res = await done;
  return { res, killed: killed && res.signal === "SIGKILL" };
}

// ------------------------------------------------------------------------------------------------

describe("crash and resume through the CLI (SIGKILL at seeded-random points)", () => {
  const dir = path.join(tmpRoot, "run");
  const log = path.join(dir, LOG_FILE);
  const refDir = path.join(tmpRoot, "reference");
  let tornBytes = 0;

  test(`kill ≥ ${MIN_KILLS} times, resume until complete: every planned trial exactly once, all judgments, same outputs as an uninterrupted run`, { timeout: 420_000 }, async () => {
    const rand = prng(SEED);
    const kills: Kill[] = [];
    const t0 = performance.now();
    let cycle = 0;
    let sawNoHeader = false;
    let completedBy: CliResult | null = null;
    while (completedBy === null) {
      cycle++;
      assert.ok(cycle < 80, "too many cycles: the run does not make progress between kills");
      const hasHeader = countLines(log) >= 1;
      if (!hasHeader && cycle > 1) {
        // Killed before the header was written: resume refuses clearly, and inject starts over.
        const r = await runCli(["resume", dir, "--quiet"], { env });
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, /no such run directory|no log\.jsonl here|empty log \(no header\)/);
        assert.doesNotMatch(r.stderr, /SELFSCOPE_DEBUG/, "a clear error, not a crash");
        sawNoHeader = true;
      }
      const cmd = hasHeader ? "resume" : "inject";
      const args = hasHeader ? ["resume", dir, "--quiet"] : ["inject", ...SWEEP, "--batch-size", "4", "--out", dir];
      // A torn record appended by hand midway: resume must cut it off before appending.
      const tearNow = cycle >= 9 && hasHeader && tornBytes === 0;
      if (tearNow) {
        const lines = fs.readFileSync(log, "utf8").split("\n");
        const frag = lines[Math.max(1, lines.length - 3)]!.slice(0, 57);
        fs.appendFileSync(log, frag);
        tornBytes = Buffer.byteLength(frag);
        assert.equal(readRunLog(dir).discardedBytes, tornBytes, "the reader sees the torn tail");
      }
      const linesBefore = countLines(log);
      const done = kills.length >= MIN_KILLS;
      const pick = rand();
      // The first kill comes early (model loading, before or just after the header is written).
      const mode = done ? "none" : cycle === 1 || pick < 0.3 ? `delay` : `records`;
      const delayMs = cycle === 1 ? 100 + Math.floor(rand() * 600) : Math.floor(rand() * 1500);
      const step = 1 + Math.floor(rand() * 7);
      const { res, killed } = done
        ? { res: await runCli(args, { env }), killed: false }
        : await runAndKill(args, log, mode === "delay" ? { delayMs } : { lines: linesBefore + step });
      if (killed) {
        kills.push({ cycle, cmd, mode: mode === "delay" ? `delay ${delayMs} ms` : `records +${step}`, linesBefore, killedAtLines: countLines(log), ms: Math.round(res.ms) });
        // The partial log is always readable and never holds a trial twice.
        if (countLines(log) >= 1) {
          const part = readRunLog(dir);
          assert.deepEqual(part.duplicateTrials, [], `cycle ${cycle}: duplicate trials after a kill`);
          const ids = new Set(part.trials.map((t) => t.id));
          for (const j of part.judgments) assert.ok(ids.has(j.trialId), `cycle ${cycle}: judgment before its trial`);
        }
        if (tearNow) {
          // The resume got at least as far as repairing the log (or was killed before reading it).
          const tail = fs.readFileSync(log);
          assert.ok(tail.at(-1) === 0x0a || readRunLog(dir).discardedBytes === tornBytes, "the torn tail was neither cut nor left intact");
        }
        continue;
      }
      // Not killed: the process ran to the end, which only happens when the run is complete.
      assert.equal(res.code, 0, `cycle ${cycle} (${cmd}) failed: ${res.stderr}`);
      assert.ok(fs.existsSync(path.join(dir, "results.json")), `cycle ${cycle}: exited 0 without results.json`);
      completedBy = res;
    }
    const ms = performance.now() - t0;

    console.log(`# kill points (seed ${SEED}; SELFSCOPE_KILL_SEED replays):`);
    console.log("# cycle  cmd     mode              lines before  killed at  process ms");
    for (const k of kills) console.log(`# ${String(k.cycle).padStart(5)}  ${k.cmd.padEnd(6)}  ${k.mode.padEnd(16)}  ${String(k.linesBefore).padStart(12)}  ${String(k.killedAtLines).padStart(9)}  ${String(k.ms).padStart(10)}`);
    console.log(`# ${kills.length} kills in ${cycle} cycles, ${(ms / 1000).toFixed(1)} s; killed before the header: ${sawNoHeader}`);
    assert.ok(kills.length >= 20, `only ${kills.length} kill points`);
    assert.ok(kills.filter((k) => k.cmd === "resume").length >= 10, "resume itself was killed too few times");
    assert.ok(kills.some((k) => k.killedAtLines > k.linesBefore), "no kill landed mid-sweep");

    // The completed run; stale locks of killed processes were taken over, the last one released.
    assert.ok(!fs.existsSync(path.join(dir, "run.lock")), "run.lock left behind by a completed run");
    const run = readRunLog(dir);
    assert.equal(run.discardedBytes, 0);
    assert.equal(run.header.plannedTrials, PLANNED);
    const plan = planTrials(run.header.config);
    const s = assertCompleteRun(run, plan, ["rule"]);
    assert.deepEqual(s.byKind, expectedCounts(run.header.config));
    const results = JSON.parse(fs.readFileSync(path.join(dir, "results.json"), "utf8")) as { n_trials: Record<string, number>; tpr: { n: number; unjudged: number }; fpr: { n: number }; forced_identification_rate: { n: number }; yes_bias_rate: { n: number } };
    assert.deepEqual(results.n_trials, { ...s.byKind, total: PLANNED });
    // The rates are one configuration's (the headline), never pooled over the sweep's configs.
    const c = run.header.config;
    const nConfigs = c.layers.length * c.strengths.length * c.variants.length;
    assert.equal(results.tpr.n + results.tpr.unjudged, s.byKind.injection / nConfigs);
    assert.equal(results.tpr.unjudged, 0);
    assert.equal(results.fpr.n, s.byKind.control / nConfigs);
    assert.equal(results.forced_identification_rate.n, s.byKind.forced / nConfigs);
    assert.equal(results.yes_bias_rate.n, s.byKind.yesbias / nConfigs);
    assert.match(fs.readFileSync(path.join(dir, "report.html"), "utf8"), /<svg/);

    // An uninterrupted run of the same config (other batch size): per-trial seeds make outputs equal.
    const ref = await runCli(["inject", ...SWEEP, "--batch-size", "8", "--out", refDir], { env });
    assert.equal(ref.code, 0, ref.stderr);
    const refRun = readRunLog(refDir);
    const a = outputsById(run.trials);
    const b = outputsById(refRun.trials);
    const differ = [...a].filter(([id, o]) => b.get(id) !== o).map(([id]) => id);
    console.log(`# outputs equal to the uninterrupted run: ${PLANNED - differ.length}/${PLANNED}${differ.length ? ` (differ: ${differ.slice(0, 5).join(", ")})` : ""}`);
    assert.ok(differ.length <= PLANNED / 10, `${differ.length} trials differ from the uninterrupted run: resume does not reproduce per-trial sampling`);
    for (const t of run.trials) {
      const r = refRun.trials.find((u) => u.id === t.id)!;
      assert.deepEqual({ prompt: t.prompt, injected: t.injected, seed: t.seed, judgePrompt: t.judgePrompt }, { prompt: r.prompt, injected: r.injected, seed: r.seed, judgePrompt: r.judgePrompt }, t.id);
    }
  });

  test("a torn last record is discarded by resume (discardedBytes > 0) and the run still completes", { timeout: 120_000 }, async () => {
    assert.ok(tornBytes > 0, "the kill test appended a torn record");
    // Cut the finished log back by a few records and tear the new last one; resume (CLI) must repair it.
    const lines = fs.readFileSync(log, "utf8").split("\n").filter(Boolean);
    const keep = lines.slice(0, lines.length - 10);
    const torn = lines[lines.length - 10]!.slice(0, 40);
    fs.writeFileSync(log, keep.join("\n") + "\n" + torn);
    fs.rmSync(path.join(dir, "results.json"));
    assert.equal(readRunLog(dir).discardedBytes, Buffer.byteLength(torn));
    const r = await runCli(["resume", dir, "--quiet"], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, new RegExp(`discarded a half-written last record \\(${Buffer.byteLength(torn)} bytes\\)`));
    const run = readRunLog(dir);
    assert.equal(run.discardedBytes, 0);
    assertCompleteRun(run, planTrials(run.header.config), ["rule"]);
    assert.ok(fs.existsSync(path.join(dir, "results.json")));
    // Same through the API: resume() reports the discarded bytes.
    const frag = '{"type":"judgment","trialId":"injection|orig';
    fs.appendFileSync(log, frag);
    const again = await resume(dir, { quiet: true, vectorCache: env.SELFSCOPE_CACHE });
    assert.equal(again.discardedBytes, Buffer.byteLength(frag));
    assert.equal(again.generated, 0);
    assert.equal(readRunLog(dir).discardedBytes, 0);
  });

  test("resuming a complete run generates nothing and appends nothing", { timeout: 60_000 }, async () => {
    const before = fs.readFileSync(log);
    const r = await runCli(["resume", dir, "--quiet"], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /resumed: 0 trials generated/);
    assert.ok(fs.readFileSync(log).equals(before), "the log changed");
  });

  test("a damaged line in the middle is an error naming the line; resume refuses and leaves the log untouched", { timeout: 60_000 }, async () => {
    const bad = path.join(tmpRoot, "damaged");
    fs.mkdirSync(bad);
    const lines = fs.readFileSync(log, "utf8").split("\n").filter(Boolean);
    lines[4] = lines[4]!.slice(0, 30); // line 5: truncated JSON, followed by complete records
    fs.writeFileSync(path.join(bad, LOG_FILE), lines.join("\n") + "\n");
    const before = fs.readFileSync(path.join(bad, LOG_FILE));
    assert.throws(() => readRunLog(bad), (e: unknown) => e instanceof RunLogError && /line 5 is damaged/.test(e.message));
    assert.throws(() => readRunLog(bad, { repair: true }), /line 5 is damaged/);
    // A record that parses but breaks the schema is damage too.
    const lines2 = [...lines];
    lines2[4] = JSON.stringify({ type: "trial", id: "x", kind: "weird" });
    fs.writeFileSync(path.join(bad, LOG_FILE), lines2.join("\n") + "\n");
    assert.throws(() => readRunLog(bad), /line 5 is damaged \(unknown kind weird\)/);
    fs.writeFileSync(path.join(bad, LOG_FILE), before);
    const r = await runCli(["resume", bad, "--quiet"], { env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /line 5 is damaged/);
    assert.ok(fs.readFileSync(path.join(bad, LOG_FILE)).equals(before), "resume modified a damaged log");
    // An invalid *last* line that ends in a newline is treated as a torn write (discarded), not as damage.
    fs.writeFileSync(path.join(bad, LOG_FILE), lines.slice(0, 3).join("\n") + "\n" + '{"type":"trial","id":\n');
    assert.equal(readRunLog(bad).discardedBytes, Buffer.byteLength('{"type":"trial","id":\n'));
  });

  // Regressions (found by this suite; fixed in acac7ef: run.lock, absolute model path).
  test("two resume processes on one run directory: the lock turns one away, no trial is recorded twice", { timeout: 120_000 }, async () => {
    const cc = path.join(tmpRoot, "concurrent");
    fs.mkdirSync(cc);
    const lines = fs.readFileSync(log, "utf8").split("\n").filter(Boolean);
    // All but the last 16 records (judgments included): 8 trials left to generate.
    fs.writeFileSync(path.join(cc, LOG_FILE), lines.slice(0, lines.length - 16).join("\n") + "\n");
    const [r1, r2] = await Promise.all([runCli(["resume", cc, "--quiet"], { env }), runCli(["resume", cc, "--quiet"], { env })]);
    const run = readRunLog(cc);
    assert.deepEqual(run.duplicateTrials, [], `${run.duplicateTrials.length} trials recorded twice`);
    assert.ok(r1.code === 0 || r2.code === 0, `${r1.stderr}\n${r2.stderr}`);
    for (const r of [r1, r2]) if (r.code !== 0) assert.match(r.stderr, /in use by another selfscope process \(pid \d+\)/);
    console.log(`# concurrent resumes: exit codes ${r1.code}, ${r2.code}`);
    assertCompleteRun(run, planTrials(run.header.config), ["rule"]);
    assert.ok(!fs.existsSync(path.join(cc, "run.lock")), "the lock is released");
  });

  test("a run started with a relative --model path resumes from another working directory", { timeout: 120_000 }, async () => {
    const rel = path.relative(repoDir(), STORIES);
    assert.ok(!path.isAbsolute(rel));
    const out = path.join(tmpRoot, "relative");
    const r = await runCli(["inject", "--model", rel, "--layers", "2", "--concepts", "1", "--trials", "1", "--controls", "1", "--judge", "rule", "--max-tokens", "2", "--out", out, "--quiet"], { env, cwd: repoDir() });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(readRunLog(out).header.model.path, STORIES);
    const again = await runCli(["resume", out, "--quiet"], { env, cwd: os.tmpdir() });
    assert.equal(again.code, 0, `resume from ${os.tmpdir()} failed: ${again.stderr.trim()}`);
  });
});

// ------------------------------------------------------------------------------------------------

describe("disk full (ENOSPC)", () => {
  const header = (): RunHeader => ({
    type: "header", schema: LOG_SCHEMA, version: LOG_VERSION, createdAt: new Date().toISOString(), tool: { name: "selfscope", version: "0" },
    model: { path: "m", hash: "h", family: "llama", nLayers: 1, dModel: 1, dtype: "F32", chatTemplate: false }, backend: { device: "wasm", adapter: "wasm" },
    config: JSON.parse("{}") as RunHeader["config"], plannedTrials: 0, command: [],
  });

  test("a real ENOSPC from the kernel (log.jsonl → /dev/full) is a SelfscopeError telling the user to free space and resume", (t) => {
    if (!fs.existsSync("/dev/full")) return t.skip("/dev/full not available");
    const dir = path.join(tmpRoot, "devfull");
    fs.mkdirSync(dir);
    fs.symlinkSync("/dev/full", path.join(dir, LOG_FILE));
    assert.throws(
      () => RunLogWriter.create(dir, header()),
      (e: unknown) => e instanceof SelfscopeError && /ENOSPC/.test(e.message) && /disk is full/.test(e.message) && /selfscope resume/.test(e.message),
    );
  });

  test("the disk fills mid-run (a record half-written, then ENOSPC): inject stops with the ENOSPC message, resume completes the run", { timeout: 180_000 }, async (t) => {
    if (!fs.existsSync("/proc/self/fd")) return t.skip("needs /proc/self/fd to tell the log's descriptor apart");
    const out = path.join(tmpRoot, "enospc");
    const args: InjectArgs = { model: STORIES, layers: "2", strengths: "4", concepts: "2", trials: 2, controls: 2, forced: true, judges: ["rule"], maxTokens: 4, seed: 5, batchSize: 4, out, vectorCache: env.SELFSCOPE_CACHE, quiet: true };
    const realWrite = fs.writeSync.bind(fs) as (fd: number, buf: Uint8Array, off: number, len: number) => number;
    let records = 0;
    let full = false;
    const FAIL_AT = 7; // the 7th record (a trial or judgment of the first batches) is torn
    const isLog = (fd: number) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`) === path.join(out, LOG_FILE);
      } catch {
        return false;
      }
    };
    const m = mock.method(fs, "writeSync", (...a: unknown[]) => {
      const [fd, buf, off, len] = a as [number, Uint8Array, number, number];
      if (typeof fd === "number" && buf instanceof Uint8Array && isLog(fd)) {
        if (full) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC", errno: -28, syscall: "write" });
        if (++records === FAIL_AT) {
          full = true;
          return realWrite(fd, buf, off, Math.floor(len / 2)); // a short write: the rest never lands
        }
      }
      return (realWrite as (...x: unknown[]) => number)(...a);
    });
    try {
      await assert.rejects(inject(args), (e: unknown) => e instanceof SelfscopeError && /could not write a record \(ENOSPC\).*disk is full.*selfscope resume/.test(e.message));
    } finally {
      m.mock.restore();
    }
    const partial = readRunLog(out);
    assert.ok(partial.discardedBytes > 0, "the half-written record is visible as a torn tail");
    assert.equal(partial.trials.length + partial.judgments.length, FAIL_AT - 2);
    const r = await resume(out, { quiet: true, vectorCache: env.SELFSCOPE_CACHE });
    assert.equal(r.discardedBytes, partial.discardedBytes);
    const run = readRunLog(out);
    assert.equal(run.discardedBytes, 0);
    const s = assertCompleteRun(run, planTrials(run.header.config), ["rule"]);
    assert.deepEqual(s.byKind, expectedCounts(run.header.config));
    assert.equal(r.generated, run.trials.length - partial.trials.length);
  });
});
