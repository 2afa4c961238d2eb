// `selfscope negative-steering` (issue 17.5; the paper's 05): can a model tell that a thought was
// *removed*? Behaviour directions (data/protocol/behavior_directions.json: refusal, sycophancy,
// deception, …) are extracted as mean(positive) − mean(negative) activations at position −2 of the
// rendered contrastive prompts (up to 64 per side; refusal from the shipped harmful/harmless lists),
// then subtracted (strength 4) at one layer from the token before "Trial n" in 05's prompt ("I am
// capable of removing these patterns … Do you detect a removed thought? If so, what concept was
// removed?"), with as many unsteered control trials. Detection is judged with 05's trial question
// as the prompt; identification against the direction's name.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { layerAt } from "../core/parse.js";
import { hookName } from "../hooks/names.js";
import { makeJudge } from "../judge/judge.js";
import { chooseJudges } from "../judge/select.js";
import { StepLog } from "../log/steps.js";
import { Model, type Prompt } from "../model/model.js";
import { readData, type Variant } from "../eval/protocol.js";
import { fisherOneSided, wilson, type Rate } from "../stats/stats.js";
import { htmlPage, htmlTable, plotOrNote, rateText } from "../report/page.js";
import { rateBar, rateBarsSpec } from "../report/plots.js";
import { steeringTrials, type SteerTrial } from "./geometry.js";

interface DirectionJson {
  description: string;
  positive_system: string;
  negative_system: string;
  positive_user_prompts: string[] | { ref: string };
  negative_user_prompts: string[] | { ref: string };
}

export interface BehaviourSet {
  name: string;
  description: string;
  positive: { system: string; user: string }[];
  negative: { system: string; user: string }[];
}

/** The paper's behaviour directions, prompts resolved (refusal from the shipped AdvBench/Alpaca lists), at most `perSide` each. */
export function behaviourSets(names?: readonly string[], perSide = 64): BehaviourSet[] {
  const all = readData<{ directions: Record<string, DirectionJson> }>("protocol/behavior_directions.json").directions;
  const pick = names ?? Object.keys(all);
  for (const n of pick) if (!all[n]) throw new UsageError(`--directions: unknown "${n}" (known: ${Object.keys(all).join(", ")})`);
  const resolve = (p: string[] | { ref: string }): string[] => {
    if (Array.isArray(p)) return p;
    if (p.ref === "HARMFUL_PROMPTS") return readData<{ prompts: string[] }>("protocol/refusal_harmful.json").prompts;
    if (p.ref === "HARMLESS_PROMPTS") return readData<{ prompts: string[] }>("protocol/refusal_harmless_512.json").prompts;
    throw new UsageError(`behavior_directions.json: unknown prompt list ${p.ref}`);
  };
  return pick.map((name) => {
    const d = all[name]!;
    return {
      name,
      description: d.description,
      positive: resolve(d.positive_user_prompts).slice(0, perSide).map((user) => ({ system: d.positive_system, user })),
      negative: resolve(d.negative_user_prompts).slice(0, perSide).map((user) => ({ system: d.negative_system, user })),
    };
  });
}

/** 05's prompt as a variant: the removed-thought intro, "Ok.", the removed-thought trial question. */
export function negativeVariant(directions?: readonly string[]): Variant {
  const p = readData<{ negative_steering_05: { intro: string; intro_optional_suffix: string; trial_question: string } }>("protocol/introspection_prompts.json").negative_steering_05;
  const intro = directions ? p.intro + p.intro_optional_suffix.replace("{directions_str}", directions.join(", ")) : p.intro;
  return {
    id: "negative_steering_05",
    label: "05 removed thought",
    family: "framing",
    asks: "detection",
    cut: false,
    usesConcept: false,
    format: "chat",
    system: "",
    user1: intro,
    assistant1: "Ok.",
    user2: p.trial_question.replace("{trial_number}", "{n}"),
  };
}

