// Resolves "@jax-js/jax" to another copy of the package, named by SELFSCOPE_BENCH_JAX_DIR (a
// directory holding package.json and dist/), so a patched jax-js can be benchmarked against the
// installed one without touching node_modules:
//   SELFSCOPE_BENCH_JAX_DIR=.scratch/jax-patched npm run bench -- --quick
// The orchestrator loads this with --import before the selfscope child's modules.
import { register } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.env.SELFSCOPE_BENCH_JAX_DIR;
if (dir) {
  const target = pathToFileURL(path.resolve(dir, "dist", "index.js")).href;
  const hooks = `export async function resolve(specifier, context, next) {
  if (specifier === "@jax-js/jax") return { url: ${JSON.stringify(target)}, shortCircuit: true };
  return next(specifier, context);
}`;
  register(`data:text/javascript,${encodeURIComponent(hooks)}`);
}
