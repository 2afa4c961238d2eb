// Reliability and security (issue 6): loader fuzzing, numerical guards, disk-full, judge faults
// during a run, the report server's file safety, and API keys that must never be written out.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { ModelFileError, NumericalError } from "../src/core/errors.js";
import { Rng } from "../src/core/rng.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { inject } from "../src/recipes/inject.js";
import { degenerateFlags } from "../src/eval/run.js";
import { readGguf } from "../src/io/gguf.js";
import { loadTokenizerJson } from "../src/io/tokenizer.js";
import { readRunLog } from "../src/log/read.js";
import { LOG_SCHEMA, LOG_VERSION, type RunHeader } from "../src/log/schema.js";
import { RunLogWriter } from "../src/log/write.js";
import { Engine } from "../src/engine/jax/engine.js";
import { loadHostModel, NumericalWeightsError, type HostModel } from "../src/model/load.js";
import { resolveInside, serveRun } from "../src/report/server.js";
import { fixture, repoDir } from "./support/paths.js";

const STORIES = path.join(repoDir(), "models/stories260K/stories260K.gguf");
const GPT2 = fixture("tiny-random-gpt2");
/** A CPU engine on its own two-thread runtime (close() stops the threads). */
const cpuEngine = (host: HostModel): Promise<CpuEngine> => CpuEngine.create(host, { threads: 2 });
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-rel-"));
const counts: Record<string, number | Record<string, number>> = {};
after(() => {
  const file = process.env.SELFSCOPE_FUZZ_REPORT;
  if (file) fs.writeFileSync(file, JSON.stringify(counts, null, 1));
});

