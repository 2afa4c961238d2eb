// The public model object: weights on a device, plus the tokenizer and chat template that came
// with the checkpoint. Everything takes and returns host data; jax-js stays inside its engine,
// which is imported (dynamically) only for the "wasm" and "webgpu" devices and for gradients.
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { cacheRoot } from "../core/cache.js";
import { UsageError } from "../core/errors.js";
import { renderChat, chatTemplateFromTokenizerConfig, type ChatMessage } from "../io/chat-template.js";
import { checkTokenizerFits, loadTokenizerJson, tokenizerFromGguf, type Tokenizer } from "../io/tokenizer.js";
import type { GgufValue } from "../io/gguf.js";
import type { Plan } from "../hooks/plan.js";
import { initDevice, type DeviceInfo, type DeviceName } from "../engine/device.js";
import type { JvpRequest, JvpResult, LossAndGradRequest, LossAndGradResult, TrainParam } from "../engine/grad.js";
import type { ModelConfig } from "../engine/config.js";
import { CpuEngine } from "../engine/cpu/engine.js";
import type { ForwardOptions, ForwardResult, GenerateOptions, GenerateResult, Row } from "../engine/types.js";
import { hasNativeMatrices, loadHostModel, weightsDigest, type FileFacts, type HostModel, type ModelFiles } from "./load.js";
import { mergeParams } from "./export.js";
import { checkFits } from "./memory.js";
import { readSamplingDefaults, resolveSampler, type EffectiveSampler, type SamplerRequest, type SamplingDefaults } from "./sampling.js";

/** What Model needs from an engine: the jax-js Engine (wasm, webgpu) and the CpuEngine (cpu) both fit. */
export interface InferenceEngine {
  readonly config: ModelConfig;
  forward(rows: (Row | number[])[], opts?: ForwardOptions): Promise<ForwardResult>;
  generate(rows: (Row | number[])[], opts: GenerateOptions): Promise<GenerateResult>;
  featShape(site: string): number[];
  /** Both backends differentiate (engine/grad.ts) on the weights they hold. */
  lossAndGrad(rows: Row[], req: LossAndGradRequest): Promise<LossAndGradResult>;
  jvpScale(rows: Row[], req: JvpRequest): Promise<JvpResult>;
  dispose(): void;
}

export interface LoadOptions {
  /** Default "cpu": selfscope's own Wasm SIMD engine. "wasm"/"webgpu": the jax-js engine. */
  device?: DeviceName;
  /** Threads of the cpu device (default: every core, os.availableParallelism()). */
  threads?: number;
  /** Force a smaller per-buffer limit (tests exercise weight splitting on any device). */
  maxBindingBytes?: number;
  /**
   * Weight storage: "f32" (default), or "f16" on WebGPU with shader-f16 (half the memory; the
   * residual stream stays f32). Quantized GGUFs default to "f16" on WebGPU: their error dominates.
   * "native" (cpu; the default for checkpoints with Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, BF16 or F16 tensors): those matrices stay
   * in their format in memory and are computed on as such (Q8_0 1.125, Q4_K 0.59, BF16 2 bytes per
   * weight; results equal f32's on the exactly widened values up to summation order); other
   * tensors are f32. The first gradient, derivative or weight delta gives every quantized matrix
   * an exact f32 copy (memory grows by the f32 size). "native-int8" (cpu): as "native", and the
   * products with Q4_K/Q5_K/Q6_K matrices (and at decode sizes Q8_0 ones) quantize their
   * activations to int8 as llama.cpp does: per 256 (its q8_K) for the K-quants, per 32 with f16
   * scales (its q8_0) for Q8_0 (faster; logits then differ from the f32 path's by the activation
   * rounding, and at decode sizes equal llama.cpp's up to f32 rounding).
   */
  weights?: "f32" | "f16" | "native" | "native-int8";
  /**
   * Weight params folded into the weights at load (an adapter's LoRA factors and deltas: W + scale·B·A,
   * W + delta, as export.ts's mergeParams). `id` (e.g. the adapter file's sha256) enters weightsHash(),
   * so run headers, resume checks and the vector cache tell the merged model from its base.
   */
  merge?: { params: readonly TrainParam[]; id: string };
}

