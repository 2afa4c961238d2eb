// Planted-circuit fixtures: an F32 GGUF copied with some tensors edited in place.
import { GgmlType, ggufMetadataForWrite, readGguf, readGgufTensor, writeGguf, type GgufWriteTensor } from "../../src/io/gguf.js";

/** A copy of an F32 GGUF with some tensors edited (same metadata). */
export function rewriteGguf(src: string, out: string, edit: (name: string, data: Float32Array, shape: number[]) => void): void {
  const g = readGguf(src);
  const tensors: GgufWriteTensor[] = [];
  for (const [name] of g.tensors) {
    const t = readGgufTensor(g, name);
    edit(name, t.data, t.shape);
    tensors.push({ name, shape: t.shape, type: GgmlType.F32, data: t.data });
  }
  writeGguf(out, ggufMetadataForWrite(g), tensors);
}
