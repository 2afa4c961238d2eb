// Model.withPlan: a view of a model whose calls append a standing plan. The references are the
// model itself with the plan passed on each call, and the two Object.create wrappers withPlan
// replaced (refusal's withGlobalPlan, bias-vector's withBias), copied here verbatim as oracles:
// the view must give the same tokens and bit-identical logits, the same weights hash, and a run
// log whose header records the plan (payloads by sha256) while trials stay identical.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { UsageError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { buildConfig, runHeader } from "../src/eval/inject.js";
import { runSweep } from "../src/eval/run.js";
import { readRun } from "../src/eval/runlog.js";
import { hookName, type HookName } from "../src/hooks/names.js";
import type { Intervention, Plan } from "../src/hooks/plan.js";
import { RunLogWriter } from "../src/log/write.js";
import { Model } from "../src/model/model.js";
import { repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-standing-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

const bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const sha = (a: Float32Array) => createHash("sha256").update(bytes(a)).digest("hex");

function randVec(seed: number, n: number, scale: number): Float32Array {
  const rng = new Rng(seed);
  return Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * scale);
}

/** refusal.ts's wrapper before withPlan: generate() appends `extra`, forward() untouched. */
function oldWithGlobalPlan(model: Model, extra: Plan): Model {
  const wrapped = Object.create(model) as Model;
  const generate = model.generate.bind(model);
  wrapped.generate = (prompts, opts) => generate(prompts, { ...opts, plan: [...(opts.plan ?? []), ...extra] });
  return wrapped;
}

/** bias-vector.ts's wrapper before withPlan: both calls append the bias; the hash covers it. */
function oldWithBias(model: Model, at: HookName, vector: Float32Array): Model {
  const extra: Intervention = { op: "add", at, vector, pos: "all" };
  const w = Object.create(model) as Model;
  const hash = createHash("sha256").update(model.weightsHash()).update(at).update(bytes(vector)).digest("hex");
  Object.defineProperties(w, {
    generate: { value: (prompts: Parameters<Model["generate"]>[0], opts: Parameters<Model["generate"]>[1]) => model.generate(prompts, { ...opts, plan: [...(opts.plan ?? []), extra] }) },
    forward: { value: (prompts: Parameters<Model["forward"]>[0], opts: Parameters<Model["forward"]>[1] = {}) => model.forward(prompts, { ...opts, plan: [...(opts.plan ?? []), extra] }) },
    weightsHash: { value: () => hash },
    dispose: { value: () => undefined },
  });
  return w;
}

const equalF32 = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((x, i) => Object.is(x, b[i]));