/**
 * A prompt: raw text (BOS added per the tokenizer), chat messages (rendered with the template), ids,
 * or `{ text }`: text that already holds its special tokens as text (a rendered chat template, or a
 * run log's `prompt`), tokenized without adding BOS again (`addSpecial: true` adds them).
 */
export type Prompt =
  | string
  | { messages: ChatMessage[]; addGenerationPrompt?: boolean; prefill?: string }
  | { ids: number[] }
  | { text: string; addSpecial?: boolean };

/** What a model's outputs depend on besides the prompt, each as a sha256 (hex). */
export interface ModelIdentity {
  /** Every byte of every weight file (see weightsDigest). */
  weights: string;
  /** tokenizer.json + tokenizer_config.json, or the GGUF's tokenizer.* metadata; null without a tokenizer. */
  tokenizer: string | null;
  chatTemplate: string | null;
  /** The resolved configuration the engine runs (ModelConfig). */
  config: string;
  /**
   * Present only when the model was loaded with weights "native-int8": the activations of its
   * quantized products are rounded to int8 (prefill and decode), so its activations differ from
   * every other weights mode's (which all compute the f32 path's values up to summation order).
   */
  arithmetic?: "int8-activations";
}

/** A plan every call of a withPlan() view appends to its own (generate always; forward unless `forward` is false). */
export interface StandingPlan {
  plan: Plan;
  forward: boolean;
}

export class Model {
  /** weightsHash() result (hashing a large checkpoint takes seconds; files are assumed not to change under a loaded model). */
  private weightsSha: string | undefined;
  /** Set on a withPlan() view: the model it runs on and the plan it adds. */
  private view: { base: Model; standing: StandingPlan } | undefined;
  /** LoadOptions.merge's id: weights merged at load. */
  private mergeId: string | undefined;
  /** Loaded with weights "native-int8" (identity().arithmetic; a view asks its base). */
  private int8Activations = false;

  private constructor(
    readonly engine: InferenceEngine,
    readonly config: ModelConfig,
    readonly files: ModelFiles,
    readonly tokenizer: Tokenizer | undefined,
    readonly chatTemplate: string | undefined,
    readonly device: DeviceInfo,
    readonly sourceDtype: string,
    private readonly tokenizerDigest: string | null,
  ) {}

  static async load(path: string, opts: LoadOptions = {}): Promise<Model> {
    const device = await initDevice(opts.device ?? "cpu");
    // The cpu engine copies one tensor at a time into its memory: read them lazily, so the
    // host never holds every weight at once.
    // The cpu engine keeps Q8_0/Q4_K matrices quantized unless f32 is asked for or an adapter is merged.
    const native = device.name === "cpu" && !opts.merge && (opts.weights === undefined || opts.weights === "native" || opts.weights === "native-int8");
    const loaded = loadHostModel(path, (c, source, facts) => checkFits(c, device.name, source, native ? facts?.nativeQuantBytes : undefined), { lazy: device.name === "cpu" && !opts.merge });
    const host = opts.merge ? { ...loaded, weights: mergeParams(loaded, opts.merge.params) } : loaded;
    const { tokenizer, chatTemplate } = tokenizerOf(host);
    const max = Math.min(opts.maxBindingBytes ?? Infinity, device.maxBindingBytes);
    const quantized = /Q\d/.test(host.sourceDtype);
    // Q8_0 / Q4_0 / Q4_K / Q6_K / BF16 / F16 matrices stay in their format on the cpu device unless f32 is asked for (or an adapter is folded in).
    const weightDtype = opts.weights ?? (device.name === "webgpu" && device.shaderF16 && quantized ? "f16" : device.name === "cpu" && !opts.merge && hasNativeMatrices(host.sourceDtype) ? "native" : "f32");
    if ((opts.weights === "native" || opts.weights === "native-int8") && (device.name !== "cpu" || opts.merge)) {
      throw new UsageError(`--weights ${opts.weights} keeps quantized matrices in their format on the cpu device only${opts.merge ? ", and not with an adapter folded in (its merge makes f32 weights)" : ""}; use --weights f32`);
    }
    if (weightDtype === "f16" && !(device.name === "webgpu" && device.shaderF16)) {
      throw new UsageError(`f16 weights need the WebGPU backend with shader-f16 (the cpu and wasm devices compute in f32 only); use --weights f32`);
    }
    let engine: InferenceEngine;
    if (device.name === "cpu") {
      engine = await CpuEngine.create(host, { ...(opts.threads !== undefined ? { threads: opts.threads } : {}), weights: weightDtype === "native" || weightDtype === "native-int8" ? weightDtype : "f32" });
    } else {
      const { Engine } = await import("../engine/jax/engine.js");
      engine = new Engine(host, { maxBindingBytes: max, weightDtype: weightDtype === "native" || weightDtype === "native-int8" ? "f32" : weightDtype });
    }
    const m = new Model(engine, host.config, host.files, tokenizer, chatTemplate, device, host.sourceDtype, tokenizerDigestOf(host));
    m.mergeId = opts.merge?.id;
    m.int8Activations = weightDtype === "native-int8";
    return m;
  }

