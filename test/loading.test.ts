// Loaders: safetensors (single, sharded, F16/BF16), GGUF, HF folders and the hub cache, and the
// errors bad files must give (one line naming the file and the fix; CLI exit code 1, no stack).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { ModelFileError, SelfscopeError, UnsupportedArchitectureError, WeightShapeError } from "../src/core/errors.js";
import { f16BytesToF32, bf16BytesToF32 } from "../src/io/binary.js";
import { GgmlType, GgufValueType, type GgufValue, f32ToF16Bytes, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf } from "../src/io/gguf.js";
import { resolveModelPath } from "../src/io/hub-cache.js";
import { readSafetensorsHeader, readStTensor, writeSafetensors } from "../src/io/safetensors.js";
import { Engine } from "../src/engine/jax/engine.js";
import { loadHostModel } from "../src/model/load.js";
import { checkFits, estimateMemory } from "../src/model/memory.js";
import { ggufTokenizerDigest } from "../src/model/model.js";
import { fixture, repoDir } from "./support/paths.js";

const GPT2 = fixture("tiny-random-gpt2");
const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const CLI = path.join(repoDir(), "dist/src/cli/main.js");

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-load-"));

function copyHfFolder(dst: string, skip: string[] = []): void {
  for (const f of fs.readdirSync(GPT2)) if (!skip.includes(f) && fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(dst, f));
}

/** Write raw safetensors with any dtype (the project writer only emits F32). */
function writeRaw(file: string, tensors: Record<string, { dtype: string; shape: number[]; bytes: Uint8Array }>): void {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const [k, t] of Object.entries(tensors)) {
    header[k] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.bytes.byteLength] };
    off += t.bytes.byteLength;
  }
  const hb = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  fs.writeFileSync(file, Buffer.concat([len, hb, ...Object.values(tensors).map((t) => Buffer.from(t.bytes))]));
}