/** Load a mutated model: it must load, or fail with a ModelFileError naming the file — never anything else. */
function expectCleanOutcome(file: string, what: string, outcomes: Map<string, number>): void {
  try {
    loadHostModel(file);
    outcomes.set("loaded", (outcomes.get("loaded") ?? 0) + 1);
  } catch (e) {
    if (!(e instanceof ModelFileError)) throw new Error(`${what}: ${(e as Error).name}: ${(e as Error).message}`);
    assert.ok(e.message.includes(path.basename(path.dirname(file))) || e.message.includes(file), `${what}: error does not name the file: ${e.message}`);
    const kind = e.message.replace(/.*?: /, "").split(/[ :(]/)[0]!;
    outcomes.set(kind, (outcomes.get(kind) ?? 0) + 1);
  }
}

test("fuzz: mutated GGUF files end in a typed error naming the file, within bounded memory", () => {
  const dir = tmp();
  const orig = fs.readFileSync(STORIES);
  const g = readGguf(STORIES);
  const headerEnd = Math.min(...[...g.tensors.values()].map((t) => t.offset));
  const rng = new Rng(2026);
  const outcomes = new Map<string, number>();
  const rss0 = process.memoryUsage().rss;
  let n = 0;
  const f = path.join(dir, "m.gguf");
  for (let i = 0; i < 300; i++) {
    const b = Buffer.from(orig);
    const kind = i % 6;
    let data: Buffer = b;
    if (kind === 0) data = b.subarray(0, Math.floor(rng.next() * b.length)); // truncation anywhere
    else if (kind === 1) {
      for (let k = 0; k < 1 + (i % 8); k++) {
        const at = Math.floor(rng.next() * headerEnd);
        b[at] = b[at]! ^ (1 << Math.floor(rng.next() * 8)); // header bit flips
      }
    }
    else if (kind === 2) b.writeBigUInt64LE(BigInt.asUintN(64, (1n << 60n) + BigInt(i)), 8 + 8 * (i % 2)); // huge tensor/metadata counts
    else if (kind === 3) {
      // A huge string or array length somewhere in the metadata.
      const at = 24 + 8 * Math.floor(rng.next() * ((headerEnd - 40) / 8));
      b.writeBigUInt64LE(kind === 3 && i % 2 ? 0xffffffffffffffffn : 1n << 62n, at);
    } else if (kind === 4) {
      // Overflowing or out-of-range tensor offsets: the last 8 bytes of a tensor directory entry.
      const t = [...g.tensors.values()][i % g.tensors.size]!;
      const pos = b.indexOf(Buffer.from(t.name)) + t.name.length + 4 + 8 * t.ne.length + 4;
      b.writeBigUInt64LE(i % 2 ? 0xfffffffffffffff0n : BigInt(orig.length), pos);
    } else b.fill(0xff, Math.floor(rng.next() * headerEnd), Math.floor(rng.next() * headerEnd) + 16); // garbage run
    fs.writeFileSync(f, data);
    expectCleanOutcome(f, `gguf case ${i} (kind ${kind})`, outcomes);
    n++;
  }
  const grown = process.memoryUsage().rss - rss0;
  assert.ok(grown < 512 * 1024 * 1024, `RSS grew by ${grown} bytes`);
  counts.gguf = n;
  counts.gguf_outcomes = Object.fromEntries(outcomes);
  assert.ok(n === 300 && (outcomes.get("loaded") ?? 0) < n);
});

test("fuzz: mutated safetensors headers, config.json and tokenizer.json", () => {
  const dir = tmp();
  for (const f of ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]) fs.copyFileSync(path.join(GPT2, f), path.join(dir, f));
  const st = fs.readFileSync(path.join(GPT2, "model.safetensors"));
  const hlen = Number(st.readBigUInt64LE(0));
  const header = JSON.parse(st.subarray(8, 8 + hlen).toString()) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>>;
  const body = st.subarray(8 + hlen);
  const rng = new Rng(7);
  const outcomes = new Map<string, number>();
  const write = (h: string, b: Buffer = body, declared?: bigint) => {
    const hb = Buffer.from(h);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(declared ?? BigInt(hb.length));
    fs.writeFileSync(path.join(dir, "model.safetensors"), Buffer.concat([len, hb, b]));
  };
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  let n = 0;
  for (let i = 0; i < 240; i++) {
    const h = structuredClone(header) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    const name = names[Math.floor(rng.next() * names.length)]!;
    const t = h[name]!;
    const kind = i % 8;
    let text: string;
    if (kind === 0) t.data_offsets = [-8, t.data_offsets[1]];
    else if (kind === 1) t.data_offsets = [t.data_offsets[0], 2 ** 53 + 10];
    else if (kind === 2) t.dtype = ["I64", "F64", "Q4", "bf16", ""][i % 5]!;
    else if (kind === 3) t.shape = [t.shape[0]! + 1, ...t.shape.slice(1)];
    else if (kind === 4) t.data_offsets = [t.data_offsets[1], t.data_offsets[0]];
    if (kind === 5) text = JSON.stringify(h).replace(`"${names[0]}":`, `"${name}":${JSON.stringify(t)},"${names[0]}":`); // duplicate key
    else if (kind === 6) text = JSON.stringify(h).slice(0, Math.floor(rng.next() * hlen)); // truncated JSON
    else text = JSON.stringify(h);
    if (kind === 7) write(text, body.subarray(0, Math.floor(rng.next() * body.length)));
    else if (i % 16 === 3) write(text, body, 1n << 62n); // huge declared header
    else write(text);
    expectCleanOutcome(path.join(dir, "model.safetensors"), `safetensors case ${i} (kind ${kind})`, outcomes);
    n++;
  }
  fs.copyFileSync(path.join(GPT2, "model.safetensors"), path.join(dir, "model.safetensors"));
  // config.json: dropped fields, wrong types, absurd values.
  const cfg = JSON.parse(fs.readFileSync(path.join(GPT2, "config.json"), "utf8")) as Record<string, unknown>;
  const keys = ["n_embd", "n_layer", "n_head", "vocab_size", "n_positions", "architectures", "layer_norm_epsilon"];
  for (let i = 0; i < keys.length * 4; i++) {
    const c = { ...cfg };
    const k = keys[i % keys.length]!;
    const v = [undefined, "32", -4, 1e12][Math.floor(i / keys.length)];
    if (v === undefined) delete c[k];
    else c[k] = v;
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(c));
    expectCleanOutcome(path.join(dir, "config.json"), `config case ${k}=${String(v)}`, outcomes);
    n++;
  }
  fs.copyFileSync(path.join(GPT2, "config.json"), path.join(dir, "config.json"));
  // tokenizer.json: truncations and flipped bytes -> ModelFileError naming the file (or a usable tokenizer).
  const tj = fs.readFileSync(path.join(GPT2, "tokenizer.json"));
  let tokCases = 0;
  for (let i = 0; i < 60; i++) {
    const b = Buffer.from(tj);
    if (i % 2) b[Math.floor(rng.next() * b.length)] = 0x7b; // a stray "{"
    const data = i % 2 ? b : b.subarray(0, Math.floor(rng.next() * b.length));
    const f = path.join(dir, "tokenizer.json");
    fs.writeFileSync(f, data);
    try {
      loadTokenizerJson(f, null).encode("hello world");
    } catch (e) {
      assert.ok(e instanceof ModelFileError, `tokenizer case ${i}: ${(e as Error).name}: ${(e as Error).message}`);
      assert.ok(e.message.startsWith(f));
    }
    tokCases++;
  }
  counts.safetensors_and_config = n;
  counts.safetensors_outcomes = Object.fromEntries(outcomes);
  counts.tokenizer = tokCases;
});