  get family(): string {
    return this.config.family;
  }

  private sampling: SamplingDefaults | undefined;
  /** The sampler HF `generate` would use for this request on this checkpoint (see sampling.ts). */
  sampler(request: SamplerRequest = {}): EffectiveSampler {
    return resolveSampler((this.sampling ??= readSamplingDefaults(this.files)), request);
  }

  dispose(): void {
    if (this.view) {
      if (this.owning) this.view.base.dispose();
      return; // a view owns nothing else: its base does
    }
    this.engine.dispose();
  }

  /**
   * A view of this model that appends `plan` to the plan of every generate() call, and of every
   * forward() call unless `forward` is false (e.g. concept vectors read from the unmodified model).
   * It shares the engine, weights and tokenizer; disposing it does nothing. When the plan reaches
   * forward(), weightsHash() (and so identity() and the concept-vector cache key) covers it.
   * Appended, not prepended: at a site where the call's own plan also acts, the standing plan acts
   * last (a projection then removes the direction from an injection there too).
   */
  withPlan(plan: Plan, opts: { forward?: boolean; owning?: boolean } = {}): Model {
    const v = new Model(this.engine, this.config, this.files, this.tokenizer, this.chatTemplate, this.device, this.sourceDtype, this.tokenizerDigest);
    v.view = { base: this, standing: { plan: [...plan], forward: opts.forward ?? true } };
    v.owning = opts.owning ?? false;
    return v;
  }

  /** A view made with withPlan(…, {owning: true}) disposes its base (nobody else holds it). */
  private owning = false;

  /** The standing plans of a view, in the order they are appended (this view's first); [] for a loaded model. */
  standingPlans(): StandingPlan[] {
    return this.view ? [this.view.standing, ...this.view.base.standingPlans()] : [];
  }

  /**
   * The loss (mean cross-entropy of the targets) and its gradient with respect to the request's
   * parameters (engine/grad.ts), on the model's own engine and weights: no second copy.
   */
  async lossAndGrad(rows: Row[], req: LossAndGradRequest): Promise<LossAndGradResult> {
    const v = this.view;
    if (v) return v.base.lossAndGrad(rows, v.standing.forward ? { ...req, plan: [...(req.plan ?? []), ...v.standing.plan] } : req);
    // { marker } positions (e.g. the protocol's "Trial n") resolve against each row's text, as in forward;
    // rows given as ids + text were tokenized without added specials (src/train/data.ts: the text holds BOS).
    const cp = req.countPrefix ?? this.counter(false);
    return this.engine.lossAndGrad(rows, cp ? { ...req, countPrefix: cp } : req);
  }

