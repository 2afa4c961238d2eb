// Every engine against Hugging Face transformers (float64, computed on another machine; see
// test/fixtures/hf-reference/PROVENANCE.md): logits, each layer's MLP contribution and down-projection output
// (mlp.hook_down) on the family fixtures, and the logits with an add at mlp.hook_down, read through selfscope's hooks
// on the cpu and wasm devices. An independent implementation, so a quirk written wrongly in
// both our engines and our float64 oracle still fails here.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { makeFixtures, type FixtureFamily } from "../scripts/make-fixtures.js";
import { hookName, type HookName } from "../src/hooks/names.js";
import { Model } from "../src/model/model.js";
import type { DeviceName } from "../src/engine/device.js";
import { assertClose } from "./support/compare.js";
import { repoDir } from "./support/paths.js";

const REF = path.join(repoDir(), "test/fixtures/hf-reference");
interface FamilyRef {
  ids: number[];
  add: { at: string; from: number; scale: number };
  tensors: Record<string, { offset: number; shape: number[] }>;
}
const refs = JSON.parse(fs.readFileSync(path.join(REF, "hf-families.json"), "utf8")) as Record<string, FamilyRef>;
const families = Object.keys(refs) as FixtureFamily[];

function tensor(family: string, name: string): Float32Array {
  const t = refs[family]!.tensors[name];
  assert.ok(t, `${family}: no reference tensor ${name}`);
  const buf = fs.readFileSync(path.join(REF, `hf-${family}.f32`));
  const n = t.shape.reduce((a, b) => a * b, 1);
  return new Float32Array(buf.buffer.slice(buf.byteOffset + t.offset * 4, buf.byteOffset + (t.offset + n) * 4));
}

let dir = "";
let fixtures = new Map<string, string>();
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-hfref-"));
  fixtures = new Map(makeFixtures(dir, families).map((p) => [p.family, p.hf]));
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

test("the regenerated fixtures are byte for byte the ones the references were computed on", () => {
  const want = fs.readFileSync(path.join(REF, "fixtures.sha256"), "utf8").trim().split("\n");
  assert.equal(want.length, 2 * families.length);
  for (const line of want) {
    const [hash, rel] = line.split(/\s+/) as [string, string];
    const [family, , file] = rel.split("/") as [string, string, string];
    const got = createHash("sha256").update(fs.readFileSync(path.join(fixtures.get(family)!, file))).digest("hex");
    assert.equal(got, hash, rel);
  }
});

for (const device of ["cpu", "wasm"] as DeviceName[]) {
  describe(`HF transformers reference [${device}]`, () => {
    for (const family of families) {
      test(`${family}: logits and every layer's hook_mlp_out`, async () => {
        const ref = refs[family]!;
        const model = await Model.load(fixtures.get(family)!, { device });
        try {
          const sites: HookName[] = Array.from({ length: model.config.nLayers }, (_, i) => hookName(i, "hook_mlp_out"));
          const { logits, cache } = await model.forward([{ ids: ref.ids }], { plan: sites.map((at) => ({ op: "read" as const, at })) });
          for (const at of sites) assertClose(cache.get(at).data, tensor(family, at), { what: `${family} ${at}`, atol: 2e-5, rtol: 1e-4 });
          assertClose(logits[0]!, tensor(family, "logits"), { what: `${family} logits`, atol: 1e-4, rtol: 1e-4 });
        } finally {
          model.dispose();
        }
      });

      test(`${family}: every layer's mlp.hook_down (the down projection before any post-MLP norm) and an add there`, async () => {
        const ref = refs[family]!;
        const model = await Model.load(fixtures.get(family)!, { device });
        try {
          const sites: HookName[] = Array.from({ length: model.config.nLayers }, (_, i) => hookName(i, "mlp.hook_down"));
          const { cache } = await model.forward([{ ids: ref.ids }], { logits: "none", plan: sites.map((at) => ({ op: "read" as const, at })) });
          for (const at of sites) assertClose(cache.get(at).data, tensor(family, at), { what: `${family} ${at}`, atol: 2e-5, rtol: 1e-4 });
          // The reference's steering: scale · v, v_j = 0.5 sin(j + 1), at the down projection's output from position `from` on.
          const vector = Float32Array.from({ length: model.config.dModel }, (_, j) => 0.5 * Math.sin(j + 1));
          const plan = [{ op: "add" as const, at: ref.add.at as HookName, vector, scale: ref.add.scale, pos: { from: ref.add.from } }];
          const steered = (await model.forward([{ ids: ref.ids }], { plan })).logits[0]!;
          assertClose(steered, tensor(family, "logits_steered"), { what: `${family} logits with the add at ${ref.add.at}`, atol: 1e-4, rtol: 1e-4 });
        } finally {
          model.dispose();
        }
      });
    }
  });
}
