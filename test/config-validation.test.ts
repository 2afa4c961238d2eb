// Config validation (issue 12 §7): bad values in config.json or GGUF metadata are one-line errors naming
// the file and the key, before any family reads them (they used to give "Invalid array length", be
// accepted and change outputs, or fail later blaming "NaN/Inf weights"); a tokenizer whose ids do not
// fit the embedding is refused at load instead of failing mid-generation.
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { ModelFileError } from "../src/core/errors.js";
import { loadHostModel } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { fixture, repoDir } from "./support/paths.js";

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-config-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let n = 0;
const tmp = () => {
  const d = path.join(tmpRoot, String(n++));
  fs.mkdirSync(d);
  return d;
};

const GPT2 = fixture("tiny-random-gpt2");
const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");

/** A copy of the tiny GPT-2 folder with `edit` applied to its config.json. */
function gpt2With(edit: (c: Record<string, unknown>) => void): string {
  const d = tmp();
  for (const f of fs.readdirSync(GPT2)) if (fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(d, f));
  const c = JSON.parse(fs.readFileSync(path.join(d, "config.json"), "utf8")) as Record<string, unknown>;
  edit(c);
  fs.writeFileSync(path.join(d, "config.json"), JSON.stringify(c));
  return d;
}

/** A folder with only a config.json and an empty model.safetensors: validation runs before the weights are opened. */
function configOnly(cfg: Record<string, unknown>): string {
  const d = tmp();
  fs.writeFileSync(path.join(d, "config.json"), JSON.stringify(cfg));
  fs.writeFileSync(path.join(d, "model.safetensors"), "");
  return d;
}

const LLAMA = { architectures: ["LlamaForCausalLM"], hidden_size: 16, num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 2, intermediate_size: 32, vocab_size: 64, rms_norm_eps: 1e-5, rope_theta: 10000, max_position_embeddings: 128 };
const GEMMA3 = { architectures: ["Gemma3ForCausalLM"], hidden_size: 16, num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, intermediate_size: 32, vocab_size: 64, rms_norm_eps: 1e-6, rope_theta: 1e6, sliding_window: 4, max_position_embeddings: 128 };

/** Loading `dir` throws one line: "<file>: <key> ..." (the key named, with the file). */
function assertConfigError(dir: string, file: string, key: RegExp): void {
  assert.throws(
    () => loadHostModel(dir),
    (e: Error) => {
      assert.ok(e instanceof ModelFileError, `${e.name}: ${e.message}`);
      assert.ok(!e.message.includes("\n"), e.message);
      assert.ok(e.message.startsWith(`${file}: `), e.message);
      assert.match(e.message.slice(file.length + 2), key);
      return true;
    },
  );
}

