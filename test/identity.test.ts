// Model identity and what depends on it: the weights hash covers every byte of every weight file
// (single safetensors, shards, GGUF), its per-file cache is never trusted when stale or corrupt,
// the concept-vector cache is keyed by weights + tokenizer + chat template + config + recipe, and
// resume refuses another model. Checkpoints are tiny-random-gpt2 copied to temp folders and
// edited; the planted edit is the truth each check is held to. wasm backend.
import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { cacheRoot } from "../src/core/cache.js";
import { UsageError } from "../src/core/errors.js";
import { inject, resume } from "../src/recipes/inject.js";
import { fileSha256, hashEntryPaths, sha256File } from "../src/io/file-hash.js";
import { readRange } from "../src/io/gguf.js";
import { readSafetensorsHeader, readStTensor, writeSafetensors } from "../src/io/safetensors.js";
import { legacyWeightsHash, resolveModelFiles, weightsDigest } from "../src/model/load.js";
import { Model } from "../src/model/model.js";
import { conceptVectors } from "../src/vectors/extract.js";
import { fixture, repoDir } from "./support/paths.js";
import { runCli } from "./support/runlog-checks.js";

const GPT2 = fixture("tiny-random-gpt2");
const STORIES = path.join(repoDir(), "models", "stories260K", "stories260K.gguf");
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-identity-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

const MIB = 1 << 20;
/** The tensor the tests edit, and the layer its edit first shows at (resid_post of its block). */
const EDITED = "transformer.h.2.mlp.c_fc.weight";
const LAYER = 3;

type Tensors = Record<string, { data: Float32Array; shape: number[] }>;

function fixtureTensors(): Tensors {
  const set = readSafetensorsHeader(path.join(GPT2, "model.safetensors"));
  const out: Tensors = {};
  for (const name of set.tensors.keys()) out[name] = readStTensor(set, name);
  return out;
}

/** The causal-mask buffer old GPT-2 checkpoints store per block (1 MiB at n_ctx 512); the loader ignores it. */
const maskBuffer = () => ({ data: new Float32Array(512 * 512).fill(1), shape: [1, 1, 512, 512] });

/**
 * A copy of tiny-random-gpt2 whose real weights sit in the middle of the file, between two mask
 * buffers at each end (as in many real GPT-2 checkpoints), so the first and last MiB hold none of
 * them. `edit` changes some values of EDITED (its middle).
 */
function paddedCopy(name: string, edit: boolean, files: Record<string, string> = {}): string {
  const dir = path.join(tmpRoot, name);
  fs.mkdirSync(dir, { recursive: true });
  for (const f of fs.readdirSync(GPT2)) if (f !== "model.safetensors" && fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(dir, f));
  for (const [f, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, f), text);
  const t = fixtureTensors();
  if (edit) editMiddle(t[EDITED]!.data);
  const ordered: Tensors = { "transformer.h.0.attn.bias": maskBuffer(), "transformer.h.1.attn.bias": maskBuffer(), ...t, "transformer.h.3.attn.bias": maskBuffer(), "transformer.h.4.attn.bias": maskBuffer() };
  writeSafetensors(path.join(dir, "model.safetensors"), ordered);
  return dir;
}

/** Change a few values in the middle of a tensor (what a fine-tune of one layer does). */
function editMiddle(d: Float32Array): void {
  const mid = d.length >> 1;
  for (let i = mid; i < mid + 32; i++) d[i] = d[i]! + 0.75;
}