test("NaN/Inf: in weights it is rejected at load naming the tensor; in activations it is located by hook (both engines)", async () => {
  const dir = tmp();
  const g = readGguf(STORIES);
  const t = g.tensors.get("blk.2.ffn_down.weight")!;
  const b = Buffer.from(fs.readFileSync(STORIES));
  b.writeFloatLE(NaN, t.offset + 4 * 17);
  const f = path.join(dir, "nan.gguf");
  fs.writeFileSync(f, b);
  const nanWeight = (e: Error) => e instanceof NumericalWeightsError && /blk\.2\.ffn_down\.weight holds NaN at element 17/.test(e.message) && e.message.startsWith(f);
  assert.throws(() => loadHostModel(f), nanWeight);
  // A lazy load defers the check to the read: the CPU engine reads every weight as it is built
  // (F32 straight from the file into its memory), so it refuses the model the same way.
  await assert.rejects(CpuEngine.create(loadHostModel(f, undefined, { lazy: true }), { threads: 2 }), nanWeight);
  const host = loadHostModel(STORIES);
  host.weights.get("blocks.3.mlp.down.weight")!.data.fill(3e38); // finite weights whose products overflow
  // Each engine names the first non-finite activation, and both say exactly the same thing.
  const messages = new Map<string, string[]>();
  for (const name of ["wasm", "cpu"] as const) {
    const eng = name === "wasm" ? new Engine(host) : await cpuEngine(host);
    const seen: string[] = [];
    const located = (e: Error) => {
      seen.push(e.message);
      return e instanceof NumericalError && /in batch row 0: the first non-finite activation is at blocks\.3\.hook_mlp_out \(position 0, value (?:NaN|-?Infinity)\)/.test(e.message);
    };
    try {
      await assert.rejects(eng.forward([[1, 403, 407]]), located, `${name}: forward`);
      await assert.rejects(eng.generate([[1, 403], [1, 5, 6]], { maxTokens: 3 }), located, `${name}: generate`);
    } finally {
      if (eng instanceof CpuEngine) await eng.close();
      else eng.dispose();
    }
    messages.set(name, seen);
  }
  assert.deepEqual(messages.get("cpu"), messages.get("wasm"), "the CPU engine's diagnosis vs the jax-js engine's");
  assert.deepEqual(degenerateFlags("", []), ["empty"]);
  assert.deepEqual(degenerateFlags("a a a a a a a a a", [5, 5, 5, 5, 5, 5, 5, 5, 5]), ["repeated-token"]);
  assert.deepEqual(degenerateFlags("a normal answer", [1, 2, 3, 4, 5, 6, 7, 8]), []);
});

