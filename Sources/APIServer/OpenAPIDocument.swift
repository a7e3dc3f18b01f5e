/// The OpenAPI 3.1 document served at `/openapi.json`, kept formatted in
/// `Resources/openapi.json` and embedded in the binary (one executable, no resource bundle to
/// find at run time): the Freestyle VMs document (seed 004) with Furcate's server, a default
/// error response on every operation and the NDJSON streams' type, plus the two InstaVM
/// operations its vendor documents with schemas (seeds 000, 001). Edit it when a route's shape
/// changes; `OpenAPIRouteTests` checks that its operations and the router's routes are the same.
enum OpenAPIDocument {
    static let json = String(decoding: PackageResources.openapi_json, as: UTF8.self)
}