/** The same weights as two shards and an index; `editSecond` edits EDITED, which lives in shard 2. */
function shardedCopy(name: string, editSecond: boolean): string {
  const dir = path.join(tmpRoot, name);
  fs.mkdirSync(dir, { recursive: true });
  for (const f of fs.readdirSync(GPT2)) if (f !== "model.safetensors" && fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(dir, f));
  const t = fixtureTensors();
  if (editSecond) editMiddle(t[EDITED]!.data);
  const names = Object.keys(t).sort();
  const first = names.filter((n) => !/\.h\.[2-4]\./.test(n));
  const second = names.filter((n) => /\.h\.[2-4]\./.test(n));
  const shard = (list: string[]) => Object.fromEntries(list.map((n) => [n, t[n]!]));
  writeSafetensors(path.join(dir, "model-00001-of-00002.safetensors"), shard(first));
  writeSafetensors(path.join(dir, "model-00002-of-00002.safetensors"), shard(second));
  const weight_map = Object.fromEntries([...first.map((n) => [n, "model-00001-of-00002.safetensors"]), ...second.map((n) => [n, "model-00002-of-00002.safetensors"])]);
  fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map }, null, 1));
  return dir;
}

const sha256Of = (file: string) => createHash("sha256").update(fs.readFileSync(file)).digest("hex");
const baselineWords = ["apple", "river", "chair", "cloud", "music", "stone"];
const concepts = ["Dust", "Oceans"];

async function withModel<T>(p: string, f: (m: Model) => Promise<T>): Promise<T> {
  const m = await Model.load(p, { device: "wasm" });
  try {
    return await f(m);
  } finally {
    m.dispose();
  }
}

/** Vectors from the cache at `cacheDir` and, as the reference, computed afresh with no cache. */
async function vectorsBoth(m: Model, cacheDir: string) {
  const cached = await conceptVectors(m, { concepts, baselineWords, layers: [LAYER], cacheDir });
  const fresh = await conceptVectors(m, { concepts, baselineWords, layers: [LAYER], cacheDir: null });
  return { cached, fresh };
}

function assertSameVectors(a: Map<number, Map<string, Float32Array>>, b: Map<number, Map<string, Float32Array>>, what: string): void {
  for (const c of concepts) assert.deepEqual(a.get(LAYER)!.get(c), b.get(LAYER)!.get(c), `${what}: ${c}`);
}

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) {
    ab += a[i]! * b[i]!;
    aa += a[i]! * a[i]!;
    bb += b[i]! * b[i]!;
  }
  return ab / Math.sqrt(aa * bb);
}

