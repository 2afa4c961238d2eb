// Types for the parts of nlopt-js (NLopt compiled to WebAssembly, MIT) that math/blackbox-worker.ts uses.
declare module "nlopt-js" {
  interface Optimize {
    setLowerBounds(x: number[]): void;
    setUpperBounds(x: number[]): void;
    setMaxObjective(f: (x: number[], grad: number[] | null) => number, tol: number): void;
    setMaxeval(n: number): void;
    optimize(x0: number[]): { success: boolean; x: number[]; value: number };
  }
  const nlopt: {
    ready: Promise<void>;
    Algorithm: Record<string, unknown>;
    Optimize: new (algorithm: unknown, n: number) => Optimize;
    GC: { flush(): void };
  };
  export default nlopt;
}
