// The organism's base: stories260K with whole-word tokens added for a few thousand nouns, so that a
// concept word is ONE token and naming it is a choice among tokens, not spelling (tok512 spells
// " frog" as ▁f r o g, and a 64-dim vector at layer 1 carries little more than the last letters:
// MODEL_CARD.md, "Identification: what was tried").
//
// How the tokens are made reachable without changing any other tokenization much: for each word
// whose tok512 pieces are p1..pk, the prefix chain p1p2, p1p2p3, …, p1..pk is appended to the vocab
// with scores BELOW every original score. SentencePiece-style merging (llama.cpp's and ours) pops
// the highest-scoring bigram first, so every text first reaches exactly its tok512 segmentation,
// and only then are pieces joined along a chain (all new pieces start with ▁, so only the first
// piece of a word can grow). Text keeps its tok512 tokens except where a word starts with one of
// the chains (" frozen" -> ▁fro zen); the script checks the protocol's prompts are unchanged.
//
// Embeddings of the new rows: a chain piece gets the mean of its pieces' rows (input and output);
// a whole word gets that mean plus a random direction z_w (seeded) of the rows' typical norm, the
// same z_w in the embedding and (rescaled) in the unembedding (--out-rows random: the unembedding
// row is 2·|row|·z_w alone). Every word token is thus distinct and the untrained base still reads
// it roughly as its letters.
//
// The shipped organism's base (models/organism/base.gguf; scripts/organism/build.ts runs this first).
//   node dist/scripts/organism/vocab.js [--out /tmp/base.gguf]
//   node dist/scripts/organism/train.js --base /tmp/base.gguf --words /tmp/base.gguf.train.txt --heldout /tmp/base.gguf.heldout.json
import fs from "node:fs";
import path from "node:path";
import { GgmlType, GgufValueType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf, type GgufWriteTensor } from "../../src/io/gguf.js";
import { tokenizerFromGguf } from "../../src/io/tokenizer.js";
import { mulberry32 } from "../../src/core/rng.js";
import { Model } from "../../src/model/model.js";
import { FORCED_PREFILL, getVariant, renderTrial } from "../../src/eval/protocol.js";
import { TRAIN_CONCEPTS } from "./train.js";

export const SOURCE = "models/stories260K/stories260K.gguf";
const NEW_SCORE = -1000; // below tok512's lowest (-252)
const SEED = 7;
/** Output rows of the word tokens: "tied" = the embedding's recipe (mean of pieces + z), "random" = 2·|row|·z only. */
export type OutRows = "tied" | "random";

