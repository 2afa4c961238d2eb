// `selfscope view RUN_DIR`: serve a run's report and files on loopback. Only files inside the
// run directory are served: "..", encoded or not, and symlinks that lead outside are refused.
import fs from "node:fs";
import http from "node:http";
import path from "node:path";

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".jsonl": "application/x-ndjson; charset=utf-8",
  ".csv": "text/csv; charset=utf-8",
  ".parquet": "application/vnd.apache.parquet",
  ".png": "image/png",
  ".svg": "image/svg+xml",
};

/** Map a URL path to a file inside `root`, or null if it is not a plain file there. */
export function resolveInside(root: string, urlPath: string): string | null {
  let rel: string;
  try {
    rel = decodeURIComponent(urlPath.split("?")[0]!.split("#")[0]!);
  } catch {
    return null; // malformed percent-encoding
  }
  if (rel.includes("\0") || rel.includes("\\")) return null;
  const parts = rel.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.some((p) => p === "..")) return null;
  const realRoot = fs.realpathSync(root);
  const target = path.resolve(realRoot, parts.length ? parts.join("/") : "report.html");
  let real: string;
  try {
    real = fs.realpathSync(target); // follows symlinks: the real file must still be inside
  } catch {
    return null;
  }
  if (real !== realRoot && !real.startsWith(realRoot + path.sep)) return null;
  return fs.statSync(real).isFile() ? real : null;
}

export function serveRun(root: string, opts: { host?: string; port?: number } = {}): Promise<{ server: http.Server; url: string }> {
  const host = opts.host ?? "127.0.0.1";
  const server = http.createServer((req, res) => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { Allow: "GET, HEAD" }).end();
      return;
    }
    const file = resolveInside(root, req.url ?? "/");
    if (!file) {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
      return;
    }
    res.writeHead(200, {
      "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream",
      "X-Content-Type-Options": "nosniff",
      "Cache-Control": "no-store",
    });
    if (req.method === "HEAD") res.end();
    else fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port ?? 0, host, () => {
      const a = server.address();
      const port = typeof a === "object" && a ? a.port : opts.port;
      resolve({ server, url: `http://${host.includes(":") ? `[${host}]` : host}:${port}/` });
    });
  });
}
