// Every intervention kind at every hook site under every position scope, on every family fixture
// (scripts/make-fixtures.ts: each family's quirks switched on), on both backends (the CPU engine
// and the jax-js engine on wasm), in forward() and in KV-cached generate(), held to the float64
// oracle (test/support/oracle64.ts).
//
// Cases are packed into one batched call per (family, backend, mode, scope): row b carries its
// own intervention (rows: [b]) at its own site and layer, so the jax-js engine traces one plan
// structure per call instead of one per case. Every call also reads every site of every layer,
// and each row's reads are compared with the oracle's for that row: the "read" kind at every site.
// Rows are ragged (left padding), so patches indexed by absolute position and scopes that follow
// each row's own prompt length are exercised with padding in the batch.
//
// forward: logits of every position and every read vs the oracle on the row's ids.
// generate (greedy, 4 tokens): the oracle runs teacher-forced on prompt + fed-back tokens; every
// generated token is the oracle's argmax at its position (up to ties within REF_TOL) and every
// read collected while decoding equals the oracle's.
// A case must not be vacuous: its intervention moves the oracle's logits or the site's own value
// by more than CHANGED (except scope "generated" in forward, which runs no generated position
// and must change nothing).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FIXTURE_FAMILIES, makeFixtures, type FixtureFamily, type FixturePaths } from "../scripts/make-fixtures.js";
import { Rng } from "../src/core/rng.js";
import type { ModelConfig } from "../src/engine/config.js";
import { CpuEngine } from "../src/engine/cpu/engine.js";
import { initDevice } from "../src/engine/device.js";
import { Engine } from "../src/engine/jax/engine.js";
import type { ForwardOptions, ForwardResult, GenerateOptions, GenerateResult, Row } from "../src/engine/types.js";
import type { HookName } from "../src/hooks/names.js";
import type { Intervention, PosSpec } from "../src/hooks/plan.js";
import { loadHostModel, type HostModel } from "../src/model/load.js";
import { argmax64, ORACLE_BLOCK_SITES, oracleFeatShape, oracleForward, type OracleResult } from "./support/oracle64.js";


const REF_TOL = 1e-4; // float32 engine vs float64 oracle (logits), as in interventions.test.ts
const READ_RTOL = 1e-4; // reads: atol REF_TOL + rtol·|oracle|, as families.test.ts's hook_down reads
const CHANGED = 1e-3; // a case's intervention must move the oracle's logits or site by more than this
const N_GEN = 4;
const TP = 12; // longest prompt; rows are TP, TP-1, TP-2 tokens long (left-padded in the batch)
const MARKER_AT = 5;
const PROMPT = [5, 77, 123, 9, 250, 31, 64, 200, 17, 99, 140, 8];
/** Source of patches and means: another sequence, long enough for prompt + fed-back positions. */
const OTHER = [41, 3, 290, 66, 12, 150, 7, 222, 38, 91, 180, 55, 260, 19, 101, 73, 14, 305, 88, 2];

type Kind = "add" | "project" | "patch" | "zero" | "mean" | "zero-heads" | "mean-heads";
const KINDS_1D: readonly Kind[] = ["add", "project", "patch", "zero", "mean"];
const KINDS_2D: readonly Kind[] = ["add", "patch", "zero", "mean", "zero-heads", "mean-heads"];
type Mode = "forward" | "generate";
const MODES: readonly Mode[] = ["forward", "generate"];
type ScopeName = "all" | "prompt" | "generated" | "range" | "marker";
const SCOPES: readonly ScopeName[] = ["all", "prompt", "generated", "range", "marker"];

function scopeOf(s: ScopeName, mode: Mode): PosSpec {
  if (s === "range") return mode === "forward" ? { from: 3, to: 8 } : { from: 8, to: 13 }; // generate: straddles prompt and fed-back tokens
  if (s === "marker") return mode === "forward" ? { marker: "MARKER", offset: -1, to: 9 } : { marker: "MARKER", offset: 2 };
  return s;
}

interface AnyEngine {
  forward(rows: Row[], opts: ForwardOptions): Promise<ForwardResult>;
  generate(rows: Row[], opts: GenerateOptions): Promise<GenerateResult>;
  close(): Promise<void>;
}
interface Backend {
  name: "cpu" | "wasm";
  make: (h: HostModel) => Promise<AnyEngine>;
}
const BACKENDS: Backend[] = [
  {
    name: "cpu",
    make: async (h) => {
      const e = await CpuEngine.create(h, { threads: 2 });
      return { forward: (r, o) => e.forward(r, o), generate: (r, o) => e.generate(r, o), close: () => e.close() };
    },
  },
  {
    name: "wasm",
    make: (h) => {
      const e = new Engine(h);
      return Promise.resolve({ forward: (r, o) => e.forward(r, o), generate: (r, o) => e.generate(r, o), close: () => Promise.resolve(e.dispose()) });
    },
  },
];

