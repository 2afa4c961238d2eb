// Transcoders and SAEs in the layouts they are published in (Gemma Scope 2 params.safetensors;
// SAELens cfg.json + sae_weights.safetensors), written here as small fixtures: loading, JumpReLU /
// TopK encoding against a float64 re-computation, the error node (splicing changes no logit), a
// feature edit, and shape / dtype / config errors that name the file.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Model } from "../src/model/model.js";
import { writeSafetensors } from "../src/io/safetensors.js";
import { decode, encode, loadGemmaScope, loadSaeLens, splice, transcoderSites } from "../src/vectors/dictionary.js";
import { mulberry32 } from "../src/core/rng.js";
import { hookName } from "../src/hooks/names.js";
import { fixture } from "./support/paths.js";

const STORIES = fixture("stories260K-gguf", "stories260K.gguf");
const D = 64, S = 48;

function rand(r: () => number, n: number, scale: number): Float32Array {
  return Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale);
}

/** A hand-written safetensors file with one I32 tensor under `name`. */
function writeI32(file: string, name: string, shape: number[]): void {
  const n = shape.reduce((a, b) => a * b, 1);
  const header = JSON.stringify({ [name]: { dtype: "I32", shape, data_offsets: [0, 4 * n] } });
  const h = Buffer.from(header + " ".repeat((8 - (header.length % 8)) % 8));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(h.length));
  fs.writeFileSync(file, Buffer.concat([len, h, Buffer.alloc(4 * n)]));
}