test("a sharded F16/BF16 checkpoint loads to the same weights as the F32 file, exactly rounded", async () => {
  const dir = tmp();
  copyHfFolder(dir, ["model.safetensors"]);
  const st = readSafetensorsHeader(path.join(GPT2, "model.safetensors"));
  const names = [...st.tensors.keys()];
  const shards: Record<string, Record<string, { dtype: string; shape: number[]; bytes: Uint8Array }>> = { "model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {} };
  const weightMap: Record<string, string> = {};
  const expected = new Map<string, Float32Array>();
  names.forEach((n, i) => {
    const { data, shape } = readStTensor(st, n);
    const shard = i % 2 === 0 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    let bytes: Uint8Array;
    let dtype: string;
    if (i % 3 === 0) {
      dtype = "F16";
      bytes = f32ToF16Bytes(data);
      expected.set(n, f16BytesToF32(bytes));
    } else if (i % 3 === 1) {
      dtype = "BF16";
      const u32 = new Uint32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
      const u16 = Uint16Array.from(u32, (u) => u >>> 16); // truncation is a valid bf16 value
      bytes = new Uint8Array(u16.buffer);
      expected.set(n, bf16BytesToF32(bytes));
    } else {
      dtype = "F32";
      bytes = new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
      expected.set(n, data);
    }
    shards[shard]![n] = { dtype, shape, bytes };
    weightMap[n] = shard;
  });
  for (const [f, t] of Object.entries(shards)) writeRaw(path.join(dir, f), t);
  fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  const host = loadHostModel(dir);
  assert.equal(host.files.weights, path.join(dir, "model.safetensors.index.json"));
  assert.match(host.sourceDtype, /F16/);
  // ln_f is one of the converted tensors: compare canonical weights to the independently rounded values.
  const lnF = expected.get("transformer.ln_f.weight")!;
  assert.deepEqual([...host.weights.get("lnFinal.weight")!.data], [...lnF]);
  const wte = expected.get("transformer.wte.weight")!;
  assert.deepEqual([...host.weights.get("embed.weight")!.data.subarray(0, 64)], [...wte.subarray(0, 64)]);
  // And it runs: logits stay close to the F32 checkpoint's (rounding only).
  const ref = new Engine(loadHostModel(GPT2));
  const e = new Engine(host);
  const a = (await ref.forward([[1, 2, 3, 4]])).logits[0]!;
  const b = (await e.forward([[1, 2, 3, 4]])).logits[0]!;
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  assert.ok(d > 0 && d < 0.05, `F16/BF16 rounding should move logits a little, moved ${d}`);
  ref.dispose();
  e.dispose();
});

test("bf16 and f16 widening are exact", () => {
  const f16 = new Uint8Array(new Uint16Array([0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000]).buffer);
  assert.deepEqual([...f16BytesToF32(f16)], [1, -2, 65504, 2 ** -24, -0]);
  const bf = new Uint8Array(new Uint16Array([0x3f80, 0xc040, 0x7f80]).buffer);
  assert.deepEqual([...bf16BytesToF32(bf)], [1, -3, Infinity]);
});

test("GGUF header: metadata, tensors and alignment", () => {
  const g = readGguf(STORIES);
  assert.equal(g.version, 3);
  assert.equal(g.metadata.get("general.architecture"), "llama");
  assert.equal(g.tensors.size, 48);
  assert.deepEqual(g.tensors.get("blk.0.attn_k.weight")!.ne, [64, 32]);
  // Stored value types are kept, so a copy can be written with the same metadata byte for byte.
  assert.deepEqual(g.metadataTypes!.get("llama.block_count"), { type: GgufValueType.UINT32 });
  assert.deepEqual(g.metadataTypes!.get("tokenizer.ggml.token_type"), { type: GgufValueType.ARRAY, itemType: GgufValueType.INT32 });
  const copy = path.join(os.tmpdir(), `gguf-copy-${process.pid}.gguf`);
  try {
    writeGguf(copy, ggufMetadataForWrite(g), [...g.tensors.keys()].map((name) => ({ name, ...readGgufTensor(g, name), type: GgmlType.F32 as const })));
    assert.deepEqual(fs.readFileSync(copy), fs.readFileSync(STORIES));
    const c = readGguf(copy);
    assert.deepEqual(c.metadata, g.metadata);
    assert.deepEqual(c.metadataTypes, g.metadataTypes);
  } finally {
    fs.rmSync(copy, { force: true });
  }
});

test("GGUF strings: UTF-8 as written, a leading U+FEFF kept, invalid bytes as U+FFFD", () => {
  const file = path.join(os.tmpdir(), `gguf-strings-${process.pid}.gguf`);
  const texts = ["\uFEFF", "\uFEFFa", "\u2581the", "\u{1F999}", "", "plain"];
  try {
    writeGguf(file, { "general.architecture": { type: GgufValueType.STRING, value: "llama" }, "t.list": { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: [...texts, "BAD"] } }, []);
    // Overwrite the last string's three bytes with a lone continuation byte, a truncated 3-byte
    // sequence and an ASCII letter: WHATWG's decoder (and llama.cpp's byte-level view) keep the length.
    const bytes = fs.readFileSync(file);
    const at = bytes.lastIndexOf(Buffer.from("BAD"));
    bytes.set([0x80, 0xe2, 0x41], at);
    fs.writeFileSync(file, bytes);
    assert.deepEqual(readGguf(file).metadata.get("t.list"), [...texts, "\uFFFD\uFFFDA"]);
  } finally {
    fs.rmSync(file, { force: true });
  }
});

test("a GGUF's tokenizer digest is sha256 over JSON.stringify([key, value]) of each tokenizer.* key, the bytes older caches were keyed by (merges, tokens, scores, types, a bigint)", () => {
  const old = (meta: ReadonlyMap<string, GgufValue>) => {
    const h = createHash("sha256");
    for (const k of [...meta.keys()].filter((x) => x.startsWith("tokenizer.")).sort()) h.update(JSON.stringify([k, meta.get(k)], (_, v: unknown) => (typeof v === "bigint" ? `${v}n` : v)));
    return h.digest("hex");
  };
  for (const file of [path.join(fixture("llamacpp-vocab"), "ggml-vocab-gpt-2.gguf"), STORIES]) {
    const meta = readGguf(file).metadata;
    assert.ok([...meta.values()].some((v) => Array.isArray(v) && v.length >= 512), file);
    assert.equal(ggufTokenizerDigest(meta), old(meta), file);
  }
  const odd = new Map<string, GgufValue>([["tokenizer.b", [[1, 2n], ["\u{1F999}", "\uD800"], []]], ["tokenizer.a", 3n], ["general.x", "not hashed"], ["tokenizer.c", []]]);
  assert.equal(ggufTokenizerDigest(odd), old(odd));
  assert.notEqual(ggufTokenizerDigest(new Map([...odd, ["tokenizer.c", [0]]])), ggufTokenizerDigest(odd));
  assert.equal(ggufTokenizerDigest(new Map([["general.x", 1]])), null);
});

test("HF hub cache names resolve offline; a missing one says where it looked and how to download", () => {
  const home = tmp();
  const repo = path.join(home, "hub", "models--tiny--gpt2");
  const commit = "0123456789abcdef0123456789abcdef01234567";
  fs.mkdirSync(path.join(repo, "snapshots", commit), { recursive: true });
  fs.mkdirSync(path.join(repo, "refs"));
  fs.writeFileSync(path.join(repo, "refs", "main"), commit);
  // The hub cache stores files as symlinks into blobs/.
  fs.mkdirSync(path.join(repo, "blobs"));
  for (const f of fs.readdirSync(GPT2)) {
    if (!fs.statSync(path.join(GPT2, f)).isFile()) continue;
    fs.copyFileSync(path.join(GPT2, f), path.join(repo, "blobs", f));
    fs.symlinkSync(path.join("..", "..", "blobs", f), path.join(repo, "snapshots", commit, f));
  }
  const env = { HF_HOME: home };
  assert.equal(resolveModelPath("tiny/gpt2", env), path.join(repo, "snapshots", commit));
  const saved = process.env.HF_HOME;
  process.env.HF_HOME = home;
  try {
    assert.equal(loadHostModel("tiny/gpt2").config.family, "gpt2");
  } finally {
    if (saved === undefined) delete process.env.HF_HOME;
    else process.env.HF_HOME = saved;
  }
  assert.throws(() => resolveModelPath("google/gemma-3-270m-it", env), (e: Error) => {
    assert.ok(e instanceof ModelFileError);
    assert.match(e.message, /models--google--gemma-3-270m-it/);
    assert.match(e.message, /huggingface-cli download google\/gemma-3-270m-it/);
    return true;
  });
});

test("a model too large for the wasm heap is refused before any weight is read", () => {
  const dir = tmp();
  const cfg = { architectures: ["LlamaForCausalLM"], hidden_size: 4096, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, intermediate_size: 14336, vocab_size: 128256, rms_norm_eps: 1e-5, max_position_embeddings: 8192 };
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg));
  fs.writeFileSync(path.join(dir, "model.safetensors"), ""); // never opened: the check comes first
  assert.throws(() => loadHostModel(dir, (c, src) => checkFits(c, "wasm", src)), (e: Error) => {
    assert.ok(e instanceof SelfscopeError);
    assert.match(e.message, /8\.03B parameters need .* GiB as f32 on the wasm backend/);
    assert.match(e.message, /--device webgpu/);
    return true;
  });
  const est = estimateMemory(loadHostModel(GPT2).config);
  assert.equal(est.params, 111968); // PROVENANCE.md: 111,968 parameters (tied)
});

