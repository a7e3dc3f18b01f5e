import Crypto

/// A 32-byte content id: the SHA-256 of a block's uncompressed bytes, or of a tree node's
/// encoding. Two reserved values never produced by SHA-256 in practice mark tree slots:
/// `hole` (nothing written: reads as zeros, SEEK_HOLE sees it) and `zero` (zeros were
/// written: reads as zeros, SEEK_DATA sees it, nothing is stored).
public struct BlockID: Hashable, Sendable, Comparable, CustomStringConvertible {
    // Four words rather than a byte array: no heap allocation, cheap hashing and comparison.
    public var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    /// An id of these four words (the digest's bytes, big-endian, in order).
    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0; self.w1 = w1; self.w2 = w2; self.w3 = w3
    }

    /// An empty slot: never written, or punched, or cut off by truncate.
    public static let hole = BlockID(w0: 0, w1: 0, w2: 0, w3: 0)
    /// A slot whose block was written with zeros only; such blocks are never stored.
    public static let zero = BlockID(w0: .max, w1: .max, w2: .max, w3: .max)

    /// True for `hole`: nothing written there.
    public var isHole: Bool { self == .hole }
    /// True for an id that names stored content (neither `hole` nor `zero`).
    public var isStored: Bool { self != .hole && self != .zero }

    /// Reads an id from 32 bytes (big-endian words, so the hex form matches the digest's).
    public init(bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= 32)
        w0 = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        w1 = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        w2 = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        w3 = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    }

    /// Reads an id from exactly 32 bytes; nil for any other length.
    public init?(_ bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self = bytes.withUnsafeBytes { BlockID(bytes: $0) }
    }

    /// Parses 64 hex digits; nil otherwise.
    public init?(hex: String) {
        var out = [UInt8]()
        out.reserveCapacity(32)
        var it = hex.utf8.makeIterator()
        while let hi = it.next() {
            guard let lo = it.next(), let h = Self.nibble(hi), let l = Self.nibble(lo) else { return nil }
            out.append(h << 4 | l)
        }
        self.init(out)
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// The 32 bytes, big-endian.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { if let p = $0.baseAddress { write(to: p) } }
        return out
    }

    /// Writes the 32 bytes at `p`.
    public func write(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: w0.bigEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: w1.bigEndian, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: w2.bigEndian, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: w3.bigEndian, toByteOffset: 24, as: UInt64.self)
    }

    /// Lowercase hex of the 32 bytes.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var s = [UInt8]()
        s.reserveCapacity(64)
        for b in bytes { s.append(digits[Int(b >> 4)]); s.append(digits[Int(b & 15)]) }
        return String(decoding: s, as: UTF8.self)
    }

    /// The first 12 hex digits, for logs.
    public var description: String {
        if self == .hole { return "hole" }
        if self == .zero { return "zero" }
        return String(hex.prefix(12))
    }

    /// Orders ids by their bytes.
    public static func < (a: BlockID, b: BlockID) -> Bool {
        (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
    }

    /// SHA-256 of `data`.
    public static func hash(_ data: UnsafeRawBufferPointer) -> BlockID {
        let digest = SHA256.hash(data: data)
        return digest.withUnsafeBytes { BlockID(bytes: $0) }
    }
}
