// A tiny WebAssembly binary emitter: one module importing `env.memory`, functions with
// i32/f32/v128 locals, structured control flow, i32 and f32 scalar ops, the SIMD ops the
// kernels in kernels.ts need (including relaxed_madd), and function exports. Instructions are
// appended in stack order, exactly as in the text format, e.g.
//   f.get(a); f.get(b); f.i32Add(); f.set(c);     // c = a + b
// Reference: https://webassembly.github.io/spec/core/binary/ and the SIMD / relaxed-SIMD
// proposals (opcodes after the 0xfd prefix are LEB128 u32).

export const I32 = 0x7f;
export const F32 = 0x7d;
export const V128 = 0x7b;
export type ValType = typeof I32 | typeof F32 | typeof V128;

/** Block type of a block/loop/if with no parameters and no results. */
const EMPTY = 0x40;

export function uleb(out: number[], v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new Error(`uleb: ${v} is not a u32`);
  do {
    let b = v & 0x7f;
    v = Math.floor(v / 128);
    if (v) b |= 0x80;
    out.push(b);
  } while (v);
}

export function sleb(out: number[], v: number): void {
  if (!Number.isInteger(v) || v < -0x80000000 || v > 0xffffffff) throw new Error(`sleb: ${v} is not an i32`);
  v |= 0; // i32 constants are signed; 0x80000000..0xffffffff wrap to negatives
  for (;;) {
    const b = v & 0x7f;
    v >>= 7;
    if ((v === 0 && (b & 0x40) === 0) || (v === -1 && (b & 0x40) !== 0)) {
      out.push(b);
      return;
    }
    out.push(b | 0x80);
  }
}

function name(out: number[], s: string): void {
  const bytes = new TextEncoder().encode(s);
  uleb(out, bytes.length);
  for (const b of bytes) out.push(b);
}

/** Natural alignment exponents for memargs (an alignment hint only; misaligned access is legal). */
const ALIGN = { i32: 2, f32: 2, v128: 4 } as const;

export class Fn {
  readonly code: number[] = [];
  private readonly locals: ValType[] = [];
  private depth = 0;

  constructor(
    readonly index: number,
    readonly name: string,
    readonly params: readonly ValType[],
    readonly results: readonly ValType[],
    readonly exported: boolean,
  ) {}

  /** Index of parameter i. */
  param(i: number): number {
    if (i < 0 || i >= this.params.length) throw new Error(`${this.name}: no parameter ${i}`);
    return i;
  }

  /** Declares a new local of type t (zero-initialised on every call) and returns its index. */
  local(t: ValType): number {
    this.locals.push(t);
    return this.params.length + this.locals.length - 1;
  }

  private op(...bytes: number[]): this {
    for (const b of bytes) this.code.push(b);
    return this;
  }
  private simd(opcode: number): this {
    this.code.push(0xfd);
    uleb(this.code, opcode);
    return this;
  }
  private memarg(align: number, offset: number): this {
    uleb(this.code, align);
    uleb(this.code, offset);
    return this;
  }

  // --- control ---------------------------------------------------------------------------
  /** `block ... end`; a `br 0` inside jumps past the end. */
  block(body: () => void): this {
    this.op(0x02, EMPTY);
    this.depth++;
    body();
    this.depth--;
    return this.op(0x0b);
  }
  /** `loop ... end`; a `br 0` inside jumps back to the start. */
  loop(body: () => void): this {
    this.op(0x03, EMPTY);
    this.depth++;
    body();
    this.depth--;
    return this.op(0x0b);
  }
  /** Pops an i32 condition: `if then (else otherwise) end`. */
  if(then: () => void, otherwise?: () => void): this {
    this.op(0x04, EMPTY);
    this.depth++;
    then();
    if (otherwise) {
      this.op(0x05);
      otherwise();
    }
    this.depth--;
    return this.op(0x0b);
  }
  br(label: number): this {
    this.op(0x0c);
    uleb(this.code, label);
    return this;
  }
  brIf(label: number): this {
    this.op(0x0d);
    uleb(this.code, label);
    return this;
  }
  return(): this {
    return this.op(0x0f);
  }
  call(f: Fn): this {
    this.op(0x10);
    uleb(this.code, f.index);
    return this;
  }
  drop(): this {
    return this.op(0x1a);
  }

