// Read the residual stream after every block, TransformerLens style.
// Run: npm run build && node dist/examples/02-read-resid.js
import { BUNDLED_MODEL, Model, hookName, type Plan } from "../src/index.js";

const model = await Model.load(BUNDLED_MODEL);
const plan: Plan = Array.from({ length: model.config.nLayers }, (_, i) => ({ op: "read" as const, at: hookName(i, "hook_resid_post") }));
const { cache, rows } = await model.forward(["The cat sat on the mat"], { plan, logits: "none" });
for (let i = 0; i < model.config.nLayers; i++) {
  const { data, shape } = cache.get(hookName(i, "hook_resid_post"));
  const last = data.subarray(data.length - shape[1]!);
  const norm = Math.hypot(...last);
  console.log(`${hookName(i, "hook_resid_post")} shape [${shape}] ‖last token‖ = ${norm.toFixed(3)}`);
}
console.log("tokens:", rows[0]!.ids);
model.dispose();
