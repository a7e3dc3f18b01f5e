// APIServer: the HTTP API on Hummingbird — dialects that parse a request and render the answer
// (Freestyle VMs at /v1, InstaVM at /instavm) over FurcateEngine, which does each operation;
// bearer API keys. Neighbours: FurcateEngine below; `furcate serve` above wires it to a data
// directory.
import Accounts
import Foundation
import FurcateCore
import FurcateEngine
import HTTPTypes
import Hummingbird
import Logging
import ServiceLifecycle
import Synchronization

/// A request's context: Hummingbird's core, plus the API key that authenticated it.
public struct APIContext: RequestContext {
    /// Hummingbird's per-request storage.
    public var coreContext: CoreRequestContextStorage
    /// The key that authenticated the request; nil until the auth middleware has run, and on paths that need none.
    public var key: APIKey?
    /// A context for a request from `source`.
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
    /// The HTTP status.
    public let status: HTTPResponse.Status
    /// The vendor's error code, SCREAMING_SNAKE.
    public let code: String
    /// One line for a person: what was wrong and what to do.
    public let message: String
    /// Headers the answer carries besides its content type (`Allow` on a 405).
    public var headers = HTTPFields()

    /// An error answered with `status`, `code` and `message`.
    public init(_ status: HTTPResponse.Status, _ code: String, _ message: String) {
        self.status = status
        self.code = code
        self.message = message
    }

    /// The error as a JSON response.
    public func response(from request: Request, context: some RequestContext) throws -> Response {
        let body = try JSONEncoder().encode(["error": code, "message": message])
        var headers = headers
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    /// The API's answer for an engine error.
    static func from(_ e: FurcateError) -> APIError {
        switch e.code {
        case .notFound: return APIError(.notFound, "NOT_FOUND", e.message)
        case .invalidArgument: return APIError(.badRequest, "BAD_REQUEST", e.message)
        case .buildFailed: return APIError(.badRequest, "BUILD_FAILED", e.message)
        case .invalidState: return APIError(.conflict, "INVALID_STATE", e.message)
        case .vmNotRunning: return APIError(.badRequest, "VM_NOT_RUNNING", e.message)
        case .busy: return APIError(.conflict, "BUSY", e.message)
        case .timedOut: return APIError(.gatewayTimeout, "TIMED_OUT", e.message)
        case .unauthenticated: return APIError(.unauthorized, "UNAUTHORIZED", e.message)
        case .unavailable: return APIError(.badGateway, "UPSTREAM_UNAVAILABLE", e.message)
        case .diskFull: return APIError(.init(code: 507, reasonPhrase: "Insufficient Storage"), "DISK_FULL", e.message)
        case .overCapacity: return APIError(.tooManyRequests, "HOST_AT_CAPACITY", e.message)
        case .exists: return APIError(.conflict, "CONFLICT", e.message)
        case .notConfigured: return APIError(.conflict, "NOT_CONFIGURED", e.message)
        default: return APIError(.internalServerError, "INTERNAL_ERROR", e.message)
        }
    }
}

/// API keys on every route — `Authorization: Bearer` on every dialect, plus the dialect's own
/// key headers (`X-API-Key` on InstaVM's) — and errors in the dialect's shape: Freestyle
/// `{error, message}`, InstaVM (FastAPI) `{detail}`.
struct AuthAndErrors: RouterMiddleware {
    typealias Context = APIContext
    let keys: KeyStore
    let routes: RouteMethods
    /// The OpenAPI document is public.
    static let documentRoute = "/openapi.json"

