// Planted-circuit fixtures: an F32 GGUF copied with some tensors edited in place.
import { GgmlType, GgufValueType, readGguf, readGgufTensor, writeGguf, type GgufWriteTensor, type GgufWriteValue } from "../../src/io/gguf.js";

/** A copy of an F32 GGUF with some tensors edited (same metadata). */
export function rewriteGguf(src: string, out: string, edit: (name: string, data: Float32Array, shape: number[]) => void): void {
  const g = readGguf(src);
  const meta: Record<string, GgufWriteValue> = {};
  for (const [k, v] of g.metadata) {
    if (Array.isArray(v)) {
      const t = k.endsWith("scores") ? GgufValueType.FLOAT32 : k.endsWith("token_type") ? GgufValueType.INT32 : GgufValueType.STRING;
      meta[k] = { type: GgufValueType.ARRAY, itemType: t, value: v as (string | number)[] };
    } else if (typeof v === "string") meta[k] = { type: GgufValueType.STRING, value: v };
    else if (typeof v === "boolean") meta[k] = { type: GgufValueType.BOOL, value: v };
    else meta[k] = { type: Number.isInteger(v) && !k.endsWith("epsilon") ? GgufValueType.UINT32 : GgufValueType.FLOAT32, value: Number(v) };
  }
  const tensors: GgufWriteTensor[] = [];
  for (const [name] of g.tensors) {
    const t = readGgufTensor(g, name);
    edit(name, t.data, t.shape);
    tensors.push({ name, shape: t.shape, type: GgmlType.F32, data: t.data });
  }
  writeGguf(out, meta, tensors);
}
