// What the single-injection-site analyses (patch, attention, features) share: the model, the
// protocol's configuration for one injection layer (inject's flags and presets), and the concept
// vectors at that layer.
import { Model } from "../model/model.js";
import { UsageError } from "../core/errors.js";
import { buildConfig } from "../eval/inject.js";
import type { InjectConfig } from "../log/schema.js";
import { conceptVectors } from "../vectors/extract.js";

export interface SiteArgs {
  model: string;
  out: string;
  /** Injection layer (one; a preset's fraction or an index, as inject's --layers). */
  layers?: string;
  preset?: string;
  concepts?: string;
  promptFormat?: "chat" | "raw";
  device?: string;
  vectorCache?: string | null;
  quiet?: boolean;
  threads?: number;
}

export function loadAnalysisModel(a: { model: string; device?: string; threads?: number }): Promise<Model> {
  return Model.load(a.model, { device: (a.device ?? "cpu") as "cpu", ...(a.threads ? { threads: a.threads } : {}) });
}

/** inject's configuration for `a`, which must resolve to exactly one injection layer. `strengths` goes through inject's parser when given. */
export function siteConfig(command: string, a: SiteArgs & { strengths?: string }, model: Model): { cfg: InjectConfig; layer: number } {
  const cfg = buildConfig(
    {
      model: a.model,
      ...(a.preset ? { preset: a.preset } : {}),
      ...(a.layers ? { layers: a.layers } : {}),
      ...(a.strengths ? { strengths: a.strengths } : {}),
      ...(a.concepts ? { concepts: a.concepts } : {}),
      ...(a.promptFormat ? { promptFormat: a.promptFormat } : {}),
    },
    model.config.nLayers,
    model.chatTemplate !== undefined,
  );
  if (cfg.layers.length !== 1) throw new UsageError(`${command}: one injection layer, got ${cfg.layers.length} (--layers)`);
  return { cfg, layer: cfg.layers[0]! };
}

/** The configuration's concept vectors at `layer` (inject's recipe and baseline words). */
export async function siteVectors(model: Model, cfg: InjectConfig, layer: number, cacheDir: string | null | undefined): Promise<Map<string, Float32Array>> {
  return (await conceptVectors(model, { concepts: cfg.concepts, baselineWords: cfg.baselineWords, layers: [layer], recipe: cfg.vectorRecipe, cacheDir: cacheDir ?? null })).vectors.get(layer)!;
}
