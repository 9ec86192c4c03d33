// Trains a small TensorFlow.js model through asgd-serve: the optimizer's steps are torch.optim.ASGD
// steps, applied and kept by the service. Start the service (`npm start` at the repository root), then
// run it with Node 24 (it imports the TypeScript sources; Node 20 cannot run .ts files):
//
//   node_modules/.bin/node clients/typescript/examples/train.ts   # from the repository root, after npm ci there
//   npm run example                                               # or in clients/typescript
//
// ASGD_URL=http://127.0.0.1:8080 by default.
// Run it twice, or on two machines at once: every run joins the same session and continues its training.
// Environment: ASGD_URL, ASGD_TOKEN (when the service has ASGD_ADMIN_TOKEN), ASGD_SESSION, EPOCHS.
import * as tf from '@tensorflow/tfjs';
import { ASGDClient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';

const url = process.env.ASGD_URL ?? 'http://127.0.0.1:8080';
const session = process.env.ASGD_SESSION ?? 'tfjs-example';
const epochs = Number(process.env.EPOCHS ?? 20);

// y = 0.7 x0 - 1.3 x1 + 0.4 x2 x3 + 0.2, on 256 points.
const xs = tf.randomUniform([256, 4], -1, 1, 'float32', 1);
const [x0, x1, x2, x3] = tf.split(xs, 4, 1);
const ys = x0.mul(0.7).sub(x1.mul(1.3)).add(x2.mul(x3).mul(0.4)).add(0.2);

const model = tf.sequential({
  layers: [
    tf.layers.dense({ units: 16, activation: 'tanh', inputShape: [4], name: 'hidden' }),
    tf.layers.dense({ units: 1, name: 'out' }),
  ],
});

const client = new ASGDClient(url, { token: process.env.ASGD_TOKEN });
const optimizer = new RemoteASGD({ client, session, hyperparameters: { lr: 0.05, t0: 200 } });
// Names of our own choosing, so that every run agrees on them. (A PyTorch worker on this session would also
// need tfjs's layout: a Dense kernel is [in, out], an nn.Linear weight [out, in]; see the README.)
const joined = await optimizer.attach(model.trainableWeights, ['hidden.weight', 'hidden.bias', 'out.weight', 'out.bias']);
console.log(`session ${session}: version ${joined.version}, step ${joined.step}`);

model.compile({ optimizer, loss: 'meanSquaredError' });
await model.fit(xs, ys, {
  epochs,
  batchSize: 32,
  verbose: 0,
  callbacks: [
    optimizer.callback,
    { onEpochEnd: async (epoch: number, logs?: tf.Logs) => console.log(`epoch ${epoch + 1}/${epochs}: loss ${logs?.loss.toFixed(5)} (version ${optimizer.version})`) },
  ],
});

// ASGD's averaged parameters are what one evaluates with: read them, load them into the model.
const averaged = await client.params(session, { averaged: true });
const names = ['hidden.weight', 'hidden.bias', 'out.weight', 'out.bias'];
model.setWeights(names.map((n) => tf.tensor(averaged.params[n].data, averaged.params[n].shape)));
const loss = (model.evaluate(xs, ys) as tf.Scalar).dataSync()[0];
console.log(`averaged parameters at version ${averaged.version}: loss ${loss.toFixed(5)}`);