describe("Model.withPlan", () => {
  let model: Model;
  before(async () => {
    model = await Model.load(STORIES, { device: "wasm" });
  });
  after(() => model?.dispose());

  const prompts = ["Once upon a time", "The little dog"];

  test("a bias view == the old withBias wrapper: forward logits bit for bit, generated tokens, weights hash", async () => {
    const at = hookName(2, "hook_mlp_out");
    const v = randVec(5, model.config.dModel, 0.7);
    const view = model.withPlan([{ op: "add", at, vector: v, pos: "all" }]);
    const old = oldWithBias(model, at, v);
    const [fv, fo, plain] = [await view.forward(prompts, { logits: "last" }), await old.forward(prompts, { logits: "last" }), await model.forward(prompts, { logits: "last" })];
    fv.logits.forEach((l, b) => assert.ok(equalF32(l, fo.logits[b]!), `row ${b}: logits differ from the old wrapper's`));
    assert.ok(!equalF32(fv.logits[0]!, plain.logits[0]!), "the bias changes the logits");
    // A call's own plan comes first, the standing plan after it (as both wrappers did).
    const own: Plan = [{ op: "add", at: hookName(1, "hook_resid_post"), vector: randVec(6, model.config.dModel, 2), pos: "all", rows: [1] }];
    const gv = await view.generate(prompts, { maxTokens: 6, temperature: 0, plan: own });
    const go = await old.generate(prompts, { maxTokens: 6, temperature: 0, plan: own });
    assert.deepEqual(gv.tokens, go.tokens);
    assert.deepEqual(gv.texts, go.texts);
    assert.equal(view.weightsHash(), old.weightsHash());
    assert.notEqual(view.weightsHash(), model.weightsHash());
    assert.equal(view.identity().weights, view.weightsHash(), "the concept-vector cache key covers the bias");
    assert.deepEqual(view.standingPlans(), [{ plan: [{ op: "add", at, vector: v, pos: "all" }], forward: true }]);
    assert.deepEqual(model.standingPlans(), []);
  });

  test("a generate-only view == the old withGlobalPlan wrapper: forward untouched, same hash; the standing projection acts after the call's injection at the same site", async () => {
    const D = model.config.dModel;
    const dir = randVec(7, D, 1);
    const extra: Plan = [2, 3].map((l) => ({ op: "project" as const, at: hookName(l, "hook_resid_post"), direction: dir, pos: "all" as const }));
    const view = model.withPlan(extra, { forward: false });
    const old = oldWithGlobalPlan(model, extra);
    // An injection at a site the standing plan also projects: order decides whether the projection removes part of it.
    const inject: Plan = [{ op: "add", at: hookName(2, "hook_resid_post"), vector: dir, scale: 6, pos: "all" }];
    const gv = await view.generate(prompts, { maxTokens: 8, temperature: 0, plan: inject });
    const go = await old.generate(prompts, { maxTokens: 8, temperature: 0, plan: inject });
    const appended = await model.generate(prompts, { maxTokens: 8, temperature: 0, plan: [...inject, ...extra] });
    assert.deepEqual(gv.tokens, go.tokens);
    assert.deepEqual(gv.tokens, appended.tokens);
    const fv = await view.forward(prompts, { logits: "last", plan: inject });
    const fm = await model.forward(prompts, { logits: "last", plan: inject });
    fv.logits.forEach((l, b) => assert.ok(equalF32(l, fm.logits[b]!), `row ${b}: forward must not see the standing plan`));
    assert.equal(view.weightsHash(), model.weightsHash(), "forward is unchanged, so is the cache key");
    // The order is observable: the prepended plan differs from the appended one here.
    const fa = await model.forward(prompts, { logits: "last", plan: [...inject, ...extra] });
    const fp = await model.forward(prompts, { logits: "last", plan: [...extra, ...inject] });
    assert.ok(!equalF32(fa.logits[0]!, fp.logits[0]!), "appending and prepending differ at a shared site, so the test above can tell them apart");
  });

  test("views nest (inner plan first), share the engine and own nothing: disposing one leaves the model working", async () => {
    const a = randVec(8, model.config.dModel, 0.5);
    const b = randVec(9, model.config.dModel, 0.5);
    const outer = model.withPlan([{ op: "add", at: hookName(1, "hook_mlp_out"), vector: a }]);
    const inner = outer.withPlan([{ op: "add", at: hookName(1, "hook_mlp_out"), vector: b }], { forward: false });
    assert.equal(inner.engine, model.engine);
    assert.deepEqual(inner.standingPlans().map((s) => s.forward), [false, true]);
    const g = await inner.generate(prompts, { maxTokens: 5, temperature: 0 });
    const want = await model.generate(prompts, { maxTokens: 5, temperature: 0, plan: [{ op: "add", at: hookName(1, "hook_mlp_out"), vector: b }, { op: "add", at: hookName(1, "hook_mlp_out"), vector: a }] });
    assert.deepEqual(g.tokens, want.tokens);
    const f = await inner.forward(prompts, { logits: "last" });
    const fo = await outer.forward(prompts, { logits: "last" });
    assert.ok(equalF32(f.logits[0]!, fo.logits[0]!), "the inner generate-only plan does not reach forward");
    inner.dispose();
    outer.dispose();
    assert.equal((await model.forward(["x"], { logits: "last" })).logits.length, 1);
  });

  test("a run on a view records its standing plan in the header; trials equal the old wrapper's run; resuming under another plan is refused", async () => {
    const cfg = buildConfig({ model: STORIES, layers: "2", strengths: "4", concepts: "2", trials: 2, controls: 2, judges: ["rule"], maxTokens: 4, batchSize: 4, seed: 5 }, model.config.nLayers, model.chatTemplate !== undefined);
    const at = hookName(3, "hook_mlp_out");
    const v = randVec(10, model.config.dModel, 0.6);
    const dir = randVec(11, model.config.dModel, 1);
    const ablation: Plan = [{ op: "project", at: hookName(2, "hook_resid_post"), direction: dir, scale: 0.5, pos: "all", rows: [0, 1] }];
    const sweep = async (m: Model, name: string) => {
      const out = path.join(tmpRoot, name);
      const log = RunLogWriter.create(out, runHeader(m, STORIES, cfg, ["test"]));
      try {
        await runSweep(m, cfg, log, null, { judges: [], vectorCache: null });
      } finally {
        log.close();
      }
      return readRun(out);
    };
    // The bias view over the ablation view: generate() appends the bias, then the ablation, as the old wrappers nested this way did.
    const view = model.withPlan(ablation, { forward: false }).withPlan([{ op: "add", at, vector: v, pos: "all" }]);
    const oldModel = oldWithBias(oldWithGlobalPlan(model, ablation), at, v);
    const nv = await sweep(view, "view");
    const no = await sweep(oldModel, "old");
    assert.deepEqual(nv.header.standingPlan, [
      { op: "add", at, pos: "all", rows: null, scale: null, sha256: sha(v), forward: true },
      { op: "project", at: hookName(2, "hook_resid_post"), pos: "all", rows: [0, 1], scale: 0.5, sha256: sha(dir), forward: false },
    ]);
    assert.equal(no.header.standingPlan, undefined, "the old wrappers recorded nothing");
    assert.equal(nv.header.model.hash, no.header.model.hash);
    const strip = (ts: typeof nv.trials) => ts.map(({ ms: _ms, ...t }) => t);
    assert.equal(nv.trials.length, nv.header.plannedTrials);
    assert.deepEqual(strip(nv.trials), strip(no.trials));
    assert.equal((await sweep(model, "plain")).header.standingPlan, undefined, "no standing plan, no field");

    // Continue the view's run: same plan passes; another plan (or none) is refused.
    const reopen = async (m: Model) => {
      const prior = readRun(path.join(tmpRoot, "view"));
      const log = RunLogWriter.reopen(prior.dir);
      try {
        return await runSweep(m, cfg, log, prior, { judges: [], vectorCache: null });
      } finally {
        log.close();
      }
    };
    assert.equal((await reopen(view)).generated, 0);
    await assert.rejects(reopen(model), (e: unknown) => e instanceof UsageError && /another standing plan/.test((e as Error).message));
    await assert.rejects(reopen(model.withPlan(ablation, { forward: false }).withPlan([{ op: "add", at, vector: randVec(12, model.config.dModel, 0.6), pos: "all" }])), UsageError);
    // A log from before the field (the old wrappers' run) still reads and continues.
    const prior = readRun(path.join(tmpRoot, "old"));
    const log = RunLogWriter.reopen(prior.dir);
    try {
      assert.equal((await runSweep(view, cfg, log, prior, { judges: [], vectorCache: null })).generated, 0);
    } finally {
      log.close();
    }
  });
});