  // --- locals ----------------------------------------------------------------------------
  get(l: number): this {
    this.op(0x20);
    uleb(this.code, l);
    return this;
  }
  set(l: number): this {
    this.op(0x21);
    uleb(this.code, l);
    return this;
  }
  tee(l: number): this {
    this.op(0x22);
    uleb(this.code, l);
    return this;
  }

  // --- i32 -------------------------------------------------------------------------------
  i32Const(v: number): this {
    this.op(0x41);
    sleb(this.code, v);
    return this;
  }
  i32Load(offset = 0): this {
    return this.op(0x28).memarg(ALIGN.i32, offset);
  }
  i32Load8S(offset = 0): this {
    return this.op(0x2c).memarg(0, offset);
  }
  i32Load8U(offset = 0): this {
    return this.op(0x2d).memarg(0, offset);
  }
  i32Load16U(offset = 0): this {
    return this.op(0x2f).memarg(1, offset);
  }
  i32Store(offset = 0): this {
    return this.op(0x36).memarg(ALIGN.i32, offset);
  }
  /** i32.store8: the low 8 bits. */
  i32Store8(offset = 0): this {
    return this.op(0x3a).memarg(0, offset);
  }
  /** i32.store16: the low 16 bits. */
  i32Store16(offset = 0): this {
    return this.op(0x3b).memarg(1, offset);
  }
  i32Eqz(): this { return this.op(0x45); }
  i32Eq(): this { return this.op(0x46); }
  i32Ne(): this { return this.op(0x47); }
  i32LtS(): this { return this.op(0x48); }
  i32LtU(): this { return this.op(0x49); }
  i32GtS(): this { return this.op(0x4a); }
  i32GtU(): this { return this.op(0x4b); }
  i32LeS(): this { return this.op(0x4c); }
  i32LeU(): this { return this.op(0x4d); }
  i32GeS(): this { return this.op(0x4e); }
  i32GeU(): this { return this.op(0x4f); }
  i32Add(): this { return this.op(0x6a); }
  i32Sub(): this { return this.op(0x6b); }
  i32Mul(): this { return this.op(0x6c); }
  i32DivU(): this { return this.op(0x6e); }
  i32And(): this { return this.op(0x71); }
  i32Or(): this { return this.op(0x72); }
  i32Shl(): this { return this.op(0x74); }
  i32ShrU(): this { return this.op(0x76); }

  // --- f32 -------------------------------------------------------------------------------
  f32Const(v: number): this {
    this.op(0x43);
    const b = new Uint8Array(new Float32Array([v]).buffer);
    return this.op(...b);
  }
  f32Load(offset = 0): this {
    return this.op(0x2a).memarg(ALIGN.f32, offset);
  }
  f32Store(offset = 0): this {
    return this.op(0x38).memarg(ALIGN.f32, offset);
  }
  f32Add(): this { return this.op(0x92); }
  f32ReinterpretI32(): this { return this.op(0xbe); }
  i32ReinterpretF32(): this { return this.op(0xbc); }
  f32Div(): this { return this.op(0x95); }
  f32ConvertI32U(): this { return this.op(0xb3); }
  f32ConvertI32S(): this { return this.op(0xb2); }
  f32Sqrt(): this { return this.op(0x91); }
  f32Max(): this { return this.op(0x97); }
  f32Gt(): this { return this.op(0x5e); }
  f32Lt(): this { return this.op(0x5d); }
  /** Round to nearest, ties to even. */
  f32Nearest(): this { return this.op(0x90); }
  f32Neg(): this { return this.op(0x8c); }
  f32Sub(): this { return this.op(0x93); }
  f32Mul(): this { return this.op(0x94); }

