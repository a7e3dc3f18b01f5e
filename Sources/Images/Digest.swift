// Images: OCI images (registry, OCI layout directory, docker-archive tarball) become ext4 rootfs
// files in the block store. Neighbours: BlockStore below (the rootfs is a store file),
// VMService above (boots it); nothing here knows of QEMU or HTTP serving.
import Crypto
import FurcateCore

/// A content digest as OCI writes it: `sha256:` and 64 lowercase hex digits. Only sha256 is
/// accepted (every registry and tool in use writes it; sha512 is optional in the spec).
public struct Digest: Hashable, Sendable, Codable, CustomStringConvertible, Comparable {
    /// The 64 hex digits.
    public let hex: String

    /// Parses `sha256:` and 64 hex digits.
    /// - Throws: `.invalidArgument` for anything else (another algorithm included).
    public init(parsing s: String) throws {
        guard s.hasPrefix("sha256:") else {
            throw FurcateError(
                .invalidArgument, "digest '\(s.prefix(80))' is not a sha256 digest (sha256:<64 hex digits>)")
        }
        let h = String(s.dropFirst(7))
        guard h.utf8.count == 64, h.utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }) else {
            throw FurcateError(.invalidArgument, "digest '\(s.prefix(80))' must be sha256: and 64 lowercase hex digits")
        }
        hex = h
    }

    /// The digest of `bytes`.
    public init(of bytes: some Sequence<UInt8>) {
        var h = SHA256()
        h.update(data: Array(bytes))
        self.init(finalizing: h)
    }

    init(finalizing h: SHA256) {
        hex = h.finalize().map { String(byte: $0) }.joined()
    }

    /// `sha256:HEX`.
    public var description: String { "sha256:" + hex }
    /// The first 12 hex digits, as `docker images` shows them.
    public var short: String { String(hex.prefix(12)) }

    /// Orders digests by their hex digits.
    public static func < (a: Digest, b: Digest) -> Bool { a.hex < b.hex }

    /// Decodes the `sha256:HEX` string.
    public init(from decoder: any Decoder) throws {
        try self.init(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    /// Encodes the `sha256:HEX` string.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

extension String {
    init(byte: UInt8) {
        let digits = Array("0123456789abcdef")
        self = String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }
}

/// Hashes bytes as they stream past and checks the total against an expected digest and size.
struct DigestVerifier {
    private var hasher = SHA256()
    private(set) var count: UInt64 = 0

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        hasher.update(bufferPointer: bytes)
        count += UInt64(bytes.count)
    }

    /// The digest of the bytes seen so far.
    var digest: Digest { Digest(finalizing: hasher) }

    /// Throws `.damaged` naming `what` when the bytes seen are not `expected`.
    func verify(_ expected: Digest, size: Int64?, what: String) throws {
        if let size, size >= 0, UInt64(size) != count {
            throw FurcateError(.damaged, "\(what) is \(count) bytes, but its descriptor says \(size): refusing it")
        }
        let got = Digest(finalizing: hasher)
        guard got == expected else {
            throw FurcateError(.damaged, "\(what) has digest \(got), not \(expected): refusing it (digest mismatch)")
        }
    }
}
