// Vega-Lite specs the recipe reports share (rendered to static SVG by page.ts's plotOrNote).
import type { TopLevelSpec } from "vega-lite";
import type { Rate } from "../stats/stats.js";

export const VEGA_LITE = "https://vega.github.io/schema/vega-lite/v6.json";
export const PLOT_FONT = { font: "Helvetica, Arial, sans-serif", view: { stroke: "#ddd" } };
/** Success (S) green and failure (F) red, the concept classes' colours. */
export const CLASS_COLORS = { domain: ["S", "F"], range: ["#2f855a", "#c53030"] };

const title = (text: string) => ({ text, anchor: "start" as const, fontSize: 14 });

export function scatterSpec(rows: Record<string, unknown>[], x: string, y: string, text: string, color?: string): TopLevelSpec {
  return {
    $schema: VEGA_LITE,
    title: title(text),
    data: { values: rows },
    width: 320,
    height: 240,
    mark: { type: "point", filled: true, size: 50, opacity: 0.8 },
    encoding: {
      x: { field: x, type: "quantitative", title: x, scale: { zero: false } },
      y: { field: y, type: "quantitative", title: y, scale: { zero: false } },
      ...(color ? { color: { field: color, type: "nominal", title: null, scale: CLASS_COLORS } } : {}),
      tooltip: [{ field: "concept", type: "nominal" }],
    },
    config: PLOT_FONT,
  } as TopLevelSpec;
}

/** Lines with points, one per `series`; `integerX` for layer or step axes. */
export function linesSpec(rows: Record<string, unknown>[], x: string, y: string, series: string, text: string, yFormat?: string, integerX = false): TopLevelSpec {
  return {
    $schema: VEGA_LITE,
    title: title(text),
    data: { values: rows },
    width: 380,
    height: 220,
    mark: { type: "line", point: { filled: true, size: 24 } },
    encoding: {
      x: { field: x, type: "quantitative", title: x, ...(integerX ? { axis: { tickMinStep: 1, format: "d" } } : {}) },
      y: { field: y, type: "quantitative", title: y, ...(yFormat ? { axis: { format: yFormat } } : {}) },
      color: { field: series, type: "nominal", title: null },
    },
    config: PLOT_FONT,
  } as TopLevelSpec;
}

export interface RateBar {
  group: string;
  series: string;
  estimate: number;
  lo: number;
  hi: number;
}

/** A rate's bar row, or nothing when the rate has no data. */
export function rateBar(group: string, series: string, r: Rate | undefined): RateBar[] {
  return r && r.estimate !== null && r.lo !== null && r.hi !== null ? [{ group, series, estimate: r.estimate, lo: r.lo, hi: r.hi }] : [];
}

/** Grouped bars of rates with their interval as a rule; `colors` pins the series' colours. */
export function rateBarsSpec(rows: RateBar[], text: string, yTitle = "rate", colors?: { domain: string[]; range: string[] }): TopLevelSpec {
  return {
    $schema: VEGA_LITE,
    title: title(text),
    data: { values: rows },
    width: { step: 40 },
    height: 200,
    encoding: {
      x: { field: "group", type: "nominal", title: null, axis: { labelAngle: -20 } },
      xOffset: { field: "series", type: "nominal" },
      color: { field: "series", type: "nominal", title: null, ...(colors ? { scale: colors } : {}) },
    },
    layer: [
      { mark: { type: "bar" }, encoding: { y: { field: "estimate", type: "quantitative", title: yTitle, axis: { format: ".0%" }, scale: { domain: [0, 1] } } } },
      { mark: { type: "rule", color: "#333" }, encoding: { y: { field: "lo", type: "quantitative" }, y2: { field: "hi" } } },
    ],
    config: PLOT_FONT,
  } as TopLevelSpec;
}
