// Prompt and persona variants (paper Tables 1 and 2), their presets' trial structures, the shipped
// concept lists, the layer-fraction rule and the base-model prompt, each checked against the paper's
// text and data in data/protocol (the 03b/03c/03 strings and defaults) or a planted truth. A chat
// template is put on the bundled stories260K (its tokenizer, a fixture template) where a test needs one.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { UsageError } from "../src/core/errors.js";
import { buildConfig, describeVariants, readConcepts, type InjectArgs } from "../src/eval/inject.js";
import { planTrials, type PlannedTrial } from "../src/eval/plan.js";
import { layerAt } from "../src/core/parse.js";
import { presets } from "../src/eval/presets.js";
import { PAPER_CONTINUATION, firstResponse, getVariant, readData, renderTrial } from "../src/eval/protocol.js";
import { cutsResponse, renderOptions } from "../src/eval/run.js";
import { readRunLog, type RunData } from "../src/log/read.js";
import type { InjectConfig } from "../src/log/schema.js";
import { Model } from "../src/model/model.js";
import { fixture, repoDir } from "./support/paths.js";
import { expectedCounts, runCli } from "./support/runlog-checks.js";

const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-variants-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

interface PromptVariantsJson {
  concept_categories_for_anti_reward: Record<string, string[]>;
  defaults: { layer_fraction: number; strength: number; n_trials_per_concept: number };
  variants: { id: string; system_prompt: string; user_turn1: string; assistant_turn1: string; user_turn2_template: string }[];
}
interface PersonaVariantsJson {
  defaults: { layer_idx: number; strength: number; n_trials_per_concept: number; control_concepts: string };
  variants: { id: string }[];
}
const PV = () => readData<PromptVariantsJson>("protocol/prompt_variants.json");
const PERSONA = () => readData<PersonaVariantsJson>("protocol/persona_variants.json");
const ORIGINAL50 = () => readData<{ concepts: string[] }>("protocol/concepts_original_50.json").concepts;
const PAPER_LAYERS = () => readData<{ model: { n_layers: number }; injection: { paper_layer: number } }>("protocol/defaults.json");
/** The category 03c's CONCEPT_CATEGORIES gives a concept ("other" when unlisted). */
const categoryOf = (concept: string) => Object.entries(PV().concept_categories_for_anti_reward).find(([, l]) => l.includes(concept))?.[0] ?? "other";

let model: Model;
before(async () => {
  model = await Model.load(STORIES, { device: "wasm" });
});
after(() => model?.dispose());

/** stories260K with a fixture chat template (the Model API reads it through `chatTemplate`). */
function withTemplate(m: Model, file: string): Model {
  const o = Object.create(m) as Model;
  Object.defineProperty(o, "chatTemplate", { value: fs.readFileSync(fixture("llamacpp-vocab", "chat-templates", file), "utf8") });
  return o;
}
const GEMMA2 = "google-gemma-2-2b-it.jinja"; // no system role: the template raises on one
const QWEN = "Qwen-Qwen2.5-7B-Instruct.jinja"; // has a system role

const args = (a: Partial<InjectArgs>): InjectArgs => ({ model: "m", judges: ["rule"], ...a });

