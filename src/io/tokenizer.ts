// Tokenizers: HF tokenizer.json files and GGUF-embedded vocabularies behind one interface.
//
// Every tokenizer runs on @huggingface/tokenizers (a pure-JS port of HF `tokenizers`). GGUF
// vocabularies are first converted into an equivalent tokenizer.json object, the way HF's own
// converters (transformers convert_slow_tokenizer.py) build fast tokenizers from SentencePiece
// and GPT-2 files. One algorithm implementation therefore serves both sources, and a GGUF vocab
// tokenizes exactly like the HF tokenizer it was exported from (llama.cpp's test vectors,
// generated with HF tokenizers, check this).
import fs from "node:fs";
import nodePath from "node:path";
import { Tokenizer as HfTokenizerClass } from "@huggingface/tokenizers";
import { ModelFileError, UsageError } from "../core/errors.js";
import { ggufOpt, type GgufFile, type GgufValue } from "./gguf.js";

/** The part of @huggingface/tokenizers' Tokenizer we use. Its bundled .d.ts files use
 * extensionless relative imports, which NodeNext resolution cannot follow (the class would be
 * typed `any`), so the surface is declared here. */
interface HfTokenizer {
  /** ids hold undefined for pieces missing from a vocab without an unk token. */
  encode(text: string, opts: { add_special_tokens: boolean }): { ids: (number | undefined)[]; tokens: string[] };
  decode(ids: number[], opts: { skip_special_tokens: boolean; clean_up_tokenization_spaces: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_vocab(withAddedTokens: boolean): Map<string, number>;
  get_added_tokens_decoder(): Map<number, { id: number; content: string; special: boolean }>;
}
const HfTokenizerCtor = HfTokenizerClass as unknown as new (tokenizerJson: object, config: object) => HfTokenizer;

export interface Tokenizer {
  /** Token ids for `text`. `addSpecial` (default true) adds BOS/EOS exactly where the model's
   * config says to, like HF `add_special_tokens=True`. Special-token text in `text` (for example
   * `<|im_start|>` in a rendered chat prompt) becomes its single special token, as in HF. */
  encode(text: string, opts?: { addSpecial?: boolean }): number[];
  /** Text for `ids`. No clean-up of spaces is applied, so decode(encode(s)) === s for normal text. */
  decode(ids: number[], opts?: { skipSpecial?: boolean }): string;
  /** One past the largest token id (added tokens included). */
  readonly vocabSize: number;
  readonly bos?: number;
  readonly eos?: number;
  /** Every id that should stop generation: eos, plus known end-of-turn tokens. */
  readonly eosIds: number[];
  tokenToId(tok: string): number | undefined;
  idToToken(id: number): string | undefined;
  /** "tokenizer.json" | "gguf-spm" | "gguf-bpe" */
  readonly kind: string;
}

// ------------------------------------------------------------------ tokenizer.json shapes we build

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type JsonObject = { [k: string]: Json };

interface AddedTokenJson extends JsonObject {
  id: number;
  content: string;
  single_word: boolean;
  lstrip: boolean;
  rstrip: boolean;
  normalized: boolean;
  special: boolean;
}

/** Token texts that end a turn or a sequence in common formats. llama.cpp auto-detects its
 * end-of-generation set from much the same list (llama-vocab.cpp); only special/control tokens
 * count. "<eos>" and "</s>" are here because chat configs often name the end-of-turn token as
 * eos (Gemma: <end_of_turn>) while the model also stops on its native one. */
const END_OF_TURN_TEXTS = new Set([
  "</s>",
  "<eos>",
  "<|eot_id|>",
  "<|eom_id|>",
  "<|im_end|>",
  "<|end|>",
  "<end_of_turn>",
  "<|endoftext|>",
  "<|end_of_text|>",
  "<EOT>",
  "_<EOT>",
  "<｜end▁of▁sentence｜>",
]);

// ------------------------------------------------------------------ the shared implementation

interface SpecialLayout {
  kind: string;
  prefix: number[];
  suffix: number[];
  bos?: number;
  eos?: number;
  eosIds: number[];
}

class LibTokenizer implements Tokenizer {
  readonly kind: string;
  readonly vocabSize: number;
  readonly bos?: number;
  readonly eos?: number;
  readonly eosIds: number[];
  private readonly prefix: number[];
  private readonly suffix: number[];

  constructor(private readonly lib: HfTokenizer, layout: SpecialLayout) {
    this.kind = layout.kind;
    this.prefix = layout.prefix;
    this.suffix = layout.suffix;
    this.bos = layout.bos;
    this.eos = layout.eos;
    this.eosIds = layout.eosIds;
    let max = -1;
    for (const id of lib.get_vocab(true).values()) if (id > max) max = id;
    this.vocabSize = max + 1;
  }

  encode(text: string, opts: { addSpecial?: boolean } = {}): number[] {
    if (typeof text !== "string") throw new UsageError(`encode: expected a string, got ${typeof text}`);
    // Ids of pieces missing from the vocab come back undefined when the model has no unk token;
    // HF's Rust BPE drops such pieces too, so filter them rather than emit garbage ids.
    const raw = text.length === 0 ? [] : this.lib.encode(text, { add_special_tokens: false }).ids;
    const ids = raw.filter((x): x is number => x !== undefined);
    return (opts.addSpecial ?? true) ? [...this.prefix, ...ids, ...this.suffix] : ids;
  }

  decode(ids: number[], opts: { skipSpecial?: boolean } = {}): string {
    if (ids.length === 0) return "";
    for (const id of ids) {
      if (!Number.isInteger(id) || this.lib.id_to_token(id) === undefined) {
        throw new UsageError(`decode: ${id} is not a token id of this ${this.kind} tokenizer (vocab size ${this.vocabSize})`);
      }
    }
    // No clean_up_tokenization_spaces: it rewrites " ." to "." etc., which breaks exact round trips
    // (and llama.cpp never applies it). Interpretability work needs the literal text.
    return this.lib.decode(ids, { skip_special_tokens: opts.skipSpecial ?? false, clean_up_tokenization_spaces: false });
  }

  tokenToId(tok: string): number | undefined {
    return this.lib.token_to_id(tok);
  }

  idToToken(id: number): string | undefined {
    return Number.isInteger(id) && id >= 0 ? this.lib.id_to_token(id) : undefined;
  }
}

function uniq(ids: (number | undefined)[]): number[] {
  const out: number[] = [];
  for (const id of ids) if (id !== undefined && !out.includes(id)) out.push(id);
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function readJsonFile(file: string, what: string): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch {
    throw new ModelFileError(file, `cannot read the ${what}`, "check the path");
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new ModelFileError(file, `the ${what} is not valid JSON (${(e as Error).message})`);
  }
}

function makeLib(tokenizerJson: object, config: object, file: string): HfTokenizer {
  try {
    return new HfTokenizerCtor(tokenizerJson, config);
  } catch (e) {
    throw new ModelFileError(file, `cannot build a tokenizer from it: ${(e as Error).message}`);
  }
}

// ------------------------------------------------------------------ tokenizer.json

/** A special-token entry in tokenizer_config.json: a string, or an AddedToken-like object. */
function tokenContent(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v.content === "string") return v.content;
  return undefined;
}

/**
 * Load an HF `tokenizer.json`. `tokenizerConfigPath` defaults to `tokenizer_config.json` beside it
 * (when present; pass null to ignore it), which supplies bos/eos, add_bos_token/add_eos_token and
 * additional special tokens. A `generation_config.json` beside it adds its eos_token_id(s) to eosIds.
 */
export function loadTokenizerJson(tokenizerJsonPath: string, tokenizerConfigPath?: string | null): Tokenizer {
  const json = readJsonFile(tokenizerJsonPath, "tokenizer.json");
  if (!isObject(json) || !isObject(json.model)) {
    throw new ModelFileError(tokenizerJsonPath, "not a tokenizer.json (no \"model\" object)");
  }
  if (json.added_tokens !== undefined && !Array.isArray(json.added_tokens)) {
    throw new ModelFileError(tokenizerJsonPath, "malformed tokenizer.json: \"added_tokens\" is not a list");
  }
  // The library iterates added_tokens unconditionally; older files may omit it.
  json.added_tokens ??= [];
  const dir = nodePath.dirname(tokenizerJsonPath);
  let configPath = tokenizerConfigPath;
  if (configPath === undefined) {
    const sibling = nodePath.join(dir, "tokenizer_config.json");
    configPath = fs.existsSync(sibling) ? sibling : null;
  }
  let config: Record<string, unknown> = {};
  if (configPath !== null) {
    const c = readJsonFile(configPath, "tokenizer_config.json");
    if (!isObject(c)) throw new ModelFileError(configPath, "malformed tokenizer_config.json: not a JSON object");
    config = c;
  }
  const lib = makeLib(json, config, tokenizerJsonPath);
  const idOf = (v: unknown): number | undefined => {
    const s = tokenContent(v);
    return s === undefined ? undefined : lib.token_to_id(s);
  };

  // Which ids the tokenizer.json post-processor wraps around a sequence: encode a probe with and
  // without special tokens and see what was added before and after it. All HF post-processors
  // (TemplateProcessing, Bert/Roberta, Sequence of those) add a fixed prefix and suffix.
  const probe = "a";
  const core = lib.encode(probe, { add_special_tokens: false }).ids;
  const full = lib.encode(probe, { add_special_tokens: true }).ids;
  let at = -1;
  for (let i = 0; i + core.length <= full.length && at < 0; i++) {
    if (core.every((id, j) => full[i + j] === id)) at = i;
  }
  const defined = (xs: (number | undefined)[]) => xs.filter((x): x is number => x !== undefined);
  let prefix = at >= 0 ? defined(full.slice(0, at)) : [];
  let suffix = at >= 0 ? defined(full.slice(at + core.length)) : [];

  const bos = idOf(config.bos_token) ?? (prefix.length > 0 ? prefix[0] : undefined);
  const eos = idOf(config.eos_token) ?? (suffix.length > 0 ? suffix[suffix.length - 1] : undefined);
  // An explicit add_bos_token / add_eos_token in tokenizer_config.json overrides the post-processor,
  // as transformers' Llama/Gemma fast tokenizers do (update_post_processor).
  if (typeof config.add_bos_token === "boolean" && bos !== undefined) {
    prefix = prefix.filter((id) => id !== bos);
    if (config.add_bos_token) prefix = [bos, ...prefix];
  }
  if (typeof config.add_eos_token === "boolean" && eos !== undefined) {
    suffix = suffix.filter((id) => id !== eos);
    if (config.add_eos_token) suffix = [...suffix, eos];
  }

  const genIds: number[] = [];
  const genPath = nodePath.join(dir, "generation_config.json");
  if (fs.existsSync(genPath)) {
    const g = readJsonFile(genPath, "generation_config.json");
    const e = isObject(g) ? g.eos_token_id : undefined;
    for (const v of Array.isArray(e) ? e : [e]) if (typeof v === "number" && Number.isInteger(v)) genIds.push(v);
  }
  const turnEnds: number[] = [];
  for (const t of lib.get_added_tokens_decoder().values()) {
    if (t.special && END_OF_TURN_TEXTS.has(t.content)) turnEnds.push(t.id);
  }
  return new LibTokenizer(lib, { kind: "tokenizer.json", prefix, suffix, bos, eos, eosIds: uniq([eos, ...genIds, ...turnEnds]) });
}

// ------------------------------------------------------------------ GGUF-embedded vocabularies

/** llama.cpp token types (llama_token_type / gguf-py TokenType). */
const enum TokType {
  NORMAL = 1,
  UNKNOWN = 2,
  CONTROL = 3,
  USER_DEFINED = 4,
  UNUSED = 5,
  BYTE = 6,
}

/** Pre-tokenizer split regexes by `tokenizer.ggml.pre`, copied from the models' tokenizer.json
 * (the same patterns llama.cpp lists in llama-vocab.cpp). */
const LLAMA3_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

interface BpePre {
  normalizer: Json;
  preTokenizer: Json;
  ignoreMerges: boolean;
  /** llama.cpp's default for add_bos when the GGUF has no tokenizer.ggml.add_bos_token. */
  addBos: boolean;
}

function bytePreTokenizer(split: string): Json {
  return {
    type: "Sequence",
    pretokenizers: [
      { type: "Split", pattern: { Regex: split }, behavior: "Isolated", invert: false },
      { type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: false },
    ],
  };
}

function bpePreFor(pre: string): BpePre | undefined {
  switch (pre) {
    case "default": // old GGUFs without a pre type: GPT-2's own regex is the sensible reading
    case "gpt-2":
      return { normalizer: null, preTokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true }, ignoreMerges: false, addBos: false };
    case "llama3":
    case "llama-v3":
    case "llama-bpe":
      // Llama 3's tokenizer.json sets ignore_merges: whole pre-tokens found in the vocab are kept.
      return { normalizer: null, preTokenizer: bytePreTokenizer(LLAMA3_SPLIT), ignoreMerges: true, addBos: true };
    case "qwen2":
    case "deepseek-r1-qwen":
      // Qwen's tokenizer.json normalizes to NFC before splitting.
      return { normalizer: { type: "NFC" }, preTokenizer: bytePreTokenizer(QWEN2_SPLIT), ignoreMerges: false, addBos: false };
    default:
      return undefined;
  }
}