  // --- v128 ------------------------------------------------------------------------------
  v128Load(offset = 0): this {
    return this.simd(0x00).memarg(ALIGN.v128, offset);
  }
  v128Store(offset = 0): this {
    return this.simd(0x0b).memarg(ALIGN.v128, offset);
  }
  /** v128.const of four f32 lanes. */
  v128ConstF32(a: number, b = a, c = a, d = a): this {
    this.simd(0x0c);
    return this.op(...new Uint8Array(new Float32Array([a, b, c, d]).buffer));
  }
  /** v128.load32_zero: lane 0 from memory, lanes 1..3 zero. */
  v128Load32Zero(offset = 0): this {
    return this.simd(0x5c).memarg(2, offset);
  }
  /** v128.load64_zero: lanes 0..1 from memory, lanes 2..3 zero. */
  v128Load64Zero(offset = 0): this {
    return this.simd(0x5d).memarg(3, offset);
  }
  /** v128.load8x8_u / _s: eight bytes widened to i16x8 lanes. */
  v128Load8x8U(offset = 0): this {
    return this.simd(0x02).memarg(3, offset);
  }
  v128Load8x8S(offset = 0): this {
    return this.simd(0x01).memarg(3, offset);
  }
  /** Stack: [v, v] -> i32x4 lane `lane` of v in all four lanes (one pshufd on x64, where a 16-bit splat takes two). */
  splatLane32(lane: number): this {
    return this.shuffle8(Array.from({ length: 16 }, (_, b) => 4 * lane + (b & 3)));
  }
  /** Stack: [v, v] -> i16x8 lanes 4·half .. 4·half+3 of v, each twice (as i32 lanes: for splatLane32). */
  pairLanes16(half: number): this {
    return this.shuffle8(Array.from({ length: 16 }, (_, b) => 2 * (4 * half + (b >> 2)) + (b & 1)));
  }
  /** i8x16.shuffle of the two vectors on the stack with sixteen byte indices (0..15 the first, 16..31 the second). */
  shuffle8(lanes: number[]): this {
    if (lanes.length !== 16) throw new Error("shuffle8: 16 lane indices");
    this.simd(0x0d);
    for (const l of lanes) this.code.push(l);
    return this;
  }
  /** Stack: [addr, vec] -> vec with 32-bit lane `lane` replaced from memory. */
  v128Load32Lane(lane: number, offset = 0): this {
    this.simd(0x56).memarg(2, offset);
    return this.op(lane);
  }
  /** i8x16.shuffle with four f32 lane indices (0..3 from the first operand, 4..7 from the second). */
  shuffle32(l0: number, l1: number, l2: number, l3: number): this {
    this.simd(0x0d);
    for (const l of [l0, l1, l2, l3]) for (let b = 0; b < 4; b++) this.code.push(l * 4 + b);
    return this;
  }
  f32x4Splat(): this { return this.simd(0x13); }
  f32x4ExtractLane(lane: number): this {
    this.simd(0x1f);
    return this.op(lane);
  }
  f32x4Add(): this { return this.simd(0xe4); }
  f32x4Sub(): this { return this.simd(0xe5); }
  f32x4Mul(): this { return this.simd(0xe6); }
  f32x4Div(): this { return this.simd(0xe7); }
  f32x4Lt(): this { return this.simd(0x43); }
  /** v128.andnot: a & ~b. */
  v128AndNot(): this { return this.simd(0x4f); }
  f32x4Min(): this { return this.simd(0xe8); }
  f32x4Max(): this { return this.simd(0xe9); }
  f32x4Nearest(): this { return this.simd(0x6a); }
  i32x4TruncSatF32x4S(): this { return this.simd(0xf8); }
  i32x4Add(): this { return this.simd(0xae); }
  /** Stack: [vec, i32 shift] -> each i32 lane shifted left. */
  i32x4Shl(): this { return this.simd(0xab); }
  /** v128.const of four i32 lanes. */
  v128ConstI32(a: number, b = a, c = a, d = a): this {
    this.simd(0x0c);
    return this.op(...new Uint8Array(new Int32Array([a, b, c, d]).buffer));
  }
  /** Relaxed SIMD: stack [a, b, c] -> a*b + c, fused or not (implementation-defined). */
  f32x4RelaxedMadd(): this { return this.simd(0x105); }
  // Integer widening and conversion (the quantized kernels' dequantization).
  i16x8ExtendLowI8x16S(): this { return this.simd(0x87); }
  i16x8ExtendHighI8x16S(): this { return this.simd(0x88); }
  i32x4ExtendLowI16x8S(): this { return this.simd(0xa7); }
  i32x4ExtendHighI16x8S(): this { return this.simd(0xa8); }
  f32x4ConvertI32x4S(): this { return this.simd(0xfa); }
  i16x8ExtendLowI8x16U(): this { return this.simd(0x89); }
  i16x8ExtendHighI8x16U(): this { return this.simd(0x8a); }
  i32x4ExtendLowI16x8U(): this { return this.simd(0xa9); }
  i32x4ExtendHighI16x8U(): this { return this.simd(0xaa); }
  v128And(): this { return this.simd(0x4e); }
  /** i8x16.shr_u: the shift count (i32) on top of the vector. */
  i8x16ShrU(): this { return this.simd(0x6d); }
  /** i16x8.shl / shr_u: the shift count (i32) on top of the vector. */
  i16x8Shl(): this { return this.simd(0x8b); }
  i16x8ShrU(): this { return this.simd(0x8d); }
  v128Or(): this { return this.simd(0x50); }
  i8x16Sub(): this { return this.simd(0x71); }
  // Integer dot products (the int8-activation Q4_K rows) and activation quantization.
  /** i32x4.dot_i16x8_s: lane k = a[2k]·b[2k] + a[2k+1]·b[2k+1]. */
  i32x4DotI16x8S(): this { return this.simd(0xba); }
  i32x4Mul(): this { return this.simd(0xb5); }
  i32x4Splat(): this { return this.simd(0x11); }
  i16x8NarrowI32x4S(): this { return this.simd(0x85); }
  f32x4Abs(): this { return this.simd(0xe0); }
  // The relaxed integer dot (int8-activation rows when the engine has it; runtime.ts checks its result).
  i16x8Splat(): this { return this.simd(0x10); }
  i16x8Add(): this { return this.simd(0x8e); }
  i8x16NarrowI16x8S(): this { return this.simd(0x65); }
  /** i16x8.relaxed_dot_i8x16_i7x16_s: lane k = a[2k]·b[2k] + a[2k+1]·b[2k+1], a signed, b in 0..127. */
  i16x8RelaxedDotI8x16I7x16S(): this { return this.simd(0x112); }
  i32x4Sub(): this { return this.simd(0xb1); }
  i32x4ExtractLane(lane: number): this {
    this.simd(0x1b);
    return this.op(lane);
  }

