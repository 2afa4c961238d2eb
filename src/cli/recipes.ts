// CLI front ends of the research recipes. Each recipe declares its flags with a type; flags are
// kebab-case on the command line and camelCase in the recipe's argument object.
import { parseArgs } from "node:util";
import { UsageError } from "../core/errors.js";
import { biasSweepCommand } from "../recipes/bias-sweep.js";
import { biasVectorCommand } from "../recipes/bias-vector.js";
import { compareCommand, compareSummary } from "../recipes/compare.js";
import { geometryCommand } from "../recipes/geometry.js";
import { patchCommand, patchSummary } from "../recipes/patch.js";
import { attentionCommand } from "../recipes/attention.js";
import { transcoderCommand } from "../recipes/transcoder.js";
import { featuresCommand } from "../recipes/features.js";
import { steeringCommand } from "../recipes/steering.js";
import { gradientsCommand } from "../recipes/gradients.js";
import { mechanismsCommand } from "../recipes/mechanisms.js";
import { lindseyCommand } from "../recipes/lindsey.js";
import { refusalCommand } from "../recipes/refusal.js";
import { probeCommand } from "../recipes/probe.js";
import { identityCommand } from "../recipes/identity.js";
import { selfRecognitionCommand } from "../recipes/self-recognition.js";
import { esrCommand } from "../recipes/esr.js";
import { controlsCommand } from "../recipes/controls.js";
import { negativeCommand } from "../recipes/negative.js";
import { abliterationSearchCommand } from "../recipes/abliteration-search.js";
import { describeCommand, selfieTrainCommand } from "../recipes/selfie-cli.js";
import { mergeCommand, trainCommand, type TrainArgs } from "./train.js";

type FlagType = "string" | "number" | "boolean" | "list";
type Schema = Record<string, FlagType>;

const COMMON: Schema = { model: "string", out: "string", device: "string", "vector-cache": "string", "no-vector-cache": "boolean", quiet: "boolean", seed: "number" };

export interface Recipe {
  usage: string;
  flags: Schema;
  run: (args: Record<string, unknown>) => Promise<unknown>;
  /** Writes no output folder (--out not required). */
  noOut?: boolean;
  /** The files it writes under --out (default results.json and report.html). */
  writes?: string[];
}

