// A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration: text config nested under
// text_config, text weights under a language_model prefix, a vision tower beside them) loads its
// language model and gives exactly the logits of the same weights saved as a text-only model.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { makeFixture } from "../scripts/make-fixtures.js";
import { readSafetensorsHeader, readStTensor, writeSafetensors } from "../src/io/safetensors.js";
import { Engine } from "../src/engine/jax/engine.js";
import { loadHostModel } from "../src/model/load.js";

function multimodalCopy(textDir: string, outDir: string, rename: (n: string) => string): void {
  fs.mkdirSync(outDir, { recursive: true });
  const cfg = JSON.parse(fs.readFileSync(path.join(textDir, "config.json"), "utf8")) as Record<string, unknown>;
  const wrapped = {
    architectures: ["Gemma3ForConditionalGeneration"],
    model_type: "gemma3",
    eos_token_id: cfg.eos_token_id,
    text_config: { ...cfg, architectures: undefined, model_type: "gemma3_text" },
    vision_config: { hidden_size: 8, model_type: "siglip_vision_model" },
  };
  fs.writeFileSync(path.join(outDir, "config.json"), JSON.stringify(wrapped));
  const st = readSafetensorsHeader(path.join(textDir, "model.safetensors"));
  const tensors: Record<string, { data: Float32Array; shape: number[] }> = {};
  for (const n of st.tensors.keys()) tensors[rename(n)] = readStTensor(st, n);
  tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = { data: new Float32Array(16).fill(0.5), shape: [4, 4] };
  tensors["multi_modal_projector.mm_input_projection_weight"] = { data: new Float32Array(8), shape: [2, 4] };
  writeSafetensors(path.join(outDir, "model.safetensors"), tensors);
}

test("Gemma 3 multimodal checkpoints (both transformers layouts) load their language model", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "selfscope-mm-"));
  const fx = makeFixture("gemma3", dir);
  const textDir = fx.hf;
  const ids = [2, 17, 99, 4, 41, 8, 250, 33];
  const ref = new Engine(loadHostModel(textDir));
  const want = (await ref.forward([ids])).logits[0]!;
  ref.dispose();
  const layouts: [string, (n: string) => string][] = [
    ["older: language_model.model.*", (n) => `language_model.${n}`],
    ["4.52+: model.language_model.*", (n) => n.replace(/^model\./, "model.language_model.")],
  ];
  for (const [name, rename] of layouts) {
    const mm = path.join(dir, name.replace(/[^a-z0-9]+/gi, "_"));
    multimodalCopy(textDir, mm, rename);
    const host = loadHostModel(mm);
    assert.equal(host.config.family, "gemma3", name);
    const e = new Engine(host);
    const got = (await e.forward([ids])).logits[0]!;
    e.dispose();
    assert.deepEqual([...got], [...want], name);
  }
});
