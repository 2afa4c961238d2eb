// The concept-injection harness end to end on the bundled stories260K: inject() → concept vectors →
// trials → rule judge → metrics → report, checked against the run log; injection positions checked
// through the engine's own hooks (forward and KV-cached generation); concept vectors recomputed
// independently; the vector cache; every prompt variant; yes-bias controls; the CLI demo.
// stories260K has no chat template (the protocol's fallback prompt, ~370 tokens with its tiny
// vocabulary), so sweeps here are kept small. wasm backend only.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { UsageError } from "../src/core/errors.js";
import { buildConfig, type InjectArgs } from "../src/eval/inject.js";
import { inject } from "../src/recipes/inject.js";
import { computeResults } from "../src/eval/metrics.js";
import { planTrials, yesBiasQuestions } from "../src/eval/plan.js";
import { FORCED_PREFILL, getVariant, readData, renderTrial, variants } from "../src/eval/protocol.js";
import { judgeTrials } from "../src/eval/run.js";
import { hookName } from "../src/hooks/names.js";
import type { Intervention } from "../src/hooks/plan.js";
import type { Judge, JudgeRequest, JudgeResult } from "../src/judge/judge.js";
import { readRunLog, type RunData } from "../src/log/read.js";
import { LOG_SCHEMA, LOG_VERSION, type RunHeader, type TrialRecord } from "../src/log/schema.js";
import { RunLogWriter } from "../src/log/write.js";
import { Model } from "../src/model/model.js";
import { conceptVectors } from "../src/vectors/extract.js";
import { maxAbsDiff } from "./support/compare.js";
import { fixture, repoDir } from "./support/paths.js";
import { assertCompleteRun, expectedCounts, runCli } from "./support/runlog-checks.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const GPT2 = fixture("tiny-random-gpt2");
const RATE_KEYS = ["tpr", "fpr", "introspection_rate", "forced_identification_rate"] as const;
/** Positions that must not change: the same float32 computation, so exactly equal in practice. */
const SAME = 1e-6;
/** Added vector vs strength·vector, and KV-cached vs full-forward activations. */
const ADD_TOL = 1e-4;

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-harness-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

let model: Model;
before(async () => {
  model = await Model.load(STORIES, { device: "wasm" });
});
after(() => model?.dispose());

/** The protocol's start position, computed from the rendered text alone (§2.2). */
function protocolFrom(m: Model, text: string, n: number): number {
  const i = text.indexOf(`Trial ${n}`);
  assert.ok(i >= 0, `no "Trial ${n}" in the prompt`);
  return m.tokenizer!.encode(text.slice(0, i), { addSpecial: false }).length - 1;
}

// ------------------------------------------------------------------------------------------------

