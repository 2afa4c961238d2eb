// Lazy loading (loadHostModel(path, check, { lazy: true })): the same weights bit for bit as an
// eager load, no tensor data read at load, NaN/Inf reported when a tensor is read, and every
// structural error (missing tensor, wrong shape, unreadable dtype) still raised at load.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { FIXTURE_FAMILIES, makeFixtures, type FixturePaths } from "../scripts/make-fixtures.js";
import { ModelFileError, WeightShapeError } from "../src/core/errors.js";
import { readGguf } from "../src/io/gguf.js";
import { readSafetensorsHeader, readStTensor, writeSafetensors } from "../src/io/safetensors.js";
import { LazyWeights, loadHostModel, NumericalWeightsError, type HostModel, type HostTensor } from "../src/model/load.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const LLAMA2 = fixture("llama2-tiny-random-gguf/llama-2-tiny-random.gguf");
const GPT2 = fixture("tiny-random-gpt2");

let dir = "";
let fixtures: FixturePaths[] = [];
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-lazy-"));
  fixtures = makeFixtures(path.join(dir, "families"), FIXTURE_FAMILIES);
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});
const tmp = () => fs.mkdtempSync(path.join(dir, "t-"));

const lazyLoad = (p: string) => loadHostModel(p, undefined, { lazy: true });

const bytesOf = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function assertSameTensor(got: HostTensor, want: HostTensor, what: string): void {
  assert.deepEqual(got.shape, want.shape, `${what}: shape`);
  assert.ok(Buffer.compare(bytesOf(got.data), bytesOf(want.data)) === 0, `${what}: data differs`);
}

// ---------------------------------------------------------------- spying on positioned reads

interface Read {
  file: string;
  position: number;
  length: number;
}

/** Record every fs.readSync the loader makes (the io modules call it through the fs default export). */
function spyReads<T>(f: () => T): { result: T; reads: Read[] } {
  const open = fs.openSync;
  const read = fs.readSync;
  const close = fs.closeSync;
  const fds = new Map<number, string>();
  const reads: Read[] = [];
  const mfs = fs as unknown as Record<string, unknown>;
  mfs.openSync = (...a: unknown[]) => {
    const fd = (open as (...x: unknown[]) => number)(...a);
    fds.set(fd, path.resolve(String(a[0])));
    return fd;
  };
  mfs.closeSync = (fd: number) => {
    fds.delete(fd);
    close(fd);
  };
  mfs.readSync = (...a: unknown[]) => {
    const [fd, , , length, position] = a as [number, unknown, number, number, number | null];
    reads.push({ file: fds.get(fd) ?? `fd ${fd}`, position: Number(position ?? -1), length });
    return (read as (...x: unknown[]) => number)(...a);
  };
  try {
    return { result: f(), reads };
  } finally {
    mfs.openSync = open;
    mfs.readSync = read;
    mfs.closeSync = close;
  }
}

/** Byte ranges of the tensors a load maps to weights (GGUF tensors read for the config are excluded). */
function mappedRanges(h: HostModel): { file: string; name: string; start: number; end: number }[] {
  if (h.gguf) {
    const ignore = h.family.ggufIgnore;
    return [...h.gguf.tensors.values()].filter((t) => !(ignore && ignore.test(t.name))).map((t) => ({ file: path.resolve(h.gguf!.path), name: t.name, start: t.offset, end: t.offset + t.byteLength }));
  }
  const st = readSafetensorsHeader(h.files.weights);
  return [...st.tensors.entries()].map(([name, t]) => ({ file: path.resolve(t.file), name, start: t.offset, end: t.offset + t.byteLength }));
}

// ---------------------------------------------------------------- tests

function models(): [string, string][] {
  const out: [string, string][] = [["stories260K", STORIES]];
  if (fs.existsSync(LLAMA2)) out.push(["llama-2-tiny-random", LLAMA2]);
  if (fs.existsSync(GPT2)) out.push(["tiny-random-gpt2", GPT2]);
  for (const f of fixtures) out.push([`${f.family} fixture (HF)`, f.hf], [`${f.family} fixture (GGUF)`, f.gguf]);
  return out;
}