/** A contrastive prompt as the model reads it: its chat template (system turn when it takes one), else `System … User … Assistant:`. */
function render(model: Model, system: string, user: string): Prompt {
  if (model.chatTemplate !== undefined) return { messages: [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: user }] };
  return `${system ? `${system}\n\n` : ""}User: ${user}\n\nAssistant:`;
}

/** mean(positive) − mean(negative) of blocks.L.hook_resid_post at position −2 of each rendered prompt. */
export async function behaviourDirection(model: Model, set: BehaviourSet, layer: number, batch = 16): Promise<Float32Array> {
  const at = hookName(layer, "hook_resid_post");
  const d = model.config.dModel;
  const meanOf = async (ps: { system: string; user: string }[]) => {
    const acc = new Float64Array(d);
    for (let i = 0; i < ps.length; i += batch) {
      const part = ps.slice(i, i + batch);
      const { cache } = await model.forward(part.map((p) => render(model, p.system, p.user)), { plan: [{ op: "read", at }], logits: "none" });
      part.forEach((_, r) => {
        const { data, shape } = cache.get(at, r);
        const pos = Math.max(0, shape[0]! - 2);
        for (let k = 0; k < d; k++) acc[k]! += data[pos * d + k]! / ps.length;
      });
    }
    return acc;
  };
  const [p, n] = [await meanOf(set.positive), await meanOf(set.negative)];
  return Float32Array.from(p, (x, k) => x - n[k]!);
}

export interface NegativeArgs {
  model: string;
  out: string;
  directions?: string;
  layer?: number;
  strength?: number;
  trials?: number;
  samples?: number;
  perSide?: number;
  listDirections?: boolean;
  maxTokens?: number;
  temperature?: number;
  judges?: string[];
  batchSize?: number;
  seed?: number;
  threads?: number;
  quiet?: boolean;
}

export interface NegativeResults {
  layer: number;
  strength: number;
  judge: string;
  approximate: boolean;
  controls: Rate;
  directions: { name: string; description: string; norm: number; detection: Rate; identification: Rate; pAboveControls: number | null }[];
  resumedSteps: number;
}