describe("weights identity", () => {
  test("two checkpoints differing only in one tensor's middle get different identities and fresh vectors", async () => {
    const a = paddedCopy("mid-a", false);
    const b = paddedCopy("mid-b", true);
    const fa = resolveModelFiles(a), fb = resolveModelFiles(b);
    // The planted edit is outside the first and last MiB: the old identity could not see it.
    assert.ok(fs.statSync(fa.weights).size > 4 * MIB);
    assert.deepEqual(readRange(fa.weights, 0, MIB), readRange(fb.weights, 0, MIB));
    assert.equal(legacyWeightsHash(fa), legacyWeightsHash(fb), "the fixture reproduces the blind spot of the old hash");
    assert.notEqual(sha256Of(fa.weights), sha256Of(fb.weights));
    const cacheDir = path.join(tmpRoot, "vectors-mid");
    const va = await withModel(a, async (m) => {
      assert.equal(m.weightsHash(), sha256Of(fa.weights), "the identity is the sha256 of every byte");
      const { cached, fresh } = await vectorsBoth(m, cacheDir);
      assert.equal(cached.computed, concepts.length);
      assertSameVectors(cached.vectors, fresh.vectors, "model A");
      return cached.vectors;
    });
    await withModel(b, async (m) => {
      assert.equal(m.weightsHash(), sha256Of(fb.weights));
      const { cached, fresh } = await vectorsBoth(m, cacheDir);
      assert.deepEqual({ reused: cached.reused, computed: cached.computed }, { reused: 0, computed: concepts.length }, "B must not reuse A's vectors");
      assertSameVectors(cached.vectors, fresh.vectors, "model B (from the shared cache) vs computed afresh");
      // The edit matters: reusing A's vectors would have been wrong.
      const c = cosine(cached.vectors.get(LAYER)!.get("Dust")!, va.get(LAYER)!.get("Dust")!);
      assert.ok(c < 0.999, `A's and B's vectors agree (cos ${c}): the edit does not reach layer ${LAYER}`);
    });
  });

  test("a sharded pair where one shard differs gets different identities (every shard is hashed) and fresh vectors", async () => {
    const a = shardedCopy("shard-a", false);
    const b = shardedCopy("shard-b", true);
    const fa = resolveModelFiles(a), fb = resolveModelFiles(b);
    assert.ok(fa.weights.endsWith("model.safetensors.index.json"));
    assert.equal(legacyWeightsHash(fa), legacyWeightsHash(fb), "the old hash read the index only");
    const shard1 = "model-00001-of-00002.safetensors";
    assert.equal(sha256Of(path.join(a, shard1)), sha256Of(path.join(b, shard1)), "shard 1 is the same");
    assert.notEqual(weightsDigest(fa), weightsDigest(fb));
    const cacheDir = path.join(tmpRoot, "vectors-shard");
    await withModel(a, async (m) => {
      const { cached } = await vectorsBoth(m, cacheDir);
      assert.equal(cached.computed, concepts.length);
    });
    await withModel(b, async (m) => {
      const { cached, fresh } = await vectorsBoth(m, cacheDir);
      assert.deepEqual({ reused: cached.reused, computed: cached.computed }, { reused: 0, computed: concepts.length });
      assertSameVectors(cached.vectors, fresh.vectors, "sharded B vs computed afresh");
    });
    // The same weights sharded and unsharded are one model to the engine, but their files differ: another identity (safe side).
    assert.notEqual(weightsDigest(fa), weightsDigest(resolveModelFiles(paddedCopy("single", false))));
  });

  test("GGUF: the identity is the sha256 of the whole file", async () => {
    await withModel(STORIES, async (m) => assert.equal(m.weightsHash(), sha256Of(STORIES)));
  });

  test("the same weights with and without a chat template do not share cached vectors", async () => {
    const tpl = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    const config = JSON.parse(fs.readFileSync(path.join(GPT2, "tokenizer_config.json"), "utf8")) as Record<string, unknown>;
    const plain = paddedCopy("tpl-none", false);
    const templated = paddedCopy("tpl-chat", false, { "tokenizer_config.json": JSON.stringify({ ...config, chat_template: tpl }) });
    const cacheDir = path.join(tmpRoot, "vectors-tpl");
    const vp = await withModel(plain, async (m) => {
      assert.equal(m.chatTemplate, undefined);
      return (await vectorsBoth(m, cacheDir)).cached.vectors;
    });
    await withModel(templated, async (m) => {
      assert.equal(m.chatTemplate, tpl);
      assert.equal(m.weightsHash(), sha256Of(resolveModelFiles(plain).weights), "same weights");
      const { cached, fresh } = await vectorsBoth(m, cacheDir);
      assert.deepEqual({ reused: cached.reused, computed: cached.computed }, { reused: 0, computed: concepts.length });
      assertSameVectors(cached.vectors, fresh.vectors, "templated vs computed afresh");
      assert.notDeepEqual(cached.vectors.get(LAYER)!.get("Dust"), vp.get(LAYER)!.get("Dust"), "the template changes the concept prompt");
      // And the same model again reuses its own.
      const again = await conceptVectors(m, { concepts, baselineWords, layers: [LAYER], cacheDir });
      assert.deepEqual({ reused: again.reused, computed: again.computed }, { reused: concepts.length, computed: 0 });
    });
  });

  test("a cached vector entry whose key or data was tampered with is recomputed, with a note", async () => {
    const cacheDir = path.join(tmpRoot, "vectors-tamper");
    await withModel(GPT2, async (m) => {
      const notes: string[] = [];
      const opts = { concepts, baselineWords, layers: [LAYER], cacheDir, onNote: (s: string) => void notes.push(s) };
      const first = await conceptVectors(m, opts);
      const f = path.join(first.dir!, `L${LAYER}`, "Dust.f32");
      fs.writeFileSync(f, Buffer.alloc(7));
      const second = await conceptVectors(m, opts);
      assert.deepEqual({ reused: second.reused, computed: second.computed }, { reused: 1, computed: 1 });
      assert.match(notes.join("\n"), /Dust\.f32 is corrupt/);
      assertSameVectors(second.vectors, first.vectors, "recomputed");
      fs.appendFileSync(path.join(first.dir!, "key.json"), " ");
      const third = await conceptVectors(m, opts);
      assert.equal(third.reused, 0);
      assert.match(notes.join("\n"), /key\.json does not match/);
    });
  });
});

