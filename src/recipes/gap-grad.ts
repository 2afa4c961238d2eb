// The gradient of the Yes/No logit gap (protocol §9.1) with respect to activations and to the
// injection strength, from the engine's cross-entropy gradients.
//
// gap = logsumexp_Y(log p(y)) − logsumexp_N(log p(n)) over the spellings (single tokens where the
// vocabulary has them, else teacher-forced token sequences, as `patch`). With L_s = −log p(s) and
// w the softmax of the log-probabilities within each set, d gap = Σ_n w_n dL_n − Σ_y w_y dL_y:
// the normalizer cancels because each set's weights sum to 1. One pass per spelling; a sequence's
// pass runs on the prompt plus its own leading tokens, so its activations have more positions.
import type { Model } from "../model/model.js";
import type { HookName } from "../hooks/names.js";
import type { Intervention, PosSpec } from "../hooks/plan.js";
import type { TrainParam } from "../engine/grad.js";
import { gapScorer } from "./patch.js";

export interface GapSpelling {
  /** Prompt ids plus the spelling's tokens but its last. */
  ids: number[];
  /** Targets per position (-1: none): the spelling's tokens from the last prompt position on. */
  targets: number[];
  yes: boolean;
}

export interface GapSpellings {
  spellings: GapSpelling[];
  promptLength: number;
  describe: string;
}

export function gapSpellings(model: Model, promptText: string, promptIds: readonly number[]): GapSpellings {
  const sc = gapScorer(model, promptText, promptIds);
  const n = promptIds.length;
  const spellings = sc.seqs.map((s, i) => {
    const ids = [...promptIds, ...s.slice(0, -1)];
    const targets = ids.map((_, p) => (p >= n - 1 ? s[p - n + 1]! : -1));
    return { ids, targets, yes: i < sc.nYes };
  });
  return { spellings, promptLength: n, describe: sc.describe };
}

export interface Injection {
  at: HookName;
  vector: Float32Array;
  scale: number;
  pos: PosSpec;
}

export interface GapGrad {
  gap: number;
  /** Per spelling: its signed weight in d gap (−w for Yes, +w for No) and d L_s / d activation per site ([positions, ...feature]). */
  terms: { spelling: GapSpelling; weight: number; grads: Map<HookName, Float32Array> }[];
  /** d gap / d(injection scale), when an injection was given. */
  dScale: number | null;
}

/**
 * The gap (with `injection` and the constant `plan`) and the per-spelling gradients at `sites`.
 * The injection is a `scale` parameter, so its derivative is the total derivative of the gap in α.
 */
export async function gapGrad(model: Model, sp: GapSpellings, o: { sites: readonly HookName[]; injection?: Injection; plan?: Intervention[] }): Promise<GapGrad> {
  const params: TrainParam[] = [];
  if (o.injection) params.push({ kind: "scale", at: o.injection.at, vector: o.injection.vector, value: o.injection.scale, pos: o.injection.pos });
  for (const at of o.sites) params.push({ kind: "activation", at });
  const rs = [];
  for (const s of sp.spellings) {
    const k = s.targets.filter((t) => t >= 0).length;
    const r = await model.lossAndGrad([{ ids: s.ids }], { targets: [s.targets], params, ...(o.plan?.length ? { plan: o.plan } : {}) });
    // The loss is the mean over the k targets: the sequence's −log p is k times it.
    rs.push({ s, lp: -k * r.loss, grads: r.grads.map((g) => g.map((a) => Float32Array.from(a, (x) => k * x))) });
  }
  const lse = (xs: number[]) => { const m = Math.max(...xs); return m + Math.log(xs.reduce((a, x) => a + Math.exp(x - m), 0)); };
  const zY = lse(rs.filter((r) => r.s.yes).map((r) => r.lp)), zN = lse(rs.filter((r) => !r.s.yes).map((r) => r.lp));
  let dScale = o.injection ? 0 : null;
  const terms = rs.map((r) => {
    const weight = r.s.yes ? -Math.exp(r.lp - zY) : Math.exp(r.lp - zN);
    const off = o.injection ? 1 : 0;
    if (o.injection) dScale = (dScale ?? 0) + weight * r.grads[0]![0]![0]!;
    return { spelling: r.s, weight, grads: new Map(o.sites.map((at, i) => [at, r.grads[off + i]![0]!] as const)) };
  });
  return { gap: zY - zN, terms, dScale };
}
