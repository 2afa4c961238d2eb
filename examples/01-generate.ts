// Greedy and sampled generation on the bundled model.
// Run: npm run build && node dist/examples/01-generate.js
import { BUNDLED_MODEL, Model } from "../src/index.js";

const model = await Model.load(BUNDLED_MODEL);
const greedy = await model.generate(["Once upon a time"], { maxTokens: 40 });
console.log("greedy :", greedy.texts[0]);
const sampled = await model.generate(["Once upon a time"], { maxTokens: 40, temperature: 0.9, topP: 0.95, seed: 7 });
console.log("sampled:", sampled.texts[0]);
model.dispose();