  /** Reads and their derivative with respect to the scale of `req.plan[req.wrt]` (forward mode), on the model's own engine. */
  async jvpScale(rows: Row[], req: JvpRequest): Promise<JvpResult> {
    const v = this.view;
    if (v) return v.base.jvpScale(rows, v.standing.forward ? { ...req, plan: [...req.plan, ...v.standing.plan] } : req);
    const cp = req.countPrefix ?? this.counter(false);
    return this.engine.jvpScale(rows, cp ? { ...req, countPrefix: cp } : req);
  }

  /**
   * The weights' identity for run logs and caches: sha256 (hex) over every byte of every weight file
   * (every shard of a sharded checkpoint). Large files are hashed once and the digest cached beside
   * them (or under the cache root's hashes/ when that folder is read-only), keyed by size, mtime,
   * ctime and inode; a stale or corrupt entry is reported on stderr and the file hashed again.
   */
  weightsHash(): string {
    if (this.view) return (this.weightsSha ??= this.view.standing.forward ? planDigest(this.view.base.weightsHash(), this.view.standing.plan) : this.view.base.weightsHash());
    if (this.weightsSha === undefined) {
      const file = weightsDigest(this.files, {
        cacheDir: path.join(cacheRoot(), "hashes"),
        onNote: (m) => void process.stderr.write(`selfscope: ${m}\n`),
      });
      this.weightsSha = this.mergeId === undefined ? file : createHash("sha256").update(`${file}+merged:${this.mergeId}`).digest("hex");
    }
    return this.weightsSha;
  }

  /** Everything besides the prompt that the model's activations depend on (keys the concept-vector cache). */
  identity(): ModelIdentity {
    return {
      weights: this.weightsHash(),
      tokenizer: this.tokenizerDigest,
      chatTemplate: this.chatTemplate === undefined ? null : sha256(this.chatTemplate),
      config: sha256(JSON.stringify(this.config)),
      ...((this.view ? this.view.base.int8Activations : this.int8Activations) ? { arithmetic: "int8-activations" as const } : {}),
    };
  }

  /** Default stop tokens: the config's EOS ids plus the tokenizer's end-of-turn ids. */
  stopTokens(): number[] {
    return stopTokensOf(this.config, this.tokenizer);
  }

  private tok(): Tokenizer {
    if (!this.tokenizer) throw new UsageError(`${this.files.path} has no tokenizer; pass token ids instead of text`);
    return this.tokenizer;
  }

  /** Render a prompt to text (chat template applied) and ids. */
  encode(p: Prompt): Row & { addSpecial: boolean } {
    if (typeof p === "object" && "ids" in p) return { ids: p.ids, addSpecial: false };
    const t = this.tok();
    if (typeof p === "string") return { ids: t.encode(p, { addSpecial: true }), text: p, addSpecial: true };
    if ("text" in p) {
      const addSpecial = p.addSpecial ?? false;
      return { ids: t.encode(p.text, { addSpecial }), text: p.text, addSpecial };
    }
    if (!this.chatTemplate) throw new UsageError(`${this.files.path} has no chat template (tokenizer_config.json chat_template or GGUF tokenizer.chat_template)`);
    let text = renderChat(this.chatTemplate, p.messages, {
      addGenerationPrompt: p.addGenerationPrompt ?? true,
      ...(this.specialText("bos") ? { bosToken: this.specialText("bos")! } : {}),
      ...(this.specialText("eos") ? { eosToken: this.specialText("eos")! } : {}),
    });
    if (p.prefill) text += p.prefill;
    // The rendered template already holds the special tokens (as HF apply_chat_template).
    return { ids: t.encode(text, { addSpecial: false }), text, addSpecial: false };
  }

  private specialText(which: "bos" | "eos"): string | undefined {
    const t = this.tokenizer;
    const id = which === "bos" ? t?.bos : t?.eos;
    return id === undefined ? undefined : t?.idToToken(id);
  }

  /** Token count of a text prefix with the same special-token handling as its row (for { marker } positions). */
  private counter(addSpecial: boolean) {
    const t = this.tokenizer;
    return t ? (s: string) => t.encode(s, { addSpecial }).length : undefined;
  }

