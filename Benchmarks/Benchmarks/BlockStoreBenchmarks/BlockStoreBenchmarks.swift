// Micro-benchmarks of BlockStore hot paths. Ratios against baselines live in `furcate bench`.
import Benchmark
import BlockStore
import Foundation

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .throughput, .mallocCountTotal], maxDuration: .seconds(2))

    var rng = SplitMix64(seed: 1)
    let block = (0..<65536).map { _ in UInt8(truncatingIfNeeded: rng.next() >> 60) }  // compressible

    Benchmark("SHA-256 of a 64 KiB block") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(block.withUnsafeBytes { BlockID.hash($0) })
        }
    }

    for codec in [Codec.lz4, .zstd(level: 1), .zstd(level: 3)] {
        Benchmark("compress+decompress 64 KiB, \(codec)") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(try CodecMeasure.measure(codec, sample: block, blockSize: 65536, bytes: 65536))
            }
        }
    }

    Benchmark("store: 4 KiB read, warm (tree walk + block cache)") { benchmark in
        let (dir, store, f) = try storeWith16MiBFile(block, "read")
        defer {
            store.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
        var buf = [UInt8](repeating: 0, count: 4096)
        var r = SplitMix64(seed: 2)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let off = (r.next() % (256 * 16)) * 4096
            blackHole(try buf.withUnsafeMutableBytes { try f.read(into: $0, at: off) })
        }
    }

    Benchmark("store: clone of a 16 MiB file") { benchmark in
        let (dir, store, _) = try storeWith16MiBFile(block, "clone")
        defer {
            store.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
        var n = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            n += 1
            try store.clone("f", to: "c\(n)")
        }
    }
}

/// A new store in a temp dir holding file "f": 256 copies of `block` (16 MiB).
func storeWith16MiBFile(_ block: [UInt8], _ label: String) throws -> (String, BlockStore, StoreFile) {
    let dir = NSTemporaryDirectory() + "furcate-mb-\(getpid())-\(label)"
    try? FileManager.default.removeItem(atPath: dir)
    let store = try BlockStore.create(at: dir)
    let f = try store.createFile("f")
    for k in 0..<256 { try f.write(block, at: UInt64(k) * 65536) }
    try f.sync()
    return (dir, store, f)
}
