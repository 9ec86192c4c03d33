// asgd-client: a typed client for asgd-serve (torch.optim.ASGD as a service). No dependencies beyond
// the platform (fetch, Web Crypto, TextEncoder): the built dist/ runs on Node >= 20 and in browsers.
export { ASGDClient, type ChangeOptions } from './client.ts';
export * from './errors.ts';
export { Transport, consoleLogger, newIdempotencyKey, type ClientLogger, type TransportOptions } from './http.ts';
export { decodeSafetensors, encodeSafetensors, float32ToFloat16Bits, float32ToBfloat16Bits, float16BitsToFloat32, bfloat16BitsToFloat32, type DType, type SafetensorsFile } from './safetensors.ts';
export { fromJsonData, toJsonData, numelOf, type Tensor, type TensorInput, type TensorLike } from './tensors.ts';
export type * from './types.ts';
