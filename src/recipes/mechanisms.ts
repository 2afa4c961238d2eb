// One mechanisms report for a model (issue 15's "all in one report"): component patching, gradient
// and head attribution, transcoders trained on the model's own activations, gates and carriers
// with intervention curves, and steering attribution, each run by its own command into a
// subfolder, then one page with the headline of each beside its caveats and a link to its report.
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../core/errors.js";
import { parseNumbers } from "../core/parse.js";
import { escapeHtml, htmlPage, htmlTable } from "../report/page.js";
import { patchCommand, type PatchResults } from "./patch.js";
import { gradientsCommand, type GradientsResults } from "./gradients.js";
import { transcoderCommand, type TranscoderResults } from "./transcoder.js";
import { featuresCommand, type FeaturesResults } from "./features.js";
import { steeringCommand, type SteeringResults } from "./steering.js";
import { loadAnalysisModel, siteConfig, type SiteArgs } from "./site.js";

export interface MechanismsArgs extends SiteArgs {
  /** Injection strength for patching and gradients (default 4); steering attribution integrates 0..it. */
  strength?: number;
  trials?: number;
  /** Blocks whose MLPs get a transcoder (default the two after the injection layer). */
  transcoderLayers?: string;
  transcoderSteps?: number;
  /** Prompts for the transcoders (default: train-transcoder's). */
  texts?: string;
}

export interface MechanismsResults {
  recipe: "mechanisms";
  model: string;
  injection_layer: number;
  strength: number;
  patch: { necessary: Record<string, string[]>; sufficient: Record<string, string[]> };
  gradients: { top_heads: { layer: number; head: number; attribution: number }[]; ablation_top_k: number; gap_after_top_k: number; gap_after_random_k: number; steered_gap: number; unsteered_gap: number };
  transcoders: { layer: number; fvu: number; dead_fraction: number }[];
  features: { gates: { feature: number; dla: number; rho: number }[]; carriers: { feature: number; score: number }[]; gate_layer: number; carrier_layer: number | null };
  steering: { top: { node: string; isa: number }[]; gates: string[]; carriers: string[]; max_invariant_error: number; residual_share: number };
  caveats: string[];
}

export async function mechanismsCommand(a: MechanismsArgs): Promise<MechanismsResults> {
  const strength = a.strength ?? 4;
  const trials = a.trials ?? 2;
  const out = (sub: string) => path.join(a.out, sub);
  const common = { model: a.model, ...(a.layers ? { layers: a.layers } : {}), ...(a.preset ? { preset: a.preset } : {}), ...(a.concepts ? { concepts: a.concepts } : {}), ...(a.promptFormat ? { promptFormat: a.promptFormat } : {}), ...(a.threads ? { threads: a.threads } : {}), quiet: a.quiet ?? false, vectorCache: a.vectorCache ?? null };
  const say = (s: string) => { if (!a.quiet) process.stderr.write(`mechanisms: ${s}\n`); };
  // Check the transcoder layers before hours of work: the injection layer and depth from the model.
  const probe = await loadAnalysisModel(a);
  let L: number, nLayers: number;
  try {
    L = siteConfig("mechanisms", { ...a, strengths: undefined }, probe).layer;
    nLayers = probe.config.nLayers;
  } finally {
    probe.dispose();
  }
  const tl = a.transcoderLayers ? parseNumbers(a.transcoderLayers, "--transcoder-layers") : [L + 1, L + 2].filter((l) => l < nLayers);
  if (tl.length === 0 || tl.some((l) => !Number.isInteger(l) || l <= L || l >= nLayers)) throw new UsageError(`--transcoder-layers: blocks after the injection layer ${L} and below ${nLayers}, got ${tl.join(",") || "none"}`);
  say("component patching");
  const patch: PatchResults = await patchCommand({ ...common, out: out("patch"), strengths: String(strength), trials });
  say("gradients and heads");
  const grads: GradientsResults = await gradientsCommand({ ...common, out: out("gradients"), strength, trials });
  const tcs: TranscoderResults[] = [];
  for (const l of tl) {
    say(`transcoder on block ${l}`);
    tcs.push(await transcoderCommand({ model: a.model, out: out(`transcoder-${l}`), layer: l, steps: a.transcoderSteps ?? 600, ...(a.texts ? { texts: a.texts } : {}), ...(a.threads ? { threads: a.threads } : {}), quiet: a.quiet ?? false }));
  }
  const file = (l: number) => path.join(out(`transcoder-${l}`), "transcoder.safetensors");
  const gateLayer = Math.max(...tl), carrierLayer = tl.length > 1 ? Math.min(...tl) : null;
  say("gates and carriers");
  const feats: FeaturesResults = await featuresCommand({ ...common, out: out("features"), transcoder: file(gateLayer), ...(carrierLayer !== null ? { carrierTranscoder: file(carrierLayer) } : {}), strengths: `-${strength},0,${strength / 2},${strength}` });
  say("steering attribution");
  const steps = [0, 0.25, 0.5, 0.75, 1].map((x) => x * strength);
  const sa: SteeringResults = await steeringCommand({ ...common, out: out("steering"), transcoders: tl.map(file).join(","), strengths: steps.join(",") });
  const k = Math.min(3, grads.ablation.length - 1);
  const inv = Math.max(...sa.per_concept.flatMap((c) => c.layers.map((l) => l.maxInvariantError)));
  const resid = sa.per_concept.flatMap((c) => c.layers.map((l) => Math.abs(l.upstream + l.error) / Math.max(1e-12, Math.abs(l.upstream + l.error) + Math.abs(l.features) + Math.abs(l.skip))));
  const results: MechanismsResults = {
    recipe: "mechanisms",
    model: a.model,
    injection_layer: L,
    strength,
    patch: { necessary: Object.fromEntries(patch.metrics.map((m) => [m.metric, m.necessary])), sufficient: Object.fromEntries(patch.metrics.map((m) => [m.metric, m.sufficient])) },
    gradients: {
      top_heads: grads.heads.slice(0, 5).map((h) => ({ layer: h.layer, head: h.head, attribution: h.attribution.mean })),
      ablation_top_k: k,
      gap_after_top_k: grads.ablation[k]!.top.mean,
      gap_after_random_k: grads.ablation[k]!.random.mean,
      steered_gap: grads.ablation[0]!.top.mean,
      unsteered_gap: grads.unsteered_gap.mean,
    },
    transcoders: tcs.map((t) => ({ layer: t.layer, fvu: t.fvu, dead_fraction: t.dead_fraction })),
    features: { gates: feats.gates.slice(0, 5).map((g) => ({ feature: g.feature, dla: g.dla, rho: g.rho })), carriers: feats.carriers.slice(0, 5).map((c) => ({ feature: c.feature, score: c.score })), gate_layer: gateLayer, carrier_layer: carrierLayer },
    steering: { top: sa.features.slice(0, 5).map((f) => ({ node: `L${f.layer}/f${f.feature}`, isa: f.isa })), gates: sa.gates, carriers: sa.carriers, max_invariant_error: inv, residual_share: resid.reduce((s, x) => s + x, 0) / Math.max(1, resid.length) },
    caveats: [
      "Patching and gradients read the Yes − No logit gap at the last prompt position, a proxy for judged detection; the concept-token metric is the forced prompt's.",
      "Transcoders are trained here on short prompts with few steps: high FVU or many dead features make gates and carriers unreliable; check transcoders' reports.",
      "Gates and carriers are candidates named by signs and rankings; the intervention curves in features/ are the test of each.",
      "Steering attribution's residual share (upstream + error node) says how much of d gap/dα the features do not explain.",
    ],
  };
  fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
  fs.writeFileSync(path.join(a.out, "report.html"), mechanismsReport(results));
  return results;
}