test("disk full while appending: the error says so and the log stays readable with every complete record", async () => {
  const dir = tmp();
  const header: RunHeader = {
    type: "header", schema: LOG_SCHEMA, version: LOG_VERSION, createdAt: new Date().toISOString(), tool: { name: "selfscope", version: "test" },
    model: { path: "m", hash: "h", family: "llama", nLayers: 1, dModel: 1, dtype: "F32", chatTemplate: false }, backend: { device: "wasm", adapter: "wasm" },
    config: {} as RunHeader["config"], plannedTrials: 3, command: [],
  };
  const w = RunLogWriter.create(dir, header);
  const trial = (id: string) => ({ type: "trial" as const, id, kind: "control" as const, concept: null, layer: 0, strength: 1, variant: "original", trialNumber: 1, sample: 0, injected: null, prompt: "p", judgePrompt: "p", prefill: null, output: "o".repeat(200), outputTokens: 1, stopReason: "length" as const, flags: [], seed: 1, ms: 1 });
  w.append(trial("a"));
  // The device fills mid-record: half the bytes land, then ENOSPC.
  const real = fs.writeSync;
  let calls = 0;
  (fs as { writeSync: unknown }).writeSync = (fd: number, buf: Uint8Array, off?: number, len?: number) => {
    if (calls++ === 0) return real(fd, buf, off ?? 0, Math.floor((len ?? buf.length) / 2));
    throw Object.assign(new Error("ENOSPC: no space left on device"), { code: "ENOSPC" });
  };
  try {
    assert.throws(() => w.append(trial("b")), /disk is full .* `selfscope resume` continues/);
  } finally {
    (fs as { writeSync: unknown }).writeSync = real;
  }
  w.close();
  const run = readRunLog(dir);
  assert.deepEqual(run.trials.map((t) => t.id), ["a"]);
  assert.ok(run.discardedBytes > 0);
});

/** A fake OpenAI-compatible judge that fails in every way, on loopback. */
async function faultyJudge(plantedKey: string): Promise<{ url: string; close: () => Promise<void>; seenKey: () => boolean }> {
  let i = 0;
  let sawKey = false;
  const server = http.createServer((req, res) => {
    if ((req.headers.authorization ?? "").includes(plantedKey)) sawKey = true;
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const k = i++ % 6;
      const reply = (text: string) => res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify({ choices: [{ message: { content: text }, finish_reason: "stop" }] }));
      if (k === 0) res.writeHead(500).end("boom");
      else if (k === 1) res.writeHead(200, { "Content-Type": "application/json" }).end("{not json");
      else if (k === 2) reply("I am not sure what to say.");
      else if (k === 3) res.writeHead(429, { "Retry-After": "0" }).end();
      else if (k === 4) req.socket.destroy();
      else reply(/YES/.test(body) ? "Answer: NO" : "Answer: YES");
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as AddressInfo).port;
  return { url: `http://127.0.0.1:${port}/v1`, close: () => new Promise((r) => server.close(() => r())), seenKey: () => sawKey };
}

