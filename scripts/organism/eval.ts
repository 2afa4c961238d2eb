// Held-out evaluation of the organism with the project's standard protocol: `selfscope inject`'s
// own code (recipes/inject.ts) on the held-out concepts, rule judge, and the same trials on the
// untrained base for contrast.
//
//   node dist/scripts/organism/eval.js [--model models/organism/organism.gguf] [--trials 3] [--controls 60]
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { inject } from "../../src/recipes/inject.js";
import type { Results } from "../../src/eval/metrics.js";
import type { Rate } from "../../src/stats/stats.js";
import { BASE, HELDOUT_CONCEPTS, LAYER } from "./train.js";

export interface EvalOptions {
  model: string;
  concepts?: string[];
  strengths?: string;
  trials?: number;
  controls?: number;
  out?: string;
  seed?: number;
}

/** One standard inject run (rule judge, forced identification) and its results.json. */
export async function evalModel(o: EvalOptions): Promise<Results> {
  const dir = o.out ?? fs.mkdtempSync(path.join(os.tmpdir(), "organism-eval-"));
  const conceptsFile = path.join(os.tmpdir(), `organism-heldout-${process.pid}.json`);
  fs.writeFileSync(conceptsFile, JSON.stringify(o.concepts ?? HELDOUT_CONCEPTS));
  const { results } = await inject({
    model: o.model,
    layers: String(LAYER),
    strengths: o.strengths ?? "2",
    concepts: conceptsFile,
    trials: o.trials ?? 3,
    controls: o.controls ?? 60,
    forced: true,
    yesBias: 0,
    judges: ["rule"],
    maxTokens: 24,
    temperature: 1,
    seed: o.seed ?? 1,
    batchSize: 32,
    vectorCache: null,
    quiet: true,
    out: path.join(dir, path.basename(o.model, ".gguf")),
  });
  return results;
}

export function summary(name: string, r: Results): string {
  const f = (x: Rate | null) => (x && x.estimate !== null ? `${x.estimate.toFixed(3)} [${x.lo!.toFixed(3)}, ${x.hi!.toFixed(3)}] n=${x.n}` : "-");
  return `${name}: TPR ${f(r.tpr)} FPR ${f(r.fpr)} id|claim ${f(r.identification_accuracy_given_claim)} forced-id ${f(r.forced_identification_rate)} p ${r.discrimination_p_value?.toExponential(2) ?? "-"}`;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const flag = (n: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1] : undefined; };
  const model = flag("--model") ?? "models/organism/organism.gguf";
  const opts = {
    trials: Number(flag("--trials") ?? 3), controls: Number(flag("--controls") ?? 60), strengths: flag("--strengths") ?? "2",
    ...(flag("--out") ? { out: flag("--out")! } : {}),
    ...(flag("--concepts") ? { concepts: JSON.parse(fs.readFileSync(flag("--concepts")!, "utf8")) as string[] } : {}),
  };
  const org = await evalModel({ model, ...opts });
  process.stdout.write(`${summary("organism (held-out)", org)}\n`);
  if (!args.includes("--no-base")) process.stdout.write(`${summary("base (same trials)", await evalModel({ model: flag("--base") ?? BASE, ...opts }))}\n`);
}

if (process.argv[1] && import.meta.url === new URL(`file://${path.resolve(process.argv[1])}`).href) await main();
