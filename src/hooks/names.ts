// Hook names follow TransformerLens exactly; they are a closed union so a typo is a compile error.
import { UsageError } from "../core/errors.js";

export type AttnSite = "q" | "k" | "v" | "z" | "pattern";
export type BlockSite =
  | "hook_resid_pre"
  | "hook_resid_mid"
  | "hook_resid_post"
  | "hook_attn_out"
  | "hook_mlp_out"
  | `attn.hook_${AttnSite}`
  | `mlp.hook_${"pre" | "post" | "down"}`;
export type HookName = "hook_embed" | "hook_pos_embed" | "ln_final.hook_normalized" | `blocks.${number}.${BlockSite}`;

export const BLOCK_SITES: readonly BlockSite[] = [
  "hook_resid_pre",
  "attn.hook_q",
  "attn.hook_k",
  "attn.hook_v",
  "attn.hook_pattern",
  "attn.hook_z",
  "hook_attn_out",
  "hook_resid_mid",
  "mlp.hook_pre",
  "mlp.hook_post",
  "mlp.hook_down",
  "hook_mlp_out",
  "hook_resid_post",
];

export const hookName = (layer: number, site: BlockSite): HookName => `blocks.${layer}.${site}`;

export interface ParsedHook {
  layer: number | null;
  site: BlockSite | "hook_embed" | "hook_pos_embed" | "ln_final.hook_normalized";
}

/** Parse and validate a hook name against a model with `nLayers` blocks. */
export function parseHook(name: string, nLayers: number): ParsedHook {
  if (name === "hook_embed" || name === "hook_pos_embed" || name === "ln_final.hook_normalized") return { layer: null, site: name };
  const m = /^blocks\.(\d+)\.(.+)$/.exec(name);
  if (!m || !BLOCK_SITES.includes(m[2] as BlockSite)) {
    throw new UsageError(`unknown hook point "${name}"; expected hook_embed, ln_final.hook_normalized or blocks.{i}.{${BLOCK_SITES.join("|")}}`);
  }
  const layer = Number(m[1]);
  if (layer >= nLayers) throw new UsageError(`hook point "${name}": the model has ${nLayers} blocks (0..${nLayers - 1})`);
  return { layer, site: m[2] as BlockSite };
}
