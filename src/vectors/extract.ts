// Concept vectors (protocol §1.1): the residual stream after block L at the last token of the
// chat-formatted "Tell me about {word}", minus the mean of the same over baseline words.
// Vectors are cached on disk under a key of everything they depend on (docs/cache.md) and reused
// across runs.
import fs from "node:fs";
import path from "node:path";
import { createHash } from "node:crypto";
import { cacheRoot } from "../core/cache.js";
import { UsageError } from "../core/errors.js";
import { VERSION } from "../core/package.js";
import { hookName } from "../hooks/names.js";
import type { Plan } from "../hooks/plan.js";
import type { Model, Prompt } from "../model/model.js";

/** How a concept vector is made (recorded in run-log headers as config.vectorRecipe). */
export interface VectorRecipe {
  method: "baseline-mean" | "simple" | "raw";
  /** "chat": the template as a user message through the chat template (protocol); "raw": plain text (Lindsey). */
  format: "chat" | "raw";
  userTemplate: string;
  /** Token index within the rendered prompt (-1 = last). */
  tokenIndex: number;
}

/** The protocol's default recipe. */
export const PROTOCOL_RECIPE: VectorRecipe = { method: "baseline-mean", format: "chat", userTemplate: "Tell me about {word}", tokenIndex: -1 };

/** The concept prompt: chat-formatted when the model has a template, else the protocol's fallback. */
export function conceptPrompt(model: Model, recipe: VectorRecipe, word: string): Prompt {
  const user = recipe.userTemplate.replaceAll("{word}", word);
  if (recipe.format === "raw") return user;
  if (model.chatTemplate) return { messages: [{ role: "user", content: user }], addGenerationPrompt: true };
  return `User: ${user}\n\nAssistant:`;
}

/** Activations at blocks.L.hook_resid_post, token `recipe.tokenIndex`, for each word and layer. */
export async function activations(model: Model, words: string[], layers: number[], recipe: VectorRecipe, batchSize = 16): Promise<Map<number, Float32Array[]>> {
  const D = model.config.dModel;
  const out = new Map<number, Float32Array[]>(layers.map((l) => [l, []]));
  const plan: Plan = layers.map((l) => ({ op: "read" as const, at: hookName(l, "hook_resid_post") }));
  for (let i = 0; i < words.length; i += batchSize) {
    const batch = words.slice(i, i + batchSize);
    const { cache } = await model.forward(batch.map((w) => conceptPrompt(model, recipe, w)), { plan, logits: "none" });
    batch.forEach((_, b) => {
      for (const l of layers) {
        const { data, shape } = cache.get(hookName(l, "hook_resid_post"), b);
        const T = shape[0]!;
        const t = recipe.tokenIndex < 0 ? T + recipe.tokenIndex : recipe.tokenIndex;
        if (t < 0 || t >= T) throw new UsageError(`token index ${recipe.tokenIndex} is outside a ${T}-token concept prompt`);
        out.get(l)!.push(data.slice(t * D, (t + 1) * D));
      }
    });
  }
  return out;
}

export interface VectorSet {
  /** layer -> concept -> vector [dModel] */
  vectors: Map<number, Map<string, Float32Array>>;
  /** Where they were cached (null when caching is off). */
  dir: string | null;
  reused: number;
  computed: number;
}

export function defaultVectorCache(): string {
  return path.join(cacheRoot(), "vectors");
}

/**
 * Bump when extraction changes what a cached vector holds (older entries are then never read).
 * 3: a `--weights native-int8` load now rounds the activations of Q6_K products at prefill sizes
 * too (2026-12-07), so vectors cached by such a load before then hold other values under the same
 * identity (arithmetic "int8-activations").
 * 4: a `--weights native-int8` load quantizes the activations of its Q8_0 products per 32 with f16
 * scales, as llama.cpp's q8_0 (2026-12-07; per 256 before).
 */
export const VECTOR_CACHE_VERSION = 4;

/**
 * What a cached vector depends on: the model's weights, tokenizer, chat template and config, the
 * recipe and baseline words, and the tool and cache versions. Any change gives another key.
 */
export function vectorCacheKey(model: Model, recipe: VectorRecipe, baselineWords: string[]): { key: string; modelDir: string; body: string } {
  const id = model.identity();
  const body = JSON.stringify({ cache: VECTOR_CACHE_VERSION, tool: VERSION, model: id, recipe, baselineWords }, null, 1);
  return { key: createHash("sha256").update(body).digest("hex").slice(0, 32), modelDir: id.weights, body };
}

