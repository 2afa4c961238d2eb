#!/usr/bin/env node
// The selfscope command line. Errors print one line (no stack trace unless SELFSCOPE_DEBUG=1)
// and exit non-zero.
import fs from "node:fs";
import { parseArgs } from "node:util";
import { SelfscopeError } from "../core/errors.js";
import { Model } from "../model/model.js";
import type { DeviceName } from "../runtime/device.js";

const USAGE = `selfscope — measure what language models can report about their own internal states

Usage:
  selfscope generate --model PATH [--prompt TEXT | --ids 1,2,3] [--chat] --max-tokens N
                     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device wasm|webgpu] [--json]
  selfscope logits   --model PATH --ids 1,2,3 --out FILE [--device wasm|webgpu]
  selfscope info     --model PATH

PATH is a .gguf file, a .safetensors file with config.json beside it, or a Hugging Face model folder.`;

type Flags = Record<string, string | boolean | undefined>;

function parse(argv: string[]): { cmd: string | undefined; flags: Flags } {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      model: { type: "string" },
      prompt: { type: "string" },
      ids: { type: "string" },
      chat: { type: "boolean" },
      "max-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-k": { type: "string" },
      "top-p": { type: "string" },
      seed: { type: "string" },
      device: { type: "string" },
      json: { type: "boolean" },
      out: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  return { cmd: positionals[0], flags: values };
}

class CliError extends SelfscopeError {}

function str(f: Flags, k: string, required = false): string | undefined {
  const v = f[k];
  if (v === undefined && required) throw new CliError(`--${k} is required (see selfscope --help)`);
  return typeof v === "string" ? v : undefined;
}

function numFlag(f: Flags, k: string, dflt?: number): number | undefined {
  const v = str(f, k);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new CliError(`--${k} must be a number, got "${v}"`);
  return n;
}

function idsFlag(s: string): number[] {
  const ids = s.split(",").filter((x) => x.trim() !== "").map((x) => Number(x.trim()));
  if (ids.some((x) => !Number.isInteger(x) || x < 0)) throw new CliError(`--ids must be comma-separated non-negative integers, got "${s}"`);
  return ids;
}

function device(f: Flags): DeviceName {
  const d = str(f, "device") ?? "wasm";
  if (d !== "wasm" && d !== "webgpu") throw new CliError(`--device must be wasm or webgpu, got "${d}"`);
  return d;
}

async function cmdGenerate(f: Flags): Promise<void> {
  const model = await Model.load(str(f, "model", true)!, { device: device(f) });
  const maxTokens = numFlag(f, "max-tokens");
  if (maxTokens === undefined || !Number.isInteger(maxTokens) || maxTokens < 0) throw new CliError("--max-tokens N is required (a non-negative integer)");
  const prompt = str(f, "prompt");
  const ids = str(f, "ids");
  if (prompt !== undefined && ids !== undefined) throw new CliError("pass either --prompt or --ids, not both");
  const p = ids !== undefined ? { ids: idsFlag(ids) } : f.chat ? { messages: [{ role: "user", content: prompt ?? "" }] } : prompt !== undefined ? prompt : { ids: [] };
  const topK = numFlag(f, "top-k");
  const topP = numFlag(f, "top-p");
  const res = await model.generate([p], {
    maxTokens,
    temperature: numFlag(f, "temperature", 0)!,
    seed: numFlag(f, "seed", 0)!,
    ...(topK !== undefined ? { topK } : {}),
    ...(topP !== undefined ? { topP } : {}),
  });
  const text = res.texts[0] ?? "";
  if (f.json) process.stdout.write(JSON.stringify({ ids: res.tokens[0], text }) + "\n");
  else process.stdout.write(text + "\n");
  model.dispose();
}

async function cmdLogits(f: Flags): Promise<void> {
  const model = await Model.load(str(f, "model", true)!, { device: device(f) });
  const ids = idsFlag(str(f, "ids", true)!);
  if (ids.length === 0) throw new CliError("--ids must name at least one token");
  const out = str(f, "out", true)!;
  const { logits } = await model.forward([{ ids }]);
  const l = logits[0]!;
  fs.writeFileSync(out, new Uint8Array(l.buffer, l.byteOffset, l.byteLength));
  process.stderr.write(`wrote ${ids.length}x${model.config.dVocab} float32 logits to ${out}\n`);
  model.dispose();
}

async function cmdInfo(f: Flags): Promise<void> {
  const model = await Model.load(str(f, "model", true)!);
  const c = model.config;
  const lines = [
    ["family", c.family],
    ["format", model.files.format],
    ["weights", model.files.weights],
    ["dtype", model.sourceDtype],
    ["dims", `dModel ${c.dModel}, nLayers ${c.nLayers}, nHeads ${c.nHeads}, nKvHeads ${c.nKvHeads}, dHead ${c.dHead}, dMlp ${c.dMlp}, dVocab ${c.dVocab}, nCtx ${c.nCtx}`],
    ["norm", JSON.stringify(c.norm)],
    ["positions", JSON.stringify(c.pos)],
    ["tokenizer", model.tokenizer ? `${model.tokenizer.kind} (${model.tokenizer.vocabSize} tokens, bos ${model.tokenizer.bos ?? "none"}, eos ${model.tokenizer.eos ?? "none"})` : "none"],
    ["chat template", model.chatTemplate ? "present" : "absent"],
    ["stop tokens", model.stopTokens().join(", ") || "none"],
  ];
  for (const [k, v] of lines) process.stdout.write(`${k!.padEnd(14)} ${v}\n`);
  model.dispose();
}

const COMMANDS: Record<string, (f: Flags) => Promise<void>> = { generate: cmdGenerate, logits: cmdLogits, info: cmdInfo };

async function main(): Promise<number> {
  let parsed;
  try {
    parsed = parse(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`selfscope: ${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { cmd, flags } = parsed;
  if (!cmd || flags.help || cmd === "help") {
    process.stdout.write(USAGE + "\n");
    return cmd || flags.help ? 0 : 2;
  }
  const run = COMMANDS[cmd];
  if (!run) {
    process.stderr.write(`selfscope: unknown command "${cmd}"\n${USAGE}\n`);
    return 2;
  }
  try {
    await run(flags);
    return 0;
  } catch (e) {
    if (process.env.SELFSCOPE_DEBUG) console.error(e);
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`selfscope ${cmd}: ${msg}${e instanceof SelfscopeError ? "" : " (set SELFSCOPE_DEBUG=1 for a stack trace)"}\n`);
    return 1;
  }
}

// Exit explicitly: the WebGPU device and wasm worker handles would otherwise keep Node alive.
main().then((code) => process.exit(code));
