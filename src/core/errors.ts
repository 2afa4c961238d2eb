// Typed errors. Every message says which file (or input) is at fault and what to do about it;
// the CLI prints `message` alone (no stack) unless SELFSCOPE_DEBUG is set.

export class SelfscopeError extends Error {
  override name = "SelfscopeError";
}

/** A model, tokenizer or config file that cannot be read as what it claims to be. */
export class ModelFileError extends SelfscopeError {
  override name = "ModelFileError";
  constructor(
    readonly file: string,
    problem: string,
    fix = "check that the file is complete and not corrupted (re-download it)",
  ) {
    super(`${file}: ${problem}; ${fix}`);
  }
}

/** A checkpoint whose tensors do not match what its config declares. */
export class WeightShapeError extends ModelFileError {
  override name = "WeightShapeError";
}

/** A model whose architecture selfscope does not implement. */
export class UnsupportedArchitectureError extends ModelFileError {
  override name = "UnsupportedArchitectureError";
}

/** Bad arguments from a caller (wrong shapes, unknown hook names, ...). */
export class UsageError extends SelfscopeError {
  override name = "UsageError";
}

/** NaN or Inf found where finite numbers were required. */
export class NumericalError extends SelfscopeError {
  override name = "NumericalError";
}