describe("anti_reward and thoughts_in_context fill their slots from the trial's concept", () => {
  test("the rendered anti_reward prompt for a food and a nature concept is 03c's, category from concept_categories_for_anti_reward", () => {
    const pv = PV();
    const ar = pv.variants.find((v) => v.id === "anti_reward")!;
    const qm = withTemplate(model, QWEN);
    const cases = [["food", pv.concept_categories_for_anti_reward.food![0]!], ["nature", pv.concept_categories_for_anti_reward.nature![0]!]] as const;
    for (const [cat, concept] of cases) {
      const f = (s: string, n: number) => s.replaceAll("{category}", cat).replaceAll("{trial_num}", String(n));
      // 03c: no system turn (anti_reward's system_prompt is empty), category in every turn.
      const expected = qm.encode({ messages: [{ role: "user", content: f(ar.user_turn1, 7) }, { role: "assistant", content: f(ar.assistant_turn1, 7) }, { role: "user", content: f(ar.user_turn2_template, 7) }], addGenerationPrompt: true }).text!;
      const r = renderTrial(qm, getVariant("anti_reward"), 7, { concept, format: "chat", judgePrompt: "full", variantRun: true });
      assert.equal(r.text, expected, `${concept} (${cat})`);
      assert.ok(r.text.includes(`PENALTY if the injected concept is related to ${cat}.`), `${concept}: category ${cat} missing`);
      assert.ok(!r.text.includes("related to other"), `${concept}: the category defaulted to "other"`);
    }
  });

  test("a variant that names the concept refuses a trial without one (no empty {thoughts})", () => {
    assert.throws(() => renderTrial(model, getVariant("thoughts_in_context"), 1, { format: "raw" }), (e: unknown) => e instanceof UsageError && /needs a concept/.test(e.message));
    assert.throws(() => renderTrial(model, getVariant("anti_reward"), 1, { format: "raw", concept: null }), UsageError);
  });

  test("planned controls of anti_reward and thoughts_in_context carry a concept; those of other variants do not", () => {
    const cfg = buildConfig(args({ variants: "original,anti_reward,thoughts_in_context", concepts: "3", trials: 1, controls: 7, layers: "1" }), 5, true);
    const controls = planTrials(cfg).filter((t) => t.kind === "control");
    assert.equal(controls.length, 21);
    for (const t of controls) {
      if (t.variant === "original") assert.equal(t.concept, null);
      else assert.ok(t.concept !== null && cfg.concepts.includes(t.concept), `${t.id}: control without a concept`);
    }
    // Each rendered control names its own concept.
    const qm = withTemplate(model, QWEN);
    for (const t of controls.filter((c) => c.variant === "thoughts_in_context")) {
      const r = renderTrial(qm, getVariant(t.variant), t.trialNumber, { ...renderOptions(cfg), concept: t.concept });
      assert.ok(r.text.includes(`You are an AI that is always thinking about ${t.concept}`), `${t.id}: {thoughts} not filled`);
    }
  });
});

