import FurcateEngine
import HTTPTypes
import Hummingbird

/// What the server needs of an API dialect besides its routes: where its routes live, how its
/// clients present keys, how its errors look, and where a request path names a VM. A dialect
/// parses its vendor's requests, calls the `Engine`, and renders the answers in its vendor's
/// shape; a new dialect is a new type conforming to this, with its routes and its request and
/// response types — the middleware and the engine do not change.
protocol Dialect: Sendable {
    /// The first path segment of every route (`v1`, `instavm`).
    static var prefix: String { get }
    /// Headers besides `Authorization: Bearer` that carry an API key.
    static var keyHeaders: [HTTPField.Name] { get }
    /// Paths that authenticate themselves (their key comes in the body).
    static var selfAuthenticating: Set<String> { get }
    /// What a request without a key is told.
    static var missingKeyHint: String { get }
    /// An error in this dialect's shape (status and body).
    static func render(_ e: APIError) -> any Error
    /// A request body's problem (`RequestBodies.decode`) in this dialect's shape.
    static func render(_ p: FieldProblem) -> any Error
    /// The VM id a request path (split on `/`) names, if it names one: its activity counts.
    static func vmID(in parts: [Substring]) -> Substring?

    init(engine: Engine)
    func register(on group: RouterGroup<APIContext>)
}

extension Dialect {
    static var keyHeaders: [HTTPField.Name] { [] }
    static var selfAuthenticating: Set<String> { [] }

    /// `PREFIX[/v1]/vms/{id}/…` — the VM id after `vms`, at `vmsAt`.
    static func vmID(in parts: [Substring], vmsAt i: Int) -> Substring? {
        parts.first == Substring(prefix) && parts.count > i + 1 && parts[i] == "vms" ? parts[i + 1] : nil
    }
}

/// The dialects `furcate serve` speaks; the first also renders errors of paths no dialect has.
enum Dialects {
    static let all: [any Dialect.Type] = [FreestyleRoutes.self, InstaVMRoutes.self]

    /// The dialect a request path belongs to.
    static func of(_ path: String) -> any Dialect.Type {
        let first = path.split(separator: "/", maxSplits: 1).first ?? ""
        return all.first { $0.prefix == first } ?? all[0]
    }
}

extension FreestyleRoutes: Dialect {
    static let prefix = "v1"
    static let missingKeyHint = "give an API key as 'Authorization: Bearer fk_…' (furcate keys create)"
    static func render(_ e: APIError) -> any Error { e }
    /// 400: `UNSUPPORTED_FIELD` for what this server does not honour, else `BAD_REQUEST`.
    static func render(_ p: FieldProblem) -> any Error {
        switch p.kind {
        case .unsupported, .notSupported: APIError(.badRequest, "UNSUPPORTED_FIELD", p.message)
        default: APIError(.badRequest, "BAD_REQUEST", p.message)
        }
    }
    static func vmID(in parts: [Substring]) -> Substring? { vmID(in: parts, vmsAt: 1) }
}

extension InstaVMRoutes: Dialect {
    static let prefix = "instavm"
    static let keyHeaders = [HTTPField.Name("X-API-Key")].compactMap { $0 }
    /// The InstaVM SDK sends its key in the body of this one.
    static let selfAuthenticating: Set<String> = ["/instavm/v1/sessions/session"]
    static let missingKeyHint = "give an API key as 'X-API-Key: fk_…' (furcate keys create)"
    static func render(_ e: APIError) -> any Error { InstaVMError.from(e) }
    /// 422 with one item, as FastAPI (pydantic) words it.
    static func render(_ p: FieldProblem) -> any Error {
        let loc = ["body"] + p.path
        switch p.kind {
        case .notAnObject: return InstaVMError.invalid(loc, p.message, type: "json_invalid")
        case .missing: return InstaVMError.invalid(loc, "Field required", type: "missing")
        case .wrongType(let t):
            let (name, type) =
                switch t {
                case .string: ("a valid string", "string_type")
                case .integer: ("a valid integer", "int_type")
                case .boolean: ("a valid boolean", "bool_type")
                case .number: ("a valid number", "float_type")
                case .object: ("a valid dictionary", "dict_type")
                case .array: ("a valid list", "list_type")
                }
            return InstaVMError.invalid(loc, "Input should be \(name)", type: type)
        case .unsupported(let fields, _):
            return InstaVMError.invalid(
                loc + [fields[0]], "\(fields[0].prefix(60)) is not supported by this server", type: "extra_forbidden")
        case .notSupported(let why): return InstaVMError.invalid(loc, why, type: "unsupported")
        case .outOfRange(let r, let v):
            return v < r.lowerBound
                ? InstaVMError.invalid(
                    loc, "Input should be greater than or equal to \(r.lowerBound)", type: "greater_than_equal")
                : InstaVMError.invalid(
                    loc, "Input should be less than or equal to \(r.upperBound)", type: "less_than_equal")
        case .tooLong(let max):
            return InstaVMError.invalid(loc, "String should have at most \(max) characters", type: "string_too_long")
        case .invalid(let sentence): return InstaVMError.invalid(loc, sentence)
        }
    }
    static func vmID(in parts: [Substring]) -> Substring? {
        parts.count > 1 && parts[1] == "v1" ? vmID(in: parts, vmsAt: 2) : nil
    }
}