describe("inject() end to end on stories260K (rule judge)", () => {
  const out = path.join(tmpRoot, "e2e");
  const args: InjectArgs = {
    model: STORIES,
    layers: "2",
    strengths: "4,8",
    concepts: "2",
    trials: 2,
    controls: 2,
    forced: true,
    yesBias: 1,
    judges: ["rule"],
    maxTokens: 8,
    temperature: 1,
    seed: 7,
    batchSize: 8,
    out,
    vectorCache: null,
    quiet: true,
    command: ["test"],
  };
  let run: RunData;
  let resultsFile: Record<string, unknown>;
  let ms = 0;

  before(async () => {
    const t0 = performance.now();
    const r = await inject(args);
    ms = performance.now() - t0;
    assert.equal(r.runDir, out);
    run = readRunLog(out);
    resultsFile = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as Record<string, unknown>;
  });

  test("the log reads back clean: no torn tail, no duplicate trials", () => {
    console.log(`# inject(): ${run.trials.length} trials in ${(ms / 1000).toFixed(1)} s`);
    assert.equal(run.discardedBytes, 0);
    assert.deepEqual(run.duplicateTrials, []);
  });

  test("header: schema, version, tool, model hash and the config buildConfig makes", () => {
    const h = run.header;
    assert.equal(h.type, "header");
    assert.equal(h.schema, LOG_SCHEMA);
    assert.equal(h.version, LOG_VERSION);
    assert.equal(h.tool.name, "selfscope");
    assert.match(h.tool.version, /^\d+\.\d+\.\d+/);
    assert.ok(!Number.isNaN(Date.parse(h.createdAt)));
    assert.equal(h.model.hash, model.weightsHash());
    assert.equal(h.model.path, STORIES, "absolute model path (resume works from any directory)");
    assert.match(h.model.hash, /^[0-9a-f]{64}$/); // sha256 of every weight byte (test/identity.test.ts)
    assert.deepEqual(h.model.identity, { tokenizer: model.identity().tokenizer, chatTemplate: null, config: model.identity().config });
    assert.deepEqual(
      { family: h.model.family, nLayers: h.model.nLayers, dModel: h.model.dModel, chatTemplate: h.model.chatTemplate },
      { family: "llama", nLayers: model.config.nLayers, dModel: model.config.dModel, chatTemplate: false },
    );
    assert.equal(h.backend.device, "cpu"); // the default device
    assert.deepEqual(h.config, buildConfig(args, model.config.nLayers, false), "stories260K has no chat template");
    assert.deepEqual(h.config.layers, [2]);
    assert.deepEqual(h.config.strengths, [4, 8]);
    assert.deepEqual(h.config.judges, ["rule"]);
    assert.equal(h.plannedTrials, planTrials(h.config).length);
    assert.deepEqual(h.command, ["test"]);
  });

  test("every planned trial is recorded exactly once, with the counts the config implies", () => {
    const plan = planTrials(run.header.config);
    const s = assertCompleteRun(run, plan, ["rule"]);
    const want = expectedCounts(run.header.config);
    assert.deepEqual(s.byKind, want);
    assert.deepEqual(want, { injection: 8, forced: 8, yesbias: 4, control: 4 });
    // Record order follows the plan (one batch after another).
    assert.deepEqual(run.trials.map((t) => t.id), plan.map((t) => t.id));
    for (const t of run.trials) {
      assert.ok(t.outputTokens >= 1 && t.outputTokens <= 8, `${t.id}: ${t.outputTokens} output tokens`);
      assert.ok(t.stopReason === "stop" || t.stopReason === "length");
      assert.ok(Array.isArray(t.flags));
    }
  });

  test("judgments: exactly the needed criteria per trial; identification only after detection YES", () => {
    const s = assertCompleteRun(run, planTrials(run.header.config), ["rule"]);
    for (const j of run.judgments) {
      assert.equal(j.judge, "rule");
      assert.equal(j.approximate, true);
      assert.ok(j.verdict === "YES" || j.verdict === "NO", `rule judge left ${j.trialId} unjudged: ${j.error}`);
    }
    const det = new Map(run.judgments.filter((j) => j.criterion === "detection").map((j) => [j.trialId, j.verdict]));
    const yes = run.trials.filter((t) => t.kind === "injection" && det.get(t.id) === "YES").length;
    assert.equal(s.identifications, yes);
    console.log(`# ${run.judgments.length} judgments; detection YES on ${yes} injection trials`);
  });

  test("yes-bias controls: one per concept and config, asking a protocol question, judged with yes_answer only", () => {
    const qs = new Set(yesBiasQuestions());
    const yb = run.trials.filter((t) => t.kind === "yesbias");
    assert.equal(yb.length, 4);
    for (const t of yb) {
      assert.ok(t.question && qs.has(t.question), `${t.id}: question ${t.question}`);
      assert.ok(t.prompt.includes(`Trial ${t.trialNumber}: ${t.question}`), `${t.id}: the question is not in the trial slot`);
      assert.ok(t.injected !== null, "yes-bias trials are injected");
      const crit = run.judgments.filter((j) => j.trialId === t.id).map((j) => j.criterion);
      assert.deepEqual(crit, ["yes_answer"]);
    }
  });

  test("injected.from is the protocol position, recomputed with the tokenizer; controls are not injected", () => {
    const tok = model.tokenizer!;
    for (const t of run.trials) {
      const ids = tok.encode(t.prompt, { addSpecial: false });
      assert.equal(ids[0], tok.bos, `${t.id}: the fallback prompt starts with BOS as text`);
      if (t.kind === "control") {
        assert.equal(t.injected, null, `${t.id}: a control must not be injected`);
        continue;
      }
      assert.ok(t.injected, `${t.id}: injected missing`);
      assert.equal(t.injected.from, protocolFrom(model, t.prompt, t.trialNumber), `${t.id}: injected.from`);
      assert.equal(t.injected.to, null, "through generation");
      assert.equal(t.injected.promptTokens, ids.length);
      assert.ok(t.injected.from > 0 && t.injected.from < ids.length);
    }
    // The start does not depend on the trial kind: forced and yes-bias prompts start where the injection prompt of the same n does.
    const inj = new Map(run.trials.filter((t) => t.kind === "injection").map((t) => [t.trialNumber, t.injected!.from]));
    for (const t of run.trials) if (t.kind !== "control" && inj.has(t.trialNumber)) assert.equal(t.injected!.from, inj.get(t.trialNumber));
  });

  test("forced trials: prompt ends with the prefill, output (what is judged) does not contain it", () => {
    const forced = run.trials.filter((t) => t.kind === "forced");
    assert.equal(forced.length, 8);
    assert.equal(FORCED_PREFILL, "Yes, I detect an injected thought. The thought is about");
    for (const t of forced) {
      assert.ok(t.prompt.endsWith(FORCED_PREFILL), `${t.id}: prompt does not end with the prefill`);
      assert.equal(t.prefill, FORCED_PREFILL);
      assert.ok(!t.output.includes(FORCED_PREFILL), `${t.id}: output contains the prefill: ${t.output}`);
      assert.ok(!t.output.startsWith("Yes, I detect"), `${t.id}: output starts with the prefill`);
      // The unforced twin of this trial has the same prompt minus the prefill.
      const twin = run.trials.find((u) => u.id === t.id.replace(/^forced\|/, "injection|"))!;
      assert.equal(t.prompt, twin.prompt + FORCED_PREFILL);
    }
    for (const t of run.trials) if (t.kind !== "forced") assert.equal(t.prefill, null);
  });

  test("results.json: contract keys, counts matching the log, equal to a recomputation; report.html has an <svg>", () => {
    for (const k of RATE_KEYS) {
      const r = resultsFile[k] as Record<string, unknown>;
      assert.ok(r && typeof r === "object", `results.${k} missing`);
      for (const f of ["estimate", "lo", "hi", "n"]) assert.ok(f in r, `results.${k}.${f} missing`);
      assert.equal(typeof r.n, "number");
      if (r.estimate !== null) assert.ok((r.lo as number) <= (r.estimate as number) && (r.estimate as number) <= (r.hi as number));
    }
    assert.ok("discrimination_p_value" in resultsFile);
    const p = resultsFile.discrimination_p_value;
    assert.ok(p === null || (typeof p === "number" && p >= 0 && p <= 1));
    // n_trials counts the whole log; the rates are the headline configuration's (one of the two strengths).
    assert.deepEqual(resultsFile.n_trials, { injection: 8, control: 4, forced: 8, yesbias: 4, total: 24 });
    const headline = resultsFile.headline as { layer: number; strength: number; variant: string };
    assert.equal(headline.layer, 2);
    assert.ok([4, 8].includes(headline.strength));
    assert.equal((resultsFile.tpr as { n: number }).n, 4);
    assert.equal((resultsFile.fpr as { n: number }).n, 2);
    assert.equal((resultsFile.forced_identification_rate as { n: number }).n, 4);
    assert.equal(resultsFile.judge, "rule");
    assert.equal(resultsFile.judge_approximate, true);
    assert.deepEqual(JSON.parse(JSON.stringify(computeResults(run))), resultsFile);
    const html = fs.readFileSync(path.join(out, "report.html"), "utf8");
    assert.match(html, /<svg/);
  });
});

