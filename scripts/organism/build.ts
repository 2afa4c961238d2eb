// Builds the shipped model organism from stories260K, deterministically (seeded data; the CPU
// kernels give bitwise-identical results for any thread count: 20 steps with a restart on 1 and 2
// threads wrote the same bytes): models/organism/MODEL_CARD.md.
//   1. vocab.js: the base — stories260K with 614 whole-word tokens (base.gguf, its training words
//      and held-out list);
//   2. train.js, stage 1: 3,000 steps, strengths 2-6, mix 0.4 controls / 0.3 forced, lr 1e-2,
//      warm restarts every 500 steps;
//   3. train.js, stage 2 on stage 1's model: 1,000 steps, mix 0.2 / 0.6 (more forced answers),
//      lr 3e-3 with a cosine decay.
// The shipped organism was trained on 1 thread of a loaded 2-core machine (stage 1: 5,413 s, stage 2:
// 2,232 s); on 2 quiet threads a step takes ~1.0 s (60 steps timed), so ~70 min for the 4,000 steps.
//
//   node dist/scripts/organism/build.js [--work DIR] [--out-dir models/organism] [--threads 2]
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const flag = (n: string) => {
  const i = args.indexOf(n);
  return i >= 0 ? args[i + 1] : undefined;
};
const work = flag("--work") ?? fs.mkdtempSync(path.join(os.tmpdir(), "organism-build-"));
const outDir = flag("--out-dir") ?? "models/organism";
fs.mkdirSync(work, { recursive: true });

function run(script: string, argv: string[]): void {
  process.stderr.write(`organism build: node ${script} ${argv.join(" ")}\n`);
  const r = spawnSync(process.execPath, [path.join(here, script), ...argv], { stdio: "inherit" });
  if (r.status !== 0) throw new Error(`${script} exited with ${r.status ?? r.signal}`);
}

const base = path.join(work, "base.gguf");
const words = `${base}.train.txt`;
const heldout = `${base}.heldout.json`;
const threads = flag("--threads") ?? "2";
const common = ["--words", words, "--heldout", heldout, "--strengths", "2,3,4,5,6", "--threads", threads, "--seed", "1", "--batch", "8"];
run("vocab.js", ["--out", base]);
run("train.js", ["--base", base, ...common, "--steps", "3000", "--mix", "0.4,0.3", "--lr", "1e-2", "--restart-every", "500", "--out", path.join(work, "stage1.gguf")]);
run("train.js", ["--base", path.join(work, "stage1.gguf"), ...common, "--steps", "1000", "--mix", "0.2,0.6", "--lr", "3e-3", "--schedule", "cosine", "--out", path.join(work, "organism.gguf")]);

fs.mkdirSync(outDir, { recursive: true });
for (const [from, to] of [[base, "base.gguf"], [path.join(work, "organism.gguf"), "organism.gguf"], [heldout, "heldout.json"], [words, "train-words.txt"]] as const) {
  fs.copyFileSync(from, path.join(outDir, to));
  process.stdout.write(`${createHash("sha256").update(fs.readFileSync(from)).digest("hex")}  ${path.join(outDir, to)}\n`);
}