export function mechanismsReport(r: MechanismsResults): string {
  const f = (x: number) => x.toFixed(3);
  const link = (dir: string, what: string) => `<p><a href="${dir}/report.html">${escapeHtml(what)}</a></p>`;
  const caveat = (i: number) => `<p class="note">${escapeHtml(r.caveats[i]!)}</p>`;
  const list = (xs: string[]) => escapeHtml(xs.join(", ") || "none");
  return htmlPage(`selfscope mechanisms — ${path.basename(r.model)}`, `injection at blocks.${r.injection_layer}.hook_resid_post, strength ${r.strength}`, [
    {
      title: "Where detection happens: component patching",
      html: htmlTable(["metric", "necessary (knock-out removes ≥ half)", "sufficient (knock-in restores ≥ half)"], Object.keys(r.patch.necessary).map((m) => [m, list(r.patch.necessary[m]!), list(r.patch.sufficient[m]!)])) + caveat(0) + link("patch", "patching report"),
    },
    {
      title: "Heads: gradient attribution and ablation",
      html: htmlTable(["layer", "head", "attribution Σ ∂gap/∂z · Δz"], r.gradients.top_heads.map((h) => [h.layer, h.head, f(h.attribution)])) +
        `<p>Gap: unsteered ${f(r.gradients.unsteered_gap)}, steered ${f(r.gradients.steered_gap)}, top-${r.gradients.ablation_top_k} heads mean-ablated ${f(r.gradients.gap_after_top_k)}, ${r.gradients.ablation_top_k} random heads ${f(r.gradients.gap_after_random_k)}.</p>` + link("gradients", "gradients report"),
    },
    { title: "Transcoders", html: htmlTable(["block", "FVU", "dead features"], r.transcoders.map((t) => [t.layer, f(t.fvu), f(t.dead_fraction)])) + caveat(1) },
    {
      title: `Gates (block ${r.features.gate_layer}) and evidence carriers (${r.features.carrier_layer === null ? "no upstream transcoder" : `block ${r.features.carrier_layer}`})`,
      html: htmlTable(["gate feature", "DLA", "mean ρ"], r.features.gates.map((g) => [g.feature, f(g.dla), f(g.rho)])) + htmlTable(["carrier feature", "score"], r.features.carriers.map((c) => [c.feature, f(c.score)])) + caveat(2) + link("features", "features report (intervention curves)"),
    },
    {
      title: "Steering attribution",
      html: htmlTable(["node", "ISA"], r.steering.top.map((t) => [t.node, f(t.isa)])) + `<p>Marked gates: ${list(r.steering.gates)}; carriers: ${list(r.steering.carriers)}. Cut identity worst relative error ${r.steering.max_invariant_error.toExponential(1)}; residual share ${f(r.steering.residual_share)}.</p>` + caveat(3) + link("steering", "attribution graph"),
    },
  ]);
}