// ------------------------------------------------------------------------------------------------

describe("injection positions through the engine's hooks (stories260K, layer 2)", () => {
  const L = 2;
  const alpha = 8;
  const at = hookName(L, "hook_resid_post");
  const next = hookName(L + 1, "hook_resid_post");
  let vec: Float32Array;
  before(async () => {
    const baseline = readData<{ words: string[] }>("protocol/baseline_words.json").words;
    vec = (await conceptVectors(model, { concepts: ["Dust"], baselineWords: baseline, layers: [L], cacheDir: null })).vectors.get(L)!.get("Dust")!;
  });

  /** The plan runSweep builds for a batch: one add per non-control row, from its injectFrom. */
  const runnerPlan = (rows: { injectFrom: number }[], injected: number[]): Intervention[] =>
    injected.map((b) => ({ op: "add", at, vector: vec, scale: alpha, pos: { from: rows[b]!.injectFrom }, rows: [b] }));

  function checkRow(what: string, steered: Float32Array, plain: Float32Array, from: number | null): void {
    const D = model.config.dModel;
    const T = plain.length / D;
    assert.equal(steered.length, plain.length, `${what}: lengths`);
    for (let t = 0; t < T; t++) {
      const s = steered.subarray(t * D, (t + 1) * D);
      const p = plain.subarray(t * D, (t + 1) * D);
      if (from === null || t < from) {
        assert.ok(maxAbsDiff(s, p) <= SAME, `${what}: position ${t} (before ${from ?? "∞"}) changed by ${maxAbsDiff(s, p)}`);
      } else {
        const expect = Float32Array.from(p, (x, i) => x + alpha * vec[i]!);
        assert.ok(maxAbsDiff(s, expect) <= ADD_TOL, `${what}: position ${t} (>= ${from}) differs from plain + ${alpha}·v by ${maxAbsDiff(s, expect)}`);
      }
    }
  }

  test("forward: resid_post changes by exactly strength·vector at every position >= injectFrom and nowhere before", async () => {
    const v = getVariant("original");
    // A ragged batch as the runner builds it: injection (Trial 10, one token longer), forced, control.
    const rows = [renderTrial(model, v, 10), renderTrial(model, v, 3, { prefill: FORCED_PREFILL }), renderTrial(model, v, 5)];
    for (const [i, r] of rows.entries()) assert.equal(r.injectFrom, protocolFrom(model, r.text, [10, 3, 5][i]!));
    const read: Intervention[] = [{ op: "read", at }, { op: "read", at: next }];
    const prompts = rows.map((r) => ({ ids: r.ids }));
    const plain = await model.forward(prompts, { plan: read, logits: "none" });
    const steered = await model.forward(prompts, { plan: [...runnerPlan(rows, [0, 1]), ...read], logits: "none" });
    let norm = 0;
    for (const x of vec) norm += alpha * alpha * x * x;
    assert.ok(Math.sqrt(norm) > 100 * ADD_TOL, "the added vector is far larger than the tolerance");
    checkRow("injection row", steered.cache.get(at, 0).data, plain.cache.get(at, 0).data, rows[0]!.injectFrom);
    checkRow("forced row", steered.cache.get(at, 1).data, plain.cache.get(at, 1).data, rows[1]!.injectFrom);
    checkRow("control row", steered.cache.get(at, 2).data, plain.cache.get(at, 2).data, null);
    // The next layer sees the injection from injectFrom on, and nothing before it.
    const D = model.config.dModel;
    const a = steered.cache.get(next, 0).data;
    const b = plain.cache.get(next, 0).data;
    const f = rows[0]!.injectFrom;
    assert.ok(maxAbsDiff(a.subarray(0, f * D), b.subarray(0, f * D)) <= SAME);
    assert.ok(maxAbsDiff(a.subarray(f * D), b.subarray(f * D)) > 1e-2, "layer L+1 does not see the injection");
  });

  test("generate: steered greedy tokens differ, and reads during generation show strength·vector at every generated position", async () => {
    const v = getVariant("original");
    const rows = [renderTrial(model, v, 4), renderTrial(model, v, 10)];
    const N = 8;
    const gen = (plan: Intervention[]) => model.generate(rows.map((r) => ({ ids: r.ids })), { maxTokens: N, temperature: 0, stop: [], plan });
    const plain = await gen([]);
    const steered = await gen([...runnerPlan(rows, [0]), { op: "read", at }]);
    assert.notDeepEqual(steered.tokens[0], plain.tokens[0], "steering did not change the greedy continuation");
    assert.deepEqual(steered.tokens[1], plain.tokens[1], "the unsteered row of the batch changed");
    console.log(`# greedy: plain ${JSON.stringify(plain.texts[0])} | steered ${JSON.stringify(steered.texts[0])}`);
    for (const b of [0, 1]) {
      const toks = steered.tokens[b]!;
      assert.equal(toks.length, N);
      const cached = steered.cache.get(at, b);
      // Prompt positions plus every generated token fed back (the last sampled one is never fed).
      assert.equal(cached.shape[0], rows[b]!.ids.length + N - 1);
      // Unsteered full forward over the same token sequence: layer L's output before the add.
      const ref = await model.forward([{ ids: [...rows[b]!.ids, ...toks.slice(0, -1)] }], { plan: [{ op: "read", at }], logits: "none" });
      const D = model.config.dModel;
      const T = cached.shape[0]!;
      const from = b === 0 ? rows[0]!.injectFrom : Infinity;
      for (let t = 0; t < T; t++) {
        const s = cached.data.subarray(t * D, (t + 1) * D);
        const p = ref.cache.get(at, 0).data.subarray(t * D, (t + 1) * D);
        const expect = t >= from ? Float32Array.from(p, (x, i) => x + alpha * vec[i]!) : p;
        const d = maxAbsDiff(s, expect);
        assert.ok(d <= ADD_TOL, `row ${b} position ${t}${t >= rows[b]!.ids.length ? " (generated)" : ""}: ${t >= from ? "not plain + strength·v" : "changed"} (|Δ| ${d})`);
      }
    }
  });
});

