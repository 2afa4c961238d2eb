// Activation patching: run a clean prompt, store one layer's residual stream, and patch it into
// a corrupted prompt at the token where they differ.
// Run: npm run build && node dist/examples/04-patch.js
import { BUNDLED_MODEL, Model, hookName } from "../src/index.js";

const model = await Model.load(BUNDLED_MODEL);
const at = hookName(1, "hook_resid_post");
const clean = "Lily had a red ball. Lily";
const corrupt = "Tom had a red ball. Lily";
const run = await model.forward([clean], { plan: [{ op: "read", at }], logits: "last" });
const source = run.cache.get(at).data;
const diffPos = 1; // the name token ("Lily" vs "Tom") after BOS
const base = await model.forward([corrupt], { logits: "last" });
const patched = await model.forward([corrupt], { logits: "last", plan: [{ op: "patch", at, source, pos: { from: diffPos, to: diffPos + 1 } }] });
const tok = model.tokenizer!;
const top = (l: Float32Array) => tok.decode([l.indexOf(Math.max(...l))]);
console.log(`clean next: ${top(run.logits[0]!)} | corrupt next: ${top(base.logits[0]!)} | patched next: ${top(patched.logits[0]!)}`);
model.dispose();
