// The family registry. Adding a family = one file here + one fixture.
import gpt2 from "./gpt2.js";
import llama from "./llama.js";
import type { Family } from "../family.js";

export const FAMILIES: readonly Family[] = [llama, gpt2];