// ------------------------------------------------------------------------------------------------

describe("concept vectors", () => {
  const concepts = ["Dust", "Satellites"];
  // A duplicated baseline word counts twice, as in the protocol's list ("Butterflies").
  const baseline = ["Desks", "Jackets", "Butterflies", "Laughter", "Fog", "Butterflies"];
  const layers = [1, 3];

  test("v = h(concept) − mean h(baseline), recomputed one prompt at a time with forward reads (1e-5)", async () => {
    const got = await conceptVectors(model, { concepts, baselineWords: baseline, layers, cacheDir: null, batchSize: 4 });
    assert.equal(got.dir, null);
    assert.equal(got.computed, concepts.length * layers.length);
    const D = model.config.dModel;
    const last = async (word: string) => {
      // Protocol §1.1 fallback prompt for a tokenizer without a chat template, BOS added.
      const { cache } = await model.forward([`User: Tell me about ${word}\n\nAssistant:`], { plan: layers.map((l) => ({ op: "read" as const, at: hookName(l, "hook_resid_post") })), logits: "none" });
      return new Map(layers.map((l) => {
        const { data, shape } = cache.get(hookName(l, "hook_resid_post"), 0);
        return [l, data.slice((shape[0]! - 1) * D, shape[0]! * D)];
      }));
    };
    const mean = new Map(layers.map((l) => [l, new Float64Array(D)]));
    for (const w of baseline) {
      const h = await last(w);
      for (const l of layers) for (let i = 0; i < D; i++) mean.get(l)![i]! += h.get(l)![i]! / baseline.length;
    }
    for (const c of concepts) {
      const h = await last(c);
      for (const l of layers) {
        const want = Float64Array.from(h.get(l)!, (x, i) => x - mean.get(l)![i]!);
        const v = got.vectors.get(l)!.get(c)!;
        assert.equal(v.length, D);
        const d = maxAbsDiff(v, want);
        assert.ok(d <= 1e-5, `${c} at layer ${l}: |Δ| ${d}`);
        assert.ok(Math.max(...want.map(Math.abs)) > 1e-2, "non-trivial vector");
      }
    }
  });

  test("the cache reuses vectors on a second call (reused > 0, computed 0), keyed by the model hash", async () => {
    const dir = path.join(tmpRoot, "vec-cache");
    const opts = { concepts, baselineWords: baseline, layers, cacheDir: dir, batchSize: 4 };
    const first = await conceptVectors(model, opts);
    assert.deepEqual({ reused: first.reused, computed: first.computed }, { reused: 0, computed: 4 });
    assert.ok(first.dir && first.dir.startsWith(path.join(dir, model.weightsHash()) + path.sep), `cache dir ${first.dir} is not under the model hash`);
    const second = await conceptVectors(model, opts);
    assert.deepEqual({ reused: second.reused, computed: second.computed }, { reused: 4, computed: 0 });
    assert.equal(second.dir, first.dir);
    for (const l of layers) for (const c of concepts) assert.deepEqual(second.vectors.get(l)!.get(c), first.vectors.get(l)!.get(c));
    // A new concept is computed; the cached ones are still reused.
    const third = await conceptVectors(model, { ...opts, concepts: [...concepts, "Rivers"] });
    assert.deepEqual({ reused: third.reused, computed: third.computed }, { reused: 4, computed: 2 });
    // Another baseline is another key.
    const fourth = await conceptVectors(model, { ...opts, baselineWords: baseline.slice(0, 3) });
    assert.equal(fourth.reused, 0);
    assert.notEqual(fourth.dir, first.dir);
    // Another model (other hash) never reuses this model's vectors.
    const gpt2 = await Model.load(GPT2, { device: "wasm" });
    try {
      assert.notEqual(gpt2.weightsHash(), model.weightsHash());
      const other = await conceptVectors(gpt2, { ...opts, layers: [1] });
      assert.deepEqual({ reused: other.reused, computed: other.computed }, { reused: 0, computed: 2 });
      assert.ok(other.dir!.startsWith(path.join(dir, gpt2.weightsHash())));
      assert.equal(other.vectors.get(1)!.get("Dust")!.length, gpt2.config.dModel);
    } finally {
      gpt2.dispose();
    }
  });
});