/** Write through a temporary and a rename, so a killed process never leaves a torn file behind. */
function writeAtomic(file: string, data: string | Uint8Array): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, file);
}

/**
 * Concept vectors for every (layer, concept), from the cache when present. The baseline mean is
 * computed in float64 (summing many f32 activations in f32 loses precision).
 */
export async function conceptVectors(
  model: Model,
  opts: {
    concepts: string[];
    baselineWords: string[];
    layers: number[];
    recipe?: VectorRecipe;
    cacheDir?: string | null;
    batchSize?: number;
    /** Told when a cache entry cannot be trusted and is recomputed (default: stderr). */
    onNote?: (message: string) => void;
  },
): Promise<VectorSet> {
  const recipe = opts.recipe ?? PROTOCOL_RECIPE;
  const D = model.config.dModel;
  const note = opts.onNote ?? ((m: string) => void process.stderr.write(`selfscope: ${m}\n`));
  let dir: string | null = null;
  let keyBody = "";
  let trusted = false;
  if (opts.cacheDir !== null) {
    const k = vectorCacheKey(model, recipe, opts.baselineWords);
    dir = path.join(opts.cacheDir ?? defaultVectorCache(), k.modelDir, k.key);
    keyBody = k.body;
    // Vectors are read only from a folder whose key.json says exactly what they were made from.
    const keyFile = path.join(dir, "key.json");
    if (fs.existsSync(keyFile)) {
      trusted = fs.readFileSync(keyFile, "utf8") === keyBody;
      if (!trusted) note(`${keyFile} does not match what the vectors depend on (a corrupt or colliding entry); recomputing them`);
    }
  }
  const vectors = new Map<number, Map<string, Float32Array>>(opts.layers.map((l) => [l, new Map()]));
  const file = (l: number, c: string) => path.join(dir!, `L${l}`, `${encodeURIComponent(c)}.f32`);
  const missing = new Set<string>();
  let reused = 0;
  for (const l of opts.layers)
    for (const c of opts.concepts) {
      const f = dir ? file(l, c) : "";
      if (dir && trusted && fs.existsSync(f)) {
        const b = fs.readFileSync(f);
        const v = b.byteLength === D * 4 ? new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)) : null;
        if (v && v.every(Number.isFinite)) {
          vectors.get(l)!.set(c, v);
          reused++;
          continue;
        }
        note(`${f} is corrupt (${b.byteLength} bytes for a ${D}-dim vector, or non-finite values); recomputing it`);
      }
      missing.add(c);
    }
  if (missing.size > 0) {
    const words = [...missing];
    const conceptActs = await activations(model, words, opts.layers, recipe, opts.batchSize);
    let base: Map<number, Float64Array> | null = null;
    if (recipe.method === "baseline-mean") {
      const acts = await activations(model, opts.baselineWords, opts.layers, recipe, opts.batchSize);
      base = new Map();
      for (const l of opts.layers) {
        const m = new Float64Array(D);
        for (const a of acts.get(l)!) for (let i = 0; i < D; i++) m[i]! += a[i]!;
        for (let i = 0; i < D; i++) m[i]! /= opts.baselineWords.length;
        base.set(l, m);
      }
    } else if (recipe.method === "simple") {
      const acts = await activations(model, ["The"], opts.layers, recipe, 1);
      base = new Map(opts.layers.map((l) => [l, Float64Array.from(acts.get(l)![0]!)]));
    }
    if (dir) {
      fs.mkdirSync(dir, { recursive: true });
      writeAtomic(path.join(dir, "key.json"), keyBody);
      writeAtomic(path.join(dir, "model.txt"), `${model.files.path}\n`); // for people browsing the cache
    }
    for (const l of opts.layers)
      words.forEach((c, j) => {
        const h = conceptActs.get(l)![j]!;
        const b = base?.get(l);
        const v = b ? Float32Array.from(h, (x, i) => x - b[i]!) : h;
        vectors.get(l)!.set(c, v);
        if (dir) {
          fs.mkdirSync(path.dirname(file(l, c)), { recursive: true });
          writeAtomic(file(l, c), new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
        }
      });
  }
  return { vectors, dir, reused, computed: missing.size * opts.layers.length };
}