test("a run judged by a faulty HTTP judge completes; failures are unjudged (never NO) and counted; the API key is never written", async () => {
  const key = "sk-PLANTED-selfscope-0xC0FFEE";
  const judge = await faultyJudge(key);
  const saved = { key: process.env.OPENAI_API_KEY, base: process.env.OPENAI_BASE_URL };
  process.env.OPENAI_API_KEY = key;
  process.env.OPENAI_BASE_URL = judge.url;
  const out = path.join(tmp(), "run");
  try {
    const { results } = await inject({ model: GPT2, layers: "2", strengths: "4", concepts: "2", trials: 3, controls: 3, forced: true, maxTokens: 4, batchSize: 8, judges: ["openai:fake-judge"], vectorCache: null, out, quiet: true });
    assert.ok(judge.seenKey(), "the key is sent to the judge (from the environment)");
    const run = readRunLog(out);
    assert.equal(run.trials.length, run.header.plannedTrials);
    const nulls = run.judgments.filter((j) => j.verdict === null);
    assert.ok(nulls.length > 0 && nulls.every((j) => j.error !== null), "failed judgments are recorded as unjudged with their error");
    const unjudged = Object.values(results.unjudged).reduce((a, b) => a + b, 0);
    assert.equal(unjudged, nulls.length);
    assert.equal(results.tpr.n + (results.tpr.unjudged ?? 0), run.trials.filter((t) => t.kind === "injection").length);
    // Grep every file the run wrote (log, results, report, judge cache) for the key.
    const files: string[] = [];
    const walk = (d: string) => fs.readdirSync(d, { withFileTypes: true }).forEach((e) => (e.isDirectory() ? walk(path.join(d, e.name)) : files.push(path.join(d, e.name))));
    walk(out);
    assert.ok(files.some((f) => f.endsWith("log.jsonl")) && files.some((f) => f.endsWith("report.html")));
    for (const f of files) assert.ok(!fs.readFileSync(f, "latin1").includes(key.slice(3)), `${f} contains the API key`);
    // The CLI's own output and errors must not show it either (401 from a server that rejects it).
    const cli = spawnSync(process.execPath, [path.join(repoDir(), "dist/src/cli/main.js"), "report", out], { encoding: "utf8", env: { ...process.env } });
    assert.equal(cli.status, 0, cli.stderr);
    assert.ok(!(cli.stdout + cli.stderr).includes(key.slice(3)));
  } finally {
    await judge.close();
    if (saved.key === undefined) delete process.env.OPENAI_API_KEY;
    else process.env.OPENAI_API_KEY = saved.key;
    if (saved.base === undefined) delete process.env.OPENAI_BASE_URL;
    else process.env.OPENAI_BASE_URL = saved.base;
  }
});

test("the report server binds loopback and serves nothing outside the run directory", async () => {
  const root = tmp();
  const outside = tmp();
  fs.writeFileSync(path.join(root, "report.html"), "<p>report</p>");
  fs.mkdirSync(path.join(root, "sub"));
  fs.writeFileSync(path.join(root, "sub", "a.json"), "{}");
  fs.writeFileSync(path.join(outside, "secret.txt"), "SECRET");
  fs.symlinkSync(path.join(outside, "secret.txt"), path.join(root, "link.txt"));
  fs.symlinkSync(outside, path.join(root, "linkdir"));
  const { server, url } = await serveRun(root);
  try {
    assert.equal((server.address() as AddressInfo).address, "127.0.0.1");
    const get = async (p: string) => {
      // Raw request: fetch() would normalise "..", which is exactly what must be tested.
      const u = new URL(url);
      return new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = http.request({ host: u.hostname, port: u.port, path: p, method: "GET" }, (res) => {
          let body = "";
          res.on("data", (c) => (body += c));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
        });
        req.on("error", reject);
        req.end();
      });
    };
    assert.deepEqual(await get("/"), { status: 200, body: "<p>report</p>" });
    assert.equal((await get("/sub/a.json")).status, 200);
    const attacks = ["/../secret.txt", "/..%2fsecret.txt", "/%2e%2e/%2e%2e/etc/passwd", "/sub/../../etc/passwd", "/%252e%252e/etc/passwd", "/..%5c..%5cetc%5cpasswd", "/link.txt", "/linkdir/secret.txt", "/sub/%00a.json", "/%E0%A4%A"];
    for (const a of attacks) {
      const r = await get(a);
      assert.equal(r.status, 404, `${a} -> ${r.status}`);
      assert.ok(!r.body.includes("SECRET") && !r.body.includes("root:"));
    }
    assert.equal(resolveInside(root, "/sub/../report.html"), null);
    counts.traversal_attacks = attacks.length;
  } finally {
    server.close();
  }
});