    func handle(_ request: Request, context: APIContext, next: (Request, APIContext) async throws -> Response)
        async throws -> Response
    {
        let dialect = Dialects.of(request.uri.path)
        do {
            if request.uri.path == Self.documentRoute { return try await next(request, context) }
            var context = context
            // Every credential presented must be valid, and all must name the same key.
            var secrets: [String] = []
            if let header = request.headers[.authorization] {
                guard header.hasPrefix("Bearer ") else {
                    throw APIError(.unauthorized, "UNAUTHORIZED", "the Authorization header must be 'Bearer fk_…'")
                }
                secrets.append(String(header.dropFirst(7)))
            }
            for name in dialect.keyHeaders { if let k = request.headers[name] { secrets.append(k) } }
            for secret in secrets {
                guard let key = try keys.authenticate(secret), context.key == nil || context.key == key else {
                    throw APIError(
                        .unauthorized, "UNAUTHORIZED", "the API key is not valid (furcate keys create makes one)")
                }
                context.key = key
            }
            guard context.key != nil || dialect.selfAuthenticating.contains(request.uri.path) else {
                throw APIError(.unauthorized, "UNAUTHORIZED", dialect.missingKeyHint)
            }
            return try await next(request, context)
        } catch let e as FurcateError {
            throw dialect.render(APIError.from(e))
        } catch let p as FieldProblem {
            throw dialect.render(p)
        } catch let e as DecodingError {
            throw dialect.render(
                APIError(.badRequest, "BAD_REQUEST", "the request body does not match the document: \(e)"))
        } catch let e as APIError {
            throw dialect.render(e)
        } catch let e as HTTPError where e.status == .notFound && routes.hasPath(request.uri.path) {
            // The path exists with other methods: 405 with Allow, as HTTP says.
            let allowed = routes.allowed(request.uri.path)
            var api = APIError(
                .methodNotAllowed, "METHOD_NOT_ALLOWED",
                "\(request.method) is not allowed on \(request.uri.path.prefix(200)); allowed: \(allowed.joined(separator: ", "))"
            )
            api.headers[.allow] = allowed.joined(separator: ", ")
            throw dialect.render(api)
        } catch let e as HTTPError {
            // Hummingbird's own errors (a body that is not JSON, no such route) in the dialect's shape.
            let code =
                e.status == .notFound
                ? "NOT_FOUND"
                : e.status.code == 400
                    ? "BAD_REQUEST" : e.status.reasonPhrase.uppercased().replacingOccurrences(of: " ", with: "_")
            throw dialect.render(APIError(e.status, code, e.body ?? e.status.reasonPhrase))
        }
    }
}

/// Counts a request on a VM (the VM its dialect's path names, by its owner) as the VM's
/// activity while it runs: an idle timeout waits for every request on the VM to end.
struct VMActivity: RouterMiddleware {
    typealias Context = APIContext
    let engine: Engine

    func handle(_ request: Request, context: APIContext, next: (Request, APIContext) async throws -> Response)
        async throws -> Response
    {
        let path = request.uri.path
        guard let id = Dialects.of(path).vmID(in: path.split(separator: "/")) else {
            return try await next(request, context)
        }
        return try await engine.duringRequest(on: String(id), account: context.account) {
            try await next(request, context)
        }
    }
}

/// The methods each registered route path answers, for 405s: filled once the router has every
/// route (the middleware that answers is added before them).
final class RouteMethods: Sendable {
    private let table = Mutex<[(path: [RouterPath.Element], method: HTTPRequest.Method)]>([])

    func set(_ routes: [(path: [RouterPath.Element], method: HTTPRequest.Method)]) { table.withLock { $0 = routes } }

    /// The methods of the route path the router would pick for `path` — of those matching it,
    /// the most specific (a literal segment before a capture, as the router's trie orders
    /// them) — sorted; empty when none matches.
    func allowed(_ path: String) -> [String] {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        return table.withLock { routes in
            let matching = routes.filter { Self.matches($0.path, parts) }
            guard let best = matching.map({ Self.specificity($0.path) }).max(by: { $0.lexicographicallyPrecedes($1) })
            else { return [] }
            return Set(matching.filter { Self.specificity($0.path) == best }.map(\.method.rawValue)).sorted()
        }
    }

    /// Whether some route matches `path` (with any method).
    func hasPath(_ path: String) -> Bool {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        return table.withLock { $0.contains { Self.matches($0.path, parts) } }
    }

    /// Per segment: 2 for a literal, 1 for a capture, 0 for a wildcard.
    static func specificity(_ route: [RouterPath.Element]) -> [Int] {
        route.map { e in
            let d = e.description
            return d.hasPrefix("{") || d.hasSuffix("}") ? 1 : d.contains("*") ? 0 : 2
        }
    }

    static func matches(_ route: [RouterPath.Element], _ parts: [Substring]) -> Bool {
        var i = 0
        for element in route {
            if element == .recursiveWildcard { return i < parts.count }
            guard i < parts.count, element ~= parts[i] else { return false }
            i += 1
        }
        return i == parts.count
    }
}

/// Builds the HTTP application over an `Engine`: both dialects, the middlewares, `/openapi.json`.
public enum APIServer {
    /// The OpenAPI document served at `/openapi.json`.
    public static var openAPIDocument: Data { Data(OpenAPIDocument.json.utf8) }

    /// The router with every route the API serves.
    public static func router(_ engine: Engine) -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        let methods = RouteMethods()
        router.add(middleware: AuthAndErrors(keys: engine.keys, routes: methods))
        router.add(middleware: VMActivity(engine: engine))
        router.get("openapi.json") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "application/json"
            return Response(
                status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: OpenAPIDocument.json)))
        }
        for dialect in Dialects.all {
            dialect.init(engine: engine).register(on: router.group(RouterPath(dialect.prefix)))
        }
        methods.set(router.routes.map { (path: $0.path.components, method: $0.method) })
        return router
    }

    /// The application `furcate serve` runs and the tests drive.
    public static func buildApplication(
        _ engine: Engine, host: String, port: Int, services: [any Service] = [],
        logger: Logger = Logger(label: "furcate.api")
    ) -> some ApplicationProtocol {
        Application(
            router: router(engine), configuration: .init(address: .hostname(host, port: port), serverName: "furcate"),
            services: services, logger: logger)
    }
}