describe("a variant run end to end (CLI, stories260K: no chat template, so the base-model prompt)", () => {
  let run: RunData;
  let stderr: string;
  before(async () => {
    const concepts = path.join(tmpRoot, "concepts.json");
    const pv = PV();
    // One food and one nature concept from 03c's table.
    fs.writeFileSync(concepts, JSON.stringify([pv.concept_categories_for_anti_reward.food![1], pv.concept_categories_for_anti_reward.nature![1]]));
    const out = path.join(tmpRoot, "variant-run");
    const r = await runCli(
      ["inject", "--model", STORIES, "--layers", "0.6", "--strengths", "4", "--concepts", concepts, "--trials", "1", "--controls", "2", "--variant", "original,anti_reward,thoughts_in_context,neutral_query", "--judge", "rule", "--max-tokens", "2", "--batch-size", "8", "--out", out, "--quiet"],
      { env: { SELFSCOPE_CACHE: path.join(tmpRoot, "cache") } },
    );
    assert.equal(r.code, 0, r.stderr);
    stderr = r.stderr;
    run = readRunLog(out);
  });

  test("the judge's {prompt} is the full rendered prompt for every variant, original included", () => {
    assert.equal(run.header.config.judgePrompt, "full");
    assert.ok(run.trials.some((t) => t.variant === "original"));
    for (const t of run.trials) assert.equal(t.judgePrompt, t.prompt, `${t.id}`);
  });

  test("anti_reward injection and control trials name their concept's category; thoughts_in_context controls name a concept", () => {
    const ar = run.trials.filter((t) => t.variant === "anti_reward");
    assert.deepEqual(new Set(ar.map((t) => t.kind)), new Set(["injection", "control"]));
    for (const t of ar) {
      assert.ok(t.concept !== null, `${t.id}: no concept`);
      const cat = categoryOf(t.concept);
      assert.notEqual(cat, "other");
      assert.ok(t.prompt.includes(`related to ${cat}. So if you detect an injection about a ${cat}-related concept`), `${t.id}: category ${cat} not in the prompt`);
    }
    const tic = run.trials.filter((t) => t.variant === "thoughts_in_context" && t.kind === "control");
    assert.equal(tic.length, 2);
    for (const t of tic) assert.ok(t.concept !== null && t.prompt.includes(`always thinking about ${t.concept}\n`), `${t.id}: empty {thoughts}`);
  });

  test("a model without a chat template runs the paper's base-model prompt (03) with a visible note", () => {
    assert.equal(run.header.config.promptFormat, "raw");
    assert.match(stderr, /note: .*no chat template: running the paper's base-model protocol/);
    const base = readData<{ base_model_raw_prompt_03: { template: string; INTROSPECTION_EXPLANATION: string } }>("protocol/introspection_prompts.json").base_model_raw_prompt_03;
    const tok = model.tokenizer!;
    for (const t of run.trials.filter((x) => x.variant === "original")) {
      const raw = base.template.replace("{INTROSPECTION_EXPLANATION}", base.INTROSPECTION_EXPLANATION).replace("{trial_number}", String(t.trialNumber));
      // 03 tokenises with encode(), which adds BOS: the logged text re-encodes to those ids.
      assert.deepEqual(tok.encode(t.prompt, { addSpecial: false }), tok.encode(raw, { addSpecial: true }), t.id);
      assert.ok(t.prompt.endsWith(raw));
    }
    // Vectors from the raw text "Tell me about {word}" (03's base-model recipe).
    const recipe = readData<{ concept_vector_extraction: { base_model_03: string } }>("protocol/introspection_prompts.json").concept_vector_extraction.base_model_03;
    assert.equal(run.header.config.vectorRecipe.format, "raw");
    assert.ok(recipe.startsWith(`raw "${run.header.config.vectorRecipe.userTemplate}"`), recipe);
  });

  test("neutral_query is labelled with its question and warned about when run alongside detection variants", () => {
    const info = new Map((run.header.variants ?? []).map((v) => [v.id, v]));
    assert.equal(info.get("neutral_query")?.asks, "current-thought");
    for (const id of ["original", "anti_reward", "thoughts_in_context"]) assert.equal(info.get(id)?.asks, "detection");
    assert.ok((run.header.warnings ?? []).some((w) => /neutral_query asks a different question \("What are you thinking about right now\?"\)/.test(w)), JSON.stringify(run.header.warnings));
    assert.match(stderr, /warning: variant neutral_query asks a different question/);
    const html = fs.readFileSync(path.join(tmpRoot, "variant-run", "report.html"), "utf8");
    assert.ok(html.includes("neutral_query [asks: current-thought]"), "the report labels the variant");
    assert.ok(html.includes("neutral_query asks a different question"), "the report shows the warning");
  });

  test("the layer rule and the resolved layer are in the header: int(5 · 0.6) = 3", () => {
    assert.deepEqual(run.header.config.layers, [3]);
    assert.deepEqual(run.header.config.layerRule, { fractions: [0.6], nLayers: 5, rule: "int(nLayers*f), clamped to [0, nLayers-1]" });
  });
});

describe("identical renders (a model with no system role)", () => {
  const cfg = (variants: string) => buildConfig(args({ variants, concepts: "2" }), 5, true);

  test("on a Gemma-2 template thoughts_in_context renders byte-identical to original: labelled and warned", () => {
    const gm = withTemplate(model, GEMMA2);
    const a = renderTrial(gm, getVariant("original"), 1, { ...renderOptions(cfg("original,thoughts_in_context")), concept: "Dust" }).text;
    const b = renderTrial(gm, getVariant("thoughts_in_context"), 1, { ...renderOptions(cfg("original,thoughts_in_context")), concept: "Dust" }).text;
    assert.equal(a, b, "the planted truth: the system prompt has nowhere to go");
    for (const variants of ["original,thoughts_in_context", "thoughts_in_context"]) {
      const d = describeVariants(gm, cfg(variants));
      assert.equal(d.variants.find((v) => v.id === "thoughts_in_context")?.identicalTo, "original", variants);
      assert.equal(d.warnings.length, 1, variants);
      assert.match(d.warnings[0]!, /thoughts_in_context renders byte-identical to original .*no system role/);
    }
  });

  test("with a system role (Qwen2.5 template) the renders differ and nothing is flagged", () => {
    const qm = withTemplate(model, QWEN);
    const d = describeVariants(qm, cfg("original,thoughts_in_context"));
    assert.deepEqual(d.variants.map((v) => v.identicalTo), [null, null]);
    assert.deepEqual(d.warnings, []);
  });
});

describe("persona variants cut every response at the first continuation (03b)", () => {
  test("all six persona variants are cut, the chat-template one included; 03c's framings are not", () => {
    const qm = withTemplate(model, QWEN);
    const c = buildConfig(args({ preset: "macar2026-persona-variants" }), 5, true);
    const ids = PERSONA().variants.map((v) => v.id);
    assert.equal(ids.length, 6);
    for (const id of ids) assert.ok(cutsResponse(qm, c, id), id);
    for (const v of PV().variants) assert.ok(!cutsResponse(qm, buildConfig(args({ preset: "macar2026-prompt-variants" }), 5, true), v.id), v.id);
  });

  test("firstResponse cuts a planted continuation of each persona dialogue", () => {
    const answer = "I notice something about the ocean.";
    // Each persona template's own speaker labels, as the model would continue the dialogue.
    const continuations = ["\n\nUser: Trial 2: Do you detect", "\nAssistant: Ok.", "\n\nAlice: Trial 3:", "\nBob: yes", "\n\nTrial 4: Do you detect an injected thought?", "<end_of_turn>\n<start_of_turn>user\nTrial 2", "\n\n* User: next"];
    for (const c of continuations) assert.equal(firstResponse(` ${answer}${c} more`, PAPER_CONTINUATION), answer, JSON.stringify(c));
    assert.equal(firstResponse(`${answer}\nThe researcher nods.`, PAPER_CONTINUATION), `${answer}\nThe researcher nods.`, "no marker, no cut");
  });
});

describe("presets reproduce the paper's trial structures", () => {
  const byVariant = (plan: PlannedTrial[], v: string) => plan.filter((t) => t.variant === v);
  const trialNumbers = (ts: PlannedTrial[]) => [...new Set(ts.map((t) => t.trialNumber))].sort((a, b) => a - b);
  const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

  test("macar2026-prompt-variants (03c): per concept trials 1-10 injected, 11-20 controls; fraction 0.61, strength 4", () => {
    const pv = PV();
    const { model: m, injection } = PAPER_LAYERS();
    const c = buildConfig(args({ preset: "macar2026-prompt-variants" }), m.n_layers, true);
    assert.deepEqual(c.layers, [injection.paper_layer], "0.61 of 62 layers is the paper's layer 37");
    assert.deepEqual(c.strengths, [pv.defaults.strength]);
    assert.deepEqual(c.variants, pv.variants.map((v) => v.id));
    assert.deepEqual(c.concepts, ORIGINAL50());
    assert.equal(c.judgePrompt, "full");
    const plan = planTrials(c);
    const half = pv.defaults.n_trials_per_concept / 2;
    for (const v of c.variants) {
      const ts = byVariant(plan, v);
      for (const concept of c.concepts) {
        const mine = ts.filter((t) => t.concept === concept);
        assert.equal(mine.length, pv.defaults.n_trials_per_concept, `${v} ${concept}`);
        assert.deepEqual(trialNumbers(mine.filter((t) => t.kind === "injection")), range(1, half));
        assert.deepEqual(trialNumbers(mine.filter((t) => t.kind === "control")), range(half + 1, 2 * half));
        assert.equal(mine.filter((t) => t.kind === "control").length, half);
      }
      assert.deepEqual(new Set(ts.map((t) => t.kind)), new Set(["injection", "control"]));
      assert.equal(ts.length, c.concepts.length * pv.defaults.n_trials_per_concept);
    }
    assert.deepEqual(expectedCounts(c), { injection: 10 * 500, forced: 0, yesbias: 0, control: 10 * 500 });
  });

  test("macar2026-persona-variants (03b): 10 trials per concept, 100 controls from the first 10 concepts, layer 37, strength 4", () => {
    const p = PERSONA();
    const c = buildConfig(args({ preset: "macar2026-persona-variants" }), PAPER_LAYERS().model.n_layers, true);
    assert.deepEqual(c.layers, [p.defaults.layer_idx]);
    assert.deepEqual(c.strengths, [p.defaults.strength]);
    assert.deepEqual(c.variants, p.variants.map((v) => v.id));
    assert.equal(c.judgePrompt, "full");
    const nControl = Number(/n_control_concepts=(\d+)/.exec(p.defaults.control_concepts)![1]);
    const plan = planTrials(c);
    for (const v of c.variants) {
      const ts = byVariant(plan, v);
      const inj = ts.filter((t) => t.kind === "injection");
      const ctl = ts.filter((t) => t.kind === "control");
      assert.equal(inj.length, 50 * p.defaults.n_trials_per_concept);
      for (const concept of ORIGINAL50()) assert.deepEqual(trialNumbers(inj.filter((t) => t.concept === concept)), range(1, p.defaults.n_trials_per_concept));
      assert.equal(ctl.length, nControl * p.defaults.n_trials_per_concept);
      assert.deepEqual([...new Set(ctl.map((t) => t.concept))], ORIGINAL50().slice(0, nControl));
      for (const concept of ORIGINAL50().slice(0, nControl)) assert.deepEqual(trialNumbers(ctl.filter((t) => t.concept === concept)), range(1, p.defaults.n_trials_per_concept));
      assert.equal(ts.length, inj.length + ctl.length);
    }
  });

  test("macar2026-500 (Fig. 1): 500 concepts × 10 trials, 5000 controls and 5000 forced per (layer, strength), every layer × strengths 1-5", () => {
    const all = readData<{ concepts: string[]; count: number }>("protocol/concepts_500.json");
    const c = buildConfig(args({ preset: "macar2026-500" }), 2, true);
    assert.deepEqual(c.concepts, all.concepts);
    assert.deepEqual(c.layers, [0, 1], "every layer");
    assert.deepEqual(c.strengths, [1, 2, 3, 4, 5]);
    const plan = planTrials(c);
    for (const layer of c.layers)
      for (const strength of c.strengths) {
        const ts = plan.filter((t) => t.layer === layer && t.strength === strength);
        const count = (k: string) => ts.filter((t) => t.kind === k).length;
        assert.deepEqual([count("injection"), count("control"), count("forced")], [all.count * 10, 5000, 5000], `L${layer} α${strength}`);
      }
    assert.equal(presets()["macar2026-500"]!.layerFractions, "all");
  });
});

describe("base-model presets (03, 03f)", () => {
  const cv = () => readData<{ concept_vector_extraction: { base_model_03: string; base_model_03f_template: string } }>("protocol/introspection_prompts.json").concept_vector_extraction;

  test("macar2026-stages (03): fractions 0.4-0.8 by int(n·f), 10 trial numbers × 10 samples injected and 10 controls per concept; base vectors from raw text", () => {
    const base = buildConfig(args({ preset: "macar2026-stages" }), 64, false);
    assert.deepEqual(base.layers, [25, 32, 38, 44, 51], "int(64·f) for 0.4..0.8");
    assert.deepEqual(base.strengths, [1, 2, 4, 8]);
    assert.equal(base.promptFormat, "raw");
    assert.equal(base.judgePrompt, "question");
    assert.ok(cv().base_model_03.startsWith(`raw "${base.vectorRecipe.userTemplate}"`));
    assert.equal(base.vectorRecipe.format, "raw");
    const plan = planTrials({ ...base, layers: [25], strengths: [4] });
    for (const concept of ORIGINAL50()) {
      const mine = plan.filter((t) => t.concept === concept);
      const inj = mine.filter((t) => t.kind === "injection");
      const ctl = mine.filter((t) => t.kind === "control");
      assert.equal(inj.length, 100);
      for (let n = 1; n <= 10; n++) assert.equal(inj.filter((t) => t.trialNumber === n).length, 10, `${concept} trial ${n}`);
      assert.deepEqual(ctl.map((t) => t.trialNumber), Array.from({ length: 10 }, (_, i) => i + 1));
    }
    // An instruct checkpoint runs the same structure through its chat template with chat vectors.
    const instruct = buildConfig(args({ preset: "macar2026-stages" }), 64, true);
    assert.equal(instruct.promptFormat, "chat");
    assert.equal(instruct.vectorRecipe.format, "chat");
  });

  test("macar2026-dpo-eval (03f): a base model gets 03f's raw-dialogue vectors; 10 trials per concept, 300 controls", () => {
    const c = buildConfig(args({ preset: "macar2026-dpo-eval" }), 62, false);
    assert.equal(c.vectorRecipe.userTemplate, cv().base_model_03f_template);
    assert.equal(c.vectorRecipe.format, "raw");
    assert.deepEqual(c.layers, [37]);
    const plan = planTrials(c);
    assert.equal(plan.filter((t) => t.kind === "injection").length, 500);
    assert.equal(plan.filter((t) => t.kind === "control" && t.concept === null).length, 300);
  });
});

describe("concept lists", () => {
  test("data/protocol/concepts_500.json loads by file, and original50, new450, all500 by name", () => {
    const file = path.join(repoDir(), "data", "protocol", "concepts_500.json");
    const json = JSON.parse(fs.readFileSync(file, "utf8")) as { concepts: string[]; count: number };
    assert.deepEqual(readConcepts(file), json.concepts);
    assert.equal(json.concepts.length, json.count);
    const o50 = readConcepts("original50");
    const n450 = readConcepts("new450");
    assert.deepEqual(o50, ORIGINAL50());
    // new450 against its category lists (an independent reading of the same file).
    const cats = readData<{ categories: { concepts: string[] }[] }>("protocol/concepts_new_450.json").categories;
    assert.deepEqual(n450, cats.flatMap((c) => c.concepts));
    assert.equal(n450.length, 450);
    // 02b: ALL_CONCEPTS = BASELINE_CONCEPTS + NEW_CONCEPTS.
    assert.deepEqual(readConcepts("all500"), [...o50, ...n450]);
    assert.equal(new Set(readConcepts("all500")).size, 500);
    assert.equal(buildConfig(args({ concepts: "all500" }), 5, true).concepts.length, 500);
    assert.throws(() => readConcepts("all5000"), (e: unknown) => e instanceof UsageError && /original50, new450, all500/.test(e.message));
  });
});

describe("layer fractions: one rule, int(n·f)", () => {
  test("the paper's examples (protocol §0: 62 layers, 0.6 → 37, 0.61 → 37, 0.7 → 43) and Gemma-3-1B's 26 layers (0.6 → 15)", () => {
    for (const [n, f, l] of [[62, 0.6, 37], [62, 0.61, 37], [62, 0.7, 43], [26, 0.6, 15]] as const) {
      assert.deepEqual(buildConfig(args({ layers: String(f) }), n, true).layers, [l], `explicit ${f} of ${n}`);
      assert.equal(layerAt(n, f), l);
    }
    // The default (no preset, no --layers) is 0.6 of depth by the same rule, as is the macar2026 preset.
    assert.deepEqual(buildConfig(args({}), 26, true).layers, [15]);
    for (let n = 1; n <= 80; n++) {
      const explicit = buildConfig(args({ layers: "0.6" }), n, true);
      for (const a of [args({}), args({ preset: "macar2026" })]) {
        const d = buildConfig(a, n, true);
        assert.deepEqual([d.layers, d.layerRule], [explicit.layers, explicit.layerRule], `${a.preset ?? "no preset"}, ${n} layers`);
      }
    }
  });

  test("every preset's default layers equal the same fractions given explicitly, for every depth 1..80", () => {
    for (const [name, p] of Object.entries(presets())) {
      if (p.layerFractions === "all") continue;
      for (let n = 1; n <= 80; n++) {
        const dflt = buildConfig(args({ preset: name }), n, true);
        const explicit = buildConfig(args({ preset: name, layers: p.layerFractions.map((f) => f.toString()).join(",") }), n, true);
        assert.deepEqual(dflt.layers, explicit.layers, `${name}, ${n} layers`);
        assert.deepEqual(dflt.layerRule, explicit.layerRule, `${name}, ${n} layers`);
      }
    }
  });
});

describe("prompt formats", () => {
  test("--prompt-format chat on a model without a template is a usage error naming the flag", () => {
    assert.throws(() => buildConfig(args({ promptFormat: "chat" }), 5, false), (e: unknown) => e instanceof UsageError && /--prompt-format raw/.test(e.message));
  });

  test("--prompt-format raw on a chat model renders 03's base prompt; the main run's judge sees 02's trial question", () => {
    const qm = withTemplate(model, QWEN);
    const c: InjectConfig = buildConfig(args({ promptFormat: "raw" }), 5, true);
    assert.equal(c.judgePrompt, "question");
    const base = readData<{ base_model_raw_prompt_03: { template: string; INTROSPECTION_EXPLANATION: string } }>("protocol/introspection_prompts.json").base_model_raw_prompt_03;
    const r = renderTrial(qm, getVariant("original"), 4, { ...renderOptions(c), concept: null });
    assert.ok(r.text.endsWith(base.template.replace("{INTROSPECTION_EXPLANATION}", base.INTROSPECTION_EXPLANATION).replace("{trial_number}", "4")));
    const q = readData<{ judge: { question: string } }>("protocol/defaults.json").judge.question;
    assert.equal(r.question, q.replace("{n}", "4"));
  });
});
