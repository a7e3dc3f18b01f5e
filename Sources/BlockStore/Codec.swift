import CLZ4
import CZstd
import FurcateCore

/// How a file's blocks are compressed in pack files.
///
/// Spelled `none`, `lz4`, `lz4:LEVEL` (0 is `lz4`; 1–12 use LZ4's high-compression encoder,
/// whose output the same decoder reads) or `zstd:LEVEL` (LEVEL 1–19; `zstd` alone means level 1). The store
/// keeps a block raw whenever compression would save less than 1/16 of it, so a record's
/// codec may be `none` whatever its file asks for.
public enum Codec: Hashable, Sendable, CustomStringConvertible {
    case none
    case lz4
    /// LZ4 HC at a level 1–12: slower to write, same speed to read, smaller.
    case lz4hc(level: Int32)
    case zstd(level: Int32)

    /// The default for new stores, chosen by `furcate bench store` (see docs/BENCHMARKS.md):
    /// lz4 decompresses several times faster than zstd on the page-fault path for a ratio
    /// within a few percent on VM images and memory.
    public static let `default` = Codec.lz4

    /// Parses `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    /// - Throws: `FurcateError.invalidArgument` naming the accepted spellings.
    public init(parsing text: String) throws {
        let t = text.lowercased()
        switch t {
        case "none", "raw": self = .none
        case "lz4": self = .lz4
        case "zstd": self = .zstd(level: 1)
        default:
            if t.hasPrefix("zstd:"), let l = Int32(t.dropFirst(5)), (1...19).contains(l) {
                self = .zstd(level: l)
            } else if t.hasPrefix("lz4:"), let l = Int32(t.dropFirst(4)), (0...12).contains(l) {
                self = l == 0 ? .lz4 : .lz4hc(level: l)
            } else {
                throw FurcateError(
                    .invalidArgument, "codec '\(text)' is not one of none, lz4, lz4:LEVEL (0-12), zstd:LEVEL (1-19)")
            }
        }
    }

    /// The codec as `--codec` takes it: `none`, `lz4`, `lz4:LEVEL` (LZ4 HC) or `zstd:LEVEL`.
    public var description: String {
        switch self {
        case .none: return "none"
        case .lz4: return "lz4"
        case .lz4hc(let level): return "lz4:\(level)"
        case .zstd(let level): return "zstd:\(level)"
        }
    }

    /// The algorithm tag stored in a pack record (the level is not needed to decompress).
    var tag: UInt8 {
        switch self {
        case .none: return 0
        case .lz4, .lz4hc: return 1
        case .zstd: return 2
        }
    }

    /// Compresses `src` into `dst` (capacity at least `bound(src.count)`); nil when the result
    /// would not save at least 1/16 of the input (the caller then stores the block raw).
    func compress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Int? {
        let limit = src.count - src.count / 16
        switch self {
        case .none:
            return nil
        case .lz4:
            let n = LZ4_compress_default(
                src.baseAddress?.assumingMemoryBound(to: CChar.self),
                dst.baseAddress?.assumingMemoryBound(to: CChar.self),
                Int32(src.count), Int32(dst.count))
            return n > 0 && Int(n) <= limit ? Int(n) : nil
        case .lz4hc(let level):
            let n = LZ4_compress_HC(
                src.baseAddress?.assumingMemoryBound(to: CChar.self),
                dst.baseAddress?.assumingMemoryBound(to: CChar.self),
                Int32(src.count), Int32(dst.count), level)
            return n > 0 && Int(n) <= limit ? Int(n) : nil
        case .zstd(let level):
            let n = ZSTD_compress(dst.baseAddress, dst.count, src.baseAddress, src.count, level)
            return ZSTD_isError(n) == 0 && n <= limit ? n : nil
        }
    }

    /// The worst-case compressed size of `n` bytes for any codec.
    static func bound(_ n: Int) -> Int {
        max(Int(LZ4_compressBound(Int32(n))), ZSTD_compressBound(n))
    }

    /// Decompresses a record payload of algorithm `tag` into exactly `dst.count` bytes.
    /// Returns false when the payload does not decode to exactly that many bytes.
    static func decompress(tag: UInt8, _ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Bool {
        switch tag {
        case 0:
            guard src.count == dst.count else { return false }
            dst.copyMemory(from: src)
            return true
        case 1:
            let n = LZ4_decompress_safe(
                src.baseAddress?.assumingMemoryBound(to: CChar.self),
                dst.baseAddress?.assumingMemoryBound(to: CChar.self),
                Int32(src.count), Int32(dst.count))
            return Int(n) == dst.count
        case 2:
            let n = ZSTD_decompress(dst.baseAddress, dst.count, src.baseAddress, src.count)
            return ZSTD_isError(n) == 0 && n == dst.count
        default:
            return false
        }
    }
}
