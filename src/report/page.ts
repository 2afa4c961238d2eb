// The HTML every report shares: one self-contained document shell (inline styles, no network; a
// script only when the page brings one, pinned by its hash in the Content-Security-Policy),
// escaping, static SVG plots, tables and the rate cell. Model output is untrusted text: it reaches
// a page only escaped.
import { createHash } from "node:crypto";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import type { Rate } from "../stats/stats.js";

/** Escape text for HTML element content and quoted attribute values. */
export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

let plotCounter = 0;

/** Compile a Vega-Lite spec and render it to a static SVG string (headless, no canvas needed). */
export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const vgSpec = compile(spec).spec;
  const view = new vega.View(vega.parse(vgSpec), { renderer: "none" });
  try {
    const svg = await view.toSVG();
    // Vega numbers clip paths and gradients from module-wide counters; several SVGs inline in one
    // document must not share ids, so give each plot its own prefix.
    const pre = `ssp${++plotCounter}-`;
    return svg
      .replace(/ id="([^"]+)"/g, ` id="${pre}$1"`)
      .replace(/="url\(#([^)"]+)\)"/g, `="url(#${pre}$1)"`)
      .replace(/ (xlink:)?href="#([^"]+)"/g, ` $1href="#${pre}$2"`);
  } finally {
    view.finalize();
  }
}

/** A plot, or a "no data" box when there is nothing to draw (never throws for empty data). */
export async function plotOrNote(rows: readonly unknown[], spec: () => TopLevelSpec, what: string): Promise<string> {
  if (rows.length === 0) return `<div class="nodata-box">no data: ${escapeHtml(what)}</div>`;
  return `<div class="plot">${await renderSvg(spec())}</div>`;
}

export function htmlTable(head: readonly string[], rows: readonly (readonly (string | number | null)[])[]): string {
  const cell = (x: string | number | null) => (x === null ? "—" : typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toPrecision(4)) : escapeHtml(x));
  return `<div class="scroll"><table><thead><tr>${head.map((h) => `<th>${escapeHtml(h)}</th>`).join("")}</tr></thead><tbody>${rows
    .map((r) => `<tr>${r.map((x) => `<td>${cell(x)}</td>`).join("")}</tr>`)
    .join("")}</tbody></table></div>`;
}

const pct = (x: number | null) => (x === null ? "—" : (100 * x).toFixed(1));

/** A rate as a table cell: estimate, Wilson interval, n, and the unjudged trials left out of n. */
export function rateCell(r: Rate | undefined): string {
  if (!r || r.estimate === null) return `<td class="num nodata">no data</td>`;
  const unj = r.unjudged ? ` <span class="unj" title="${r.unjudged} unjudged trial(s), excluded from n">+${r.unjudged}?</span>` : "";
  return `<td class="num"><b>${pct(r.estimate)}%</b> <span class="ci">[${pct(r.lo)}, ${pct(r.hi)}]</span> <span class="n">n=${Math.round(r.n)}</span>${unj}</td>`;
}

/** A rate as text: "12.5% [3.2, 38.1] n=8", or "n/a". */
export function rateText(r: Pick<Rate, "estimate" | "lo" | "hi" | "n"> | null | undefined): string {
  if (!r || r.estimate === null) return "n/a";
  return `${pct(r.estimate)}% [${pct(r.lo)}, ${pct(r.hi)}] n=${r.n}`;
}

/** The stylesheet of the recipe pages (the run report brings its own). */
export const PAGE_CSS = `
:root { --fg: #1f2933; --muted: #616e7c; --line: #d9e2ec; --accent: #2b6cb0; }
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; color: var(--fg); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 18px 24px 40px; }
h1 { font-size: 22px; margin: 6px 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.muted { color: var(--muted); } .small { font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; } th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f7fa; } .scroll { overflow: auto; max-width: 100%; max-height: 520px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .ci, .n { color: var(--muted); font-size: 12px; } .unj { color: #b7791f; font-size: 12px; } .nodata { color: #9aa5b1; }
.plot { margin: 10px 0 18px; overflow-x: auto; } .plot svg { max-width: none; display: block; }
.nodata-box { padding: 14px; border: 1px dashed #c5cdd5; border-radius: 6px; color: var(--muted); background: #fafbfc; margin: 8px 0; }
.note { background: #fffbea; border: 1px solid #f0d675; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
pre { font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; background: #f6f8fa; padding: 8px; max-height: 320px; overflow: auto; white-space: pre-wrap; }
footer { margin-top: 30px; font-size: 12px; color: var(--muted); }
`;

/**
 * One self-contained HTML document: `body` inside <body>, then `script` (allowed by its sha256 in
 * the CSP, nothing else runs). `css` replaces the recipe pages' stylesheet.
 */
export function htmlDocument(o: { title: string; body: string; css?: string; script?: string }): string {
  const scriptSrc = o.script === undefined ? "" : ` script-src 'sha256-${createHash("sha256").update(o.script, "utf8").digest("base64")}';`;
  const csp = `default-src 'none';${scriptSrc} style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${escapeHtml(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(o.title)}</title>
<style>${o.css ?? PAGE_CSS}</style>
</head>
<body>
${o.body}
${o.script === undefined ? "" : `<script>${o.script}</script>\n`}</body>
</html>
`;
}

const FOOTER = `<footer>Generated by selfscope. Plots: Vega-Lite/Vega rendered to static SVG. Self-contained: this file loads nothing from the network.</footer>`;

/** A recipe page: title, a subtitle line, then one section per entry. */
export function htmlPage(title: string, subtitle: string, sections: readonly { title: string; html: string }[]): string {
  return htmlDocument({
    title,
    body: `<main>
<h1>${escapeHtml(title)}</h1>
<p class="muted">${escapeHtml(subtitle)}</p>
${sections.map((s) => `<section><h2>${escapeHtml(s.title)}</h2>${s.html}</section>`).join("\n")}
${FOOTER}
</main>`,
  });
}

/** A recipe page whose body brings its own headings (`parts`, joined by newlines). */
export function htmlBodyPage(title: string, parts: readonly string[]): string {
  return htmlDocument({ title, body: `<main>\n${parts.join("\n")}\n${FOOTER}\n</main>` });
}
