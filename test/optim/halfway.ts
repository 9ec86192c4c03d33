// Adversarial fma inputs: the double sum lands exactly on a float32 midpoint, the exact sum does not.
// They live in src/optim/fma-cases.ts, where the start-up FMA self-test uses them too.
export { halfwayTriples } from '../../src/optim/fma-cases.ts';
