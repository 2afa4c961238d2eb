// The block written once. A schedule is the ordered list of steps (and the hook sites between
// them) that one transformer block runs, derived from a ModelConfig alone: where the norms sit,
// whether q/k are normalised, whether positions rotate, which MLP kind. Every backend walks the
// same list and implements each step kind (fusing inside a step as it likes); the float64 oracle
// (test/support/oracle64.ts) is written independently and the conformance test holds each
// backend to the order of sites listed here. A new family quirk is a new step (or a flag on
// one) here plus its implementation in each backend; a new hook site is a `site` step.
import type { BlockSite } from "../hooks/names.js";
import type { ModelConfig } from "./config.js";

/**
 * Named activations of one block call, each [B·T, ...feature]:
 * x the residual stream; h the input of attention or the MLP (normalised, or a copy of x);
 * q, k, v the projections [heads, dHead]; z the per-head attention output; a what attention adds
 * to the residual; pre / post the MLP hidden state before / after the activation; d what the MLP adds;
 * rl / ew a mixture of experts' router logits and expert weights [nExperts].
 */
export type Buf = "x" | "h" | "q" | "k" | "v" | "z" | "a" | "pre" | "post" | "d" | "rl" | "ew";

/** The block's own norms (weights blocks.{i}.{name}). */
export type BlockNormName = "ln1" | "ln1Post" | "ln2" | "ln2Post";

export type Step =
  /** Apply the plan's ops for `site` to `buf`, then record a read when asked. */
  | { kind: "site"; site: BlockSite; buf: Buf }
  /** dst = norm(src) with the block's `weight` norm (RMS or Layer, per ModelConfig.norm). */
  | { kind: "norm"; weight: BlockNormName; src: Buf; dst: Buf }
  /** dst = src: the attention or MLP input of a block without a pre-norm (OLMo 2), kept apart so its site never touches x. */
  | { kind: "copy"; src: Buf; dst: Buf }
  /** q, k, v = h·Wᵀ (+ bias), each [B·T, heads, dHead]. */
  | { kind: "qkv" }
  /** q, k normalised per head or over the whole projection (ModelConfig.qkNorm). */
  | { kind: "qkNorm" }
  /** Rotate q and k by their absolute positions (this layer's RoPE table: local for sliding layers). */
  | { kind: "rope" }
  /**
   * Write k and v into the KV cache at the call's slots; z = softmax(mask(scale·q·kᵀ, softcap))·v
   * per head (grouped-query, causal, never a padding key, the layer's sliding window). The
   * probabilities are the read-only site `pattern`.
   */
  | { kind: "attend"; pattern: "attn.hook_pattern" }
  /**
   * a = Σ_h result_h + b_o, where result_h = z_h·W_o[:, h]ᵀ is the per-head output (site `result`,
   * [heads, dModel]). A backend materialises the per-head results only when the plan touches `result`.
   */
  | { kind: "oProj"; result: "attn.hook_result" }
  /** pre = h·W_gateᵀ (gated MLPs; the up projection is computed beside it) or h·W_upᵀ (plain MLPs), + bias. */
  | { kind: "mlpIn" }
  /** post = act(pre) · up (gated) or act(pre) (plain). */
  | { kind: "mlpAct" }
  /** d = post·W_downᵀ (+ bias). */
  | { kind: "down" }
  /** Mixture of experts: rl = h·W_routerᵀ. */
  | { kind: "route" }
  /**
   * ew = the routing weights from rl: p = softmax(rl); the topK largest p (ties: the lower expert
   * index) kept, divided by their sum when the model normalises them, every other entry 0.
   */
  | { kind: "select" }
  /**
   * d = Σ_e ew_e · down_e(act(gate_e(h)) · up_e(h)), over the experts whose weight is not 0 (so an
   * intervention on ew can add or remove experts). The weighted per-expert outputs are the site
   * `out` ([nExperts, dModel], zeros for unused experts), materialised only when the plan touches it.
   */
  | { kind: "experts"; out: "mlp.hook_expert_out" }
  /** x += src. */
  | { kind: "residual"; src: Buf };

/** The steps of the embedding stage (before block 0) and of the head (after the last block). */
export type EmbedStep =
  /** x = embed[id] · embedScale. */
  | { kind: "embed" }
  /** a = posEmbed[position] (learned positions only). */
  | { kind: "posEmbed" }
  | { kind: "site"; site: "hook_embed" | "hook_pos_embed"; buf: "x" | "a" }
  | { kind: "residual"; src: "a" };

