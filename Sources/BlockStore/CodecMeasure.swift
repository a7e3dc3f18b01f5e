/// Compression throughput of a codec on sample data, for `furcate bench store` (which picks the
/// default codec from these numbers).
public enum CodecMeasure {
    /// One codec's figures.
    public struct Result: Sendable {
        /// Compression throughput, MB/s of input.
        public var compress: Double
        /// Decompression throughput, MB/s of output.
        public var decompress: Double
        /// Input bytes over compressed bytes.
        public var ratio: Double
    }

    /// Compresses and decompresses `bytes` of `sample` in blocks of `blockSize`; MB/s and ratio.
    /// Blocks that would be kept raw count at their raw size, as the store keeps them.
    public static func measure(_ codec: Codec, sample: [UInt8], blockSize: Int, bytes: Int) throws -> Result {
        let blocks = min(bytes, sample.count) / blockSize
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Codec.bound(blockSize) * blocks, alignment: 16)
        defer { scratch.deallocate() }
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 16)
        defer { out.deallocate() }
        var sizes = [Int?](repeating: nil, count: blocks)
        let bound = Codec.bound(blockSize)
        let t0 = StoreClock.now()
        sample.withUnsafeBytes { raw in
            for k in 0..<blocks {
                let src = UnsafeRawBufferPointer(rebasing: raw[(k * blockSize)..<((k + 1) * blockSize)])
                sizes[k] = codec.compress(
                    src, into: UnsafeMutableRawBufferPointer(rebasing: scratch[(k * bound)..<((k + 1) * bound)]))
            }
        }
        let t1 = StoreClock.now()
        var ok = true
        for k in 0..<blocks {
            guard let n = sizes[k] else { continue }
            ok =
                Codec.decompress(
                    tag: codec.tag, UnsafeRawBufferPointer(rebasing: scratch[(k * bound)..<(k * bound + n)]), into: out)
                && ok
        }
        let t2 = StoreClock.now()
        precondition(ok, "codec round trip failed")
        let stored = sizes.reduce(0) { $0 + ($1 ?? blockSize) }
        let total = Double(blocks * blockSize)
        return Result(
            compress: total / (t1 - t0) / 1e6, decompress: total / max(t2 - t1, 1e-9) / 1e6,
            ratio: total / Double(stored))
    }
}

#if canImport(Glibc)
    import Glibc
#endif

enum StoreClock {
    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
