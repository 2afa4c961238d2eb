// Non-finite logits: caught in the driver and turned into an error that names the first bad activation.
import { NumericalError } from "../core/errors.js";
import type { HookName } from "../hooks/names.js";
import type { Intervention } from "../hooks/plan.js";
import type { ModelConfig } from "./config.js";
import type { ForwardOptions, ForwardResult, Row } from "./types.js";

/** Internal: logits with NaN/Inf, caught by forward/generate and turned into a located NumericalError. */
export class NonFiniteLogits extends Error {
  constructor(
    readonly row: number,
    readonly value: number,
  ) {
    super("non-finite logits");
  }
}

/**
 * Re-run one row reading every block-boundary site and name the first that holds NaN/Inf
 * (NaN in weights, or an intervention scale that overflowed), so the error says where.
 */
export async function locateNonFinite(
  c: ModelConfig,
  forward: (rows: Row[], opts: ForwardOptions) => Promise<ForwardResult>,
  row: Row,
  opts: ForwardOptions,
  e: NonFiniteLogits,
): Promise<NumericalError> {
  const sites: HookName[] = ["hook_embed"];
  for (let l = 0; l < c.nLayers; l++) for (const s of ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"] as const) sites.push(`blocks.${l}.${s}`);
  const plan: Intervention[] = [...(opts.plan ?? []).map((iv) => ({ ...iv, rows: [0] })), ...sites.map((at) => ({ op: "read" as const, at }))];
  let where = "the final norm or unembedding";
  try {
    const { cache } = await forward([row], { ...opts, plan, logits: "none" });
    for (const at of sites) {
      const { data, shape } = cache.get(at);
      const i = data.findIndex((x) => !Number.isFinite(x));
      if (i >= 0) {
        where = `${at} (position ${Math.floor(i / (shape[1] ?? 1))}, value ${data[i]})`;
        break;
      }
    }
  } catch {
    where = "(could not re-run to locate it)";
  }
  return new NumericalError(
    `non-finite logits (${e.value}) in batch row ${e.row}: the first non-finite activation is at ${where}; ` +
      `check the model file for NaN/Inf weights and any intervention vector or scale`,
  );
}