  async forward(prompts: Prompt[], opts: Omit<ForwardOptions, "countPrefix"> = {}): Promise<ForwardResult & { rows: Row[] }> {
    const v = this.view;
    if (v) return v.base.forward(prompts, v.standing.forward ? { ...opts, plan: [...(opts.plan ?? []), ...v.standing.plan] } : opts);
    const rows = prompts.map((p) => this.encode(p));
    const cp = this.counter(rows.every((r) => r.addSpecial));
    const res = await this.engine.forward(rows, { ...opts, ...(cp ? { countPrefix: cp } : {}) });
    return { ...res, rows };
  }

  async generate(prompts: Prompt[], opts: Omit<GenerateOptions, "countPrefix">): Promise<GenerateResult & { texts: string[]; rows: Row[] }> {
    const v = this.view;
    if (v) return v.base.generate(prompts, { ...opts, plan: [...(opts.plan ?? []), ...v.standing.plan] });
    const rows = prompts.map((p) => this.encode(p));
    if (rows.some((r) => r.ids.length === 0)) {
      const bos = this.config.bosTokenId ?? this.tokenizer?.bos;
      if (bos === undefined) throw new UsageError("empty prompt and the model declares no BOS token");
      rows.forEach((r) => { if (r.ids.length === 0) r.ids = [bos]; });
    }
    const cp = this.counter(rows.every((r) => r.addSpecial));
    const stopIds = opts.stop ?? this.stopTokens();
    const res = await this.engine.generate(rows, { ...opts, stop: stopIds, ...(cp ? { countPrefix: cp } : {}) });
    const stop = new Set(stopIds);
    const texts = res.tokens.map((ts) => (this.tokenizer ? this.tokenizer.decode(ts.filter((t) => !stop.has(t)), { skipSpecial: true }) : ""));
    return { ...res, texts, rows };
  }
}

/** Generation stops at the config's EOS ids and the tokenizer's. */
function stopTokensOf(config: ModelConfig, tokenizer: Tokenizer | undefined): number[] {
  return [...new Set([...config.eosTokenIds, ...(tokenizer?.eosIds ?? [])])];
}

/** What `selfscope info` shows: everything the headers say, with no tensor data read and no engine built. */
export interface ModelSummary {
  config: ModelConfig;
  files: ModelFiles;
  sourceDtype: string;
  tokenizer?: Tokenizer;
  chatTemplate?: string;
  stopTokens: number[];
  sampler(request?: SamplerRequest): EffectiveSampler;
  /** GGUF: the weights' bytes on the cpu engine with Q8_0/Q4_K matrices kept quantized. */
  nativeQuantBytes?: number;
}

/**
 * Read a checkpoint's headers, config, tokenizer and sampling defaults (lazy load: no tensor is
 * read), e.g. to describe a model too large for this machine before anyone tries to run it.
 */
export function inspectModel(path: string): ModelSummary {
  let facts: FileFacts | undefined;
  const host = loadHostModel(path, (_c, _s, f) => void (facts = f), { lazy: true });
  const { tokenizer, chatTemplate } = tokenizerOf(host);
  const defaults = readSamplingDefaults(host.files);
  return {
    config: host.config,
    files: host.files,
    sourceDtype: host.sourceDtype,
    ...(tokenizer ? { tokenizer } : {}),
    ...(chatTemplate ? { chatTemplate } : {}),
    stopTokens: stopTokensOf(host.config, tokenizer),
    sampler: (request: SamplerRequest = {}) => resolveSampler(defaults, request),
    ...(facts ? { nativeQuantBytes: facts.nativeQuantBytes } : {}),
  };
}

/** A host model's chat template (GGUF metadata or tokenizer_config.json), without building its tokenizer. */
export function hostChatTemplate(host: HostModel): string | undefined {
  if (host.gguf) {
    const tpl = host.gguf.metadata.get("tokenizer.chat_template");
    return typeof tpl === "string" ? tpl : undefined;
  }
  return host.files.tokenizerConfig ? chatTemplateFromTokenizerConfig(host.files.tokenizerConfig) : undefined;
}

const sha256 = (s: string | Buffer) => createHash("sha256").update(s).digest("hex");

