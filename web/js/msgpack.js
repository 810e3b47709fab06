// The msgpack codec (@msgpack/msgpack, pinned in package-lock.json): the package's own minified
// build, dist.umd/msgpack.min.js (22 KB, one request), rather than its unminified ES modules
// (dist.esm: 56 KB in eleven requests) — a cheap phone on a mobile link loads the room sooner.
// That build is UMD, not an ES module; ./msgpack-define.js catches what it exports.
import { codec } from './msgpack-define.js';
import '/vendor/@msgpack/msgpack/dist.umd/msgpack.min.js';

if (!codec?.Encoder || !codec?.Decoder) throw new Error('the msgpack codec did not load');

export const { Encoder, Decoder } = codec;
