#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The one error type of Furcate: an opaque code, a human message and optional context.
///
/// Codes are open-ended (`FurcateError.Code` is a struct, not an enum) so layers can add their
/// own without breaking callers; callers that must react to a condition compare codes.
/// Storage errors carry the path, offset and operation they concern.
public struct FurcateError: Error, CustomStringConvertible, Sendable {
    /// A stable, machine-readable error kind.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code as it appears in logs and API bodies (`not_found`).
        public let rawValue: String
        /// A code of that spelling; codes are equal when their spellings are.
        public init(_ rawValue: String) { self.rawValue = rawValue }
        /// The raw value.
        public var description: String { rawValue }

        /// A named object does not exist.
        public static let notFound = Code("not_found")
        /// A named object exists already.
        public static let exists = Code("exists")
        /// An argument from a caller is malformed or out of range.
        public static let invalidArgument = Code("invalid_argument")
        /// Stored data failed a checksum or hash check; nothing wrong was returned.
        public static let damaged = Code("damaged")
        /// The disk (or a quota) is full; nothing already durable was lost.
        public static let diskFull = Code("disk_full")
        /// Another process holds a resource exclusively.
        public static let busy = Code("busy")
        /// The operation is not allowed on this object in its current state (e.g. writing a snapshot).
        public static let notPermitted = Code("not_permitted")
        /// An operating-system call failed for another reason.
        public static let io = Code("io")
        /// An on-disk format is not one this build understands.
        public static let unsupportedFormat = Code("unsupported_format")
        /// The object is not of the expected kind (e.g. a directory where a store was expected).
        public static let notAStore = Code("not_a_store")
        /// An invariant of Furcate's own was broken; always a bug.
        public static let internalError = Code("internal")
        /// The operation does not apply in the object's current state ("VM is suspended").
        public static let invalidState = Code("invalid_state")
        /// A deadline passed before the operation finished.
        public static let timedOut = Code("timed_out")
        /// A build ran and failed (its reason in the message).
        public static let buildFailed = Code("build_failed")
        /// The hypervisor (QEMU) failed or refused a command.
        public static let hypervisor = Code("hypervisor")
        /// A remote service refused the credentials given (or wanted some and none were given).
        public static let unauthenticated = Code("unauthenticated")
        /// A remote service could not be reached or answered with a server error.
        public static let unavailable = Code("unavailable")
        /// The host has no room for it now (VM capacity): nothing was made; it may succeed
        /// once other work ends.
        public static let overCapacity = Code("over_capacity")
        /// This server is not set up for it (a feature left off at its start): the message
        /// says which option turns it on.
        public static let notConfigured = Code("not_configured")
    }

    /// What kind of failure this is; callers branch on it.
    public var code: Code
    /// One line saying what failed and why, for a person.
    public var message: String
    /// The file or store path concerned, when there is one.
    public var path: String?
    /// The byte offset concerned, when there is one.
    public var offset: UInt64?
    /// The operation that failed (`pwrite`, `commit`, …), when known.
    public var operation: String?
    /// The errno of a failed system call, when the error came from one.
    public var errno: Int32?
    /// The underlying error, when this one wraps another.
    public var underlying: (any Error & Sendable)?

    /// An error of `code` with its message and whatever context applies.
    public init(
        _ code: Code, _ message: String, path: String? = nil, offset: UInt64? = nil,
        operation: String? = nil, errno: Int32? = nil, underlying: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.operation = operation
        self.errno = errno
        self.underlying = underlying
    }

    /// One line: what went wrong and where.
    public var description: String {
        var s = message
        var ctx: [String] = []
        if let operation { ctx.append("op \(operation)") }
        if let path { ctx.append("path \(path)") }
        if let offset { ctx.append("offset \(offset)") }
        if let errno { ctx.append(String(cString: strerror(errno))) }
        if !ctx.isEmpty { s += " (" + ctx.joined(separator: ", ") + ")" }
        if let underlying, !(underlying is FurcateError) { s += ": \(underlying)" }
        return s
    }

    /// The errno a filesystem would return for this error (used by the FUSE layer).
    public var posixErrno: Int32 {
        switch code {
        case .notFound: return ENOENT
        case .exists: return EEXIST
        case .invalidArgument: return EINVAL
        case .damaged: return EIO
        case .diskFull: return ENOSPC
        case .busy: return EBUSY
        case .notPermitted: return EROFS
        default: return errno ?? EIO
        }
    }

    /// An error for a failed system call, classified by its errno (ENOSPC/EDQUOT become `.diskFull`).
    public static func system(
        _ operation: String, errno err: Int32, path: String? = nil, offset: UInt64? = nil
    ) -> FurcateError {
        let code: Code
        switch err {
        case ENOSPC, EDQUOT: code = .diskFull
        case ENOENT: code = .notFound
        case EEXIST: code = .exists
        case EWOULDBLOCK: code = .busy
        default: code = .io
        }
        let what = code == .diskFull ? "disk full" : "\(operation) failed"
        return FurcateError(code, what, path: path, offset: offset, operation: operation, errno: err)
    }
}

/// Runs a system call, retrying on EINTR, and converts a `-1` result into a `FurcateError`.
///
/// - Throws: `FurcateError.system` with the call's errno.
@discardableResult
public func syscall<T: FixedWidthInteger>(
    _ operation: String, path: String? = nil, offset: UInt64? = nil, _ body: () -> T
) throws -> T {
    while true {
        let r = body()
        if r == -1 {
            let e = errno
            if e == EINTR { continue }
            throw FurcateError.system(operation, errno: e, path: path, offset: offset)
        }
        return r
    }
}

/// The text of a foreign error that is not itself `Sendable`, kept as a `FurcateError`'s cause.
public struct UnderlyingMessage: Error, Sendable, CustomStringConvertible {
    /// The foreign error as text.
    public let description: String
    /// The text of `error`.
    public init(_ error: any Error) { description = String(describing: error) }
    /// A given text.
    public init(_ text: String) { description = text }
}

/// `lseek` whence values Glibc's module does not export (they need _GNU_SOURCE); Linux ABI.
public let SEEK_DATA_LINUX: Int32 = 3
/// `lseek` whence: the next hole at or after the offset.
public let SEEK_HOLE_LINUX: Int32 = 4
