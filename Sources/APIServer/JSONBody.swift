// Request bodies as typed values. A dialect declares each body it reads as a `JSONBody`: its
// fields, the vendor document's other fields, its checks. `RequestBodies.decode` parses it,
// refuses by name any field this server does not honour, decodes and validates, once for every
// dialect, and throws a `FieldProblem` that each dialect renders in its own error shape.
import Foundation
import FurcateCore
import Hummingbird

/// A JSON object a request carries, as a typed value.
protocol JSONBody: Decodable {
    /// The fields this server honours.
    static var fields: Set<String> { get }
    /// The vendor document's other fields of this body: sent as null they mean "unset"; with a
    /// value they are refused by name, never ignored.
    static var documentedFields: Set<String> { get }
    /// The body with a deprecated form rewritten as today's, before it is decoded (nil: as is).
    static func current(_ object: [String: JSONValue]) throws -> [String: JSONValue]?
    /// Checks beyond JSON types: ranges, lengths, combinations.
    /// - Throws: `FieldProblem`.
    func validate() throws
}

extension JSONBody {
    static var documentedFields: Set<String> { [] }
    static func current(_ object: [String: JSONValue]) throws -> [String: JSONValue]? { nil }
    func validate() throws {}
}

/// What is wrong with a request body, and where (a path of field names and array indices).
struct FieldProblem: Error, Equatable {
    enum JSONType: Equatable {
        case string, integer, boolean, number, object, array

        init(_ type: Any.Type) {
            if type == String.self {
                self = .string
            } else if type == Bool.self {
                self = .boolean
            } else if type is any BinaryInteger.Type {
                self = .integer
            } else if type is any BinaryFloatingPoint.Type {
                self = .number
            } else if type == [Any].self || "\(type)".hasPrefix("Array<") {
                self = .array
            } else {
                self = .object
            }
        }

        /// "a string", "an integer", …
        var withArticle: String {
            switch self {
            case .string: "a string"
            case .integer: "an integer"
            case .boolean: "true or false"
            case .number: "a number"
            case .object: "an object"
            case .array: "an array"
            }
        }
    }

    enum Kind: Equatable {
        /// The body is not JSON, or not an object.
        case notAnObject
        case missing
        case wrongType(JSONType)
        /// Fields present with a value that this server does not honour.
        case unsupported(fields: [String], supported: [String])
        /// A field this server knows and cannot honour as given, with why.
        case notSupported(String)
        case outOfRange(ClosedRange<Int>, value: Int)
        case tooLong(max: Int)
        /// Another problem, in a sentence that names the field.
        case invalid(String)
    }

    var path: [String]
    var kind: Kind

    init(_ path: [String], _ kind: Kind) {
        self.path = path
        self.kind = kind
    }

    /// The field's dotted path (`spec.snapshot.workdir`), or "the body".
    var field: String { path.isEmpty ? "the body" : path.joined(separator: ".") }

    /// The problem in a sentence that names the field.
    var message: String {
        switch kind {
        case .notAnObject: "the body must be a JSON object"
        case .missing: "\(field) is required"
        case .wrongType(let t): "\(field) must be \(t.withArticle)"
        case .unsupported(let fields, let supported):
            "this server does not honour \(fields.map { "'\(path.isEmpty ? "" : field + ".")\($0.prefix(60))'" }.joined(separator: ", "))"
                + " (supported: \(supported.joined(separator: ", ")))"
        case .notSupported(let why): why
        case .outOfRange(let r, _): "\(field) must be an integer from \(r.lowerBound) to \(r.upperBound)"
        case .tooLong(let max): "\(field) must be at most \(max) bytes"
        case .invalid(let sentence): sentence
        }
    }

    /// The decoder's account of a body that does not match its type.
    init(_ e: DecodingError) {
        func names(_ path: [any CodingKey]) -> [String] { path.map { $0.intValue.map(String.init) ?? $0.stringValue } }
        switch e {
        case .typeMismatch(let type, let c), .valueNotFound(let type, let c):
            self.init(names(c.codingPath), c.codingPath.isEmpty ? .notAnObject : .wrongType(JSONType(type)))
        case .keyNotFound(let key, let c):
            self.init(names(c.codingPath + [key]), .missing)
        case .dataCorrupted(let c):
            let path = names(c.codingPath)
            if path.isEmpty {
                self.init([], .notAnObject)
            } else if c.debugDescription.contains("does not fit") || c.debugDescription.contains("Parsed JSON number") {
                self.init(path, .wrongType(.integer))
            } else if c.debugDescription.hasPrefix("Cannot initialize") {
                self.init(path, .invalid("\(path.joined(separator: ".")) is not one of the documented values"))
            } else {
                self.init(path, .invalid(c.debugDescription))
            }
        @unknown default:
            self.init([], .invalid("the body does not match the document: \(e)"))
        }
    }