  /** The function body: local declarations (run-length encoded), code, `end`. */
  body(): number[] {
    if (this.depth !== 0) throw new Error(`${this.name}: unbalanced blocks`);
    const out: number[] = [];
    const groups: [number, ValType][] = [];
    for (const t of this.locals) {
      const last = groups[groups.length - 1];
      if (last && last[1] === t) last[0]++;
      else groups.push([1, t]);
    }
    uleb(out, groups.length);
    for (const [n, t] of groups) {
      uleb(out, n);
      out.push(t);
    }
    for (const b of this.code) out.push(b);
    out.push(0x0b);
    return out;
  }
}

export interface MemoryImport {
  initialPages: number;
  maximumPages: number;
  shared: boolean;
}

export class ModuleBuilder {
  private readonly fns: Fn[] = [];

  constructor(private readonly memory: MemoryImport) {}

  /** Declares a function (its index is its declaration order). */
  func(name: string, params: readonly ValType[], results: readonly ValType[] = [], exported = false): Fn {
    const f = new Fn(this.fns.length, name, params, results, exported);
    this.fns.push(f);
    return f;
  }

  emit(): Uint8Array<ArrayBuffer> {
    const out: number[] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    const section = (id: number, body: number[]) => {
      out.push(id);
      uleb(out, body.length);
      for (const b of body) out.push(b);
    };

    // Types: one per distinct signature.
    const sigs: string[] = [];
    const sigOf = (f: Fn) => `${f.params.join(",")}:${f.results.join(",")}`;
    for (const f of this.fns) if (!sigs.includes(sigOf(f))) sigs.push(sigOf(f));
    const types: number[] = [];
    uleb(types, sigs.length);
    for (const s of sigs) {
      const f = this.fns.find((g) => sigOf(g) === s) as Fn;
      types.push(0x60);
      uleb(types, f.params.length);
      types.push(...f.params);
      uleb(types, f.results.length);
      types.push(...f.results);
    }
    section(1, types);

    const imports: number[] = [];
    uleb(imports, 1);
    name(imports, "env");
    name(imports, "memory");
    imports.push(0x02, this.memory.shared ? 0x03 : 0x01);
    uleb(imports, this.memory.initialPages);
    uleb(imports, this.memory.maximumPages);
    section(2, imports);

    const funcs: number[] = [];
    uleb(funcs, this.fns.length);
    for (const f of this.fns) uleb(funcs, sigs.indexOf(sigOf(f)));
    section(3, funcs);

    const exported = this.fns.filter((f) => f.exported);
    const exports: number[] = [];
    uleb(exports, exported.length);
    for (const f of exported) {
      name(exports, f.name);
      exports.push(0x00);
      uleb(exports, f.index);
    }
    section(7, exports);

    const code: number[] = [];
    uleb(code, this.fns.length);
    for (const f of this.fns) {
      const body = f.body();
      uleb(code, body.length);
      for (const b of body) code.push(b);
    }
    section(10, code);
    return new Uint8Array(out);
  }
}