export type HeadStep =
  /** h = lnFinal(x). */
  | { kind: "finalNorm" }
  | { kind: "site"; site: "ln_final.hook_normalized"; buf: "h" }
  /** logits = h·W_Uᵀ, then finalSoftcap·tanh(logits / finalSoftcap) when the model caps. */
  | { kind: "unembed" };

export interface Schedule {
  embed: readonly EmbedStep[];
  /** One block's steps; the same for every layer (layer-specific data, e.g. a sliding window, comes from the config). */
  block: readonly Step[];
  /**
   * Index in `block` of the first step after attention: the jax-js backend jits a block as two
   * halves split here (a matmul reading the permuted attention output inside one jit is ~12x slower).
   */
  split: number;
  head: readonly HeadStep[];
}

const cache = new WeakMap<ModelConfig, Schedule>();

/** The schedule of a model (memoised per config object). */
export function scheduleOf(c: ModelConfig): Schedule {
  let s = cache.get(c);
  if (!s) {
    s = build(c);
    cache.set(c, s);
  }
  return s;
}

function build(c: ModelConfig): Schedule {
  const pre = c.blockNorm !== "post";
  const postNorm = c.blockNorm !== "pre";
  const block: Step[] = [];
  const site = (s: BlockSite, buf: Buf) => block.push({ kind: "site", site: s, buf });
  site("hook_resid_pre", "x");
  block.push(pre ? { kind: "norm", weight: "ln1", src: "x", dst: "h" } : { kind: "copy", src: "x", dst: "h" });
  site("ln1.hook_normalized", "h");
  block.push({ kind: "qkv" });
  if (c.qkNorm.kind !== "none") block.push({ kind: "qkNorm" });
  site("attn.hook_q", "q");
  site("attn.hook_k", "k");
  site("attn.hook_v", "v");
  if (c.pos.kind === "rope") block.push({ kind: "rope" });
  block.push({ kind: "attend", pattern: "attn.hook_pattern" });
  const split = block.length;
  site("attn.hook_z", "z");
  block.push({ kind: "oProj", result: "attn.hook_result" });
  if (postNorm) block.push({ kind: "norm", weight: "ln1Post", src: "a", dst: "a" });
  site("hook_attn_out", "a");
  block.push({ kind: "residual", src: "a" });
  site("hook_resid_mid", "x");
  block.push(pre ? { kind: "norm", weight: "ln2", src: "x", dst: "h" } : { kind: "copy", src: "x", dst: "h" });
  site("ln2.hook_normalized", "h");
  if (c.mlp.kind === "moe") {
    block.push({ kind: "route" });
    site("mlp.hook_router_logits", "rl");
    block.push({ kind: "select" });
    site("mlp.hook_expert_weights", "ew");
    block.push({ kind: "experts", out: "mlp.hook_expert_out" });
  } else {
    block.push({ kind: "mlpIn" });
    site("mlp.hook_pre", "pre");
    block.push({ kind: "mlpAct" });
    site("mlp.hook_post", "post");
    block.push({ kind: "down" });
  }
  site("mlp.hook_down", "d");
  if (postNorm) block.push({ kind: "norm", weight: "ln2Post", src: "d", dst: "d" });
  site("hook_mlp_out", "d");
  block.push({ kind: "residual", src: "d" });
  site("hook_resid_post", "x");

  const embed: EmbedStep[] = [{ kind: "embed" }, { kind: "site", site: "hook_embed", buf: "x" }];
  if (c.pos.kind === "learned") embed.push({ kind: "posEmbed" }, { kind: "site", site: "hook_pos_embed", buf: "a" }, { kind: "residual", src: "a" });
  const head: HeadStep[] = [{ kind: "finalNorm" }, { kind: "site", site: "ln_final.hook_normalized", buf: "h" }, { kind: "unembed" }];
  return { embed, block, split, head };
}

/**
 * Every hook site a forward pass fires, in order, for a model (the conformance test compares a
 * backend's fired sites with this). Sites inside a step (`pattern`, `result`) fire within it.
 */
export function siteOrder(c: ModelConfig): string[] {
  const s = scheduleOf(c);
  const out: string[] = [];
  for (const st of s.embed) if (st.kind === "site") out.push(st.site);
  for (let l = 0; l < c.nLayers; l++)
    for (const st of s.block) {
      if (st.kind === "site") out.push(`blocks.${l}.${st.site}`);
      else if (st.kind === "attend") out.push(`blocks.${l}.${st.pattern}`);
      else if (st.kind === "oProj") out.push(`blocks.${l}.${st.result}`);
      else if (st.kind === "experts") out.push(`blocks.${l}.${st.out}`);
    }
  out.push("ln_final.hook_normalized");
  return out;
}