function strings(file: GgufFile, key: string, required: boolean): string[] | undefined {
  const v = file.metadata.get(key);
  if (v === undefined) {
    if (required) throw new ModelFileError(file.path, `missing metadata key ${key}`, "use a GGUF that embeds its tokenizer");
    return undefined;
  }
  if (!Array.isArray(v) || !v.every((x): x is string => typeof x === "string")) {
    throw new ModelFileError(file.path, `metadata key ${key} should be an array of strings`);
  }
  return v;
}

function numbers(file: GgufFile, key: string, n: number): number[] | undefined {
  const v = file.metadata.get(key);
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || v.length !== n || !v.every((x): x is number => typeof x === "number")) {
    throw new ModelFileError(file.path, `metadata key ${key} should be an array of ${n} numbers`);
  }
  return v;
}

function optId(file: GgufFile, key: string, n: number): number | undefined {
  const v = ggufOpt<GgufValue>(file, key);
  const id = typeof v === "bigint" ? Number(v) : v;
  // Converters write 0xFFFFFFFF (or -1) for "none".
  return typeof id === "number" && Number.isInteger(id) && id >= 0 && id < n ? id : undefined;
}

function optBool(file: GgufFile, key: string): boolean | undefined {
  const v = ggufOpt<GgufValue>(file, key);
  return typeof v === "boolean" ? v : undefined;
}