describe("the per-file hash cache", () => {
  const big = (name: string) => {
    const dir = path.join(tmpRoot, name);
    fs.mkdirSync(dir, { recursive: true });
    const f = path.join(dir, "w.bin");
    const b = Buffer.alloc(3 * MIB);
    for (let i = 0; i < b.length; i++) b[i] = (i * 2654435761) >>> 24;
    fs.writeFileSync(f, b);
    return f;
  };

  test("is written beside the file, used while the file is unchanged, and never trusted once it changed", () => {
    const f = big("hc");
    const t0 = new Date("2026-01-01T00:00:00Z"); // whole seconds, so it can be restored exactly
    fs.utimesSync(f, t0, t0);
    const notes: string[] = [];
    const opts = { minCacheBytes: 0, cacheDir: path.join(tmpRoot, "hc-user"), onNote: (s: string) => void notes.push(s) };
    const h0 = fileSha256(f, opts);
    assert.equal(h0, sha256Of(f));
    const [beside] = hashEntryPaths(f, opts.cacheDir);
    assert.ok(fs.existsSync(beside!), "entry beside the file");
    assert.equal(fileSha256(f, opts), h0);
    assert.deepEqual(notes, []);
    // Change the middle of the file in place, keeping its size and restoring its mtime.
    const st = fs.statSync(f);
    const fd = fs.openSync(f, "r+");
    fs.writeSync(fd, Buffer.from([1, 2, 3, 4]), 0, 4, 3 * MIB / 2);
    fs.closeSync(fd);
    fs.utimesSync(f, t0, t0);
    assert.equal(fs.statSync(f).size, st.size);
    assert.equal(fs.statSync(f).mtimeMs, st.mtimeMs, "mtime restored");
    const h1 = fileSha256(f, opts);
    assert.equal(h1, sha256Of(f), "the stale entry was not used");
    assert.notEqual(h1, h0);
    assert.match(notes.join("\n"), /changed since it was hashed \(ctimeNs differs\); hashing it again/);
  });

  test("a corrupt or forged entry is reported and ignored", () => {
    const f = big("hc-corrupt");
    const notes: string[] = [];
    const opts = { minCacheBytes: 0, cacheDir: path.join(tmpRoot, "hc-corrupt-user"), onNote: (s: string) => void notes.push(s) };
    const h = fileSha256(f, opts);
    const [beside] = hashEntryPaths(f, opts.cacheDir);
    const e = JSON.parse(fs.readFileSync(beside!, "utf8")) as { sha256: string };
    fs.writeFileSync(beside!, JSON.stringify({ ...e, sha256: "0".repeat(64) }));
    assert.equal(fileSha256(f, opts), h);
    assert.match(notes.join("\n"), /is corrupt \(its seal does not match\); hashing it again/);
    fs.writeFileSync(beside!, '{"schema":');
    assert.equal(fileSha256(f, opts), h);
    assert.match(notes.at(-1)!, /is corrupt \(not JSON\)/);
  });

  test("falls back to the user cache folder when the entry cannot be written beside the file", () => {
    const f = big("hc-ro");
    const user = path.join(tmpRoot, "hc-ro-user");
    const [beside, inUser] = hashEntryPaths(f, user);
    // A folder where the entry file would go makes the beside write fail for any user (root included).
    fs.mkdirSync(beside!);
    const h = fileSha256(f, { minCacheBytes: 0, cacheDir: user });
    assert.equal(h, sha256Of(f));
    assert.ok(fs.existsSync(inUser!), "entry in the user cache folder");
    assert.equal(fileSha256(f, { minCacheBytes: 0, cacheDir: user }), h);
  });

  test("small files are hashed directly and leave nothing behind", () => {
    const f = big("hc-small");
    assert.equal(fileSha256(f, { cacheDir: path.join(tmpRoot, "hc-small-user") }), sha256File(f));
    assert.deepEqual(fs.readdirSync(path.dirname(f)), ["w.bin"]);
  });
});

