// Concept injection in miniature: a mean-difference vector added to the residual stream from a
// chosen token on, in prompt and generation alike (the introspection protocol's hook).
// Run: npm run build && node dist/examples/03-steer.js
import { BUNDLED_MODEL, Model, hookName, type HookName } from "../src/index.js";

const model = await Model.load(BUNDLED_MODEL);
const at: HookName = hookName(2, "hook_resid_post");
// Activation at the last token of a concept prompt minus the mean over baseline prompts.
async function lastToken(texts: string[]): Promise<Float32Array[]> {
  const { cache } = await model.forward(texts, { plan: [{ op: "read", at }], logits: "none" });
  return texts.map((_, b) => {
    const { data, shape } = cache.get(at, b);
    return data.slice(data.length - shape[1]!);
  });
}
const [concept] = await lastToken(["The dog barked at the dog"]);
const base = await lastToken(["The girl went to the park", "The boy ate an apple", "The sun was hot"]);
const vector = concept!.map((x, i) => x - base.reduce((s, v) => s + v[i]!, 0) / base.length);

const prompt = "Once upon a time, there was a little girl named Lily.";
const plain = await model.generate([prompt], { maxTokens: 40 });
const steered = await model.generate([prompt], { maxTokens: 40, plan: [{ op: "add", at, vector, scale: 4, pos: { marker: "Lily", offset: -1 } }] });
console.log("plain  :", plain.texts[0]);
console.log("steered:", steered.texts[0]);
model.dispose();