const isHighSurrogate = (c: number) => c >= 0xd800 && c <= 0xdbff;

/**
 * SentencePiece merges from a vocabulary with scores, as transformers' SentencePieceExtractor
 * derives them for Llama/Gemma fast tokenizers: every split of a piece into two vocab pieces is a
 * merge, ranked by the merged piece's score (higher first, stable), ties within a piece by the
 * ids of the halves. BPE over these merges reproduces SentencePiece's score-driven bigram merging.
 */
function spmMerges(tokens: string[], scores: number[], ids: Map<string, number>): [string, string][] {
  const merges: { l: string; r: string; score: number }[] = [];
  tokens.forEach((piece, i) => {
    if (ids.get(piece) !== i) return; // duplicate piece text: only its first id is reachable
    // Split points between code points (not inside a surrogate pair), as string offsets: slicing
    // the piece itself allocates only the halves (an array of its characters per split was most
    // of a 128k-piece vocabulary's load-time garbage).
    const local: { l: string; r: string; li: number; ri: number }[] = [];
    for (let k = 1; k < piece.length; k++) {
      const c = piece.charCodeAt(k);
      if (c >= 0xdc00 && c <= 0xdfff && isHighSurrogate(piece.charCodeAt(k - 1))) continue;
      const l = piece.slice(0, k);
      const r = piece.slice(k);
      const li = ids.get(l);
      const ri = ids.get(r);
      if (li !== undefined && ri !== undefined) local.push({ l, r, li, ri });
    }
    local.sort((a, b) => a.li - b.li || a.ri - b.ri);
    for (const m of local) merges.push({ l: m.l, r: m.r, score: scores[i]! });
  });
  merges.sort((a, b) => b.score - a.score); // Array.prototype.sort is stable
  return merges.map((m) => [m.l, m.r]);
}