describe("config.json", () => {
  test("the unedited fixture loads (control)", () => {
    assert.equal(loadHostModel(gpt2With(() => undefined)).config.nLayers, (JSON.parse(fs.readFileSync(path.join(GPT2, "config.json"), "utf8")) as { n_layer: number }).n_layer);
  });

  test("negative or zero layer counts name the key (was 'Invalid array length')", () => {
    let d = gpt2With((c) => (c.n_layer = -2));
    assertConfigError(d, path.join(d, "config.json"), /^n_layer = -2 must be a positive integer; fix config\.json$/);
    d = configOnly({ ...LLAMA, num_hidden_layers: -3 });
    assertConfigError(d, path.join(d, "config.json"), /^num_hidden_layers = -3 must be a positive integer/);
    d = configOnly({ ...LLAMA, num_hidden_layers: 0 });
    assertConfigError(d, path.join(d, "config.json"), /^num_hidden_layers = 0 /);
  });

  test("norm epsilon -1 and rope_theta 0 name the key (they used to fail later as NaN/Inf weights)", () => {
    let d = gpt2With((c) => (c.layer_norm_epsilon = -1));
    assertConfigError(d, path.join(d, "config.json"), /^layer_norm_epsilon = -1 must be a finite number greater than 0/);
    d = configOnly({ ...LLAMA, rms_norm_eps: -1 });
    assertConfigError(d, path.join(d, "config.json"), /^rms_norm_eps = -1 /);
    d = configOnly({ ...LLAMA, rope_theta: 0 });
    assertConfigError(d, path.join(d, "config.json"), /^rope_theta = 0 must be a finite number greater than 0/);
  });

  test("sliding_window 0 or negative, and layer_types shorter than the layer count, name the key", () => {
    let d = configOnly({ ...LLAMA, sliding_window: 0 });
    assertConfigError(d, path.join(d, "config.json"), /^sliding_window = 0 must be a positive number of tokens/);
    d = configOnly({ ...GEMMA3, sliding_window: -4 });
    assertConfigError(d, path.join(d, "config.json"), /^sliding_window = -4 /);
    d = configOnly({ ...LLAMA, sliding_window: 8, layer_types: ["sliding_attention", "full_attention", "sliding_attention"] });
    assertConfigError(d, path.join(d, "config.json"), /^layer_types has 3 entries but num_hidden_layers = 4: it must list one entry per layer/);
    d = configOnly({ ...GEMMA3, layer_types: ["sliding_attention", "full_attention"] });
    assertConfigError(d, path.join(d, "config.json"), /^layer_types has 2 entries but num_hidden_layers = 4/);
    d = configOnly({ ...GEMMA3, layer_types: ["sliding_attention", "full_attention", "sliding_attention", "global"] });
    assertConfigError(d, path.join(d, "config.json"), /^layer_types\[3\] = "global" must be "sliding_attention" or "full_attention"/);
    // A multimodal Gemma 3 nests its text config: the key is named with its path.
    d = configOnly({ architectures: ["Gemma3ForConditionalGeneration"], text_config: { ...GEMMA3, architectures: undefined, layer_types: ["full_attention"] } });
    assertConfigError(d, path.join(d, "config.json"), /^text_config\.layer_types has 1 entries but text_config\.num_hidden_layers = 4/);
  });

  test("controls: valid values pass validation (the load then fails on the empty weights file, not on the config)", () => {
    for (const cfg of [{ ...LLAMA }, { ...LLAMA, sliding_window: 8, layer_types: Array(4).fill("full_attention") }, { ...GEMMA3 }, { ...LLAMA, architectures: ["Qwen2ForCausalLM"], sliding_window: 0, use_sliding_window: false }]) {
      const d = configOnly(cfg);
      assert.throws(() => loadHostModel(d), (e: Error) => !e.message.startsWith(path.join(d, "config.json")) && e.message.includes("model.safetensors"));
    }
  });
});

describe("GGUF metadata", () => {
  /** A copy of stories260K with one metadata value overwritten in place (type code and 4-byte value). */
  function storiesWith(key: string, type: number, write: (b: Buffer, at: number) => void): string {
    const b = fs.readFileSync(STORIES);
    const at = b.indexOf(Buffer.from(key));
    assert.ok(at > 0, key);
    b.writeUInt32LE(type, at + key.length);
    write(b, at + key.length + 4);
    const f = path.join(tmp(), "stories.gguf");
    fs.writeFileSync(f, b);
    return f;
  }

  test("the unpatched copy loads (control)", () => {
    const f = storiesWith("llama.block_count", 4, (b, at) => b.writeUInt32LE(5, at));
    assert.equal(loadHostModel(f).config.nLayers, 5);
  });

  test("a negative block_count and a negative epsilon name the .gguf and the key", () => {
    let f = storiesWith("llama.block_count", 5 /* INT32 */, (b, at) => b.writeInt32LE(-2, at));
    assertConfigError(f, f, /^llama\.block_count = -2 must be a positive integer; re-convert the GGUF/);
    f = storiesWith("llama.attention.layer_norm_rms_epsilon", 6 /* FLOAT32 */, (b, at) => b.writeFloatLE(-1, at));
    assertConfigError(f, f, /^llama\.attention\.layer_norm_rms_epsilon = -1 must be a finite number greater than 0/);
  });
});

test("a tokenizer with ids beyond the embedding is refused at load, naming tokenizer.json and vocab_size", async () => {
  const d = gpt2With(() => undefined);
  const tj = path.join(d, "tokenizer.json");
  const tok = JSON.parse(fs.readFileSync(tj, "utf8")) as { added_tokens: { id: number; content: string; special: boolean }[] };
  tok.added_tokens.push({ id: 1500, content: "<|extra|>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true } as never);
  fs.writeFileSync(tj, JSON.stringify(tok));
  await assert.rejects(Model.load(d), (e: Error) => {
    assert.ok(e instanceof ModelFileError, e.message);
    assert.ok(!e.message.includes("\n"));
    assert.ok(e.message.startsWith(`${tj}: model.vocab/added_tokens has token ids up to 1500, but the model's embedding has 1000 rows (${path.join(d, "config.json")}: vocab_size = 1000)`), e.message);
    return true;
  });
  // Control: the unedited tokenizer fits and the model loads.
  const m = await Model.load(gpt2With(() => undefined));
  assert.equal(m.tokenizer!.vocabSize, 1000);
  m.dispose();
});
