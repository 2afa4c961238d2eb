// Parsers for the list flags every command shares (--layers, --strengths, ...): one syntax and one
// set of messages, each naming the flag and what to write instead.
import { UsageError } from "./errors.js";

/** "1,2,4" or "0.5, -1" → numbers in the order given. */
export function parseNumbers(spec: string, flag: string): number[] {
  const parts = spec.split(",").map((s) => s.trim());
  for (const s of parts) if (s === "" || !Number.isFinite(Number(s))) throw new UsageError(`${flag} ${spec}: "${s}" is not a number (expected numbers like 1,2,4)`);
  return parts.map(Number);
}

/** The paper's rule for a fraction of depth: int(nLayers · f), clamped to [0, nLayers − 1]. */
export const LAYER_RULE = "int(nLayers*f), clamped to [0, nLayers-1]" as const;
export function layerAt(nLayers: number, f: number): number {
  return Math.max(0, Math.min(nLayers - 1, Math.floor(nLayers * f)));
}

const isFraction = (s: string) => s.includes(".");

/**
 * Layers from "37", "20,30,40", a range "0-5", a fraction of depth "0.6" (layerAt), any mix of
 * those, or "all", in the order given; `sorted`: unique and ascending.
 */
export function parseLayers(spec: string, nLayers: number, flag = "--layers", opts: { sorted?: boolean } = {}): number[] {
  if (spec.trim() === "all") return Array.from({ length: nLayers }, (_, i) => i);
  const out: number[] = [];
  const outside = () => new UsageError(`${flag} ${spec}: layers must lie in 0..${nLayers - 1}`);
  for (const s of spec.split(",").map((x) => x.trim())) {
    if (s === "") continue;
    const range = /^(\d+)-(\d+)$/.exec(s);
    if (range) {
      const [a, b] = [Number(range[1]), Number(range[2])];
      if (b < a) throw new UsageError(`${flag} ${spec}: range ${s} runs backwards (write ${b}-${a})`);
      if (b >= nLayers) throw outside();
      for (let l = a; l <= b; l++) out.push(l);
      continue;
    }
    const x = Number(s);
    if (!Number.isFinite(x) || x < 0) throw new UsageError(`${flag} ${spec}: bad layer "${s}" (use 37, 20,30,40, a range 0-25, a fraction of depth like 0.6, or all)`);
    const l = isFraction(s) ? layerAt(nLayers, x) : x;
    if (!Number.isInteger(l) || l >= nLayers) throw outside();
    out.push(l);
  }
  if (out.length === 0) throw new UsageError(`${flag} is empty (use 37, 20,30,40, a range 0-25, a fraction of depth like 0.6, or all)`);
  return opts.sorted ? [...new Set(out)].sort((a, b) => a - b) : out;
}

/** The fractions in a --layers spec ("0.6", "0.4,0.8"); empty when every layer is absolute. */
export function layerFractionsOf(spec: string): number[] {
  if (spec.trim() === "all") return [];
  return spec.split(",").filter(isFraction).map((s) => Number(s.trim()));
}