function gauss(r: () => number): number {
  const u = Math.max(r(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
}

function rowNorm(m: Float32Array, d: number, i: number): number {
  let s = 0;
  for (let k = 0; k < d; k++) s += m[i * d + k]! ** 2;
  return Math.sqrt(s);
}

const json = (p: string) => JSON.parse(fs.readFileSync(new URL(`../../../${p}`, import.meta.url), "utf8")) as Record<string, unknown>;

/** The shipped held-out list with truck, candy and train (whose prefix chains re-tokenize the prompt) swapped for pony, robot, rabbit. */
export const WORD_HELDOUT = "frog pony shoe drum chair table window garden robot bunny puppy kitten cookie flower rabbit ship grass queen school shop".split(" ");

/** The words given their own token: the paper's 500 concepts and 100 baseline words (lower-cased),
 * the organism's training concepts and its held-out concepts. */
export function vocabWords(): string[] {
  const lower = (xs: unknown) => (xs as string[]).map((w) => w.toLowerCase());
  return [
    ...lower(json("data/protocol/concepts_500.json").concepts),
    ...lower(json("data/protocol/baseline_words.json").words),
    ...TRAIN_CONCEPTS,
    ...WORD_HELDOUT,
  ];
}

export interface VocabResult { words: string[]; added: number; vocab: number }

/** Writes the extended base and returns the words that became single tokens. */
export function extendVocab(words: string[], out: string, keepTexts: string[] = [], outRows: OutRows = "tied", source = SOURCE): VocabResult {
  // Words whose chains would re-tokenize a kept text (the protocol's prompts) are dropped, until none does.
  let ws = [...new Set(words)].sort();
  for (;;) {
    const r = build(ws, out, source, outRows);
    const tok = tokenizerFromGguf(readGguf(out));
    const newPieces = new Set<string>();
    for (const t of keepTexts) for (const id of tok.encode(t, { addSpecial: false })) if (id >= r.base) newPieces.add(tok.idToToken(id)!);
    if (!newPieces.size) return { words: r.words, added: r.added, vocab: r.vocab };
    const drop = new Set(r.words.filter((w) => r.chains.get(w)!.some((c) => newPieces.has(c))));
    ws = ws.filter((w) => !drop.has(w));
  }
}

function build(words: string[], out: string, source: string, outRows: OutRows): VocabResult & { base: number; chains: Map<string, string[]> } {
  const g = readGguf(source);
  const tok = tokenizerFromGguf(g);
  const tokens = [...(g.metadata.get("tokenizer.ggml.tokens") as string[])];
  const scores = [...(g.metadata.get("tokenizer.ggml.scores") as number[])];
  const types = [...(g.metadata.get("tokenizer.ggml.token_type") as number[])];
  const n0 = tokens.length;
  const ids = new Map(tokens.map((t, i) => [t, i]));
  // Pieces of " w" in running text: what follows "about" in "Tell me about w".
  const about = tok.encode("about", { addSpecial: false }).length;
  const pieces = (w: string) => tok.encode(`about ${w}`, { addSpecial: false }).slice(about);

  const emb = readGgufTensor(g, "token_embd.weight");
  const outW = readGgufTensor(g, "output.weight");
  const d = emb.shape[1]!;
  const newRows: { e: number[]; o: number[] }[] = [];
  const meanRow = (m: Float32Array, ps: number[]) => Array.from({ length: d }, (_, k) => ps.reduce((a, p) => a + m[p * d + k]!, 0) / ps.length);
  const avg = (m: Float32Array) => { let s = 0; for (let i = 3; i < n0; i++) s += rowNorm(m, d, i); return s / (n0 - 3); };
  const eNorm = avg(emb.data), oNorm = avg(outW.data);
  const r = mulberry32(SEED);
  const kept: string[] = [];
  const chains = new Map<string, string[]>();
  for (const w of words) {
    if (!/^[a-z]+$/.test(w)) continue;
    const ps = pieces(w);
    const texts = ps.map((p) => tokens[p]!);
    if (ps.length < 2 || !texts[0]!.startsWith("\u2581") || texts.slice(1).some((t) => t.includes("\u2581"))) continue;
    chains.set(w, []);
    for (let k = 2; k <= ps.length; k++) {
      const text = texts.slice(0, k).join("");
      chains.get(w)!.push(text);
      if (ids.has(text)) continue;
      const isWord = k === ps.length;
      const e = meanRow(emb.data, ps.slice(0, k)), o = meanRow(outW.data, ps.slice(0, k));
      if (isWord) {
        const z = Array.from({ length: d }, () => gauss(r));
        const zn = Math.sqrt(z.reduce((a, x) => a + x * x, 0));
        for (let j = 0; j < d; j++) {
          e[j] = e[j]! + (eNorm * z[j]!) / zn;
          o[j] = outRows === "tied" ? o[j]! + (oNorm * z[j]!) / zn : (2 * oNorm * z[j]!) / zn;
        }
      }
      ids.set(text, tokens.length);
      tokens.push(text);
      scores.push(NEW_SCORE - newRows.length);
      types.push(1);
      newRows.push({ e, o });
    }
    kept.push(w);
  }
  const grow = (m: Float32Array, key: "e" | "o") => {
    const x = new Float32Array((n0 + newRows.length) * d);
    x.set(m);
    newRows.forEach((row, i) => x.set(row[key], (n0 + i) * d));
    return x;
  };

  const meta = ggufMetadataForWrite(g, {
    "tokenizer.ggml.tokens": { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: tokens },
    "tokenizer.ggml.scores": { type: GgufValueType.ARRAY, itemType: GgufValueType.FLOAT32, value: scores },
    "tokenizer.ggml.token_type": { type: GgufValueType.ARRAY, itemType: GgufValueType.INT32, value: types },
    "general.name": { type: GgufValueType.STRING, value: "stories260K-words" },
  });
  const tensors: GgufWriteTensor[] = [];
  for (const [name] of g.tensors) {
    const t = readGgufTensor(g, name);
    const data = name === "token_embd.weight" ? grow(t.data, "e") : name === "output.weight" ? grow(t.data, "o") : t.data;
    const shape = name === "token_embd.weight" || name === "output.weight" ? [n0 + newRows.length, d] : t.shape;
    tensors.push({ name, shape, type: GgmlType.F32, data });
  }
  fs.mkdirSync(path.dirname(out), { recursive: true });
  writeGguf(out, meta, tensors);

  // Every kept word must now be one token in running text.
  const tok2 = tokenizerFromGguf(readGguf(out));
  const about2 = tok2.encode("about", { addSpecial: false }).length;
  const single = kept.filter((w) => tok2.encode(`about ${w}`, { addSpecial: false }).length - about2 === 1);
  if (single.length !== kept.length) {
    const bad = kept.filter((w) => !single.includes(w));
    throw new Error(`vocab: ${bad.length} words did not become single tokens: ${bad.slice(0, 10).join(", ")}`);
  }
  return { words: kept, added: newRows.length, vocab: tokens.length, base: n0, chains };
}

/** The organism's dialogue as `selfscope inject` renders it for stories260K (both prompts: question and forced). */
export async function protocolTexts(): Promise<string[]> {
  const m = await Model.load(SOURCE, { threads: 1 });
  try {
    const v = getVariant("original");
    return [null, FORCED_PREFILL].map((prefill) => renderTrial(m, v, 1, { format: "raw", judgePrompt: "question", prefill }).text);
  } finally {
    m.dispose();
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const flag = (n: string) => { const i = args.indexOf(n); return i >= 0 ? args[i + 1] : undefined; };
  const out = flag("--out") ?? "/tmp/base.gguf";
  const outRows = (flag("--out-rows") ?? "tied") as OutRows;
  if (outRows !== "tied" && outRows !== "random") throw new Error(`--out-rows ${outRows}: use tied or random`);
  const r = extendVocab(vocabWords(), out, await protocolTexts(), outRows);
  // Training words: the single-token words minus the held-out ones and their plurals/derivatives.
  const train = r.words.filter((w) => !WORD_HELDOUT.some((h) => w.startsWith(h)));
  fs.writeFileSync(`${out}.train.txt`, train.join("\n") + "\n");
  fs.writeFileSync(`${out}.heldout.json`, JSON.stringify(WORD_HELDOUT.filter((w) => r.words.includes(w))));
  process.stderr.write(`${out}: ${r.words.length} words as single tokens, ${r.added} tokens added, vocab ${r.vocab}; ${train.length} training words in ${out}.train.txt, held-out list in ${out}.heldout.json\n`);
}

if (process.argv[1] && import.meta.url === new URL(`file://${path.resolve(process.argv[1])}`).href) await main();