    /// `value`, if given, within `range`.
    static func check(_ value: Int?, _ field: String, in range: ClosedRange<Int>) throws {
        if let value, !range.contains(value) {
            throw FieldProblem(field.split(separator: ".").map(String.init), .outOfRange(range, value: value))
        }
    }

    /// `value`, if given, at most `max` bytes of UTF-8.
    static func check(_ value: String?, _ field: String, max: Int) throws {
        if let value, value.utf8.count > max {
            throw FieldProblem(field.split(separator: ".").map(String.init), .tooLong(max: max))
        }
    }
}

enum RequestBodies {
    /// The body (empty: `{}`) as `T`: a JSON object, without fields `T` does not honour,
    /// decoded and validated.
    /// - Throws: `FieldProblem`, or what `T`'s own decoding and checks throw.
    static func decode<T: JSONBody>(_: T.Type, from body: ByteBuffer) throws -> T {
        try decode(T.self, from: Data(buffer: body))
    }

    static func decode<T: JSONBody>(_: T.Type, from data: Data) throws -> T {
        var data = data.isEmpty ? Data("{}".utf8) : data
        let object: [String: JSONValue]
        do {
            guard case .object(let o) = try JSONDecoder().decode(JSONValue.self, from: data) else {
                throw FieldProblem([], .notAnObject)
            }
            object = o
        } catch {
            throw FieldProblem([], .notAnObject)
        }
        try refuse(object, honoured: T.fields, documented: T.documentedFields, at: [])
        if let rewritten = try T.current(object) { data = try JSONEncoder().encode(JSONValue.object(rewritten)) }
        let value: T
        do { value = try JSONDecoder().decode(T.self, from: data) } catch let e as DecodingError {
            var problem = FieldProblem(e)
            // Foundation's decoder reports a number that fits no integer (1.5, 1e30) as "not
            // valid JSON" with no path: it was valid, so the number is one of those.
            if problem.kind == .notAnObject {
                let suspects = nonIntegers(in: .object(object), at: [])
                problem =
                    suspects.count == 1
                    ? FieldProblem(suspects[0], .wrongType(.integer))
                    : FieldProblem(
                        [],
                        .invalid(
                            "a number in the body does not fit its field (an integer given a fraction, or too large)"))
            }
            throw problem
        }
        try value.validate()
        return value
    }

    /// The paths of the numbers in `value` that no `Int` holds.
    static func nonIntegers(in value: JSONValue, at path: [String]) -> [[String]] {
        switch value {
        case .number(let n): return Int(exactly: n) == nil ? [path] : []
        case .array(let a): return a.enumerated().flatMap { nonIntegers(in: $1, at: path + [String($0)]) }
        case .object(let o): return o.sorted { $0.key < $1.key }.flatMap { nonIntegers(in: $1, at: path + [$0]) }
        default: return []
        }
    }

    /// Refuses the fields of `object` at `path` that are not `honoured`, unless `documented`
    /// and null.
    static func refuse(
        _ object: [String: JSONValue], honoured: Set<String>, documented: Set<String> = [], at path: [String]
    ) throws {
        let unsupported = object.filter {
            !honoured.contains($0.key) && !($0.value == .null && documented.contains($0.key))
        }.keys.sorted()
        guard unsupported.isEmpty else {
            throw FieldProblem(path, .unsupported(fields: unsupported, supported: honoured.sorted()))
        }
    }
}

extension Decoder {
    /// Refuses the fields of the object being decoded that are not `honoured`, unless
    /// `documented` and null: for the objects nested in a request body.
    func refuseFields(except honoured: Set<String>, documented: Set<String> = []) throws {
        let object = try singleValueContainer().decode([String: JSONValue].self)
        try RequestBodies.refuse(
            object, honoured: honoured, documented: documented,
            at: codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue })
    }
}
