// Which schema validates which kind: "apiVersion kind" -> module (a package's _schemas/ file).
// The three CRD packages are vendored under crds/ (vendor.mjs); the core ones come from the
// kubernetes-models packages `npm ci` installs (package.json).
export const KINDS = {
  "gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy":
    "@kubernetes-models/envoy-gateway/_schemas/ComGithubEnvoyproxyGatewayApiV1alpha1EnvoyExtensionPolicy.js",
  "gateway.envoyproxy.io/v1alpha1 BackendTrafficPolicy":
    "@kubernetes-models/envoy-gateway/_schemas/ComGithubEnvoyproxyGatewayApiV1alpha1BackendTrafficPolicy.js",
  "gateway.envoyproxy.io/v1alpha1 EnvoyPatchPolicy":
    "@kubernetes-models/envoy-gateway/_schemas/ComGithubEnvoyproxyGatewayApiV1alpha1EnvoyPatchPolicy.js",
  "gateway.envoyproxy.io/v1alpha1 EnvoyProxy":
    "@kubernetes-models/envoy-gateway/_schemas/ComGithubEnvoyproxyGatewayApiV1alpha1EnvoyProxy.js",
  "gateway.networking.k8s.io/v1 Gateway":
    "@kubernetes-models/gateway-api/_schemas/IoK8sSigsGatewayApiApisV1Gateway.js",
  "gateway.networking.k8s.io/v1 HTTPRoute":
    "@kubernetes-models/gateway-api/_schemas/IoK8sSigsGatewayApiApisV1HTTPRoute.js",
  "extensions.istio.io/v1alpha1 WasmPlugin":
    "@kubernetes-models/istio/_schemas/ExtensionsIstioIoV1alpha1WasmPlugin.js",
  "networking.istio.io/v1alpha3 EnvoyFilter":
    "@kubernetes-models/istio/_schemas/NetworkingIstioIoV1alpha3EnvoyFilter.js",
  "v1 Namespace": "kubernetes-models/_schemas/IoK8sApiCoreV1Namespace",
  "v1 Service": "kubernetes-models/_schemas/IoK8sApiCoreV1Service",
  "v1 ConfigMap": "kubernetes-models/_schemas/IoK8sApiCoreV1ConfigMap",
  "apps/v1 Deployment": "kubernetes-models/_schemas/IoK8sApiAppsV1Deployment",
};

// The packages whose schemas are kept in this repository (crds/), with the version vendored.
export const VENDORED = {
  "@kubernetes-models/envoy-gateway": "2.0.0",
  "@kubernetes-models/gateway-api": "2.0.0",
  "@kubernetes-models/istio": "3.0.1",
};
