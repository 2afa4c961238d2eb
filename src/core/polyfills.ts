// @jax-js/jax 0.1.25 targets Node >= 24. On Node 20/22 two globals are missing:
//  - Iterator helpers (`iter.map`), used by np.einsum and nn.dotProductAttention;
//  - Float16Array, referenced by np.array() for every non-float32 typed array.
// Importing this module first makes both available. It is idempotent.
import "core-js/actual/iterator/index.js";
import { Float16Array as Float16ArrayPolyfill } from "@petamoriken/float16";

const g = globalThis as { Float16Array?: unknown };
if (typeof g.Float16Array === "undefined") g.Float16Array = Float16ArrayPolyfill;
