// IPv4 addresses and networks: parsed, validated and printed; what the pool and the policies
// are made of.
import FurcateCore

/// An IPv4 address.
public struct IPv4Address: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    /// The address, most significant octet first.
    public var value: UInt32

    /// The address with this value.
    public init(_ value: UInt32) { self.value = value }

    /// Parses dotted-quad notation ("203.0.113.7"); nil for anything else (no leading zeros,
    /// no shorthand forms).
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for p in parts {
            guard (1...3).contains(p.count), p.allSatisfy(\.isASCII), p.allSatisfy(\.isNumber),
                p.count == 1 || p.first != "0", let o = UInt32(p), o <= 255
            else { return nil }
            v = v << 8 | o
        }
        value = v
    }

    /// Dotted-quad notation.
    public var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }

    /// Numeric order.
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }

    /// Decodes dotted-quad notation.
    public init(from decoder: any Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        guard let a = IPv4Address(s) else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: decoder.codingPath, debugDescription: "not an IPv4 address: \(s)"))
        }
        self = a
    }

    /// Encodes as its description.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

/// An IPv4 network: an address and a prefix length, the address's host bits zero.
public struct IPv4Network: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The first address.
    public let address: IPv4Address
    /// Leading bits that name the network (0-32).
    public let prefix: Int

    /// - Throws: `.invalidArgument` when `prefix` is outside 0-32 or `address` has host bits set.
    public init(_ address: IPv4Address, prefix: Int) throws {
        guard (0...32).contains(prefix) else {
            throw FurcateError(.invalidArgument, "a prefix length is 0 to 32, not \(prefix)")
        }
        let n = IPv4Network(unchecked: address, prefix: prefix)
        guard n.address == address else {
            throw FurcateError(
                .invalidArgument, "\(address)/\(prefix) has host bits set (the network is \(n.address)/\(prefix))")
        }
        self = n
    }

    private init(unchecked address: IPv4Address, prefix: Int) {
        self.prefix = prefix
        self.address = IPv4Address(address.value & Self.mask(prefix))
    }

    /// Parses "a.b.c.d/n" (a bare address is a /32).
    /// - Throws: `.invalidArgument` saying what is wrong.
    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let a = IPv4Address(parts[0]) else {
            throw FurcateError(.invalidArgument, "'\(text)' is not an IPv4 network (like 203.0.113.0/24)")
        }
        guard parts.count == 2 else {
            self.init(unchecked: a, prefix: 32)
            return
        }
        guard let p = Int(parts[1]), parts[1].allSatisfy(\.isNumber) else {
            throw FurcateError(.invalidArgument, "'\(text)': the prefix length must be a number from 0 to 32")
        }
        try self.init(a, prefix: p)
    }

    static func mask(_ prefix: Int) -> UInt32 { prefix == 0 ? 0 : ~UInt32(0) << (32 - prefix) }

    /// Addresses in the network.
    public var size: UInt64 { UInt64(1) << (32 - prefix) }

    /// Whether `a` is in the network.
    public func contains(_ a: IPv4Address) -> Bool { a.value & Self.mask(prefix) == address.value }

    /// Whether the two networks share an address.
    public func overlaps(_ other: IPv4Network) -> Bool {
        contains(other.address) || other.contains(address)
    }

    /// The `offset`-th address of the network (nil past its end).
    public func address(at offset: UInt64) -> IPv4Address? {
        offset < size ? IPv4Address(address.value + UInt32(offset)) : nil
    }

    /// "a.b.c.d/n".
    public var description: String { "\(address)/\(prefix)" }

    /// Decodes "a.b.c.d/n".
    public init(from decoder: any Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        do { try self.init(parsing: s) } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "\(error)"))
        }
    }

    /// Encodes as its description.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }

    /// What a guest never reaches unless its policy names it: this host's loopback, "this"
    /// network, private and shared ranges, link-local (cloud metadata), multicast and reserved.
    public static let blockedByDefault: [IPv4Network] = [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    ].compactMap { try? IPv4Network(parsing: $0) }
}

extension Array {
    subscript(safe i: Int) -> Element? { indices.contains(i) ? self[i] : nil }
}