// ---------------------------------------------------------------- cases

/** Every writable site of a model (not the read-only pattern), each with its kinds. */
function sitesOf(c: ModelConfig): { site: string; kinds: readonly Kind[] }[] {
  const out: { site: string; kinds: readonly Kind[] }[] = [];
  const add = (site: string) => out.push({ site, kinds: oracleFeatShape(c, site).length === 2 ? KINDS_2D : KINDS_1D });
  add("hook_embed");
  if (c.pos.kind === "learned") add("hook_pos_embed");
  for (const s of ORACLE_BLOCK_SITES) if (s !== "attn.hook_pattern") add(s);
  add("ln_final.hook_normalized");
  return out;
}

/** Every site read in a call: all sites of all layers (the pattern only in forward). */
function readNames(c: ModelConfig, mode: Mode): HookName[] {
  const out: HookName[] = ["hook_embed"];
  if (c.pos.kind === "learned") out.push("hook_pos_embed");
  for (let l = 0; l < c.nLayers; l++)
    for (const s of ORACLE_BLOCK_SITES) {
      if (s === "attn.hook_pattern" && mode === "generate") continue;
      out.push(`blocks.${l}.${s}` as HookName);
    }
  out.push("ln_final.hook_normalized");
  return out;
}

interface Case {
  site: string;
  name: HookName;
  kind: Kind;
  iv: Intervention;
}

/** One row's prompt: TP - (b % 3) tokens; one word per token, MARKER at MARKER_AT. */
function rowOf(b: number): Row {
  const ids = PROMPT.slice(0, TP - (b % 3));
  return { ids, text: ids.map((id, i) => (i === MARKER_AT ? "MARKER" : `w${id}`)).join(" ") };
}
const countPrefix = (s: string): number => s.split(" ").filter((w) => w.length > 0).length;

function randUnit(rng: Rng, n: number): Float32Array {
  const v = Float64Array.from({ length: n }, () => rng.next() - 0.5);
  const s = 1 / Math.hypot(...v);
  return Float32Array.from(v, (x) => x * s);
}

/** Payload material per hook name: the oracle's activations on OTHER (patch sources, means, typical norms). */
class Payloads {
  private other: OracleResult;
  constructor(private host: HostModel) {
    const c = host.config;
    const all: HookName[] = ["hook_embed", ...(c.pos.kind === "learned" ? (["hook_pos_embed"] as const) : [])];
    for (let l = 0; l < c.nLayers; l++) for (const s of ORACLE_BLOCK_SITES) if (s !== "attn.hook_pattern") all.push(`blocks.${l}.${s}` as HookName);
    all.push("ln_final.hook_normalized");
    this.other = oracleForward(host, OTHER, all.map((at) => ({ op: "read" as const, at })));
  }
  private read(name: HookName): { data: Float64Array; F: number; T: number } {
    const r = this.other.reads.get(name)!;
    const F = r.shape.slice(1).reduce((a, b) => a * b, 1);
    return { data: r.data, F, T: r.shape[0]! };
  }
  source(name: HookName): Float32Array {
    const { data, F, T } = this.read(name);
    // Position embeddings do not depend on the tokens: patch them with another position's.
    if (name !== "hook_pos_embed") return Float32Array.from(data);
    const out = new Float32Array(T * F);
    for (let t = 0; t < T; t++) out.set(data.subarray((T - 1 - t) * F, (T - t) * F), t * F);
    return out;
  }
  mean(name: HookName): Float32Array {
    const { data, F, T } = this.read(name);
    const m = new Float32Array(F);
    for (let i = 0; i < F; i++) {
      let s = 0;
      for (let t = 0; t < T; t++) s += data[t * F + i]!;
      m[i] = s / T;
    }
    return m;
  }
  private norms = new Map<HookName, number>();
  /** Mean Euclidean norm of the activation per position. */
  norm(name: HookName): number {
    let n = this.norms.get(name);
    if (n === undefined) {
      const { data, F, T } = this.read(name);
      let s = 0;
      for (let t = 0; t < T; t++) {
        let ss = 0;
        for (let i = t * F; i < (t + 1) * F; i++) ss += data[i]! * data[i]!;
        s += Math.sqrt(ss);
      }
      this.norms.set(name, (n = s / T));
    }
    return n;
  }
  heads(site: string): number[] {
    const n = oracleFeatShape(this.host.config, site)[0]!;
    return n === 2 ? [1] : [0, 2];
  }
}

