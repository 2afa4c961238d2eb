// A training run SIGKILLed mid-way (in a child process) and resumed with --resume reaches
// bit-identical parameters and the same loss curve as an uninterrupted run; a resume with other
// settings is refused. DPO (with its reference log-probs recomputed on resume) on stories260K,
// LoRA, batch 1 over two pairs so the data order changes every epoch, a concept injection in the plan.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { UsageError } from "../src/core/errors.js";
import { trainCommand, type TrainArgs } from "../src/cli/train.js";
import { openSafetensors, readStTensor } from "../src/io/safetensors.js";
import { CHECKPOINT_FILE, readCheckpoint } from "../src/train/loop.js";
import { repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const CHILD = path.join(path.dirname(fileURLToPath(import.meta.url)), "support", "train-child.js");

describe("kill and resume", () => {
  test("a SIGKILLed run resumes to bit-identical parameters", async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "train-resume-"));
    const data = path.join(tmp, "pairs.jsonl");
    fs.writeFileSync(
      data,
      [
        { prompt: "Once upon a time", chosen: " there was a dog.", rejected: " the sky fell.", plan: { inject: { concept: "ocean", layer: 2, strength: 3, from: "assistant" } } },
        { prompt: "Lily liked", chosen: " to play.", rejected: " a box of rocks." },
      ]
        .map((x) => JSON.stringify(x))
        .join("\n"),
    );
    const base = (out: string): TrainArgs => ({ model: STORIES, data, out, objective: "dpo", loraRank: 2, loraAlpha: 4, loraTargets: "attn.q,mlp.down", lr: 5e-3, warmup: 2, clip: 1, steps: 8, batch: 1, seed: 7, checkpointEvery: 3, threads: 1, vectorCache: path.join(tmp, "vectors"), quiet: true });
    const full = path.join(tmp, "full");
    const cut = path.join(tmp, "cut");
    const a = await trainCommand(base(full));
    assert.equal(a.step, 8);

    const r = spawnSync(process.execPath, [CHILD, JSON.stringify(base(cut)), "5"], { encoding: "utf8" });
    assert.equal(r.signal, "SIGKILL", `the child should die by SIGKILL (status ${r.status}, stderr ${r.stderr})`);
    assert.equal(readCheckpoint(path.join(cut, CHECKPOINT_FILE)).header.step, 3, "the last checkpoint before the kill");
    assert.equal(fs.readFileSync(path.join(cut, "loss.jsonl"), "utf8").trim().split("\n").length, 5, "steps 4-5 ran after it");
    assert.ok(!fs.existsSync(path.join(cut, "adapter.safetensors")));

    await assert.rejects(trainCommand(base(cut)), (e: Error) => e instanceof UsageError && /pass --resume/.test(e.message));
    await assert.rejects(trainCommand({ ...base(cut), beta: 0.3, resume: true }), (e: Error) => e instanceof UsageError && /config hash differs/.test(e.message));
    const b = await trainCommand({ ...base(cut), resume: true });
    assert.equal(b.resumedFrom, 3);

    const A = openSafetensors(path.join(full, "adapter.safetensors"));
    const B = openSafetensors(path.join(cut, "adapter.safetensors"));
    assert.deepEqual([...B.tensors.keys()].sort(), [...A.tensors.keys()].sort());
    let moved = false;
    for (const k of A.tensors.keys()) {
      const x = readStTensor(A, k).data, y = readStTensor(B, k).data;
      assert.deepEqual(Buffer.from(y.buffer, y.byteOffset, y.byteLength), Buffer.from(x.buffer, x.byteOffset, x.byteLength), `${k}: bit-identical`);
      if (k.endsWith("lora_B")) moved ||= x.some((v) => v !== 0);
    }
    assert.ok(moved, "training moved the LoRA B factors (a comparison of untouched zeros would be vacuous)");
    assert.equal(fs.readFileSync(path.join(cut, "loss.jsonl"), "utf8"), fs.readFileSync(path.join(full, "loss.jsonl"), "utf8"), "the same loss curve");
    const res = JSON.parse(fs.readFileSync(path.join(cut, "results.json"), "utf8")) as { stepsRun: number; resumedFrom: number; objective: string };
    assert.deepEqual([res.stepsRun, res.resumedFrom, res.objective], [8, 3, "dpo"]);
    const html = fs.readFileSync(path.join(cut, "report.html"), "utf8");
    assert.equal((/<polyline[^>]*points="([^"]*)"/.exec(html)?.[1] ?? "").split(" ").length, 8, "the loss curve has one point per step");
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test("--eval-every runs the held-out loss and the injection evaluation of a vector adapter (and of LoRA) into eval.jsonl", async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "train-eval-"));
    const data = path.join(tmp, "d.jsonl");
    fs.writeFileSync(data, [{ prompt: "Once upon a time", completion: " there was a dog." }, { prompt: "Lily liked", completion: " to play." }].map((x) => JSON.stringify(x)).join("\n"));
    const out = path.join(tmp, "o");
    await trainCommand({ model: STORIES, data, out, vectorAt: "blocks.2.hook_resid_post", steps: 4, batch: 2, evalEvery: 2, evalData: data, evalConcepts: "ocean,tree", evalLayers: "2", evalTrials: 1, maxTokens: 6, threads: 1, vectorCache: path.join(tmp, "vectors"), quiet: true });
    const lines = fs.readFileSync(path.join(out, "eval.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { step: number; evalLoss: number; injection: { n: number; tpr: number; fpr: number } });
    assert.deepEqual(lines.map((l) => l.step), [2, 4]);
    // Training on the eval data itself: its loss falls between the two evaluations.
    assert.ok(lines[1]!.evalLoss < lines[0]!.evalLoss, `${lines[0]!.evalLoss} → ${lines[1]!.evalLoss}`);
    for (const l of lines) assert.equal(l.injection.n, 2, "2 concepts × 1 layer × 1 strength × 1 trial");
    // A LoRA run is evaluated too: its params merged into a fresh load of the weights at each evaluation.
    const lo = path.join(tmp, "l");
    await trainCommand({ model: STORIES, data, out: lo, steps: 2, lr: 1e-2, evalEvery: 1, evalConcepts: "ocean", evalLayers: "2", evalTrials: 1, maxTokens: 4, threads: 1, vectorCache: null, quiet: true });
    const ll = fs.readFileSync(path.join(lo, "eval.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { step: number; injection: { n: number } });
    assert.deepEqual(ll.map((l) => [l.step, l.injection.n]), [[1, 1], [2, 1]]);
    fs.rmSync(tmp, { recursive: true, force: true });
  });
});
