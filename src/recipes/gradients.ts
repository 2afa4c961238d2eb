// Gradient attribution of the Yes/No logit gap (protocol §9.2, the paper's 13 §B / 13c / 10–12):
// - ‖∂gap/∂x‖ per component (attention and MLP outputs of every block) at the last prompt position
//   and over all positions, and per token × layer on the residual stream (a heat map);
// - per-head attribution: Σ_{p,d} ∂gap/∂z[p,h,d] · (z_steered − z_unsteered)[p,h,d] at attn.hook_z,
//   the first-order estimate (attribution patching) of how much the steering-induced change of
//   head h moves the gap; knocking the head out moves it by about minus that;
// - mean-ablation of the top-N heads by |attribution| in the steered runs (N = 0..K), against
//   N random heads on the same trials, as curves of the mean gap.
// - cross-entropy gradients on the bias-training targets (13c): ‖∂CE/∂x‖ per component over the
//   protocol's bias-vector examples (recipes/bias-vector.ts: the injected trial answered "Yes, … {concept}",
//   the control "No, …"), injection and control examples apart.
// Gradients are taken on the steered run (the injection a constant of the pass).
import fs from "node:fs";
import path from "node:path";
import type { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { mulberry32 } from "../core/rng.js";
import { getVariant, renderTrial } from "../eval/protocol.js";
import { hookName, type HookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import { escapeHtml, htmlPage, htmlTable } from "../report/page.js";
import { gapGrad, gapSpellings, type GapSpellings } from "./gap-grad.js";
import { meanCI, type MeanCI } from "./patch.js";
import { loadAnalysisModel, siteConfig, siteVectors, type SiteArgs } from "./site.js";
import { batchInputs, buildBiasData, type BiasExample } from "./bias-vector.js";

/** d gap / d activation at each site over the prompt's positions ([promptLength, ...feature]): the spellings' gradients, weighted. */
export async function promptGradients(model: Model, sp: GapSpellings, sites: readonly HookName[], plan: Intervention[]): Promise<{ gap: number; grads: Map<HookName, Float32Array> }> {
  const gg = await gapGrad(model, sp, { sites, plan });
  const grads = new Map<HookName, Float32Array>();
  for (const at of sites) {
    const first = gg.terms[0]!.grads.get(at)!;
    const per = first.length / gg.terms[0]!.spelling.ids.length;
    const out = new Float32Array(sp.promptLength * per);
    for (const t of gg.terms) {
      const g = t.grads.get(at)!;
      for (let i = 0; i < out.length; i++) out[i] = out[i]! + t.weight * g[i]!;
    }
    grads.set(at, out);
  }
  return { gap: gg.gap, grads };
}

const norm = (x: Float32Array, from = 0, to = x.length) => { let s = 0; for (let i = from; i < to; i++) s += x[i]! * x[i]!; return Math.sqrt(s); };

export interface TrialGradients {
  gap: number;
  /** [layer] → ‖∂gap/∂attn_out‖ and ‖∂gap/∂mlp_out‖ at the last position and over all positions. */
  components: { attnLast: number; mlpLast: number; attnAll: number; mlpAll: number }[];
  /** [layer][position] ‖∂gap/∂resid_post‖. */
  tokenLayer: number[][];
  /** [layer][head] Σ ∂gap/∂z · (z_steered − z_unsteered). */
  heads: number[][];
}

export async function trialGradients(model: Model, sp: GapSpellings, steer: Intervention[]): Promise<TrialGradients> {
  const { nLayers: nL, nHeads: H, dHead } = model.config;
  const n = sp.promptLength, D = model.config.dModel;
  const sites: HookName[] = [];
  for (let l = 0; l < nL; l++) sites.push(hookName(l, "hook_attn_out"), hookName(l, "hook_mlp_out"), hookName(l, "hook_resid_post"), hookName(l, "attn.hook_z"));
  const { gap, grads } = await promptGradients(model, sp, sites, steer);
  const ids = sp.spellings[0]!.ids.slice(0, n);
  const reads: Intervention[] = Array.from({ length: nL }, (_, l) => ({ op: "read", at: hookName(l, "attn.hook_z"), pos: { from: 0 } }));
  const zs = await model.forward([{ ids }], { plan: [...steer, ...reads], logits: "none" });
  const z0 = await model.forward([{ ids }], { plan: reads, logits: "none" });
  const components = [], tokenLayer = [], heads = [];
  for (let l = 0; l < nL; l++) {
    const a = grads.get(hookName(l, "hook_attn_out"))!, m = grads.get(hookName(l, "hook_mlp_out"))!, r = grads.get(hookName(l, "hook_resid_post"))!;
    components.push({ attnLast: norm(a, (n - 1) * D, n * D), mlpLast: norm(m, (n - 1) * D, n * D), attnAll: norm(a), mlpAll: norm(m) });
    tokenLayer.push(Array.from({ length: n }, (_, p) => norm(r, p * D, (p + 1) * D)));
    const g = grads.get(hookName(l, "attn.hook_z"))!;
    const s = zs.cache.get(hookName(l, "attn.hook_z"), 0).data, u = z0.cache.get(hookName(l, "attn.hook_z"), 0).data;
    const row = new Array<number>(H).fill(0);
    for (let p = 0; p < n; p++) for (let h = 0; h < H; h++) for (let d = 0; d < dHead; d++) { const i = (p * H + h) * dHead + d; row[h] = row[h]! + g[i]! * (s[i]! - u[i]!); }
    heads.push(row);
  }
  return { gap, components, tokenLayer, heads };
}

/** Mean over `examples` of ‖∂CE/∂x‖ (all positions) at every block's attention output, MLP output and residual stream. */
export async function ceGradients(model: Model, examples: readonly BiasExample[]): Promise<{ layer: number; attn: number; mlp: number; resid: number }[]> {
  const nL = model.config.nLayers;
  const sites: HookName[] = [];
  for (let l = 0; l < nL; l++) sites.push(hookName(l, "hook_attn_out"), hookName(l, "hook_mlp_out"), hookName(l, "hook_resid_post"));
  const acc = Array.from({ length: nL }, (_, layer) => ({ layer, attn: 0, mlp: 0, resid: 0 }));
  for (const e of examples) {
    const { rows, targets, plan } = batchInputs([e]);
    const r = await model.lossAndGrad(rows, { targets, params: sites.map((at) => ({ kind: "activation" as const, at })), plan });
    for (let l = 0; l < nL; l++) {
      acc[l]!.attn += norm(r.grads[3 * l]![0]!) / examples.length;
      acc[l]!.mlp += norm(r.grads[3 * l + 1]![0]!) / examples.length;
      acc[l]!.resid += norm(r.grads[3 * l + 2]![0]!) / examples.length;
    }
  }
  return acc;
}

export interface Head { layer: number; head: number }

/** The mean gap of the steered prompts with `heads` mean-ablated at attn.hook_z (means per layer over the unsteered prompts). */
export async function ablatedGap(model: Model, prompts: readonly { sp: GapSpellings; steer: Intervention[] }[], heads: readonly Head[], means: Map<number, Float32Array>): Promise<number[]> {
  const byLayer = new Map<number, number[]>();
  for (const h of heads) byLayer.set(h.layer, [...(byLayer.get(h.layer) ?? []), h.head]);
  const ablate: Intervention[] = [...byLayer].map(([l, hs]) => ({ op: "ablate", at: hookName(l, "attn.hook_z"), mode: "mean", mean: means.get(l)!, heads: hs }));
  const out = [];
  for (const p of prompts) out.push((await gapGrad(model, p.sp, { sites: [], plan: [...p.steer, ...ablate] })).gap);
  return out;
}

/** Per layer, hook_z's mean over every position of the given (unsteered) prompts. */
export async function headMeans(model: Model, prompts: readonly number[][]): Promise<Map<number, Float32Array>> {
  const nL = model.config.nLayers;
  const out = new Map<number, Float32Array>();
  let count = 0;
  for (const ids of prompts) {
    const res = await model.forward([{ ids }], { plan: Array.from({ length: nL }, (_, l) => ({ op: "read" as const, at: hookName(l, "attn.hook_z"), pos: { from: 0 } })), logits: "none" });
    for (let l = 0; l < nL; l++) {
      const z = res.cache.get(hookName(l, "attn.hook_z"), 0).data;
      const F = z.length / ids.length;
      const m = out.get(l) ?? new Float32Array(F);
      for (let p = 0; p < ids.length; p++) for (let f = 0; f < F; f++) m[f] = m[f]! + z[p * F + f]!;
      out.set(l, m);
    }
    count += ids.length;
  }
  for (const m of out.values()) for (let f = 0; f < m.length; f++) m[f] = m[f]! / count;
  return out;
}

// ---------------------------------------------------------------- the command

export interface GradientsArgs extends SiteArgs {
  /** One injection strength (default: the configuration's largest). */
  strength?: number;
  trials?: number;
  /** Largest number of heads ablated (default 8). */
  topHeads?: number;
  seed?: number;
}

export interface GradientsResults {
  recipe: "gradients";
  model: string;
  injection_layer: number;
  strength: number;
  concepts: string[];
  trials: number;
  gap: string;
  /** Per layer: mean over trials of the gradient norms. */
  components: { layer: number; attn_last: number; mlp_last: number; attn_all: number; mlp_all: number }[];
  /** Trial 1 of the first concept: [layer][position] ‖∂gap/∂resid_post‖, with the prompt's tokens. */
  token_layer: { tokens: string[]; inject_from: number; norms: number[][] };
  /** Heads by mean |attribution| over trials. */
  heads: { layer: number; head: number; attribution: MeanCI }[];
  /** N = 0..K: mean gap with the top-N heads and with N random heads mean-ablated (steered runs), and the unsteered gap. */
  ablation: { n: number; top: MeanCI; random: MeanCI }[];
  unsteered_gap: MeanCI;
  /** ‖∂CE/∂x‖ on the bias-training examples at this layer and strength (mean per example; injection and control apart). */
  ce: { examples: { injection: number; control: number }; injection: { layer: number; attn: number; mlp: number; resid: number }[]; control: { layer: number; attn: number; mlp: number; resid: number }[] };
  notes: string[];
}

export async function gradientsCommand(a: GradientsArgs): Promise<GradientsResults> {
  const model = await loadAnalysisModel(a);
  try {
    const { cfg, layer: L } = siteConfig("gradients", a, model);
    const strength = a.strength ?? Math.max(...cfg.strengths);
    const trials = a.trials ?? 2;
    if (!Number.isInteger(trials) || trials < 1) throw new UsageError(`--trials must be a positive integer, got ${trials}`);
    const vs = await siteVectors(model, cfg, L, a.vectorCache);
    const { nLayers: nL, nHeads: H } = model.config;
    const per: TrialGradients[] = [];
    const prompts: { sp: GapSpellings; steer: Intervention[]; plain: Intervention[] }[] = [];
    let tokenLayer: GradientsResults["token_layer"] | null = null;
    let describe = "";
    for (const concept of cfg.concepts)
      for (let t = 1; t <= trials; t++) {
        const p = renderTrial(model, getVariant("original"), t, { format: cfg.promptFormat, judgePrompt: "question" });
        const sp = gapSpellings(model, p.text, p.ids);
        describe = sp.describe;
        const steer: Intervention[] = [{ op: "add", at: hookName(L, "hook_resid_post"), vector: vs.get(concept)!, scale: strength, pos: { from: p.injectFrom } }];
        const g = await trialGradients(model, sp, steer);
        per.push(g);
        prompts.push({ sp, steer, plain: [] });
        tokenLayer ??= { tokens: p.ids.map((id) => model.tokenizer!.decode([id])), inject_from: p.injectFrom, norms: g.tokenLayer };
      }
    if (!a.quiet) process.stderr.write(`gradients: ${per.length} trials done; ablating heads\n`);
    const components = Array.from({ length: nL }, (_, l) => {
      const m = (k: keyof TrialGradients["components"][number]) => per.reduce((s, g) => s + g.components[l]![k], 0) / per.length;
      return { layer: l, attn_last: m("attnLast"), mlp_last: m("mlpLast"), attn_all: m("attnAll"), mlp_all: m("mlpAll") };
    });
    const heads = [];
    for (let l = 0; l < nL; l++) for (let h = 0; h < H; h++) heads.push({ layer: l, head: h, attribution: meanCI(per.map((g) => g.heads[l]![h]!)) });
    heads.sort((x, y) => Math.abs(y.attribution.mean) - Math.abs(x.attribution.mean) || x.layer - y.layer || x.head - y.head);
    const means = await headMeans(model, prompts.map((p) => p.sp.spellings[0]!.ids.slice(0, p.sp.promptLength)));
    const K = Math.min(a.topHeads ?? 8, nL * H);
    const rng = mulberry32(a.seed ?? 0);
    const all: Head[] = heads.map((h) => ({ layer: h.layer, head: h.head }));
    const steered = prompts.map((p) => ({ sp: p.sp, steer: p.steer }));
    const ablation = [];
    for (let n = 0; n <= K; n++) {
      // Random heads: a seeded draw of n distinct heads (the same trials as the top-N curve).
      const shuffled = [...all];
      for (let i = shuffled.length - 1; i > 0; i--) { const j = Math.floor(rng() * (i + 1)); [shuffled[i], shuffled[j]] = [shuffled[j]!, shuffled[i]!]; }
      ablation.push({ n, top: meanCI(await ablatedGap(model, steered, all.slice(0, n), means)), random: meanCI(await ablatedGap(model, steered, shuffled.slice(0, n), means)) });
    }
    const unsteered = meanCI(await Promise.all(prompts.map(async (p) => (await gapGrad(model, p.sp, { sites: [] })).gap)));
    const bias = await buildBiasData(model, { concepts: cfg.concepts, trialsPerConcept: trials, injectionLayers: [L], strengths: [strength], baselineWords: cfg.baselineWords, vectorCache: a.vectorCache ?? null });
    const inj = bias.filter((e) => e.inject), ctl = bias.filter((e) => !e.inject);
    const ce = { examples: { injection: inj.length, control: ctl.length }, injection: await ceGradients(model, inj), control: await ceGradients(model, ctl) };
    const results: GradientsResults = {
      recipe: "gradients",
      model: a.model,
      injection_layer: L,
      strength,
      concepts: cfg.concepts,
      trials,
      gap: describe,
      components,
      token_layer: tokenLayer!,
      heads: heads.slice(0, 20),
      ablation,
      unsteered_gap: unsteered,
      ce,
      notes: [
        "Gradients of the Yes − No logit gap at the last prompt position, on the steered run (docs/mechanisms.md).",
        "Head attribution is first order (attribution patching): Σ ∂gap/∂z · (z_steered − z_unsteered); the ablation curve is the measured effect.",
        "Mean-ablation replaces a head's hook_z by its mean over every position of the unsteered trial prompts.",
        "CE gradients: the bias-vector recipe's examples (protocol §7.2) at this injection layer and strength, one pass each; an empty set reports zeros.",
      ],
    };
    fs.mkdirSync(a.out, { recursive: true });
    fs.writeFileSync(path.join(a.out, "results.json"), JSON.stringify(results, null, 1) + "\n");
    fs.writeFileSync(path.join(a.out, "report.html"), gradientsReport(results));
    return results;
  } finally {
    model.dispose();
  }
}

export function gradientsReport(r: GradientsResults): string {
  const f = (x: number) => x.toExponential(2);
  const max = Math.max(1e-12, ...r.token_layer.norms.flat());
  const shade = (x: number) => `<td style="background: rgba(43,108,176,${(x / max).toFixed(3)})" title="${f(x)}">${f(x)}</td>`;
  const tl = r.token_layer;
  const heat = `<div style="overflow-x:auto"><table><thead><tr><th>layer</th>${tl.tokens.map((t, p) => `<th${p >= tl.inject_from ? ' style="text-decoration: underline"' : ""}>${escapeHtml(JSON.stringify(t))}</th>`).join("")}</tr></thead><tbody>${tl.norms.map((row, l) => `<tr><th>${l}</th>${row.map(shade).join("")}</tr>`).join("")}</tbody></table></div>`;
  const ci = (m: MeanCI) => `${m.mean.toFixed(3)} [${m.lo.toFixed(3)}, ${m.hi.toFixed(3)}]`;
  return htmlPage(`selfscope gradients — ${path.basename(r.model)}`, `injection at blocks.${r.injection_layer}.hook_resid_post, strength ${r.strength} · ${r.concepts.length} concepts × ${r.trials} trials · ${r.gap}`, [
    { title: "‖∂gap/∂x‖ per component (mean over trials)", html: htmlTable(["layer", "attn out, last token", "MLP out, last token", "attn out, all tokens", "MLP out, all tokens"], r.components.map((c) => [c.layer, f(c.attn_last), f(c.mlp_last), f(c.attn_all), f(c.mlp_all)])) },
    { title: "‖∂gap/∂resid_post‖ per token × layer (first trial; injected tokens underlined)", html: heat },
    { title: "Heads by |attribution| (Σ ∂gap/∂z · Δz)", html: htmlTable(["layer", "head", "attribution (mean, 95% CI)"], r.heads.map((h) => [h.layer, h.head, ci(h.attribution)])) },
    { title: `Mean-ablation of the top-N heads vs N random heads (steered; unsteered gap ${ci(r.unsteered_gap)})`, html: htmlTable(["N", "gap, top-N ablated", "gap, N random ablated"], r.ablation.map((x) => [x.n, ci(x.top), ci(x.random)])) },
    { title: `‖∂CE/∂x‖ on the bias-training targets (${r.ce.examples.injection} injection, ${r.ce.examples.control} control examples)`, html: htmlTable(["layer", "attn out (inj)", "MLP out (inj)", "resid (inj)", "attn out (ctl)", "MLP out (ctl)", "resid (ctl)"], r.ce.injection.map((x, l) => { const c = r.ce.control[l]!; return [x.layer, f(x.attn), f(x.mlp), f(x.resid), f(c.attn), f(c.mlp), f(c.resid)]; })) },
    { title: "Notes", html: r.notes.map((n) => `<p class="note">${escapeHtml(n)}</p>`).join("") },
  ]);
}
