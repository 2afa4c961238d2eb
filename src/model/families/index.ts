// The family registry. Adding a family = one file here + one fixture.
import type { Family } from "../family.js";
import { gemma2, gemma3 } from "./gemma.js";
import gpt2 from "./gpt2.js";
import llama from "./llama.js";
import mistral from "./mistral.js";
import mixtral from "./mixtral.js";
import olmoe from "./olmoe.js";
import qwen3moe from "./qwen3moe.js";
import olmo2 from "./olmo2.js";
import qwen2 from "./qwen2.js";
import qwen3 from "./qwen3.js";

export const FAMILIES: readonly Family[] = [llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, gpt2, qwen3moe, olmoe, mixtral];