export const RECIPES: Record<string, Recipe> = {
  train: {
    usage:
      "selfscope train --model PATH --data FILE.jsonl --out DIR [--objective sft|dpo|dpo_no_ref|dpo_shuffled|dpo_reversed|dpo_chosen_sft|dpo_rejected_sft|\n" +
      "                contrastive_margin|contrastive_margin_kl|sft_chosen_kl|random_lora] [--lora-rank 8] [--lora-alpha 16] [--lora-targets attn.q,attn.v]\n" +
      "                [--layers 0-3] [--vector-at blocks.L.hook_resid_post] [--lr 1e-3] [--warmup N] [--clip X] [--steps N | --epochs N] [--batch 4]\n" +
      "                [--beta 0.1] [--margin 1] [--kl 0.1] [--seed 0] [--checkpoint-every 50] [--resume] [--eval-every N --eval-data FILE]\n" +
      "                [--eval-concepts a,b --eval-layers L --eval-strengths 4 --eval-trials 2 --judge rule] (the injection evaluation of the checkpoint)\n" +
      "                [--match-adapter FILE | --random-norm X] [--threads N]   (docs/training.md)",
    flags: {
      ...COMMON, data: "string", objective: "string", "lora-rank": "number", "lora-alpha": "number", "lora-targets": "string", layers: "string",
      "vector-at": "string", full: "boolean", lr: "number", warmup: "number", clip: "number", "weight-decay": "number", steps: "number", epochs: "number",
      batch: "number", beta: "number", margin: "number", kl: "number", "checkpoint-every": "number", resume: "boolean", "eval-every": "number",
      "eval-data": "string", "match-adapter": "string", "random-norm": "number", threads: "number", "eval-concepts": "string", "eval-layers": "string",
      "eval-strengths": "string", "eval-trials": "number", "max-tokens": "number", judge: "list",
    },
    run: (a) => trainCommand(a as unknown as TrainArgs),
  },
  merge: {
    usage:
      "selfscope merge --model PATH --adapter FILE --out OUT [--format safetensors|gguf] [--force]\n" +
      "                LoRA factors and weight deltas of a trained adapter folded into the weights: safetensors writes the folder OUT\n" +
      "                (config.json, model.safetensors, tokenizer files); gguf writes the file OUT, a copy of an F32 GGUF source.",
    flags: { model: "string", adapter: "string", out: "string", format: "string", force: "boolean" },
    run: (a) => mergeCommand(a as unknown as Parameters<typeof mergeCommand>[0]),
    // Checks --out itself and says what it wrote (a folder or one file).
    noOut: true,
  },
  "bias-vector": {
    usage:
      "selfscope bias-vector --model PATH --out DIR [--layer L] [--site mlp.hook_down] [--steps N] [--lr X] [--batch-size B] [--train-concepts N] [--trials-per-concept N]\n" +
      "                      [--eval-protocol 7.4|main] [--eval-concepts N] [--eval-layers 5,7] [--eval-strengths 2,4] [--eval-trials N] [--reply-tokens 200]\n" +
      "                      [--no-eval] [--judge SPEC]",
    flags: {
      ...COMMON, layer: "number", site: "string", steps: "number", lr: "number", "batch-size": "number", "weight-decay": "number", "split-seed": "number",
      "train-concepts": "number", "trials-per-concept": "number", "control-ratio": "number", "checkpoint-every": "number", "no-eval": "boolean",
      "eval-concepts": "number", "eval-layers": "string", "eval-strengths": "string", "eval-trials": "number", "eval-controls": "number",
      "eval-forced": "boolean", "max-tokens": "number", temperature: "number", judge: "list", "eval-batch-size": "number",
      "eval-protocol": "string", "reply-tokens": "number",
    },
    run: (a) => biasVectorCommand(a as unknown as Parameters<typeof biasVectorCommand>[0]),
  },
  "train-bias-sweep": {
    usage:
      "selfscope train-bias-sweep --model PATH --out DIR [--layers 0-25] [--site mlp.hook_down] [--steps N] [--lr X] [--batch-size B] [--train-concepts N]\n" +
      "                           [--trials-per-concept N] [--eval-concepts N] [--eval-layers 5,7] [--eval-strengths 1,2,4,8] [--eval-trials N]\n" +
      "                           [--max-tokens 100] [--reply-tokens 200] [--judge SPEC]",
    flags: {
      ...COMMON, layers: "string", site: "string", steps: "number", lr: "number", "batch-size": "number", "weight-decay": "number", "split-seed": "number",
      "train-concepts": "number", "trials-per-concept": "number", "control-ratio": "number", "checkpoint-every": "number", "eval-concepts": "number",
      "eval-layers": "string", "eval-strengths": "string", "eval-trials": "number", "max-tokens": "number", "reply-tokens": "number", judge: "list",
      "eval-batch-size": "number",
    },
    run: (a) => biasSweepCommand(a as unknown as Parameters<typeof biasSweepCommand>[0]),
  },
  lindsey: {
    usage:
      "selfscope lindsey --model PATH --out DIR [--experiments exp2,exp3,exp4] [--layer L | --layers 0.6] [--strengths 2,4] [--pairs N] [--words N]\n" +
      "                  [--sentences N] [--judge SPEC] [--max-tokens N] [--temperature T]",
    flags: {
      ...COMMON, experiments: "string", layer: "number", layers: "string", strengths: "string", pairs: "number", words: "number", sentences: "number",
      conditions: "string", "exp3-conditions": "string", "control-words": "number", choices: "number", temperature: "number", "max-tokens": "number",
      judge: "list", "judge-max-tokens": "number", "batch-size": "number", resamples: "number", permutations: "number",
    },
    run: (a) => lindseyCommand(a as unknown as Parameters<typeof lindseyCommand>[0]),
  },
  refusal: {
    usage:
      "selfscope refusal --model PATH --out DIR [--harmful FILE] [--harmless FILE | --prompts PAIR.json] [--n-instructions 512] [--sample-seed 42]\n" +
      "                  [--n-val N] [--n-test N] [--held-out] [--position=-2] [--layers ...] [--weights protocol|single|full]\n" +
      "                  [--subspace-k 8] [--subspace-ablate-k K] [--export-checkpoint] [--no-injection] [--inject-concepts N] [--judge SPEC]\n" +
      "  Prompts: the paper's draw, random.seed(42); random.sample(HARMFUL, 512); random.sample(HARMLESS, 512), from the shipped lists\n" +
      "  (data/protocol/REFUSAL_PROMPTS.md: AdvBench harmful, MIT; the paper's 512 Alpaca-derived harmless prompts, CC BY-NC 4.0) or from\n" +
      "  --harmful/--harmless FILE (JSON array, {\"prompts\": [...]}, or one prompt per line). Refusals are judged by the first --judge\n" +
      "  (default: openai:gpt-4.1-mini when OPENAI_API_KEY is set) with the paper's 03d prompt; --judge rule uses a phrase list (approximate).",
    flags: {
      ...COMMON, prompts: "string", harmful: "string", harmless: "string", "n-instructions": "number", "sample-seed": "number", "n-val": "number",
      "n-test": "number", "held-out": "boolean", position: "number", layers: "string",
      weights: "string", "no-select": "boolean", "candidate-layers": "string", "kl-max": "number", "subspace-k": "number",
      "subspace-ablate-k": "number", "max-tokens": "number", temperature: "number", samples: "number", "batch-size": "number",
      "validation-samples": "number", "validation-max-tokens": "number", "validation-temperature": "number", "export-checkpoint": "boolean",
      "no-injection": "boolean", "inject-concepts": "number", "inject-trials": "number", "inject-controls": "number", "inject-layers": "string",
      "inject-strength": "number", "inject-max-tokens": "number", "inject-temperature": "number", judge: "list",
    },
    run: (a) => refusalCommand(a as unknown as Parameters<typeof refusalCommand>[0]),
  },
  compare: {
    usage:
      "selfscope compare --model A --model B [--model C ...] --out DIR [--label a,b,c] [--preset macar2026|lindsey2025] [--per-model-layers]\n" +
      "                  [--layers 37|0.6] [--strengths 1,2,4] [--concepts FILE|N] [--trials N] [--controls N] [--forced] [--yes-bias N]\n" +
      "                  [--controls-per-concept N] [--variant original,...] [--prompt-format chat|raw] [--judge SPEC] [--identify-all] [--failed-as-no]\n" +
      "                  [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--greedy] [--seed S] [--batch-size B]\n" +
      "  Runs the same planned trials on every model (each in DIR/runs/LABEL, resumable: rerun the same command), then writes\n" +
      "  DIR/results.json (one block per model) and DIR/report.html (side by side). Refuses when the preset's layer fractions\n" +
      "  resolve to different layers on the models unless --per-model-layers; the resolved layer of each model is recorded.",
    flags: {
      ...COMMON, model: "list", label: "string", "per-model-layers": "boolean", preset: "string", layers: "string", strengths: "string",
      concepts: "string", trials: "number", controls: "number", forced: "boolean", "yes-bias": "number", variant: "string", judge: "list",
      "max-tokens": "number", temperature: "number", "top-k": "number", "top-p": "number", "min-p": "number", greedy: "boolean",
      "controls-per-concept": "number", "prompt-format": "string", "identify-all": "boolean", "failed-as-no": "boolean", "batch-size": "number",
    },
    run: async (a) => {
      const r = await compareCommand(a as unknown as Parameters<typeof compareCommand>[0]);
      process.stdout.write(compareSummary(r) + "\n");
      return r;
    },
  },
  geometry: {
    usage:
      "selfscope geometry --model PATH --out DIR [--run INJECT_RUN_DIR | --rates FILE] [--layer L] [--strength S] [--split adaptive|fixed]\n" +
      "                   [--trials N] [--no-swap] [--no-bidirectional] [--lens-k K] [--judge SPEC]\n" +
      "                   [--no-dpc] [--dpc-all-pairs] [--dpc-max-pairs 30] [--dpc-k 10] [--dpc-alphas=-1.5,...,1.5] [--dpc-trials N]   (δ-PCs, 04c §4.3)",
    flags: {
      ...COMMON, run: "string", rates: "string", layer: "number", strength: "number", folds: "number", split: "string", trials: "number",
      "no-swap": "boolean", "no-bidirectional": "boolean", "swap-direction": "string", "max-pairs": "number", "pair-window": "number",
      "no-dpc": "boolean", "dpc-all-pairs": "boolean", "dpc-max-pairs": "number", "dpc-k": "number", "dpc-alphas": "string", "dpc-trials": "number",
      "max-tokens": "number", temperature: "number", judge: "list", "lens-k": "number", "batch-size": "number",
    },
    run: (a) => geometryCommand(a as unknown as Parameters<typeof geometryCommand>[0]),
  },
  patch: {
    usage:
      "selfscope patch --model PATH --out DIR [--layers L] [--strengths S] [--preset macar2026] [--concepts FILE|N|a,b] [--trials 3]\n" +
      "                [--positions all|last] [--components attn,mlp[,resid]] [--patch-layers 3-5] [--no-forced] [--prompt-format chat|raw]\n" +
      "                [--batch-size 16] [--threads N]\n" +
      "  Component knock-out / knock-in (protocol §9.1): for every layer after the injection layer, attention and MLP outputs\n" +
      "  patched between the steered and unsteered runs of each trial prompt; the Yes/No logit gap and (forced prompt) the\n" +
      "  concept's first-token log-probability at the last prompt position. Writes results.json, trials.jsonl, report.html.",
    flags: {
      ...COMMON, layers: "string", strengths: "string", preset: "string", concepts: "string", trials: "number", positions: "string",
      components: "string", "patch-layers": "string", "no-forced": "boolean", "prompt-format": "string", "batch-size": "number", threads: "number",
    },
    run: async (a) => {
      const r = await patchCommand(a as unknown as Parameters<typeof patchCommand>[0]);
      process.stdout.write(patchSummary(r) + "\n");
      return r;
    },
    writes: ["results.json", "trials.jsonl", "report.html"],
  },
  attention: {
    usage:
      "selfscope attention --model PATH --out DIR [--layers L] [--strengths 0,1,2,4,8] [--concepts FILE|N|a,b] [--trials 3] [--prompt-format chat|raw]\n" +
      "  Attention mass from the last prompt token to BOS, to the injected positions and to the rest, per layer and strength (13b).",
    flags: { ...COMMON, layers: "string", strengths: "string", preset: "string", concepts: "string", trials: "number", "prompt-format": "string", threads: "number" },
    run: (a) => attentionCommand(a as unknown as Parameters<typeof attentionCommand>[0]),
  },
  "train-transcoder": {
    usage:
      "selfscope train-transcoder --model PATH --out DIR [--layer L] [--texts FILE] [--d-sae 4·d] [--k 8] [--steps 2000] [--batch 256] [--lr 5e-3]\n" +
      "                           [--dead-after 200] [--seed 0]\n" +
      "  A TopK transcoder from the MLP input to the MLP output of layer L, trained on the model's activations (docs/mechanisms.md);\n" +
      "  writes DIR/transcoder.safetensors, results.json (FVU, dead features, splice check) and report.html.",
    flags: { ...COMMON, layer: "number", texts: "string", "d-sae": "number", k: "number", steps: "number", batch: "number", lr: "number", "dead-after": "number", threads: "number" },
    run: (a) => transcoderCommand(a as unknown as Parameters<typeof transcoderCommand>[0]),
    writes: ["transcoder.safetensors", "results.json", "report.html"],
  },
  features: {
    usage:
      "selfscope features --model PATH --out DIR --transcoder FILE [--gate-layer L] [--carrier-transcoder FILE --carrier-layer L]\n" +
      "                   [--layers L] [--strengths=-8,-4,-2,-1,0,1,2,4,8] [--concepts ...] [--gates 20] [--curves 5]   (a list starting with a minus needs the =)\n" +
      "  Gate candidates (most negative direct logit attribution onto Yes − No) and evidence carriers (upstream features that rise\n" +
      "  with the injection and suppress the gates), protocol §9.3. Transcoders: files from train-transcoder, or Gemma Scope 2\n" +
      "  params.safetensors with the layer given.",
    flags: {
      ...COMMON, transcoder: "string", "carrier-transcoder": "string", "gate-layer": "number", "carrier-layer": "number", layers: "string",
      strengths: "string", preset: "string", concepts: "string", gates: "number", curves: "number", "prompt-format": "string", threads: "number",
    },
    run: (a) => featuresCommand(a as unknown as Parameters<typeof featuresCommand>[0]),
  },
  gradients: {
    usage:
      "selfscope gradients --model PATH --out DIR [--layers L] [--strength S] [--concepts FILE|N|a,b] [--trials 2] [--top-heads 8] [--seed 0]\n" +
      "  Gradient attribution of the Yes − No logit gap (protocol §9.2): ‖∂gap/∂x‖ per attention/MLP output and per token × layer,\n" +
      "  per-head attribution (Σ ∂gap/∂z · Δz) and mean-ablation curves of the top-N heads against N random heads. Writes\n" +
      "  results.json and report.html.",
    flags: { ...COMMON, layers: "string", strength: "number", preset: "string", concepts: "string", trials: "number", "top-heads": "number", seed: "number", "prompt-format": "string", threads: "number" },
    run: (a) => gradientsCommand(a as unknown as Parameters<typeof gradientsCommand>[0]),
    writes: ["results.json", "report.html"],
  },
  mechanisms: {
    usage:
      "selfscope mechanisms --model PATH --out DIR [--layers L] [--strength 4] [--concepts FILE|N|a,b] [--trials 2]\n" +
      "                     [--transcoder-layers L,L] [--transcoder-steps 600] [--texts FILE]\n" +
      "  Every mechanism analysis on one model into one report: patch, gradients, train-transcoder per block, features and\n" +
      "  steering-attribution, each in its subfolder of DIR, and DIR/report.html with each headline beside its caveats.",
    flags: {
      ...COMMON, layers: "string", strength: "number", preset: "string", concepts: "string", trials: "number", "transcoder-layers": "string",
      "transcoder-steps": "number", texts: "string", "prompt-format": "string", threads: "number",
    },
    run: (a) => mechanismsCommand(a as unknown as Parameters<typeof mechanismsCommand>[0]),
    writes: ["results.json", "report.html"],
  },
  "steering-attribution": {
    usage:
      "selfscope steering-attribution --model PATH --out DIR --transcoders FILE[,FILE...] [--transcoder-layers L[,L...]] [--layers L]\n" +
      "                               [--strengths 0,0.5,...,4] [--concepts FILE|N|a,b] [--top 8] [--prompt-format chat|raw]\n" +
      "  Steering attribution (protocol §9.4): SA = GA × SG per transcoder feature (gradient of the Yes − No gap times the\n" +
      "  forward-mode derivative of the activation in the injection strength), ISA over strengths, the residual (upstream +\n" +
      "  error node) and an interactive attribution graph. Writes results.json and report.html.",
    flags: {
      ...COMMON, transcoders: "string", "transcoder-layers": "string", layers: "string", strengths: "string", preset: "string", concepts: "string",
      top: "number", "prompt-format": "string", threads: "number",
    },
    run: (a) => steeringCommand(a as unknown as Parameters<typeof steeringCommand>[0]),
    writes: ["results.json", "report.html"],
  },
  probe: {
    usage:
      "selfscope probe --model [NAME=]PATH [--model [NAME=]PATH ...] --data FILE.jsonl --out DIR [--site hook_resid_post] [--layers all]\n" +
      "                [--position last|mean|INDEX] [--chat] [--target-names a,b] [--folds 5] [--inner-folds 3] [--alphas 0.01,...,1e5]\n" +
      "                [--cs 0.001,...,100] [--permutations 100] [--seed 0] [--no-decompose] [--decompose-layer L]\n" +
      "                [--patch-layers 2,4 --patch-from NAME --patch-into NAME --patch-prompts 4] [--steer-alphas 0,0.5,1 --steer-layer L\n" +
      "                --steer-model NAME --steer-prompts 3] [--max-tokens 24] [--batch-size 8]\n" +
      "  Linear probes (docs/probes.md): FILE.jsonl lines {\"prompt\": TEXT | \"messages\": [...], \"target\": x | [x, y] | \"label\": L};\n" +
      "  ridge (targets; α by inner CV, R² by outer k-fold) or logistic (labels; accuracy, AUC) at every layer of every model,\n" +
      "  permutation p-values, the probe direction's per-head / MLP decomposition, cross-model patching and steering along it.\n" +
      "  Resumable: rerun the same command after a kill.",
    flags: {
      ...COMMON, model: "list", data: "string", site: "string", layers: "string", position: "string", chat: "boolean", "target-names": "string",
      folds: "number", "inner-folds": "number", alphas: "string", cs: "string", permutations: "number", "batch-size": "number",
      "no-decompose": "boolean", "decompose-layer": "number", "patch-from": "string", "patch-into": "string", "patch-layers": "string",
      "patch-prompts": "number", "steer-alphas": "string", "steer-layer": "number", "steer-model": "string", "steer-prompts": "number",
      "max-tokens": "number", threads: "number",
    },
    run: (a) => probeCommand(a as unknown as Parameters<typeof probeCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  identity: {
    usage:
      "selfscope identity --model [LABEL=]SPEC[@OFFICIAL NAME] [--model ...] --out DIR [--prompts id,id] [--samples N] [--follow-up]\n" +
      "                   [--judge openai:MODEL] [--temperature 0.7] [--max-tokens 500] [--concurrency 8] [--sweep FILE]\n" +
      "  The identity self-report sweep (docs/identity.md; data/identity/sweep.json): 32 prompts in English and Chinese, 7 sampled 4 times,\n" +
      "  no system prompt. SPEC: openai:MODEL (OPENAI_BASE_URL for any compatible server), openrouter:MODEL, anthropic:MODEL, or a\n" +
      "  local checkpoint (PATH or local:PATH). Claims of another model's name or creator in replies and reasoning traces,\n" +
      "  a models × prompts matrix; failed calls are counted, never read as claims, and retried on resume (rerun the command).",
    flags: {
      model: "list", out: "string", sweep: "string", prompts: "string", samples: "number", temperature: "number", "max-tokens": "number",
      "follow-up": "boolean", judge: "string", concurrency: "number", "timeout-ms": "number", "max-attempts": "number", seed: "number", threads: "number", quiet: "boolean",
    },
    run: (a) => identityCommand(a as unknown as Parameters<typeof identityCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  "self-recognition": {
    usage:
      "selfscope self-recognition --model SPEC --other SPEC --out DIR [--articles FILE.jsonl] [--n N] [--choice logprob|text]\n" +
      "                           [--judge openai:MODEL] [--max-tokens 80] [--temperature 0]\n" +
      "  Both models summarize each article; the model is shown both summaries in both orders and asked which it wrote\n" +
      "  (docs/self-recognition.md). Accuracy with Wilson and bootstrap intervals, per order, position bias, recognized vs anti\n" +
      "  pairs with a sign test. SPEC as for identity: openai:M, openrouter:M, anthropic:M, or a local checkpoint.",
    flags: {
      model: "list", other: "string", out: "string", articles: "string", n: "number", choice: "string", judge: "string", "max-tokens": "number",
      temperature: "number", concurrency: "number", "timeout-ms": "number", "max-attempts": "number", seed: "number", threads: "number", quiet: "boolean",
    },
    run: (a) => selfRecognitionCommand(a as unknown as Parameters<typeof selfRecognitionCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  esr: {
    usage:
      "selfscope esr --model PATH --out DIR [--questions FILE.jsonl] [--n N] [--concepts a,b] [--layer L] [--strengths 0,2,4,8] [--from-token K]\n" +
      "              [--max-tokens 60] [--judge openai:MODEL] [--transcoder FILE [--transcoder-layer L] [--top 10]] [--batch-size 8]\n" +
      "  Steering resistance (docs/esr.md): questions with known answers, an unrelated concept steered in from answer token K;\n" +
      "  does the answer notice and correct course, is it right in the end, by strength; with a transcoder/SAE, the features that\n" +
      "  predict a correction and an ablation check. Without --judge: the configured LLM judge (OPENAI_API_KEY), else the rule judge (labelled).",
    flags: {
      ...COMMON, questions: "string", n: "number", concepts: "string", layer: "number", strengths: "string", "from-token": "number", "max-tokens": "number",
      judge: "string", transcoder: "string", "transcoder-layer": "number", top: "number", "batch-size": "number", threads: "number",
    },
    run: (a) => esrCommand(a as unknown as Parameters<typeof esrCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  controls: {
    usage:
      "selfscope controls --model PATH --out DIR [--concepts a,b,...|FILE.json] [--success a,b] [--failure c,d] [--layer L] [--strength 4]\n" +
      "                   [--conditions isotropic,norm_matched,shuffled,pca_all,pca_success,orthogonal,cov_matched,norm_sweep] [--count 50] [--k 50]\n" +
      "                   [--trials 5] [--samples 5] [--alphas 0,0.25,...,2] [--cone-angles 30,60,90] [--max-tokens 100] [--temperature 1] [--judge SPEC]\n" +
      "  Noise controls (protocol §8, 04; docs/controls.md): detection with concept vectors, no vector, and control vectors of each\n" +
      "  kind, one-sided Fisher tests Bonferroni-corrected; with --failure, the synthetic threshold μ_F + α(μ_S − μ_F) and its sigmoid fit (04e),\n" +
      "  and with --cone-angles the cone rotation test (04i).",
    flags: {
      ...COMMON, concepts: "string", success: "string", failure: "string", layer: "number", strength: "number", conditions: "string", count: "number",
      k: "number", trials: "number", samples: "number", alphas: "string", "cone-angles": "string", "max-tokens": "number", temperature: "number", judge: "list",
      "batch-size": "number", threads: "number",
    },
    run: (a) => controlsCommand(a as unknown as Parameters<typeof controlsCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  "negative-steering": {
    usage:
      "selfscope negative-steering --model PATH --out DIR [--directions refusal,sycophancy,...] [--layer L] [--strength 4] [--trials 10] [--samples 1]\n" +
      "                            [--per-side 64] [--list-directions] [--max-tokens 100] [--temperature 1] [--judge SPEC]\n" +
      "  The paper's 05 (docs/controls.md): behaviour directions (mean positive − mean negative at position −2) subtracted from the\n" +
      "  token before \"Trial n\" in the removed-thought prompt; detection and identification vs unsteered controls.",
    flags: {
      ...COMMON, directions: "string", layer: "number", strength: "number", trials: "number", samples: "number", "per-side": "number", "list-directions": "boolean",
      "max-tokens": "number", temperature: "number", judge: "list", "batch-size": "number", threads: "number",
    },
    run: (a) => negativeCommand(a as unknown as Parameters<typeof negativeCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  "abliteration-search": {
    usage:
      "selfscope abliteration-search --model PATH --out DIR [--algorithm direct-l|bobyqa|nelder-mead|sbplx] [--trials 500] [--runs 20] [--prompts 10]\n" +
      "                              [--n-instructions 128] [--upper X] [--max-tokens 100] [--temperature 1] [--judge openai:MODEL] [--seed 42]\n" +
      "  The paper's 03e (docs/controls.md): per-region weights of the refusal ablation searched with NLopt for harmful-yet-coherent\n" +
      "  answers (objective √(harm/5 · coherence/5), 03e's judge prompt; the rule judge is approximate). Resumable.",
    flags: {
      model: "string", out: "string", algorithm: "string", trials: "number", runs: "number", prompts: "number", "n-instructions": "number", upper: "number",
      "max-tokens": "number", temperature: "number", judge: "string", seed: "number", "batch-size": "number", threads: "number", quiet: "boolean",
    },
    run: (a) => abliterationSearchCommand(a as unknown as Parameters<typeof abliterationSearchCommand>[0]),
    writes: ["steps.jsonl", "results.json", "report.html"],
  },
  "selfie-train": {
    usage:
      "selfscope selfie-train --model PATH --out DIR --words W1,W2,...|FILE [--held-out W,...|FILE] [--layer L] [--kind scalar|full]\n" +
      "                       [--template \"Lily saw a <v>. Lily saw a {word}\"] [--steps 100] [--lr 0.1] [--batch-size 8] [--seed 0]\n" +
      "  Trains a SelfIE adapter (docs/selfie.md) on the words' concept vectors at layer L; writes DIR/adapter.safetensors and, with\n" +
      "  --held-out, recall@1/@5 of the trained, untrained and label-shuffled adapters and the bias term's share in DIR/results.json.",
    flags: { ...COMMON, words: "string", "held-out": "string", layer: "number", kind: "string", template: "string", steps: "number", lr: "number", "batch-size": "number", threads: "number", "max-tokens": "number" },
    run: (a) => selfieTrainCommand(a as unknown as Parameters<typeof selfieTrainCommand>[0]),
    writes: ["adapter.safetensors", "results.json"],
  },
  describe: {
    usage:
      "selfscope describe --model PATH --adapter FILE (--concept WORD | --vector FILE.npy|.safetensors) [--template T] [--max-tokens 20]\n" +
      "                   [--temperature 0] [--seed 0]\n" +
      "  Inserts the adapted vector at the template's <v> and prints what the frozen model generates after the text before {word}.",
    flags: { ...COMMON, adapter: "string", concept: "string", vector: "string", template: "string", "max-tokens": "number", temperature: "number", threads: "number" },
    run: (a) => describeCommand(a as unknown as Parameters<typeof describeCommand>[0]),
    noOut: true,
  },
};

const camel = (s: string) => s.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/** Parse a recipe's flags into its argument object (types checked, judges as a list). */
export function recipeArgs(name: string, argv: string[]): Record<string, unknown> {
  const r = RECIPES[name]!;
  const options = Object.fromEntries(Object.entries(r.flags).map(([k, t]) => [k, t === "boolean" ? { type: "boolean" as const } : { type: "string" as const, ...(t === "list" ? { multiple: true } : {}) }]));
  let values: Record<string, unknown>;
  try {
    ({ values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false }));
  } catch (e) {
    throw new UsageError(`${(e as Error).message}\nusage: ${r.usage}`);
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(values)) {
    const t = r.flags[k]!;
    if (t === "number") {
      const n = Number(v);
      if (!Number.isFinite(n)) throw new UsageError(`--${k} must be a number, got "${String(v)}"`);
      out[camel(k)] = n;
    } else if (t === "list") out[k === "judge" ? "judges" : camel(k)] = k === "judge" ? (v as string[]).flatMap((x) => x.split(",")) : v; // paths may hold commas
    else out[camel(k)] = v;
  }
  for (const req of ["model", ...(r.noOut ? [] : ["out"])]) if (out[req] === undefined) throw new UsageError(`--${req} is required\nusage: ${r.usage}`);
  return out;
}
