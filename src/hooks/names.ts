// Hook names follow TransformerLens exactly; they are a closed union so a typo is a compile error.
import { UsageError } from "../core/errors.js";

export type AttnSite = "q" | "k" | "v" | "z" | "pattern" | "result";
export type BlockSite =
  | "hook_resid_pre"
  | `ln${1 | 2}.hook_normalized`
  | "hook_resid_mid"
  | "hook_resid_post"
  | "hook_attn_out"
  | "hook_mlp_out"
  | `attn.hook_${AttnSite}`
  | `mlp.hook_${"pre" | "post" | "down"}`
  | MoeSite;
/**
 * Mixture-of-experts MLP sites (no TransformerLens standard): the router's logits [nExperts], the
 * weight each expert gets (0 unless routed to) [nExperts], and each expert's weighted output
 * [nExperts, dModel] (their sum is mlp.hook_down). A MoE block has these instead of mlp.hook_pre/post.
 */
export type MoeSite = `mlp.hook_${"router_logits" | "expert_weights" | "expert_out"}`;
export type HookName = "hook_embed" | "hook_pos_embed" | "ln_final.hook_normalized" | `blocks.${number}.${BlockSite}`;

/** Every block site, in the order a block fires them (src/engine/schedule.ts). */
export const BLOCK_SITES: readonly BlockSite[] = [
  "hook_resid_pre",
  "ln1.hook_normalized",
  "attn.hook_q",
  "attn.hook_k",
  "attn.hook_v",
  "attn.hook_pattern",
  "attn.hook_z",
  "attn.hook_result",
  "hook_attn_out",
  "hook_resid_mid",
  "ln2.hook_normalized",
  "mlp.hook_pre",
  "mlp.hook_post",
  "mlp.hook_down",
  "hook_mlp_out",
  "hook_resid_post",
];

/** A mixture-of-experts block's sites, in firing order. */
export const MOE_BLOCK_SITES: readonly BlockSite[] = BLOCK_SITES.flatMap((s): BlockSite[] =>
  s === "mlp.hook_pre" ? ["mlp.hook_router_logits", "mlp.hook_expert_weights", "mlp.hook_expert_out"] : s === "mlp.hook_post" ? [] : [s],
);

/** The block sites of a model: dense, or mixture of experts. */
export const blockSites = (moe: boolean): readonly BlockSite[] => (moe ? MOE_BLOCK_SITES : BLOCK_SITES);

export const hookName = (layer: number, site: BlockSite): HookName => `blocks.${layer}.${site}`;

export interface ParsedHook {
  layer: number | null;
  site: BlockSite | "hook_embed" | "hook_pos_embed" | "ln_final.hook_normalized";
}

/** Parse and validate a hook name against a model with `nLayers` blocks. */
export function parseHook(name: string, nLayers: number): ParsedHook {
  if (name === "hook_embed" || name === "hook_pos_embed" || name === "ln_final.hook_normalized") return { layer: null, site: name };
  const m = /^blocks\.(\d+)\.(.+)$/.exec(name);
  if (!m || !(BLOCK_SITES.includes(m[2] as BlockSite) || MOE_BLOCK_SITES.includes(m[2] as BlockSite))) {
    throw new UsageError(`unknown hook point "${name}"; expected hook_embed, ln_final.hook_normalized or blocks.{i}.{${BLOCK_SITES.join("|")}}`);
  }
  const layer = Number(m[1]);
  if (layer >= nLayers) throw new UsageError(`hook point "${name}": the model has ${nLayers} blocks (0..${nLayers - 1})`);
  return { layer, site: m[2] as BlockSite };
}

/** What a names filter accepts: one name, a list, a pattern, or a predicate (TransformerLens's names_filter). */
export type NamesFilter = string | readonly string[] | RegExp | ((name: HookName) => boolean);

/**
 * Every hook name of a model with `nLayers` blocks that `filter` accepts, in the order a forward
 * pass fires them. `learnedPos`: the model has hook_pos_embed (learned positions, GPT-2); `moe`: its
 * MLPs are mixtures of experts (MOE_BLOCK_SITES).
 * A string filter with no match is an error (a typo must not read nothing).
 */
export function hookNames(nLayers: number, filter: NamesFilter = () => true, opts: { learnedPos?: boolean; moe?: boolean } = {}): HookName[] {
  const all: HookName[] = ["hook_embed", ...(opts.learnedPos ? (["hook_pos_embed"] as const) : [])];
  for (let l = 0; l < nLayers; l++) for (const s of blockSites(opts.moe ?? false)) all.push(hookName(l, s));
  all.push("ln_final.hook_normalized");
  const test =
    typeof filter === "function" ? filter : filter instanceof RegExp ? (n: string) => filter.test(n) : typeof filter === "string" ? (n: string) => n === filter : (n: string) => filter.includes(n);
  const out = all.filter((n) => test(n));
  if (out.length === 0 && typeof filter !== "function") throw new UsageError(`no hook point matches ${filter instanceof RegExp ? String(filter) : JSON.stringify(filter)}; hook names look like blocks.{i}.{${BLOCK_SITES.join("|")}}`);
  return out;
}