describe("dictionaries", () => {
  let dir: string;
  let model: Model;
  let ids: number[];
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "dict-test-"));
    model = await Model.load(STORIES, { threads: 1 });
    ids = model.tokenizer!.encode("Once upon a time, there was a little girl named Lily. She liked to play.", { addSpecial: true });
    const r = mulberry32(11);
    writeSafetensors(path.join(dir, "params.safetensors"), {
      w_enc: { data: rand(r, D * S, 0.3), shape: [D, S] },
      b_enc: { data: rand(r, S, 0.1), shape: [S] },
      w_dec: { data: rand(r, S * D, 0.2), shape: [S, D] },
      b_dec: { data: rand(r, D, 0.05), shape: [D] },
      threshold: { data: Float32Array.from({ length: S }, () => 0.2 + 0.4 * r()), shape: [S] },
      affine_skip_connection: { data: rand(r, D * D, 0.05), shape: [D, D] },
    });
    const sae = path.join(dir, "sae");
    fs.mkdirSync(sae);
    fs.writeFileSync(path.join(sae, "cfg.json"), JSON.stringify({ d_in: D, d_sae: S, architecture: "topk", activation_fn_kwargs: { k: 4 }, hook_name: "blocks.1.hook_resid_post", apply_b_dec_to_input: true }));
    writeSafetensors(path.join(sae, "sae_weights.safetensors"), {
      W_enc: { data: rand(r, D * S, 0.3), shape: [D, S] },
      b_enc: { data: rand(r, S, 0.1), shape: [S] },
      W_dec: { data: rand(r, S * D, 0.2), shape: [S, D] },
      b_dec: { data: rand(r, D, 0.05), shape: [D] },
    });
  });
  after(() => {
    model?.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("Gemma Scope 2 transcoder: JumpReLU matches float64, the error node leaves logits unchanged, an ablation moves them by its decoder row", async () => {
    const t = loadGemmaScope(path.join(dir, "params.safetensors"), { ...transcoderSites(2), dModel: D });
    assert.equal(t.kind, "transcoder");
    assert.equal(t.dSae, S);
    // Encoding against a float64 re-computation of 1[pre > θ]·ReLU(pre) on a few inputs.
    const r = mulberry32(2);
    const x = rand(r, 3 * D, 2);
    const a = encode(t, x, 3);
    let active = 0, gated = 0;
    for (let row = 0; row < 3; row++)
      for (let f = 0; f < S; f++) {
        let pre = t.bEnc[f]!;
        for (let i = 0; i < D; i++) pre += x[row * D + i]! * t.wEnc[i * S + f]!;
        const want = pre > t.threshold![f]! ? Math.max(0, pre) : 0;
        assert.ok(Math.abs(a[row * S + f]! - want) < 1e-5, `row ${row} feature ${f}: ${a[row * S + f]} vs ${want}`);
        if (want > 0) active++;
        if (pre > 0 && pre <= t.threshold![f]!) gated++;
      }
    assert.ok(active > 0 && gated > 0, `the fixture exercises both sides of the threshold (${active} active, ${gated} gated)`);
    // Splicing with the error node: logits unchanged.
    const base = (await model.forward([{ ids }], { logits: "all" })).logits[0]!;
    const sp = await splice(model, t, ids);
    const spliced = (await model.forward([{ ids }], { plan: [sp.patch], logits: "all" })).logits[0]!;
    let maxd = 0;
    for (let i = 0; i < base.length; i++) maxd = Math.max(maxd, Math.abs(base[i]! - spliced[i]!));
    assert.ok(maxd <= 1e-5, `spliced logits differ by ${maxd}`);
    // Zero the most active feature at every position: the output moves by exactly −a_f · w_dec[f].
    const total = new Float64Array(S);
    sp.acts.forEach((v, i) => (total[i % S] = total[i % S]! + v));
    const best = total.indexOf(Math.max(...total));
    const ab = await splice(model, t, ids, [], (acts, n) => { for (let p = 0; p < n; p++) acts[p * S + best] = 0; });
    const y = sp.patch.op === "patch" ? sp.patch.source : new Float32Array();
    const z = ab.patch.op === "patch" ? ab.patch.source : new Float32Array();
    let moved = 0;
    for (let p = 0; p < ids.length; p++)
      for (let j = 0; j < D; j++) {
        const want = y[p * D + j]! - sp.acts[p * S + best]! * t.wDec[best * D + j]!;
        assert.ok(Math.abs(z[p * D + j]! - want) < 1e-4, `position ${p} dim ${j}`);
        moved = Math.max(moved, Math.abs(z[p * D + j]! - y[p * D + j]!));
      }
    assert.ok(moved > 1e-3, "the ablated feature was active somewhere");
    const ablated = (await model.forward([{ ids }], { plan: [ab.patch], logits: "all" })).logits[0]!;
    assert.ok(ablated.some((v, i) => Math.abs(v - base[i]!) > 1e-4), "the ablation changes logits");
    // The affine skip reads the inputs: decoding without them is refused, not silently skip-free.
    assert.throws(() => decode(t, sp.acts, ids.length), /needs its inputs/);
  });

  test("SAELens TopK SAE: at most k active features, splice unchanged", async () => {
    const s = loadSaeLens(path.join(dir, "sae"), model.config.nLayers);
    assert.equal(s.activation, "topk");
    assert.equal(s.inputSite, hookName(1, "hook_resid_post"));
    const sp = await splice(model, s, ids);
    for (let p = 0; p < ids.length; p++) assert.ok(sp.acts.subarray(p * S, (p + 1) * S).filter((v) => v > 0).length <= 4);
    const base = (await model.forward([{ ids }], { logits: "last" })).logits[0]!;
    const spliced = (await model.forward([{ ids }], { plan: [sp.patch], logits: "last" })).logits[0]!;
    assert.ok(base.every((v, i) => Math.abs(v - spliced[i]!) <= 1e-5));
  });

  test("errors name the file: shapes, dtypes, configs, d_model", async () => {
    const bad = path.join(dir, "bad.safetensors");
    writeSafetensors(bad, { w_enc: { data: new Float32Array(D * S), shape: [S, D] } });
    assert.throws(() => loadGemmaScope(bad, { ...transcoderSites(2), dModel: D }), /bad\.safetensors: tensor w_enc has shape \[48, 64\], expected \[64, \?\]/);
    writeSafetensors(bad, { w_enc: { data: new Float32Array(D * S), shape: [D, S] } });
    assert.throws(() => loadGemmaScope(bad, { ...transcoderSites(2), dModel: D }), /bad\.safetensors: missing tensor w_dec/);
    writeI32(bad, "w_enc", [D, S]);
    assert.throws(() => loadGemmaScope(bad, { ...transcoderSites(2), dModel: D }), /w_enc has dtype I32/);
    assert.throws(() => loadGemmaScope(path.join(dir, "none.safetensors"), { ...transcoderSites(2), dModel: D }), /none\.safetensors does not exist/);
    assert.throws(() => loadGemmaScope(path.join(dir, "params.safetensors"), { ...transcoderSites(2), dModel: 32 }), /w_enc has shape \[64, 48\], expected \[32, \?\]/);
    const cfgDir = path.join(dir, "sae2");
    fs.mkdirSync(cfgDir);
    fs.copyFileSync(path.join(dir, "sae", "sae_weights.safetensors"), path.join(cfgDir, "sae_weights.safetensors"));
    fs.writeFileSync(path.join(cfgDir, "cfg.json"), JSON.stringify({ d_in: D, d_sae: S, architecture: "gated", hook_name: "blocks.1.hook_resid_post" }));
    assert.throws(() => loadSaeLens(cfgDir, 5), /cfg\.json: architecture "gated" is not one selfscope runs/);
    fs.writeFileSync(path.join(cfgDir, "cfg.json"), JSON.stringify({ d_in: D, d_sae: S, architecture: "standard", hook_name: "blocks.9.hook_resid_post" }));
    assert.throws(() => loadSaeLens(cfgDir, 5), /the model has 5 blocks/);
    fs.writeFileSync(path.join(cfgDir, "cfg.json"), JSON.stringify({ d_in: D, d_sae: 0, architecture: "standard", hook_name: "blocks.1.hook_resid_post" }));
    assert.throws(() => loadSaeLens(cfgDir, 5), /cfg\.json: d_sae should be a positive integer/);
    fs.rmSync(path.join(cfgDir, "cfg.json"));
    assert.throws(() => loadSaeLens(cfgDir, 5), /cfg\.json does not exist/);
    const small = { ...loadSaeLens(path.join(dir, "sae"), 5), dIn: 32, dOut: 32 };
    await assert.rejects(splice(model, small, ids), /do not match the model's d_model 64/);
  });
});