// ------------------------------------------------------------------------------------------------

describe("prompt variants", () => {
  const ids = () => [
    ...readData<{ variants: { id: string }[] }>("protocol/prompt_variants.json").variants.map((v) => v.id),
    ...readData<{ variants: { id: string }[] }>("protocol/persona_variants.json").variants.map((v) => v.id),
    "lindsey2025",
  ];

  test("every variant in data/protocol renders for stories260K and tiny-random-gpt2 with Trial n and injectFrom inside the prompt", async () => {
    assert.deepEqual([...variants().keys()].sort(), ids().sort());
    assert.ok(ids().length >= 17);
    const gpt2 = await Model.load(GPT2, { device: "wasm" });
    try {
      assert.equal(gpt2.chatTemplate, undefined, "tiny-random-gpt2 has no chat template (fallback prompt)");
      const q = yesBiasQuestions()[0]!;
      for (const m of [model, gpt2]) {
        for (const id of ids()) {
          const v = getVariant(id);
          for (const n of [1, 10]) {
            for (const o of [{}, { prefill: FORCED_PREFILL }, { question: q }]) {
              const r = renderTrial(m, v, n, { ...o, concept: "Dust" });
              const what = `${m.family} ${id} n=${n} ${JSON.stringify(o).slice(0, 20)}`;
              assert.ok(r.text.includes(`Trial ${n}`), `${what}: no "Trial ${n}"`);
              if ("question" in o) assert.ok(r.text.includes(`Trial ${n}: ${q}`), `${what}: the yes/no question is not in the trial slot`);
              if ("prefill" in o) assert.ok(r.text.endsWith(FORCED_PREFILL));
              assert.deepEqual(r.ids, m.tokenizer!.encode(r.text, { addSpecial: false }));
              assert.ok(r.injectFrom >= 0 && r.injectFrom < r.ids.length, `${what}: injectFrom ${r.injectFrom} outside ${r.ids.length} tokens`);
              assert.equal(r.injectFrom, protocolFrom(m, r.text, n), what);
              assert.ok(!r.text.includes("{n}") && !r.text.includes("{trial"), `${what}: unfilled placeholder`);
              assert.ok(r.question.includes(`Trial ${n}`), `${what}: the judge's {prompt} lacks the trial question`);
            }
          }
        }
      }
    } finally {
      gpt2.dispose();
    }
  });

  test("an unknown variant is a UsageError naming the known ones (getVariant, inject, CLI)", async () => {
    assert.throws(() => getVariant("nope"), (e: unknown) => e instanceof UsageError && /unknown variant "nope".*original/.test(e.message));
    const out = path.join(tmpRoot, "bad-variant");
    await assert.rejects(
      inject({ model: STORIES, layers: "2", concepts: "1", trials: 1, controls: 1, variants: "original,nope", judges: ["rule"], maxTokens: 2, out, vectorCache: null, quiet: true }),
      (e: unknown) => e instanceof UsageError && /unknown variant "nope"/.test(e.message),
    );
    const r = await runCli(["inject", "--model", STORIES, "--layers", "2", "--concepts", "1", "--trials", "1", "--controls", "1", "--variant", "nope", "--judge", "rule", "--out", path.join(tmpRoot, "bad-variant-cli"), "--quiet"], { env: { SELFSCOPE_CACHE: path.join(tmpRoot, "cache") } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /unknown variant "nope"; known: original,/);
    assert.doesNotMatch(r.stderr, /SELFSCOPE_DEBUG/, "a usage error prints no stack-trace hint");
  });

  // Regression (found by this suite; fixed in acac7ef): the run directory used to be created before
  // runSweep validated the variants, leaving a header-only log that blocked reusing --out.
  test("an invalid variant leaves no run directory behind, so the same --out works once corrected", async () => {
    const out = path.join(tmpRoot, "bad-variant-leftover");
    await assert.rejects(inject({ model: STORIES, layers: "2", concepts: "1", trials: 1, controls: 1, variants: "nope", judges: ["rule"], maxTokens: 2, out, vectorCache: null, quiet: true }), UsageError);
    assert.ok(!fs.existsSync(path.join(out, "log.jsonl")), `${out}/log.jsonl was left behind by a run that never started`);
  });
});

// ------------------------------------------------------------------------------------------------

describe("judgeTrials (the runner's judging step)", () => {
  const trial = (id: string, kind: TrialRecord["kind"], output: string): TrialRecord => ({
    type: "trial", id, kind, concept: kind === "control" ? null : "Dust", layer: 2, strength: 4, variant: "original", trialNumber: 1, sample: 0,
    injected: kind === "control" ? null : { from: 1, to: null, promptTokens: 3 }, prompt: "p", judgePrompt: "q", prefill: null, output, outputTokens: 1, stopReason: "stop", flags: [], seed: 1, ms: 0,
  });
  class FakeJudge implements Judge {
    readonly name = "fake";
    readonly approximate = false;
    asked: JudgeRequest[] = [];
    async judge(reqs: JudgeRequest[]): Promise<JudgeResult[]> {
      this.asked.push(...reqs);
      return reqs.map((r) => ({ verdict: r.response.startsWith("yes") ? "YES" : "NO", raw: "x", error: null, attempts: 1, approximate: false, ms: 0 }));
    }
  }

  test("identification is asked only after a YES detection, and a rerun asks only what is missing", async () => {
    const dir = path.join(tmpRoot, "judge-unit");
    const header = { type: "header", schema: LOG_SCHEMA, version: LOG_VERSION, createdAt: new Date().toISOString(), tool: { name: "selfscope", version: "0" }, model: { path: "m", hash: "h", family: "llama", nLayers: 1, dModel: 1, dtype: "F32", chatTemplate: false }, backend: { device: "wasm", adapter: "wasm" }, config: buildConfig({ model: "m", judges: ["fake"] }, 5), plannedTrials: 5, command: [] } satisfies RunHeader;
    const trials = [trial("a", "injection", "yes I do"), trial("b", "injection", "no"), trial("c", "control", "yes"), trial("d", "forced", "yes"), trial("e", "yesbias", "no")];
    const w = RunLogWriter.create(dir, header);
    const judge = new FakeJudge();
    // Only part of the work existed before (as after a crash): the detection of "a".
    const prior = [{ type: "judgment" as const, trialId: "a", judge: "fake", criterion: "detection" as const, verdict: "YES" as const, raw: "x", error: null, approximate: false, attempts: 1, ms: 0 }];
    w.append(prior[0]!);
    const n = await judgeTrials(trials, prior, w, [judge]);
    w.close();
    assert.deepEqual(judge.asked.map((r) => `${r.criterion}:${r.response}`).sort(), ["detection:no", "detection:yes", "forced_identification:yes", "identification:yes I do", "yes_answer:no"].sort());
    assert.equal(n, 5);
    const run = readRunLog(dir);
    const got = run.judgments.map((j) => `${j.trialId}:${j.criterion}:${j.verdict}`).sort();
    assert.deepEqual(got, ["a:detection:YES", "a:identification:YES", "b:detection:NO", "c:detection:YES", "d:forced_identification:YES", "e:yes_answer:NO"].sort());
    // Everything judged: a rerun asks nothing.
    const again = new FakeJudge();
    const w2 = RunLogWriter.reopen(dir);
    assert.equal(await judgeTrials(trials, run.judgments, w2, [again]), 0);
    w2.close();
    assert.equal(again.asked.length, 0);
  });
});

// ------------------------------------------------------------------------------------------------

describe("CLI", () => {
  test("inject prints its plan and an ETA before generating; --identify-all judges identification on every injection trial; report --failed-as-no", { timeout: 300_000 }, async () => {
    const out = path.join(tmpRoot, "plan-eta");
    const args = ["inject", "--model", STORIES, "--layers", "2", "--strengths", "4,8", "--concepts", "2", "--trials", "2", "--controls", "2", "--identify-all", "--judge", "rule", "--max-tokens", "4", "--out", out];
    const r = await runCli(args, { env: { SELFSCOPE_CACHE: path.join(tmpRoot, "cache") } });
    assert.equal(r.code, 0, r.stderr);
    const run = readRunLog(out);
    assert.equal(run.header.config.identifyAll, true);
    const lines = r.stderr.split(/\r|\n/).filter((l) => l !== "");
    const planAt = lines.findIndex((l) => l.startsWith(`plan: ${run.header.plannedTrials} trials (8 injection, 4 control)`));
    const etaAt = lines.findIndex((l) => /^ETA: about \d/.test(l));
    const progressAt = lines.findIndex((l) => l.startsWith("["));
    assert.ok(planAt >= 0 && etaAt > planAt && progressAt > etaAt, r.stderr);
    assert.ok(lines.some((l) => /^\[.*ETA /.test(l)), "progress lines carry an ETA");
    // Identification was judged on all 8 injection trials, whatever the detection verdict.
    const ided = new Set(run.judgments.filter((j) => j.criterion === "identification").map((j) => j.trialId));
    assert.deepEqual([...ided].sort(), run.trials.filter((t) => t.kind === "injection").map((t) => t.id).sort());
    const res = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as { identification_accuracy_unconditional: { n: number; unjudged: number } | null; failed_judgments: string };
    assert.ok(res.identification_accuracy_unconditional);
    assert.equal(res.identification_accuracy_unconditional.n + res.identification_accuracy_unconditional.unjudged, 4);
    assert.equal(res.failed_judgments, "excluded");
    const rep = await runCli(["report", out, "--failed-as-no"]);
    assert.equal(rep.code, 0, rep.stderr);
    assert.equal((JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as { failed_judgments: string }).failed_judgments, "no");
  });

  // Measured: `selfscope demo` takes ~29 s on 2 cores (the organism and its base, 360 trials each, 24 tokens), under the 2-minute budget.
  test("selfscope demo --out DIR writes report.html (with charts) and results.json with the contract keys", { timeout: 300_000 }, async () => {
    const out = path.join(tmpRoot, "demo");
    const r = await runCli(["demo", "--out", out, "--quiet"]);
    console.log(`# selfscope demo: ${(r.ms / 1000).toFixed(1)} s`);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /detection \(TPR\)/);
    // How to open the report, what introspection means, wall time, and the next step with its estimate.
    assert.ok(r.stdout.includes(`selfscope view ${out}`), r.stdout);
    assert.ok(r.stdout.includes(path.resolve(out, "report.html")));
    assert.match(r.stdout, /introspection = the model says it detects an injected thought AND names the injected concept/);
    assert.match(r.stdout, /wall time: \d+/);
    assert.match(r.stdout, /--preset macar2026 +\(5,500 trials × up to 100 tokens\)/);
    assert.match(r.stdout, /estimate on this machine: about \d/);
    assert.match(r.stdout, /every configuration \(\* = best by introspection rate\)/);
    assert.match(fs.readFileSync(path.join(out, "report.html"), "utf8"), /<svg/);
    const res = JSON.parse(fs.readFileSync(path.join(out, "results.json"), "utf8")) as Record<string, unknown>;
    for (const k of [...RATE_KEYS, "discrimination_p_value", "yes_bias_rate", "n_trials", "by_config", "by_concept", "judge"]) assert.ok(k in res, `results.json lacks ${k}`);
    for (const k of RATE_KEYS) for (const f of ["estimate", "lo", "hi", "n"]) assert.ok(f in (res[k] as object), `${k}.${f}`);
    const run = readRunLog(out);
    const s = assertCompleteRun(run, planTrials(run.header.config), ["rule"]);
    assert.deepEqual(s.byKind, expectedCounts(run.header.config));
    assert.equal((res.n_trials as { total: number }).total, run.header.plannedTrials);
    // The organism, said plainly, and its untrained base on the same trials as the contrast.
    assert.match(r.stdout, /TRAINED to report injections/);
    assert.match(r.stdout, /contrast, the untrained base on the same trials: TPR/);
    assert.match(fs.readFileSync(path.join(out, "report.html"), "utf8"), /About this model[\s\S]*TRAINED to report[\s\S]*untrained base/);
    assert.ok(run.header.model.path.endsWith("organism.gguf"), run.header.model.path);
    const about = res.about as { text: string; contrast: { runDir: string; figures: Record<string, { estimate: number }> } };
    assert.match(about.text, /nothing here is emergent introspection/);
    const baseRes = JSON.parse(fs.readFileSync(path.join(out, about.contrast.runDir, "results.json"), "utf8")) as Record<string, { estimate: number }>;
    assert.equal(about.contrast.figures.tpr!.estimate, baseRes.tpr!.estimate);
    const baseRun = readRunLog(path.join(out, "base"));
    assert.deepEqual(baseRun.header.config.concepts, run.header.config.concepts, "the base ran the same held-out concepts");
    assert.ok(baseRun.header.model.path.endsWith("models/organism/base.gguf"), baseRun.header.model.path);
    // The held-out figures the model card states, at the demo's size: the organism detects, its base does not.
    const tpr = (res.tpr as { estimate: number }).estimate, fpr = (res.fpr as { estimate: number }).estimate;
    assert.ok(tpr - fpr > 0.5, `organism TPR ${tpr} FPR ${fpr}`);
    assert.ok(baseRes.tpr!.estimate - baseRes.fpr!.estimate < 0.2, `base TPR ${baseRes.tpr!.estimate} FPR ${baseRes.fpr!.estimate}`);
    // And it names held-out concepts (the card: 0.52-0.57 forced identification at n=100), the base does not.
    const forced = (res.forced_identification_rate as { estimate: number }).estimate;
    assert.ok(forced > 0.3, `organism forced identification ${forced}`);
    assert.ok(baseRes.forced_identification_rate!.estimate < 0.1, `base forced identification ${baseRes.forced_identification_rate!.estimate}`);
  });
});
