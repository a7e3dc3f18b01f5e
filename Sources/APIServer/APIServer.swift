// APIServer: the HTTP API on Hummingbird — the Freestyle VMs dialect at /v1 (a first set of its
// operations so far), bearer API keys, accounts owning resources. Neighbours: VMService, Images,
// Builds and Accounts below; the `furcate serve` command above wires it to a data directory.
import Accounts
import Builds
import Foundation
import FurcateCore
import Hummingbird
import Images
import Logging
import RecordStore
import ServiceLifecycle
import VMService

/// What the API serves: the engine's services, the key store and who owns what.
public struct APIEngine: Sendable {
    public let vms: VMService
    public let images: ImageService
    public let builds: BuildService
    public let keys: KeyStore
    public let owners: OwnerStore
    /// The default image's rootfs tarball (Debian 12 with systemd).
    public let defaultImage: String

    public init(vms: VMService, images: ImageService, builds: BuildService, keys: KeyStore, owners: OwnerStore, defaultImage: String) {
        self.vms = vms
        self.images = images
        self.builds = builds
        self.keys = keys
        self.owners = owners
        self.defaultImage = defaultImage
    }
}

/// Which account owns a VM, snapshot or build (`owners.sqlite`). Another account's resource is
/// answered exactly as a missing one.
public final class OwnerStore: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("owners")
    struct Owner: Codable { var account: String }

    public init(path: String) throws {
        db = try RecordDatabase(path: path, what: "owner", migrations: ["CREATE TABLE owners (id TEXT PRIMARY KEY, record BLOB NOT NULL)"])
    }

    public func set(_ id: String, account: String) throws { try db.save(Self.table, key: id, Owner(account: account)) }
    public func owner(_ id: String) throws -> String? { try db.get(Self.table, key: id, as: Owner.self)?.account }
    public func remove(_ id: String) throws { try db.delete(Self.table, key: id) }
}

/// A request's context: Hummingbird's core, plus the API key that authenticated it.
public struct APIContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public var key: APIKey?
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
    }
    /// Request bodies are small JSON documents; files have their own limit.
    public var maxUploadSize: Int { 64 << 20 }

    /// The authenticated account (the auth middleware ran before every route).
    var account: String { key?.account ?? "" }
}

/// An error as the Freestyle document writes it: `{"error": "SCREAMING_SNAKE", "message": …}`.
public struct APIError: HTTPResponseError {
    public let status: HTTPResponse.Status
    public let code: String
    public let message: String

    public init(_ status: HTTPResponse.Status, _ code: String, _ message: String) {
        self.status = status
        self.code = code
        self.message = message
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        let body = try JSONEncoder().encode(["error": code, "message": message])
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    /// The API's answer for an engine error.
    static func from(_ e: FurcateError) -> APIError {
        switch e.code {
        case .notFound: return APIError(.notFound, "NOT_FOUND", e.message)
        case .invalidArgument: return APIError(.badRequest, "BAD_REQUEST", e.message)
        case .invalidState: return APIError(.conflict, "INVALID_STATE", e.message)
        case .busy: return APIError(.conflict, "BUSY", e.message)
        case .timedOut: return APIError(.gatewayTimeout, "TIMED_OUT", e.message)
        case .unauthenticated: return APIError(.unauthorized, "UNAUTHORIZED", e.message)
        case .unavailable: return APIError(.badGateway, "UPSTREAM_UNAVAILABLE", e.message)
        case .diskFull: return APIError(.init(code: 507, reasonPhrase: "Insufficient Storage"), "DISK_FULL", e.message)
        default: return APIError(.internalServerError, "INTERNAL_ERROR", e.message)
        }
    }
}

/// Bearer API keys on every route; engine errors become `{error, message}` bodies.
struct AuthAndErrors: RouterMiddleware {
    typealias Context = APIContext
    let keys: KeyStore

    func handle(_ request: Request, context: APIContext, next: (Request, APIContext) async throws -> Response) async throws -> Response {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer "),
            let key = try keys.authenticate(String(header.dropFirst(7)))
        else {
            throw APIError(.unauthorized, "UNAUTHORIZED", "give an API key as 'Authorization: Bearer fk_…' (furcate keys create)")
        }
        var context = context
        context.key = key
        do {
            return try await next(request, context)
        } catch let e as FurcateError {
            throw APIError.from(e)
        } catch let e as DecodingError {
            throw APIError(.badRequest, "BAD_REQUEST", "the request body does not match the document: \(e)")
        }
    }
}

public enum APIServer {
    /// The router with every route the API serves.
    public static func router(_ engine: APIEngine) -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        router.add(middleware: AuthAndErrors(keys: engine.keys))
        FreestyleRoutes(engine: engine).register(on: router.group("v1"))
        return router
    }

    /// The application `furcate serve` runs and the tests drive.
    public static func buildApplication(
        _ engine: APIEngine, host: String, port: Int, services: [any Service] = [], logger: Logger = Logger(label: "furcate.api")
    ) -> some ApplicationProtocol {
        Application(
            router: router(engine), configuration: .init(address: .hostname(host, port: port), serverName: "furcate"),
            services: services, logger: logger)
    }
}
