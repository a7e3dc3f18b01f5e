import APIServer
import Accounts
import BlockStore
import Builds
import Foundation
import FurcateEngine
import FurcateTestSupport
import Images
import Testing
import VMService

/// The served OpenAPI document and the router describe the same API: every route is an
/// operation of the document, every operation has a route. (No VM runs: the router is built
/// over an engine whose services are never called.)
@Suite struct OpenAPIRouteTests {
    /// `GET /v1/vms/{}` for `GET /v1/vms/{vm_id}`: parameters compare by place, not name (the
    /// vendor's document names one `{id}` where the router says `{vm_id}`); a trailing `**` is
    /// the document's last path parameter.
    static func operation(_ method: String, _ parts: [Substring]) -> String {
        "\(method) /"
            + parts.map { $0 == "**" || ($0.hasPrefix("{") && $0.hasSuffix("}")) ? "{}" : String($0) }.joined(
                separator: "/")
    }

    @Test func everyRouteIsDocumentedAndEveryOperationRouted() async throws {
        let tmp = TempDir("openapi")
        let store = try BlockStore.create(at: tmp.sub("store"))
        defer { store.close() }
        let vms = try VMService(
            store: store,
            options: VMServiceOptions(
                dataDirectory: tmp.sub("vms"), mountpoint: tmp.sub("mnt"), guestDirectory: tmp.sub("guest")))
        let images = try ImageService(
            store: store, options: ImageServiceOptions(directory: tmp.sub("images"), agentPath: tmp.sub("agent")))
        let engine = Engine(
            vms: vms, images: images,
            builds: try BuildService(
                images: images, vms: vms, options: BuildServiceOptions(directory: tmp.sub("builds"))),
            keys: try KeyStore(path: tmp.sub("keys.sqlite")), owners: try OwnerStore(path: tmp.sub("owners.sqlite")),
            defaultImage: tmp.sub("none.tar"))
        let routes = Set(
            APIServer.router(engine).routes.map {
                Self.operation($0.method.rawValue, $0.path.components.map { Substring($0.description) })
            })

        let doc = try #require(try JSONSerialization.jsonObject(with: APIServer.openAPIDocument) as? [String: Any])
        let paths = try #require(doc["paths"] as? [String: [String: Any]])
        let methods: Set<String> = ["get", "put", "post", "delete", "patch", "head", "options"]
        var documented: Set<String> = ["GET /openapi.json"]
        for (path, item) in paths {
            for m in item.keys where methods.contains(m) {
                documented.insert(Self.operation(m.uppercased(), path.split(separator: "/")))
            }
        }
        let undocumented = routes.subtracting(documented).sorted()
        let unrouted = documented.subtracting(routes).sorted()
        #expect(undocumented.isEmpty, "routes the document lacks: \(undocumented)")
        #expect(unrouted.isEmpty, "operations no route serves: \(unrouted)")
    }
}