describe("lazy and eager loads give bit-identical weights", () => {
  test("every bundled model and family fixture", () => {
    const seen: string[] = [];
    for (const [what, p] of models()) {
      const eager = loadHostModel(p);
      const lazy = lazyLoad(p);
      assert.ok(!(eager.weights instanceof LazyWeights), `${what}: the default load is eager`);
      assert.ok(lazy.weights instanceof LazyWeights && lazy.weights instanceof Map, `${what}: lazy weights`);
      assert.deepEqual(lazy.config, eager.config, `${what}: config`);
      assert.equal(lazy.sourceDtype, eager.sourceDtype);
      assert.equal(lazy.weights.size, eager.weights.size, `${what}: size`);
      assert.deepEqual([...lazy.weights.keys()], [...eager.weights.keys()], `${what}: names and order`);
      // Through get, in the engine's order...
      for (const [k, t] of eager.weights) {
        assert.ok(lazy.weights.has(k));
        assert.deepEqual(lazy.weights.shapeOf(k), t.shape, `${what}: ${k} header shape`);
        assertSameTensor(lazy.weights.get(k)!, t, `${what}: ${k}`);
      }
      assert.equal(lazy.weights.keptSources, 0, `${what}: nothing kept once every weight was read`);
      // ...and through iteration (a fresh load, so fused sources start unread).
      const again = lazyLoad(p);
      let n = 0;
      for (const [k, t] of again.weights) {
        assertSameTensor(t, eager.weights.get(k)!, `${what}: ${k} (iteration)`);
        n++;
      }
      assert.equal(n, eager.weights.size);
      seen.push(`${what} (${n})`);
    }
    assert.ok(seen.length >= 2 + 2 * FIXTURE_FAMILIES.length, `models checked: ${seen.join(", ")}`);
  });

  test("get does not retain: each call reads afresh and hands over a new array", () => {
    const h = lazyLoad(STORIES);
    const a = h.weights.get("blocks.0.attn.q.weight")!;
    a.data.fill(0);
    const b = h.weights.get("blocks.0.attn.q.weight")!;
    assert.notEqual(a.data, b.data);
    assert.ok(b.data.some((x) => x !== 0), "a caller's edit leaked into the next read");
    assert.equal(h.weights.get("no.such.weight"), undefined);
    // Map methods stay usable: set keeps a caller's tensor, delete and clear drop entries.
    const mine = { data: new Float32Array([1, 2]), shape: [2] };
    h.weights.set("extra.weight", mine);
    assert.equal(h.weights.get("extra.weight"), mine);
    assert.ok(h.weights.delete("blocks.0.attn.q.weight"));
    assert.ok(!h.weights.has("blocks.0.attn.q.weight"));
    const copy = new Map(h.weights);
    assert.equal(copy.size, h.weights.size);
    h.weights.clear();
    assert.equal(h.weights.size, 0);
    assert.deepEqual([...h.weights], []);
  });
});

describe("lazy load reads no tensor data until asked", () => {
  for (const [what, p, strict] of [
    ["stories260K GGUF", STORIES, false],
    ["llama-2-tiny-random GGUF", LLAMA2, false],
    ["tiny-random-gpt2 safetensors", GPT2, true],
  ] as const) {
    test(what, (t) => {
      if (!fs.existsSync(p)) return t.skip(`${p} is not present`);
      const { result: h, reads } = spyReads(() => lazyLoad(p));
      const ranges = mappedRanges(h);
      const dataStart = Math.min(...ranges.map((r) => r.start));
      const weightFile = ranges[0]!.file;
      const onFile = reads.filter((r) => r.file === weightFile);
      assert.ok(onFile.length > 0, "the spy saw the header reads");
      for (const r of onFile) {
        // GGUF headers are read in windows from offset 0 (the first one may run past a tiny file's header);
        // no read starts in the data. Safetensors headers have an exact length: no data byte is read at all.
        assert.ok(r.position >= 0 && r.position < dataStart, `read at ${r.position} (+${r.length}) starts in the tensor data (from ${dataStart})`);
        if (strict) assert.ok(r.position + r.length <= dataStart, `read at ${r.position} (+${r.length}) covers tensor data (from ${dataStart})`);
      }
      const headerBytes = onFile.reduce((a, r) => a + r.length, 0);
      t.diagnostic(`${onFile.length} reads, ${headerBytes} bytes at load; tensor data is ${fs.statSync(weightFile).size - dataStart} bytes`);

      // The eager load reads every mapped tensor's range (the spy would have seen it).
      const eager = spyReads(() => loadHostModel(p)).reads.filter((r) => r.file === weightFile);
      for (const r of ranges) assert.ok(eager.some((e) => e.position === r.start), `eager load read ${r.name}`);

      // A get reads that tensor's range, and only it.
      const name = [...h.weights.keys()].find((k) => k.startsWith("blocks.0.mlp.up"))!;
      const got = spyReads(() => h.weights.get(name)).reads.filter((r) => r.file === weightFile);
      assert.ok(got.length >= 1);
      const hit = ranges.filter((r) => got.some((g) => g.position >= r.start && g.position < r.end));
      assert.equal(hit.length, 1, `one source tensor read for ${name}: ${hit.map((r) => r.name).join(", ")}`);
      assert.equal(got.reduce((a, g) => a + g.length, 0), hit[0]!.end - hit[0]!.start, "exactly its bytes");
    });
  }

  test("GPT-2's fused c_attn is read once for q, k and v, and dropped after v", (t) => {
    if (!fs.existsSync(GPT2)) return t.skip(`${GPT2} is not present`);
    const h = lazyLoad(GPT2);
    const w = h.weights as LazyWeights;
    const cAttn = readSafetensorsHeader(path.join(GPT2, "model.safetensors")).tensors.get("transformer.h.0.attn.c_attn.weight")!;
    const readsOf = (f: () => unknown) => spyReads(f).reads.filter((r) => r.position >= cAttn.offset && r.position < cAttn.offset + cAttn.byteLength).length;
    assert.equal(readsOf(() => w.get("blocks.0.attn.q.weight")), 1);
    assert.equal(w.keptSources, 1, "c_attn kept for k and v");
    assert.equal(readsOf(() => w.get("blocks.0.attn.k.weight")), 0);
    assert.equal(readsOf(() => w.get("blocks.0.attn.v.weight")), 0);
    assert.equal(w.keptSources, 0, "c_attn dropped once q, k and v were read");
    assert.equal(readsOf(() => w.get("blocks.0.attn.k.weight")), 1, "a second read of k goes back to the file");
    assert.equal(w.keptSources, 0);
    // Deleting the weights still waiting on a kept source drops it.
    w.get("blocks.1.attn.q.weight");
    assert.equal(w.keptSources, 1);
    w.delete("blocks.1.attn.k.weight");
    w.delete("blocks.1.attn.v.weight");
    assert.equal(w.keptSources, 0);
  });
});