test("the cpu memory check is the machine's RAM (the engine splits past 4 GiB), counting quantized matrices at their native size", () => {
  // Llama-3.2-1B's shape: 4.6 GiB as f32, ~1.8 GB with Q4_K matrices and an f32 embedding.
  const dir = tmp();
  const cfg = { architectures: ["LlamaForCausalLM"], hidden_size: 2048, num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, intermediate_size: 8192, vocab_size: 128256, rms_norm_eps: 1e-5, max_position_embeddings: 8192, tie_word_embeddings: true };
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg));
  fs.writeFileSync(path.join(dir, "model.safetensors"), "");
  let c: Parameters<typeof checkFits>[0] | undefined;
  const GiB = 2 ** 30;
  // On a 4 GiB machine the f32 load is refused, naming the RAM and the quantized way out.
  assert.throws(() => loadHostModel(dir, (cfg2, src) => {
    c = cfg2;
    checkFits(cfg2, "cpu", src, undefined, 4 * GiB);
  }), /1\.24B parameters need 4\.6\d GiB as f32 on the cpu backend, more than 85% of this machine's 4\.00 GiB of RAM.*or its Q8_0\/Q4_K GGUF or BF16 safetensors/);
  // On a 24 GiB machine it fits (split across two Wasm memories by the engine).
  assert.doesNotThrow(() => checkFits(c!, "cpu", "1b.safetensors", undefined, 24 * GiB));
  const blocks = 16 * (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192);
  const native = (blocks * 152) / 256 + 128256 * 2048 * 4;
  assert.doesNotThrow(() => checkFits(c!, "cpu", "1b.gguf", native, 4 * GiB));
  assert.throws(() => checkFits(c!, "cpu", "8b.gguf", 4.6 * GiB, 4 * GiB), /with its Q8_0\/Q4_K\/BF16 matrices kept in their format.*a smaller quantization/);
  assert.doesNotThrow(() => checkFits(c!, "cpu", "8b.gguf", 4.6 * GiB, 24 * GiB));
  // jax-js's wasm backend still has one 4 GiB memory.
  assert.throws(() => checkFits(c!, "wasm", "1b.safetensors", undefined, 24 * GiB), /one 4 GiB wasm32 memory.*--device cpu/);
});

