// Full-parameter training end to end on the bundled stories260K: `selfscope train --full` (one additive
// delta per trainable weight, gradients from the engine's delta kind) lowers the SFT loss; the adapter
// file holds every delta; merged into the weights and exported (safetensors), the model reloads and
// its loss on the training data is the trained loss the params give through lossAndGrad.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { trainCommand } from "../src/cli/train.js";
import { trainableWeights } from "../src/engine/grad.js";
import { loadHostModel } from "../src/model/load.js";
import { exportMerged } from "../src/model/export.js";
import { Model } from "../src/model/model.js";
import { readAdapter } from "../src/train/adapter.js";
import { repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");

test("--full trains every weight, and the merged export reloads with the trained loss", async (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "train-full-"));
  const data = path.join(tmp, "sft.jsonl");
  const rows = [
    { prompt: "Once upon a time", completion: " there was a big red dog." },
    { prompt: "Lily liked", completion: " to play with her ball." },
  ];
  fs.writeFileSync(data, rows.map((x) => JSON.stringify(x)).join("\n"));
  const out = path.join(tmp, "run");
  const res = await trainCommand({ model: STORIES, data, out, objective: "sft", full: true, lr: 3e-3, steps: 12, batch: 2, seed: 3, threads: 1, vectorCache: null, quiet: true });
  const names = trainableWeights(loadHostModel(STORIES, undefined, { lazy: true })).map((w) => w.name);
  const written = readAdapter(path.join(out, "adapter.safetensors")).params;
  assert.deepEqual(written.map((p) => (p.kind === "delta" ? p.name : p.kind)), names, "one delta per trainable weight, in order");
  const first = res.curve[0]!.loss;
  const last = res.curve[res.curve.length - 1]!.loss;
  t.diagnostic(`full-parameter SFT loss ${first.toFixed(4)} → ${last.toFixed(4)} in 12 steps`);
  assert.ok(last < 0.6 * first, `loss ${first} → ${last}`);

  const model = await Model.load(STORIES, { threads: 1 });
  const ids = rows.map((r) => model.encode(r.prompt + r.completion).ids);
  const targets = ids.map((x) => x.map((_, i) => (i + 1 < x.length ? x[i + 1]! : -1)));
  const inMemory = await model.lossAndGrad(ids.map((x) => ({ ids: x })), { targets, params: written.map((p) => ({ ...p })) });
  const baseLoss = await model.lossAndGrad(ids.map((x) => ({ ids: x })), { targets, params: [] });
  model.dispose();
  const dir = path.join(tmp, "export");
  exportMerged(STORIES, written, dir, { format: "safetensors" });
  const back = await Model.load(dir, { threads: 1 });
  const reloaded = await back.lossAndGrad(ids.map((x) => ({ ids: x })), { targets, params: [] });
  back.dispose();
  t.diagnostic(`next-token loss: base ${baseLoss.loss.toFixed(5)}, trained in memory ${inMemory.loss.toFixed(5)}, exported ${reloaded.loss.toFixed(5)}`);
  // (This loss counts the prompt tokens too, which SFT does not train: it need not fall.)
  assert.ok(Math.abs(inMemory.loss - baseLoss.loss) > 0.05, "training changed the model");
  assert.ok(Math.abs(reloaded.loss - inMemory.loss) <= 1e-5 * Math.abs(inMemory.loss), `${reloaded.loss} vs ${inMemory.loss}`);
  fs.rmSync(tmp, { recursive: true, force: true });
});
