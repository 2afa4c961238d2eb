// Test helpers around chat templates.
import fs from "node:fs";
import type { Model } from "../../src/model/model.js";
import { fixture } from "./paths.js";

/** The model (stories260K in the tests) seen through Gemma 2's chat template (the vendored google-gemma-2-2b-it.jinja). */
export function withGemmaTemplate(m: Model): Model {
  const tpl = fs.readFileSync(fixture("llamacpp-vocab", "chat-templates", "google-gemma-2-2b-it.jinja"), "utf8");
  const w = Object.create(m) as Model;
  Object.defineProperty(w, "chatTemplate", { value: tpl });
  return w;
}
