// A `define` for one call: the msgpack codec's UMD build, imported as a module (./msgpack.js), has
// no `this` to hang its exports on, so it takes its AMD branch and hands them to this function,
// which then removes itself from the page. Evaluated just before that build (import order).
export let codec = null;

function define(deps, factory) {
  if (globalThis.define === define) delete globalThis.define;
  codec = factory();
}
define.amd = true;
globalThis.define = define;
