// The paper's post-training contrast in miniature (its 03f): the same base, the same detection data,
// trained with SFT or with DPO (or any 03f preset), then evaluated with the standard protocol on the
// organism's held-out concepts. Everything goes through `selfscope train` (src/cli/train.ts): the data
// is a JSONL of preference pairs whose plans inject the concept, so the conditions differ only in the
// objective.
//
//   node dist/scripts/organism/posttrain.js [--objectives dpo_chosen_sft,dpo] [--steps 150] [--out runs/posttrain]
//
// Pairs (raw dialogue, trial 1..50, the organism's strengths, layer 1 from the token before "Trial n"):
// an injection's chosen answer is " Yes, {word}." and its rejected one " No."; a control's chosen is
// " No." and its rejected " Yes, {another training word}.". "SFT" is dpo_chosen_sft: cross-entropy on
// the chosen answers of the same pairs (the paper's SFT arm), so only the objective differs.
import fs from "node:fs";
import path from "node:path";
import { trainCommand } from "../../src/cli/train.js";
import { readAdapter } from "../../src/train/adapter.js";
import { Model } from "../../src/model/model.js";
import { bosText, getVariant, renderTrial } from "../../src/eval/protocol.js";
import { exportMerged } from "../../src/model/export.js";
import { BASE, LAYER, NO, STRENGTHS, TRAIN_CONCEPTS, YES } from "./train.js";
import { evalModel, summary } from "./eval.js";
import { mulberry32 } from "../../src/core/rng.js";

/** The detection pairs as `selfscope train` JSONL (deterministic in the seed). */
export async function writePairs(file: string, n: number, seed: number): Promise<void> {
  const model = await Model.load(BASE, { threads: 1 });
  try {
    const r = mulberry32(seed);
    const pick = () => TRAIN_CONCEPTS[Math.floor(r() * TRAIN_CONCEPTS.length)]!;
    const lines: string[] = [];
    const bos = bosText(model);
    for (let i = 0; i < n; i++) {
      const trial = 1 + Math.floor(r() * 50);
      const injected = r() < 0.5;
      const word = pick();
      const strength = STRENGTHS[Math.floor(r() * STRENGTHS.length)]!;
      // renderTrial's text starts with the BOS text; `selfscope train` adds it itself.
      const p = renderTrial(model, getVariant("original"), trial, { format: "raw", judgePrompt: "question", prefill: null });
      const prompt = p.text.startsWith(bos) ? p.text.slice(bos.length) : p.text;
      lines.push(
        JSON.stringify(
          injected
            ? { prompt, chosen: YES(word), rejected: NO, plan: { inject: { concept: word, layer: LAYER, strength, from: "trial" } } }
            : { prompt, chosen: NO, rejected: YES(pick()) },
        ),
      );
    }
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, lines.join("\n") + "\n");
  } finally {
    model.dispose();
  }
}

export interface Row {
  objective: string;
  steps: number;
  finalLoss: number | null;
  tpr: unknown;
  fpr: unknown;
  forced_identification_rate: unknown;
  discrimination_p_value: number | null;
  summary: string;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const flag = (n: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1] : undefined; };
  const objectives = (flag("--objectives") ?? "dpo_chosen_sft,dpo").split(",");
  const steps = Number(flag("--steps") ?? 150);
  const out = flag("--out") ?? "runs/posttrain";
  const seed = Number(flag("--seed") ?? 1);
  const data = path.join(out, "pairs.jsonl");
  await writePairs(data, steps * 8, seed);
  const rows: Row[] = [];
  const evalOpts = { trials: Number(flag("--trials") ?? 3), controls: Number(flag("--controls") ?? 60) };
  const base = await evalModel({ model: BASE, ...evalOpts, out: path.join(out, "eval") });
  rows.push({ objective: "base (untrained)", steps: 0, finalLoss: null, tpr: base.tpr, fpr: base.fpr, forced_identification_rate: base.forced_identification_rate, discrimination_p_value: base.discrimination_p_value, summary: summary("base", base) });
  for (const objective of objectives) {
    const dir = path.join(out, objective);
    const t = await trainCommand({
      model: BASE, data, out: dir, objective, steps, batch: 8, lr: Number(flag("--lr") ?? 5e-3), warmup: 20, seed, threads: 1, quiet: true,
      // The organism's parameters, at LoRA rank 16 (alpha 16: scale 1).
      loraRank: 16, loraAlpha: 16, loraTargets: "attn.v,attn.o,mlp.gate,mlp.up,mlp.down", layers: "2-4",
    });
    const merged = path.join(dir, "merged.gguf");
    exportMerged(BASE, readAdapter(path.join(dir, "adapter.safetensors")).params, merged, { format: "gguf", force: true });
    const r = await evalModel({ model: merged, ...evalOpts, out: path.join(dir, "eval") });
    const last = t.curve.at(-1);
    rows.push({ objective, steps, finalLoss: last ? last.loss : null, tpr: r.tpr, fpr: r.fpr, forced_identification_rate: r.forced_identification_rate, discrimination_p_value: r.discrimination_p_value, summary: summary(objective, r) });
    process.stderr.write(`${summary(objective, r)}\n`);
  }
  fs.writeFileSync(path.join(out, "results.json"), JSON.stringify({ base: BASE, layer: LAYER, steps, seed, rows }, null, 1) + "\n");
  const pct = (x: unknown) => { const q = x as { estimate: number | null; lo: number; hi: number; n: number }; return q.estimate === null ? "–" : `${(100 * q.estimate).toFixed(1)}% [${(100 * q.lo).toFixed(1)}, ${(100 * q.hi).toFixed(1)}] n=${q.n}`; };
  const table = ["| training | steps | final loss | TPR | FPR | forced identification | Fisher p |", "|---|---|---|---|---|---|---|",
    ...rows.map((r) => `| ${r.objective} | ${r.steps} | ${r.finalLoss?.toFixed(4) ?? "–"} | ${pct(r.tpr)} | ${pct(r.fpr)} | ${pct(r.forced_identification_rate)} | ${r.discrimination_p_value?.toExponential(2) ?? "–"} |`)].join("\n");
  fs.writeFileSync(path.join(out, "table.md"), table + "\n");
  process.stdout.write(table + "\n");
}

if (process.argv[1] && import.meta.url === new URL(`file://${path.resolve(process.argv[1])}`).href) await main();