/**
 * The weights' identity under a standing plan: sha256 over the base hash, then each intervention's
 * site and payload bytes, and its other fields as JSON where they differ from an add on every
 * position (so a single bias `add` hashes as the bias vector's runs always have).
 */
function planDigest(base: string, plan: Plan): string {
  const h = createHash("sha256").update(base);
  for (const iv of plan) {
    const { at, op, ...rest } = iv;
    const payload = "vector" in rest ? rest.vector : "direction" in rest ? rest.direction : "source" in rest ? rest.source : "mean" in rest ? rest.mean : undefined;
    h.update(at);
    if (payload) h.update(new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength));
    const meta = Object.fromEntries(Object.entries(rest).filter(([k, x]) => !["vector", "direction", "source", "mean"].includes(k) && !(k === "pos" && x === "all")));
    if (op !== "add" || Object.keys(meta).length > 0) h.update(JSON.stringify({ op, ...meta }));
  }
  return h.digest("hex");
}

/** sha256 of what the tokenizer is built from (files, or GGUF tokenizer.* metadata), or null without one. */
function tokenizerDigestOf(host: HostModel): string | null {
  if (host.gguf) return ggufTokenizerDigest(host.gguf.metadata);
  const files = [host.files.tokenizerJson, host.files.tokenizerConfig].filter((f): f is string => f !== undefined);
  if (files.length === 0) return null;
  const h = createHash("sha256");
  for (const f of files) h.update(`${path.basename(f)}\0${sha256(fs.readFileSync(f))}\n`);
  return h.digest("hex");
}

/**
 * A GGUF's tokenizer digest: sha256 over JSON.stringify([key, value]) of each tokenizer.* key in
 * order (bigints as "<n>n"), or null without one. Part of the model's identity (cache keys, run
 * headers), so these bytes must not change.
 */
export function ggufTokenizerDigest(metadata: ReadonlyMap<string, GgufValue>): string | null {
  const keys = [...metadata.keys()].filter((k) => k.startsWith("tokenizer.")).sort();
  if (keys.length === 0) return null;
  const h = createHash("sha256");
  const json = (v: unknown) => JSON.stringify(v, (_, x: unknown) => (typeof x === "bigint" ? `${x}n` : x));
  // An array's items are hashed one at a time, the same bytes: a 280k-merge array as one string
  // was ~10 MiB of garbage made just as the weights reach their peak memory.
  for (const k of keys) {
    const v = metadata.get(k);
    if (!Array.isArray(v)) {
      h.update(json([k, v]));
      continue;
    }
    h.update(`[${json(k)},[`);
    for (let i = 0; i < v.length; i++) h.update(i ? `,${json(v[i])}` : json(v[i]));
    h.update("]]");
  }
  return h.digest("hex");
}

function tokenizerOf(host: HostModel): { tokenizer?: Tokenizer; chatTemplate?: string } {
  const out: { tokenizer?: Tokenizer; chatTemplate?: string } = {};
  if (host.gguf) {
    if (host.gguf.metadata.has("tokenizer.ggml.model")) {
      out.tokenizer = tokenizerFromGguf(host.gguf);
      checkTokenizerFits(out.tokenizer, host.config.dVocab, { tokenizerFile: host.gguf.path, tokenizerKey: "tokenizer.ggml.tokens", modelKey: "token_embd.weight rows" });
    }
  } else if (host.files.tokenizerJson) {
    out.tokenizer = loadTokenizerJson(host.files.tokenizerJson, host.files.tokenizerConfig ?? null);
    checkTokenizerFits(out.tokenizer, host.config.dVocab, { tokenizerFile: host.files.tokenizerJson, tokenizerKey: "model.vocab/added_tokens", modelKey: `${host.files.configJson ?? "config.json"}: vocab_size` });
  }
  const tpl = hostChatTemplate(host);
  if (tpl) out.chatTemplate = tpl;
  return out;
}

/**
 * The jax-js engine's gradient (wasm, webgpu) behind the request type: one vector parameter (its
 * lossAndGrad predates engine/grad.ts).
 */