/** Build a tokenizer from the vocabulary embedded in a GGUF file (`tokenizer.ggml.*`). */
export function tokenizerFromGguf(file: GgufFile): Tokenizer {
  const modelV = file.metadata.get("tokenizer.ggml.model");
  if (typeof modelV !== "string") {
    throw new ModelFileError(file.path, "has no embedded tokenizer (tokenizer.ggml.model missing)", "pass the model's tokenizer.json instead");
  }
  const tokens = strings(file, "tokenizer.ggml.tokens", true)!;
  const n = tokens.length;
  if (n === 0) throw new ModelFileError(file.path, "tokenizer.ggml.tokens is empty");
  const types = numbers(file, "tokenizer.ggml.token_type", n) ?? new Array<number>(n).fill(TokType.NORMAL);

  // First occurrence wins for duplicate texts; a null-prototype object keeps texts like
  // "__proto__" as ordinary keys.
  const ids = new Map<string, number>();
  tokens.forEach((t, i) => { if (!ids.has(t)) ids.set(t, i); });
  const vocab: Record<string, number> = Object.create(null) as Record<string, number>;
  for (const [t, i] of ids) vocab[t] = i;

  // Control and unknown tokens are special (split out of raw text, dropped by skipSpecial);
  // user-defined tokens are split out of raw text but are ordinary text. This mirrors how HF
  // converters register them as added tokens and how llama.cpp's tokenizer treats them.
  const added: AddedTokenJson[] = [];
  tokens.forEach((content, id) => {
    const t = types[id];
    if (ids.get(content) !== id) return;
    if (t === TokType.CONTROL || t === TokType.UNKNOWN || t === TokType.USER_DEFINED) {
      added.push({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: t !== TokType.USER_DEFINED });
    }
  });

  const bos = optId(file, "tokenizer.ggml.bos_token_id", n);
  const eos = optId(file, "tokenizer.ggml.eos_token_id", n);
  const unk = optId(file, "tokenizer.ggml.unknown_token_id", n);
  let kind: string;
  let json: JsonObject;
  let addBos: boolean;

  if (modelV === "llama") {
    kind = "gguf-spm";
    const scores = numbers(file, "tokenizer.ggml.scores", n);
    if (!scores) throw new ModelFileError(file.path, "SentencePiece vocabulary without tokenizer.ggml.scores");
    // SentencePiece marks word starts with U+2581 and, for Llama-family vocabs, treats the text as
    // if it began with a space (add_dummy_prefix), after every special token too.
    const spacePrefix = optBool(file, "tokenizer.ggml.add_space_prefix") ?? true;
    const replace = { type: "Replace", pattern: { String: " " }, content: "\u2581" };
    const decoders: Json[] = [
      { type: "Replace", pattern: { String: "\u2581" }, content: " " },
      { type: "ByteFallback" },
      { type: "Fuse" },
    ];
    if (spacePrefix) decoders.push({ type: "Strip", content: " ", start: 1, stop: 0 });
    json = {
      normalizer: spacePrefix ? { type: "Sequence", normalizers: [{ type: "Prepend", prepend: "\u2581" }, replace] } : replace,
      pre_tokenizer: null,
      model: {
        type: "BPE",
        dropout: null,
        unk_token: unk !== undefined ? tokens[unk]! : null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: true,
        byte_fallback: true,
        ignore_merges: false,
        vocab,
        merges: spmMerges(tokens, scores, ids),
      },
      decoder: { type: "Sequence", decoders },
    };
    addBos = optBool(file, "tokenizer.ggml.add_bos_token") ?? true;
  } else if (modelV === "gpt2") {
    kind = "gguf-bpe";
    const preName = ggufOpt<GgufValue>(file, "tokenizer.ggml.pre") ?? "default";
    const pre = typeof preName === "string" ? bpePreFor(preName) : undefined;
    if (!pre) {
      throw new ModelFileError(
        file.path,
        `tokenizer.ggml.pre = ${JSON.stringify(preName)} is a pre-tokenizer selfscope does not implement (supported: default, gpt-2, llama-bpe, qwen2)`,
        "pass the model's tokenizer.json instead",
      );
    }
    const merges: [string, string][] = (strings(file, "tokenizer.ggml.merges", true) ?? []).map((m, i) => {
      const parts = m.split(" ");
      if (parts.length !== 2) throw new ModelFileError(file.path, `tokenizer.ggml.merges[${i}] = ${JSON.stringify(m)} is not "left right"`);
      return [parts[0]!, parts[1]!];
    });
    json = {
      normalizer: pre.normalizer,
      pre_tokenizer: pre.preTokenizer,
      model: {
        type: "BPE",
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: pre.ignoreMerges,
        vocab,
        merges,
      },
      decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    };
    addBos = optBool(file, "tokenizer.ggml.add_bos_token") ?? pre.addBos;
  } else {
    throw new ModelFileError(
      file.path,
      `tokenizer.ggml.model = ${JSON.stringify(modelV)} is not supported (supported: llama, gpt2)`,
      "pass the model's tokenizer.json instead",
    );
  }
  json.version = "1.0";
  json.added_tokens = added;
  json.post_processor = null; // BOS/EOS are added by LibTokenizer from the GGUF flags below

  const addEos = optBool(file, "tokenizer.ggml.add_eos_token") ?? false;
  const eot = optId(file, "tokenizer.ggml.eot_token_id", n);
  const eom = optId(file, "tokenizer.ggml.eom_token_id", n);
  const turnEnds = added.filter((t) => t.special && END_OF_TURN_TEXTS.has(t.content)).map((t) => t.id);
  const lib = makeLib(json, {}, file.path);
  return new LibTokenizer(lib, {
    kind,
    prefix: addBos && bos !== undefined ? [bos] : [],
    suffix: addEos && eos !== undefined ? [eos] : [],
    bos,
    eos,
    eosIds: uniq([eos, eot, eom, ...turnEnds]),
  });
}

/**
 * A tokenizer must fit the model's embedding: an id ≥ dVocab would load and then fail (or read
 * another row) mid-generation. A smaller tokenizer is normal (embeddings are often padded).
 */
export function checkTokenizerFits(tok: Tokenizer, dVocab: number, where: { tokenizerFile: string; tokenizerKey: string; modelKey: string }): void {
  if (tok.vocabSize <= dVocab) return;
  throw new ModelFileError(
    where.tokenizerFile,
    `${where.tokenizerKey} has token ids up to ${tok.vocabSize - 1}, but the model's embedding has ${dVocab} rows (${where.modelKey} = ${dVocab})`,
    "use the tokenizer that came with these weights",
  );
}