/** The cases of one call: every site × kind, row b = case b, each at its own layer. */
function casesOf(host: HostModel, pay: Payloads, scope: ScopeName, mode: Mode, seed: number): Case[] {
  const c = host.config;
  const rng = new Rng(seed);
  const cases: Case[] = [];
  const pos = scopeOf(scope, mode);
  sitesOf(c).forEach(({ site, kinds }, si) => {
    kinds.forEach((kind, ki) => {
      // Each case in its own layer, cycling, so every site meets sliding and full layers.
      const isGlobal = site === "hook_embed" || site === "hook_pos_embed" || site === "ln_final.hook_normalized";
      const name = (isGlobal ? site : `blocks.${(si + ki) % c.nLayers}.${site}`) as HookName;
      const F = oracleFeatShape(c, site).reduce((a, b) => a * b, 1);
      const b = cases.length;
      const base = { at: name, pos, rows: [b] };
      let iv: Intervention;
      if (kind === "add") iv = { ...base, op: "add", vector: randUnit(rng, F).map((x) => x * pay.norm(name)), scale: 1.5 };
      else if (kind === "project") iv = { ...base, op: "project", direction: randUnit(rng, F).map((x) => x * 3), scale: 0.8 };
      else if (kind === "patch") iv = { ...base, op: "patch", source: pay.source(name) };
      else if (kind === "zero") iv = { ...base, op: "ablate", mode: "zero" };
      else if (kind === "mean") iv = { ...base, op: "ablate", mode: "mean", mean: pay.mean(name) };
      else if (kind === "zero-heads") iv = { ...base, op: "ablate", mode: "zero", heads: pay.heads(site) };
      else iv = { ...base, op: "ablate", mode: "mean", mean: pay.mean(name), heads: pay.heads(site) };
      cases.push({ site, name, kind, iv });
    });
  });
  return cases;
}

// ---------------------------------------------------------------- checking one call

/** Oracle results within one test, shared by both backends (forward: same ids; generate: same fed-back ids). */
const oracleMemo = new Map<string, OracleResult>();
function oracleFor(host: HostModel, key: string, ids: number[], plan: Intervention[], promptLen: number, row: number | undefined, text: string): OracleResult {
  const k = `${key}|${row}|${ids.join(",")}`;
  let r = oracleMemo.get(k);
  if (!r) oracleMemo.set(k, (r = oracleForward(host, ids, plan, { promptLen, row, text, countPrefix })));
  return r;
}

/** max |a − b| over two equally long arrays. */
function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Out-of-tolerance description, or null: |got − want| <= atol + rtol·|want| everywhere. */
function mismatch(got: ArrayLike<number>, want: ArrayLike<number>, atol: number, rtol: number): string | null {
  if (got.length !== want.length) return `length ${got.length}, oracle ${want.length}`;
  let worst = -1;
  let bad = 0;
  for (let i = 0; i < got.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (!(d <= atol + rtol * Math.abs(want[i]!))) {
      bad++;
      if (worst < 0 || !(d <= Math.abs(got[worst]! - want[worst]!))) worst = i;
    }
  }
  return bad === 0 ? null : `${bad}/${got.length} out of tolerance, worst at ${worst}: ${got[worst]} vs oracle ${want[worst]}`;
}

const counts = { cases: 0, reads: 0 };

interface CallOutcome {
  failures: string[];
  cases: number;
  reads: number;
}