test("NaN in a weight: lazy load succeeds and get() throws NumericalWeightsError naming the tensor", () => {
  const g = readGguf(STORIES);
  const t = g.tensors.get("blk.2.ffn_down.weight")!;
  const b = Buffer.from(fs.readFileSync(STORIES));
  b.writeFloatLE(NaN, t.offset + 4 * 17);
  const f = path.join(tmp(), "nan.gguf");
  fs.writeFileSync(f, b);
  const isNan = (e: Error) => e instanceof NumericalWeightsError && /tensor blk\.2\.ffn_down\.weight holds NaN at element 17 \(for blocks\.2\.mlp\.down\.weight, layer 2\)/.test(e.message) && e.message.startsWith(f);
  assert.throws(() => loadHostModel(f), isNan, "the default (eager) load still rejects it");
  const h = lazyLoad(f);
  assert.throws(() => h.weights.get("blocks.2.mlp.down.weight"), isNan);
  assert.throws(() => [...h.weights.values()], isNan, "iteration reaches it too");
  assert.ok(h.weights.get("blocks.2.mlp.up.weight")!.data.every(Number.isFinite), "other weights still read");
});

describe("structural errors are still raised at load in lazy mode", () => {
  const copyHfFolder = (dst: string, skip: string[]) => {
    for (const f of fs.readdirSync(GPT2)) if (!skip.includes(f) && fs.statSync(path.join(GPT2, f)).isFile()) fs.copyFileSync(path.join(GPT2, f), path.join(dst, f));
  };
  const all = (): Record<string, { data: Float32Array; shape: number[] }> => {
    const st = readSafetensorsHeader(path.join(GPT2, "model.safetensors"));
    return Object.fromEntries([...st.tensors.keys()].map((n) => [n, readStTensor(st, n)]));
  };

  test("missing, unexpected and mis-shaped tensors (safetensors)", (t) => {
    if (!fs.existsSync(GPT2)) return t.skip(`${GPT2} is not present`);
    const tensors = all();
    const missing = tmp();
    copyHfFolder(missing, ["model.safetensors"]);
    const { ["transformer.h.3.mlp.c_fc.bias"]: _drop, ...rest } = tensors;
    writeSafetensors(path.join(missing, "model.safetensors"), rest);
    assert.throws(() => lazyLoad(missing), (e: Error) => e instanceof WeightShapeError && /missing tensor h\.3\.mlp\.c_fc\.bias/.test(e.message));

    const extra = tmp();
    copyHfFolder(extra, ["model.safetensors"]);
    writeSafetensors(path.join(extra, "model.safetensors"), { ...tensors, "transformer.h.0.mystery.weight": { data: new Float32Array(4), shape: [4] } });
    assert.throws(() => lazyLoad(extra), (e: Error) => e instanceof WeightShapeError && /unexpected tensor transformer\.h\.0\.mystery\.weight/.test(e.message));

    const shaped = tmp();
    copyHfFolder(shaped, ["config.json"]);
    fs.writeFileSync(path.join(shaped, "config.json"), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(GPT2, "config.json"), "utf8")), n_embd: 64 }));
    assert.throws(() => lazyLoad(shaped), (e: Error) => e instanceof WeightShapeError && /has shape \[1000,32\] but the config implies \[1000,64\]/.test(e.message));

    // The fused c_attn's shape is checked after its transpose and split, from the header.
    const fused = tmp();
    copyHfFolder(fused, ["model.safetensors"]);
    const c = tensors["transformer.h.1.attn.c_attn.weight"]!;
    const [r, k] = c.shape as [number, number];
    writeSafetensors(path.join(fused, "model.safetensors"), { ...tensors, "transformer.h.1.attn.c_attn.weight": { data: c.data.subarray(0, r * (k - 6)), shape: [r, k - 6] } });
    const want = (e: Error) => e instanceof WeightShapeError && new RegExp(`tensor transformer\\.h\\.1\\.attn\\.c_attn\\.weight has shape \\[${(k - 6) / 3},${r}\\] but the config implies \\[${k / 3},${r}\\] for blocks\\.1\\.attn\\.q\\.weight`).test(e.message);
    assert.throws(() => loadHostModel(fused), want);
    assert.throws(() => lazyLoad(fused), want);
  });

  test("a dtype the loader cannot read is rejected at load, with the read's message", (t) => {
    if (!fs.existsSync(GPT2)) return t.skip(`${GPT2} is not present`);
    const d = tmp();
    copyHfFolder(d, ["model.safetensors"]);
    writeSafetensors(path.join(d, "model.safetensors"), all());
    // Relabel one F32 tensor as I32 (same byte length) in the header.
    const file = path.join(d, "model.safetensors");
    const buf = fs.readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    const header = buf.subarray(8, 8 + n).toString("utf8");
    const i = header.indexOf('"transformer.h.1.ln_1.bias"');
    const patched = header.slice(0, i) + header.slice(i).replace('"dtype":"F32"', '"dtype":"I32"');
    assert.equal(patched.length, header.length);
    fs.writeFileSync(file, Buffer.concat([buf.subarray(0, 8), Buffer.from(patched), buf.subarray(8 + n)]));
    const want = (e: Error) => e instanceof ModelFileError && /tensor transformer\.h\.1\.ln_1\.bias has dtype I32; selfscope reads F32, F16 and BF16 weights/.test(e.message);
    assert.throws(() => loadHostModel(d), want);
    assert.throws(() => lazyLoad(d), want);
  });

  test("missing and mis-shaped tensors (GGUF family fixture)", () => {
    const src = fixtures.find((f) => f.family === "llama")!.gguf;
    // Renaming a tensor in the directory (same length) makes it both missing and unexpected; missing comes first.
    const b = Buffer.from(fs.readFileSync(src));
    const at = b.indexOf(Buffer.from("blk.1.ffn_up.weight"));
    assert.ok(at > 0);
    b.write("blk.1.ffn_uq.weight", at, "latin1");
    const f = path.join(tmp(), "renamed.gguf");
    fs.writeFileSync(f, b);
    const want = (e: Error) => e instanceof WeightShapeError && /missing tensor blk\.1\.ffn_up\.weight \(for blocks\.1\.mlp\.up\.weight\)/.test(e.message);
    assert.throws(() => loadHostModel(f), want);
    assert.throws(() => lazyLoad(f), want);
    // A wrong shape: swap ne of a 2-D tensor in the directory.
    const g = readGguf(src);
    const ti = g.tensors.get("blk.0.ffn_down.weight")!;
    assert.notEqual(ti.ne[0], ti.ne[1]);
    const c = Buffer.from(fs.readFileSync(src));
    const pos = c.indexOf(Buffer.from("blk.0.ffn_down.weight")) + "blk.0.ffn_down.weight".length + 4;
    assert.equal(Number(c.readBigUInt64LE(pos)), ti.ne[0]);
    c.writeBigUInt64LE(BigInt(ti.ne[1]!), pos);
    c.writeBigUInt64LE(BigInt(ti.ne[0]!), pos + 8);
    const f2 = path.join(tmp(), "shaped.gguf");
    fs.writeFileSync(f2, c);
    const shape = (e: Error) => e instanceof WeightShapeError && /tensor blk\.0\.ffn_down\.weight has shape \[.*\] but the config implies \[.*\] for blocks\.0\.mlp\.down\.weight/.test(e.message);
    assert.throws(() => loadHostModel(f2), shape);
    assert.throws(() => lazyLoad(f2), shape);
  });
});