test("unexpected, missing and mis-shaped tensors and unknown architectures are rejected by name", () => {
  const extra = tmp();
  copyHfFolder(extra, ["model.safetensors"]);
  const st = readSafetensorsHeader(path.join(GPT2, "model.safetensors"));
  const all: Record<string, { data: Float32Array; shape: number[] }> = {};
  for (const n of st.tensors.keys()) all[n] = readStTensor(st, n);
  writeSafetensors(path.join(extra, "model.safetensors"), { ...all, "transformer.h.0.mystery.weight": { data: new Float32Array(4), shape: [4] } });
  assert.throws(() => loadHostModel(extra), (e: Error) => e instanceof WeightShapeError && /unexpected tensor transformer\.h\.0\.mystery\.weight/.test(e.message) && e.message.includes(extra));

  const missing = tmp();
  copyHfFolder(missing, ["model.safetensors"]);
  const { ["transformer.h.3.mlp.c_fc.bias"]: _drop, ...rest } = all;
  writeSafetensors(path.join(missing, "model.safetensors"), rest);
  assert.throws(() => loadHostModel(missing), /missing tensor h\.3\.mlp\.c_fc\.bias/);

  const shaped = tmp();
  copyHfFolder(shaped, ["model.safetensors", "config.json"]);
  fs.writeFileSync(path.join(shaped, "config.json"), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(GPT2, "config.json"), "utf8")), n_embd: 64 }));
  fs.copyFileSync(path.join(GPT2, "model.safetensors"), path.join(shaped, "model.safetensors"));
  assert.throws(() => loadHostModel(shaped), (e: Error) => e instanceof WeightShapeError && /has shape \[1000,32\] but the config implies \[1000,64\]/.test(e.message));

  const arch = tmp();
  copyHfFolder(arch, ["config.json"]);
  fs.writeFileSync(path.join(arch, "config.json"), JSON.stringify({ architectures: ["MambaForCausalLM"] }));
  assert.throws(() => loadHostModel(arch), (e: Error) => e instanceof UnsupportedArchitectureError && /MambaForCausalLM/.test(e.message) && /supported: .*Qwen3ForCausalLM/.test(e.message));
});

test("corrupt and truncated files: typed error naming the file, bounded work", () => {
  const dir = tmp();
  const bytes = fs.readFileSync(STORIES);
  const cases: [string, Uint8Array, RegExp][] = [
    ["truncated-header.gguf", bytes.subarray(0, 100), /truncated/],
    ["truncated-data.gguf", bytes.subarray(0, bytes.length - 1000), /truncated: tensor/],
    ["bad-magic.gguf", Buffer.concat([Buffer.from("GGUX"), bytes.subarray(4)]), /not a GGUF file/],
  ];
  // A header that declares 2^60 metadata entries must not allocate.
  const huge = Buffer.from(bytes.subarray(0, 64));
  huge.writeBigUInt64LE(1n << 60n, 16);
  cases.push(["huge-count.gguf", huge, /corrupt header/]);
  for (const [name, data, re] of cases) {
    const f = path.join(dir, name);
    fs.writeFileSync(f, data);
    assert.throws(() => loadHostModel(f), (e: Error) => e instanceof ModelFileError && re.test(e.message) && e.message.startsWith(f), name);
  }
  const st = path.join(dir, "st");
  fs.mkdirSync(st);
  copyHfFolder(st, ["model.safetensors"]);
  const sb = fs.readFileSync(path.join(GPT2, "model.safetensors"));
  fs.writeFileSync(path.join(st, "model.safetensors"), sb.subarray(0, sb.length - 10));
  assert.throws(() => loadHostModel(st), /truncated: tensor/);
  fs.writeFileSync(path.join(st, "model.safetensors"), Buffer.concat([sb.subarray(0, 8), Buffer.from("{not json")]));
  assert.throws(() => loadHostModel(st), /model\.safetensors: corrupt or truncated|corrupt header JSON/);
  fs.writeFileSync(path.join(st, "config.json"), "{ \"n_embd\": ");
  assert.throws(() => loadHostModel(st), /config\.json: not valid JSON/);
});

test("the CLI reports bad input in one line, exit code 1, no stack trace", () => {
  const dir = tmp();
  const f = path.join(dir, "broken.gguf");
  fs.writeFileSync(f, fs.readFileSync(STORIES).subarray(0, 5000));
  const r = spawnSync(process.execPath, [CLI, "info", "--model", f], { encoding: "utf8" });
  assert.equal(r.status, 1);
  const lines = r.stderr.trim().split("\n").filter((l) => !/^Warning:|Dawn|^\s*$/.test(l));
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, new RegExp(`^selfscope info: ${f.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: truncated`));
  assert.doesNotMatch(r.stderr, /\n\s+at /);
  const u = spawnSync(process.execPath, [CLI, "generate", "--model", STORIES, "--max-tokens", "x"], { encoding: "utf8" });
  assert.equal(u.status, 1);
  assert.match(u.stderr, /--max-tokens must be a number/);
});
