// Module resolution for check.mjs: the vendored CRD packages resolve to crds/ in this directory,
// every other package to the `npm ci` install (target/k8s-schemas/node_modules).
import path from "node:path";
import { pathToFileURL } from "node:url";
import { VENDORED } from "./kinds.mjs";

const crds = path.join(path.dirname(new URL(import.meta.url).pathname), "crds");
let runtimeParent;

export function initialize({ runtime }) {
  runtimeParent = pathToFileURL(path.join(runtime, "resolve-from-here.js")).href;
}

export async function resolve(specifier, context, next) {
  const bare = !/^(\.|\/|node:|file:|data:)/.test(specifier);
  if (!bare) return next(specifier, context);
  const vendored = Object.keys(VENDORED).find((p) => specifier.startsWith(p + "/"));
  if (vendored) {
    const file = specifier.endsWith(".js") ? specifier : specifier + ".js";
    return { url: pathToFileURL(path.join(crds, file)).href, shortCircuit: true };
  }
  return next(specifier, { ...context, parentURL: runtimeParent });
}
