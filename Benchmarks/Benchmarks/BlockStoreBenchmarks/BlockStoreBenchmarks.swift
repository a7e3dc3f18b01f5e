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

    let reads = StoreFixture(block, "read")
    Benchmark(
        "store: 4 KiB read, warm (tree walk + block cache)",
        closure: { benchmark in
            guard let f = reads.file else { return }
            var buf = [UInt8](repeating: 0, count: 4096)
            var r = SplitMix64(seed: 2)
            for _ in benchmark.scaledIterations {
                let off = (r.next() % (256 * 16)) * 4096
                blackHole(try buf.withUnsafeMutableBytes { try f.read(into: $0, at: off) })
            }
        }, setup: { try reads.setUp() }, teardown: { reads.tearDown() })

    let clones = StoreFixture(block, "clone")
    Benchmark(
        "store: clone of a 16 MiB file",
        closure: { benchmark in
            guard let store = clones.store else { return }
            for _ in benchmark.scaledIterations {
                clones.counter += 1
                try store.clone("f", to: "c\(clones.counter)")
            }
        }, setup: { try clones.setUp() }, teardown: { clones.tearDown() })
}

/// A store in a temp dir holding file "f": 256 copies of `block` (16 MiB), made in a
/// benchmark's setup so the measured closure does only the operation.
final class StoreFixture: @unchecked Sendable {
    let block: [UInt8]
    let dir: String
    var store: BlockStore?
    var file: StoreFile?
    var counter = 0

    init(_ block: [UInt8], _ label: String) {
        self.block = block
        dir = NSTemporaryDirectory() + "furcate-mb-\(getpid())-\(label)"
    }

    func setUp() throws {
        try? FileManager.default.removeItem(atPath: dir)
        let s = try BlockStore.create(at: dir)
        let f = try s.createFile("f")
        for k in 0..<256 { try f.write(block, at: UInt64(k) * 65536) }
        try f.sync()
        store = s
        file = f
    }

    func tearDown() {
        file = nil
        store?.close()
        store = nil
        try? FileManager.default.removeItem(atPath: dir)
    }
}