async function runCall(host: HostModel, engine: AnyEngine, pay: Payloads, family: string, scope: ScopeName, mode: Mode, seed: number): Promise<CallOutcome> {
  const c = host.config;
  const V = c.dVocab;
  const cases = casesOf(host, pay, scope, mode, seed);
  const names = readNames(c, mode);
  const plan: Intervention[] = [...cases.map((cs) => cs.iv), ...names.map((at) => ({ op: "read" as const, at }))];
  const rows = cases.map((_, b) => rowOf(b));
  const key = `${family}|${mode}|${scope}`;
  const failures: string[] = [];
  let reads = 0;
  const res = mode === "forward" ? await engine.forward(rows, { plan, countPrefix }) : await engine.generate(rows, { plan, maxTokens: N_GEN, stop: [], countPrefix });
  for (const [b, cs] of cases.entries()) {
    const row = rows[b]!;
    const Tp = row.ids.length;
    const what = `${family} ${mode} scope=${scope} ${cs.kind} at ${cs.name} (row ${b})`;
    let seq = row.ids;
    if (mode === "generate") seq = [...row.ids, ...(res as GenerateResult).tokens[b]!.slice(0, -1)];
    const ref = oracleFor(host, key, seq, plan, Tp, b, row.text!);
    const base = oracleFor(host, `${family}|base`, seq, names.map((at) => ({ op: "read" as const, at })), Tp, undefined, row.text!);
    // Not vacuous: the case moves the oracle's logits or the site's own value.
    const effect = Math.max(...ref.logits.map((l, t) => maxDiff(l, base.logits[t]!)), maxDiff(ref.reads.get(cs.name)?.data ?? [], base.reads.get(cs.name)?.data ?? []));
    if (mode === "forward" && scope === "generated") {
      if (effect !== 0) failures.push(`${what}: the oracle applied a "generated" op in a forward pass (effect ${effect})`);
    } else if (!(effect > CHANGED)) failures.push(`${what}: vacuous case, the oracle moves by only ${effect}`);
    if (mode === "forward") {
      const lg = (res as ForwardResult).logits[b]!;
      const want = new Float64Array(Tp * V);
      ref.logits.forEach((l, t) => want.set(l, t * V));
      const m = mismatch(lg, want, REF_TOL, 0);
      if (m) failures.push(`${what}: logits ${m}`);
    } else {
      // Greedy: each generated token is the oracle's argmax after its prefix (ties within REF_TOL allowed).
      const toks = (res as GenerateResult).tokens[b]!;
      toks.forEach((tok, i) => {
        const l = ref.logits[Tp - 1 + i]!;
        const best = argmax64(l);
        if (tok !== best && !(l[tok]! >= l[best]! - REF_TOL)) failures.push(`${what}: token ${i} is ${tok}, the oracle's argmax is ${best} (logit ${l[tok]} vs ${l[best]})`);
      });
    }
    for (const at of names) {
      const got = res.cache.get(at, b);
      const want = ref.reads.get(at)!;
      // During generate, ln_final is taken where logits are: the prompt's last position, then each fed token.
      const from = mode === "generate" && at === "ln_final.hook_normalized" ? Tp - 1 : 0;
      const F = want.shape.slice(1).reduce((a, x) => a * x, 1);
      const wantData = at.endsWith("attn.hook_pattern") ? want.data : want.data.subarray(from * F);
      const wantShape = at.endsWith("attn.hook_pattern") ? want.shape : [want.shape[0]! - from, ...want.shape.slice(1)];
      if (JSON.stringify(got.shape) !== JSON.stringify(wantShape)) failures.push(`${what}: read ${at} shape ${JSON.stringify(got.shape)}, oracle ${JSON.stringify(wantShape)}`);
      else {
        const m = mismatch(got.data, wantData, REF_TOL, READ_RTOL);
        if (m) failures.push(`${what}: read ${at} ${m}`);
      }
      reads++;
    }
  }
  return { failures, cases: cases.length, reads };
}

// ---------------------------------------------------------------- the run

let dir = "";
let fixtures = new Map<FixtureFamily, FixturePaths>();

before(async () => {
  await initDevice("wasm");
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-oracle-"));
  fixtures = new Map(makeFixtures(dir).map((p) => [p.family, p]));
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

for (const family of FIXTURE_FAMILIES) {
  describe(family, () => {
    let host: HostModel;
    let pay: Payloads;
    const engines = new Map<Backend["name"], AnyEngine>();
    before(async () => {
      host = loadHostModel(fixtures.get(family)!.gguf);
      pay = new Payloads(host);
      for (const be of BACKENDS) engines.set(be.name, await be.make(host));
    });
    after(async () => {
      for (const e of engines.values()) await e.close();
      engines.clear();
    });
    // Both backends in one test per (mode, scope): the oracle runs once for both, then is dropped.
    MODES.forEach((mode, mi) =>
      SCOPES.forEach((scope, si) => {
        test(`${mode}, scope ${scope}: every kind at every site, both backends, vs the oracle`, async (t) => {
          const failures: string[] = [];
          try {
            for (const be of BACKENDS) {
              const out = await runCall(host, engines.get(be.name)!, pay, family, scope, mode, 1000 + 10 * mi + si);
              counts.cases += out.cases;
              counts.reads += out.reads;
              failures.push(...out.failures.map((f) => `[${be.name}] ${f}`));
              t.diagnostic(`[${be.name}] ${out.cases} cases, ${out.reads} reads, ${out.failures.length} failures`);
            }
          } finally {
            oracleMemo.clear();
          }
          if (failures.length > 0) assert.fail(`${failures.length} mismatches with the float64 oracle:\n${failures.slice(0, 12).join("\n")}`);
        });
      }),
    );
  });
}

test("case count", (t) => {
  // Per family: (1-D sites × 5 kinds + 2-D sites × 6 kinds) × scopes × modes × backends.
  let want = 0;
  for (const family of FIXTURE_FAMILIES) {
    const c = loadHostModel(fixtures.get(family)!.gguf).config;
    const per = sitesOf(c).reduce((a, s) => a + s.kinds.length, 0);
    want += per * SCOPES.length * MODES.length * BACKENDS.length;
  }
  t.diagnostic(`oracle cases run: ${counts.cases} interventions (family × site × kind × scope × mode × backend), ${counts.reads} row reads compared`);
  assert.equal(counts.cases, want, "every case ran");
});
