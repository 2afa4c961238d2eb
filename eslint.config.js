// Typed lint: strict TypeScript rules, no `any`, zero warnings (see package.json "lint"), and the
// layering of src/ (below).
import js from "@eslint/js";
import tseslint from "typescript-eslint";

// The layers of src/, bottom to top: a folder may import its own layer and those before it, never
// one after it. src/index.ts, the public facade, may import anything; nothing in src imports it.
// test/, bench/, examples/ and scripts/ are not layered (README.md, "What is in the box", lists the layers).
//
//   core ← hooks ← io ← engine ← reference ← model ← vectors ← math ← stats ← log ← judge ← eval ← train
//        ← report ← recipes ← cli
//
// log sits below judge because judges read logs (judge/agreement.ts reads runs, judge.ts takes the
// log's Criterion); reference (the llama.cpp logits check) needs only core.
export const LAYERS = ["core", "hooks", "io", "engine", "reference", "model", "vectors", "math", "stats", "log", "judge", "eval", "train", "report", "recipes", "cli"];

/** Crossings allowed while code moves (zone → module names below it); none today. */
const KNOWN_CROSSINGS = {};

/** Relative import sources that reach folder `zone` of src/ (or the facade src/index.js) from a file in src/<folder>/. */
const reaching = (zones, except = []) => `^(\\.\\./)+(${zones.join("|")})/${except.length > 0 ? `(?!(${except.join("|")})$)` : ""}`;
const FACADE = "^(\\.\\./)+index\\.js$";

function layerRules(zone, i) {
  const above = LAYERS.slice(i + 1);
  const message = `${zone} is below ${above.join(", ")} (eslint.config.js LAYERS): move the code down, or invert the dependency`;
  const known = KNOWN_CROSSINGS[zone] ?? [];
  const patterns = above.length === 0 ? [] : [{ regex: reaching(above.filter((z) => z !== "model" || known.length === 0)), message }];
  if (known.length > 0 && above.includes("model")) patterns.push({ regex: reaching(["model"], known), message });
  patterns.push({ regex: FACADE, message: "src/index.ts is the public facade: import the module itself" });
  // Dynamic import() and TypeScript's import("...") types are not import declarations: the same sources, by syntax.
  const sources = patterns.map((p) => p.regex.replaceAll("/", "\\u002F"));
  return {
    files: [`src/${zone}/**/*.ts`],
    rules: {
      "no-restricted-imports": ["error", { patterns }],
      "no-restricted-syntax": [
        "error",
        ...sources.flatMap((re) => [
          { selector: `ImportExpression[source.value=/${re}/]`, message: `dynamic import crosses a layer: ${message}` },
          { selector: `TSImportType[argument.literal.value=/${re}/]`, message: `import type crosses a layer: ${message}` },
        ]),
      ],
    },
  };
}

export default tseslint.config(
  { ignores: ["dist/**", "node_modules/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-explicit-any": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "no-constant-condition": ["error", { checkLoops: false }],
    },
  },
  ...LAYERS.map(layerRules),
);
