// The tests' seeded PRNG (reproducible kill points, random shapes): src/core/rng.ts's mulberry32.
export { mulberry32 as prng } from "../../src/core/rng.js";