export async function negativeCommand(a: NegativeArgs): Promise<NegativeResults> {
  const say = (m: string) => void (a.quiet || process.stderr.write(`negative-steering: ${m}\n`));
  const model = await Model.load(a.model, a.threads ? { threads: a.threads } : {});
  try {
    const c = model.config;
    // The paper's layer 29 of Gemma 3 27B's 62 (0.47 of depth).
    const layer = a.layer ?? layerAt(c.nLayers, 29 / 62);
    if (!Number.isInteger(layer) || layer < 0 || layer >= c.nLayers) throw new UsageError(`--layer ${layer}: outside 0..${c.nLayers - 1}`);
    const strength = a.strength ?? 4;
    const sets = behaviourSets(a.directions ? a.directions.split(",").map((s) => s.trim()) : undefined, a.perSide ?? 64);
    const trialsPer = a.trials ?? 10, samples = a.samples ?? 1;
    const variant = negativeVariant(a.listDirections ? sets.map((s) => s.name) : undefined);
    const judgeSpec = chooseJudges(a.judges).specs[0]!;
    const judge = makeJudge(judgeSpec, { cacheDir: path.join(a.out, "judge-cache") });
    const log = StepLog.open(a.out, "negative-steering", {
      model: model.identity(), layer, strength, directions: sets.map((s) => s.name), perSide: a.perSide ?? 64, trials: trialsPer, samples,
      listDirections: !!a.listDirections, maxTokens: a.maxTokens ?? 100, temperature: a.temperature ?? 1, judge: judgeSpec, seed: a.seed ?? 42,
    });
    if (log.resumed) say(`resuming ${a.out}: ${log.resumed} steps already done`);
    const vectors = new Map<string, Float32Array>();
    for (const s of sets) {
      const v = await log.step(`direction|${s.name}`, async () => log.writeBinary(`directions/${s.name}.f32`, await behaviourDirection(model, s, layer)));
      vectors.set(s.name, log.readF32(v, c.dModel));
    }
    // Subtracting = adding with a negative scale; controls add nothing. As many controls as steered trials of one direction.
    const trials: (SteerTrial & { group: string; strength: number })[] = [];
    for (const s of sets) for (let t = 1; t <= trialsPer; t++) for (let k = 0; k < samples; k++) trials.push({ group: s.name, strength: -strength, key: `${s.name}|${t}|${k}`, concept: s.name, vector: vectors.get(s.name)!, trialNumber: t });
    for (let t = 1; t <= trialsPer; t++) for (let k = 0; k < samples; k++) trials.push({ group: "control", strength: 0, key: `control|${t}|${k}`, concept: null, vector: new Float32Array(c.dModel), trialNumber: t });
    const todo = trials.filter((t) => !log.has(`trial|${t.key}`));
    for (const sign of [-strength, 0]) {
      const part = todo.filter((t) => t.strength === sign);
      for (let i = 0; i < part.length; i += 64) {
        const chunk = part.slice(i, i + 64);
        const res = await steeringTrials(model, chunk, { layer, strength: sign, judge, variant, identify: true, maxTokens: a.maxTokens ?? 100, temperature: a.temperature ?? 1, seed: a.seed ?? 42, batchSize: a.batchSize ?? 16 });
        // Unjudged trials are not recorded: a rerun judges them again.
        res.forEach((r) => r.detected !== null && log.put(`trial|${r.key}`, { detected: r.detected, identified: r.identified, text: r.text }));
      }
    }
    log.close();
    const got = (group: string) => trials.filter((t) => t.group === group).map((t) => log.get<{ detected: boolean; identified: boolean | null }>(`trial|${t.key}`)).filter((x) => x !== undefined);
    const ctl = got("control");
    const controls = wilson(ctl.filter((x) => x.detected).length, ctl.length);
    const res: NegativeResults = {
      layer, strength, judge: judge.name, approximate: judge.approximate, controls,
      directions: sets.map((s) => {
        const g = got(s.name);
        const k = g.filter((x) => x.detected).length;
        const ids = g.filter((x) => x.identified !== null);
        return {
          name: s.name,
          description: s.description,
          norm: Math.hypot(...vectors.get(s.name)!),
          detection: wilson(k, g.length),
          identification: wilson(ids.filter((x) => x.identified).length, ids.length),
          pAboveControls: g.length && ctl.length ? fisherOneSided(k, g.length, ctl.filter((x) => x.detected).length, ctl.length) : null,
        };
      }),
      resumedSteps: log.resumed,
    };
    say(`controls: ${rateText(controls)}`);
    const bars = [...rateBar("controls", "nothing removed", controls), ...res.directions.flatMap((d) => rateBar(d.name, "removed", d.detection))];
    for (const d of res.directions) say(`${d.name}: detection ${rateText(d.detection)}`);
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(res, null, 1));
    fs.writeFileSync(
      path.join(a.out, "report.html"),
      htmlPage("Negative steering (05)", `Behaviour directions subtracted at blocks.${layer}.hook_resid_post, strength ${strength}; judge ${res.judge}${res.approximate ? " (approximate)" : ""}`, [
        {
          title: "Detection of a removed thought",
          html: (await plotOrNote(bars, () => rateBarsSpec(bars, "Removed-thought detection (Wilson 95%)", "detection rate"), "no judged trials")) + htmlTable(
            ["direction", "description", "‖direction‖", "detected", "identified (after YES)", "p (above controls)"],
            [["controls (nothing removed)", "", "", rateText(controls), "", ""], ...res.directions.map((d) => [d.name, d.description, d.norm.toFixed(3), rateText(d.detection), rateText(d.identification), d.pAboveControls === null ? "—" : d.pAboveControls.toPrecision(3)])],
          ),
        },
      ]),
    );
    return res;
  } finally {
    model.dispose();
  }
}
