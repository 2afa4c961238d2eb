// Bounds-checked little-endian reader over a file's bytes. Every read checks the remaining
// length first, so a truncated or corrupt header raises a ModelFileError naming the file and
// offset instead of a RangeError (or a 2^60-byte allocation).
import { ModelFileError } from "../core/errors.js";

export class ByteReader {
  readonly view: DataView;
  /** The same bytes as a Buffer, whose toString decodes a range without a view or decoder object per string. */
  private readonly buf: Buffer;
  offset = 0;
  constructor(
    readonly bytes: Uint8Array,
    readonly file: string,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  need(n: number, what: string): void {
    if (!Number.isSafeInteger(n) || n < 0 || this.offset + n > this.bytes.byteLength) {
      throw new ModelFileError(
        this.file,
        `truncated or corrupt: ${what} needs ${n} bytes at offset ${this.offset} but the file has ${this.bytes.byteLength}`,
      );
    }
  }
  u8(): number {
    this.need(1, "u8");
    return this.view.getUint8(this.offset++);
  }
  i8(): number {
    this.need(1, "i8");
    return this.view.getInt8(this.offset++);
  }
  u16(): number {
    this.need(2, "u16");
    const v = this.view.getUint16(this.offset, true);
    this.offset += 2;
    return v;
  }
  i16(): number {
    this.need(2, "i16");
    const v = this.view.getInt16(this.offset, true);
    this.offset += 2;
    return v;
  }
  u32(): number {
    this.need(4, "u32");
    const v = this.view.getUint32(this.offset, true);
    this.offset += 4;
    return v;
  }
  i32(): number {
    this.need(4, "i32");
    const v = this.view.getInt32(this.offset, true);
    this.offset += 4;
    return v;
  }
  f32(): number {
    this.need(4, "f32");
    const v = this.view.getFloat32(this.offset, true);
    this.offset += 4;
    return v;
  }
  f64(): number {
    this.need(8, "f64");
    const v = this.view.getFloat64(this.offset, true);
    this.offset += 8;
    return v;
  }
  /** A u64 that must fit in a JS safe integer (counts, lengths, offsets). */
  u64(what: string): number {
    this.need(8, what);
    const v = this.view.getBigUint64(this.offset, true);
    this.offset += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ModelFileError(this.file, `corrupt header: ${what} is ${v}, larger than any real file`);
    }
    return Number(v);
  }
  i64(what: string): number {
    this.need(8, what);
    const v = this.view.getBigInt64(this.offset, true);
    this.offset += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new ModelFileError(this.file, `corrupt header: ${what} is ${v}, out of range`);
    }
    return Number(v);
  }
  /**
   * n bytes as UTF-8, invalid sequences replaced by U+FFFD as WHATWG's decoder does, and a leading
   * U+FEFF kept (it is part of the text: a vocabulary's token, say). A GGUF header holds ~10^5 to
   * 10^6 strings, so this allocates nothing but the string (a TextDecoder and a subarray per string
   * were most of a header's garbage).
   */
  utf8(n: number, what: string): string {
    this.need(n, what);
    const s = this.buf.toString("utf8", this.offset, this.offset + n);
    this.offset += n;
    return s;
  }
}

/** IEEE half -> float, exact. */
export function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

const F16_TABLE = (() => {
  const t = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = f16ToF32(i);
  return t;
})();

/** Widen packed little-endian f16 values to f32 (exact). */
export function f16BytesToF32(bytes: Uint8Array): Float32Array {
  const n = bytes.byteLength >> 1;
  const u16 = new Uint16Array(n);
  new Uint8Array(u16.buffer).set(bytes.subarray(0, n * 2));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = F16_TABLE[u16[i]!]!;
  return out;
}

/** Widen packed little-endian bf16 values to f32 (exact: bf16 is the top half of an f32). */
export function bf16BytesToF32(bytes: Uint8Array): Float32Array {
  const n = bytes.byteLength >> 1;
  const u16 = new Uint16Array(n);
  new Uint8Array(u16.buffer).set(bytes.subarray(0, n * 2));
  const u32 = new Uint32Array(n);
  for (let i = 0; i < n; i++) u32[i] = u16[i]! << 16;
  return new Float32Array(u32.buffer);
}

/** Copy f32 little-endian bytes into a fresh (aligned) Float32Array. */
export function f32BytesToF32(bytes: Uint8Array): Float32Array {
  const out = new Float32Array(bytes.byteLength >> 2);
  new Uint8Array(out.buffer).set(bytes.subarray(0, out.length * 4));
  return out;
}