describe("resume", () => {
  test("refuses a run whose model file now holds other weights, naming both hashes", async () => {
    const dir = paddedCopy("resume-model", false);
    const other = paddedCopy("resume-other", true);
    const out = path.join(tmpRoot, "resume-run");
    await inject({ model: dir, layers: String(LAYER), strengths: "4", concepts: "1", trials: 1, controls: 1, judges: ["rule"], maxTokens: 2, batchSize: 4, out, vectorCache: null, quiet: true, device: "wasm" });
    const before = fs.readFileSync(path.join(out, "log.jsonl"));
    // The same path, other weights: the old header hash (first and last MiB) matched this.
    fs.copyFileSync(path.join(other, "model.safetensors"), path.join(dir, "model.safetensors"));
    await assert.rejects(resume(out, { quiet: true, device: "wasm", vectorCache: null }), (e: unknown) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.match(e.message, /is not the one this run started with \(weights sha256 [0-9a-f]{16}… ≠ [0-9a-f]{16}… in the log header\); resume needs the same model/);
      return true;
    });
    assert.deepEqual(fs.readFileSync(path.join(out, "log.jsonl")), before, "nothing was appended");
    // Restoring the weights but changing the tokenizer is refused too.
    fs.copyFileSync(path.join(paddedCopy("resume-restore", false), "model.safetensors"), path.join(dir, "model.safetensors"));
    const tc = path.join(dir, "tokenizer_config.json");
    fs.writeFileSync(tc, JSON.stringify({ ...(JSON.parse(fs.readFileSync(tc, "utf8")) as object), chat_template: "{{ messages[0].content }}" }));
    await assert.rejects(resume(out, { quiet: true, device: "wasm", vectorCache: null }), /tokenizer sha256 .* ≠ /);
  });
});

test("the cache root: $SELFSCOPE_CACHE, else an absolute $XDG_CACHE_HOME/selfscope, else ~/.cache/selfscope", () => {
  const home = path.join(os.homedir(), ".cache", "selfscope");
  assert.equal(cacheRoot({ SELFSCOPE_CACHE: "/tmp/a", XDG_CACHE_HOME: "/tmp/x" }), "/tmp/a");
  assert.equal(cacheRoot({ XDG_CACHE_HOME: "/tmp/x" }), "/tmp/x/selfscope");
  assert.equal(cacheRoot({ XDG_CACHE_HOME: "relative/x" }), home, "a relative XDG_CACHE_HOME is ignored, as the XDG spec says");
  assert.equal(cacheRoot({}), home);
});

describe("selfscope cache", () => {
  test("shows where the caches live and clears them", async () => {
    const root = path.join(tmpRoot, "cli-cache");
    const env = { ...process.env, SELFSCOPE_CACHE: root };
    fs.mkdirSync(path.join(root, "vectors", "m", "k"), { recursive: true });
    fs.writeFileSync(path.join(root, "vectors", "m", "k", "key.json"), "{}");
    fs.mkdirSync(path.join(root, "other"));
    const shown = await runCli(["cache"], { env });
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stdout, new RegExp(`vectors +${path.join(root, "vectors")} +\\(1 files`));
    assert.match(shown.stdout, new RegExp(`hashes +${path.join(root, "hashes")}`));
    const cleared = await runCli(["cache", "clear"], { env });
    assert.equal(cleared.code, 0, cleared.stderr);
    assert.ok(!fs.existsSync(path.join(root, "vectors")), "vectors removed");
    assert.ok(fs.existsSync(path.join(root, "other")), "nothing else under the root is touched");
  });
});
