// Per-item seeds derived from a run seed and a stable id, so a trial's randomness does not depend
// on batch composition or order (node:crypto, so it stays out of core/rng.ts, which the engine loads).
import { createHash } from "node:crypto";

/** The first 4 bytes (little-endian) of sha256("seed|id"). */
export function seedOf(seed: number, id: string): number {
  return createHash("sha256").update(`${seed}|${id}`).digest().readUInt32LE(0);
}
