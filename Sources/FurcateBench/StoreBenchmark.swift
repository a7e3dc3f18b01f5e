// FurcateBench — the system benchmarks behind `furcate bench`. Each one measures a baseline
// in the same run (a plain file on the same filesystem, a file of 16 MiB against one of
// 16 GiB) and reports ratios, so results compare across machines.
import BlockStore
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Results of `furcate bench store`; every field is printed and in the JSON.
public struct StoreBenchReport: Codable, Sendable {
    /// Clone and snapshot of one file size.
    public struct CloneTiming: Codable, Sendable {
        /// The file cloned.
        public var fileBytes: UInt64
        /// Its blocks.
        public var blocks: Int
        /// Clone, median.
        public var cloneMillisP50: Double
        /// Clone, 99th percentile.
        public var cloneMillisP99: Double
        /// Snapshot, median.
        public var snapshotMillisP50: Double
        /// Snapshot, 99th percentile.
        public var snapshotMillisP99: Double
    }
    /// One I/O pattern on a store file against a plain file.
    public struct IOThroughput: Codable, Sendable {
        /// The pattern (`sequential write + fsync`, …), in 4 KiB calls.
        public var pattern: String
        /// The store file's throughput.
        public var storeMBps: Double
        /// A plain file's on the same filesystem.
        public var plainFileMBps: Double
        /// Store over plain file.
        public var ratio: Double
    }
    /// One codec on sample data.
    public struct CodecThroughput: Codable, Sendable {
        /// The codec.
        public var codec: String
        /// The block size it compressed.
        public var blockSize: Int
        /// Compression, MB/s of input.
        public var compressMBps: Double
        /// Decompression, MB/s of output.
        public var decompressMBps: Double
        /// Input bytes over compressed bytes.
        public var ratio: Double
    }
    /// How the store grows as clones of a file are written to.
    public struct Growth: Codable, Sendable {
        /// The file cloned.
        public var baseFileBytes: UInt64
        /// Clones made.
        public var clones: Int
        /// 4 KiB pages each clone writes.
        public var pagesDirtiedPerClone: Int
        /// Blocks those writes dirtied, all clones together.
        public var blocksDirtied: Int
        /// Those blocks' bytes.
        public var dirtiedBytesAtBlockGranularity: UInt64
        /// How much the store grew.
        public var storeGrowthBytes: UInt64
        /// storeGrowthBytes / dirtiedBytesAtBlockGranularity; goal ≤ 1.5.
        public var growthRatio: Double
    }
    /// Shorter runs and smaller files.
    public var quick: Bool
    /// The filesystem holding the store (the plain files' too).
    public var filesystemOf: String
    /// One entry per file size.
    public var clone: [CloneTiming] = []
    /// clone p50 of the largest file / clone p50 of the smallest; goal ≤ 2.
    public var cloneFlatness = 0.0
    /// One entry per I/O pattern.
    public var io: [IOThroughput] = []
    /// SHA-256 throughput in MB/s, by block size.
    public var hashMBps: [String: Double] = [:]
    /// One entry per codec and block size.
    public var codecs: [CodecThroughput] = []
    /// The growth figures, when that part ran.
    public var growth: Growth?
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench store`.
public struct StoreBenchmark {
    /// Where the run keeps its store and files (removed afterwards).
    public var workDir: String
    /// Shorter runs and smaller files.
    public var quick: Bool
    /// The parts to run (`codecs`, `clone`, `io`, `growth`); all when empty.
    public var only: Set<String>
    /// Called with a line for each step.
    public var progress: (String) -> Void

    /// The parts a run may be limited to.
    public static let parts = ["codecs", "clone", "io", "growth"]

    /// A run with the given settings.
    public init(workDir: String, quick: Bool, only: Set<String> = [], progress: @escaping (String) -> Void) {
        self.workDir = workDir
        self.quick = quick
        self.only = only
        self.progress = progress
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    static func percentile(_ xs: [Double], _ p: Double) -> Double {
        let s = xs.sorted()
        guard !s.isEmpty else { return 0 }
        return s[min(s.count - 1, Int((Double(s.count - 1) * p).rounded()))]
    }

    /// A block of plausible VM content: a real binary sample, stamped with `index` so every
    /// block is distinct.
    static func block(_ sample: [UInt8], _ index: UInt64, size: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size)
        let start = Int(index &* 7919 % UInt64(max(1, sample.count - size)))
        b.withUnsafeMutableBytes { dst in
            sample.withUnsafeBytes { src in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<(start + size)]))
            }
            dst.storeBytes(of: index, toByteOffset: 0, as: UInt64.self)
            dst.storeBytes(of: index ^ 0xdead_beef, toByteOffset: size / 2, as: UInt64.self)
        }
        return b
    }

    /// Up to `bytes` of real executable and library bytes from this machine (compressible the
    /// way VM images are), padded by repetition.
    static func sample(bytes: Int) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(bytes)
        let dirs = ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"]
        for d in dirs {
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: d) else { continue }
            for n in names.sorted() {
                guard out.count < bytes, let data = FileManager.default.contents(atPath: d + "/" + n) else { continue }
                out += data.prefix(bytes - out.count)
            }
        }
        if out.isEmpty { out = (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 31 >> 3) } }
        while out.count < bytes { out += out.prefix(bytes - out.count) }
        return out
    }

    /// Runs the benchmark (the parts of `only`, every part when empty).
    /// - Throws: when a step fails.
    public func run() throws -> StoreBenchReport {
        let t0 = Self.now()
        var r = StoreBenchReport(quick: quick, filesystemOf: workDir)
        let sample = Self.sample(bytes: 64 << 20)
        let want = { (part: String) in only.isEmpty || only.contains(part) }
        if want("codecs") { try benchCodecs(sample, &r) }
        if want("clone") { try benchClone(sample, &r) }
        if want("io") { try benchIO(sample, &r) }
        if want("growth") { try benchGrowth(sample, &r) }
        r.seconds = Self.now() - t0
        return r
    }

    func freshStore(_ label: String) throws -> (String, BlockStore) {
        let dir = workDir + "/furcate-bench-\(label)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        return (dir, try BlockStore.create(at: dir))
    }

    // MARK: codecs

    func benchCodecs(_ sample: [UInt8], _ r: inout StoreBenchReport) throws {
        progress("hash and codec throughput")
        let total = quick ? 16 << 20 : 64 << 20
        for bs in [4096, 64 << 10, 1 << 20] {
            let blocks = total / bs
            let t = Self.now()
            sample.withUnsafeBytes { raw in
                for k in 0..<blocks {
                    _ = BlockID.hash(UnsafeRawBufferPointer(rebasing: raw[(k * bs)..<((k + 1) * bs)]))
                }
            }
            r.hashMBps["\(bs)"] = Double(blocks * bs) / (Self.now() - t) / 1e6
            for codec in [Codec.lz4, .zstd(level: 1), .zstd(level: 3)] {
                let m = try CodecMeasure.measure(codec, sample: sample, blockSize: bs, bytes: total)
                r.codecs.append(
                    .init(
                        codec: codec.description, blockSize: bs, compressMBps: m.compress, decompressMBps: m.decompress,
                        ratio: m.ratio))
            }
        }
    }

    // MARK: clone

    func benchClone(_ sample: [UInt8], _ r: inout StoreBenchReport) throws {
        let sizes: [UInt64] = quick ? [16 << 20, 256 << 20, 1 << 30] : [16 << 20, 1 << 30, 16 << 30]
        let (dir, store) = try freshStore("clone")
        defer {
            store.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
        let bs = store.defaultBlockSize
        for size in sizes {
            progress("clone and snapshot of a \(ByteSize.format(size)) file (writing it first)")
            let name = "f\(size)"
            let f = try store.createFile(name)
            let chunk = 16
            var k: UInt64 = 0
            while k * UInt64(bs) < size {
                var buf = [UInt8]()
                buf.reserveCapacity(chunk * bs)
                for j in 0..<UInt64(chunk) where (k + j) * UInt64(bs) < size {
                    buf += Self.block(sample, k + j, size: bs)
                }
                try f.write(buf, at: k * UInt64(bs))
                k += UInt64(chunk)
            }
            try f.sync()
            var clones: [Double] = []
            var snaps: [Double] = []
            for i in 0..<25 {
                var t = Self.now()
                try store.clone(name, to: "\(name)-c\(i)")
                clones.append((Self.now() - t) * 1000)
                t = Self.now()
                try store.snapshot(name, as: "\(name)-s\(i)")
                snaps.append((Self.now() - t) * 1000)
            }
            r.clone.append(
                .init(
                    fileBytes: size, blocks: Int(size / UInt64(bs)),
                    cloneMillisP50: Self.percentile(clones, 0.5), cloneMillisP99: Self.percentile(clones, 0.99),
                    snapshotMillisP50: Self.percentile(snaps, 0.5), snapshotMillisP99: Self.percentile(snaps, 0.99)))
        }
        if let first = r.clone.first, let last = r.clone.last, first.cloneMillisP50 > 0 {
            r.cloneFlatness = last.cloneMillisP50 / first.cloneMillisP50
        }
    }

    // MARK: 4 KiB I/O against a plain file

    func benchIO(_ sample: [UInt8], _ r: inout StoreBenchReport) throws {
        let size = quick ? 64 << 20 : 256 << 20
        let io = 4096
        let randomOps = quick ? 8192 : 32768
        progress("4 KiB I/O: store vs pread/pwrite on a plain file, \(ByteSize.format(UInt64(size)))")
        let (dir, store) = try freshStore("io")
        let plainPath = dir + "/plain.bin"
        defer {
            store.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
        let fd = open(plainPath, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: plainPath) }
        defer { close(fd) }
        let f = try store.createFile("f")
        var rng = SplitMix64(seed: 7)
        let offsets = (0..<randomOps).map { _ in (rng.next() % UInt64(size / io)) * UInt64(io) }
        let page = Array(sample[0..<io])
        var buf = [UInt8](repeating: 0, count: io)

        func measure(_ name: String, bytes: Int, store body: () throws -> Void, plain: () throws -> Void) rethrows {
            var t = Self.now()
            try plain()
            let p = Double(bytes) / (Self.now() - t) / 1e6
            t = Self.now()
            try body()
            let s = Double(bytes) / (Self.now() - t) / 1e6
            r.io.append(.init(pattern: name, storeMBps: s, plainFileMBps: p, ratio: s / p))
        }
        try measure(
            "sequential write + fsync", bytes: size,
            store: {
                for k in 0..<(size / io) {
                    try sample.withUnsafeBytes {
                        try f.write(
                            UnsafeRawBufferPointer(rebasing: $0[(k * io % (sample.count - io))...].prefix(io)),
                            at: UInt64(k * io))
                    }
                }
                try f.sync()
            },
            plain: {
                for k in 0..<(size / io) {
                    _ = sample.withUnsafeBytes {
                        pwrite(fd, $0.baseAddress.map { $0 + (k * io % (sample.count - io)) }, io, off_t(k * io))
                    }
                }
                fsync(fd)
            })
        try measure(
            "sequential read", bytes: size,
            store: {
                for k in 0..<(size / io) {
                    _ = try buf.withUnsafeMutableBytes { try f.read(into: $0, at: UInt64(k * io)) }
                }
            },
            plain: {
                for k in 0..<(size / io) {
                    _ = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, io, off_t(k * io)) }
                }
            })
        try measure(
            "random read", bytes: randomOps * io,
            store: { for o in offsets { _ = try buf.withUnsafeMutableBytes { try f.read(into: $0, at: o) } } },
            plain: { for o in offsets { _ = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, io, off_t(o)) } } })
        try measure(
            "random write + fsync", bytes: randomOps * io,
            store: {
                for o in offsets { try f.write(page, at: o) }
                try f.sync()
            },
            plain: {
                for o in offsets { _ = page.withUnsafeBytes { pwrite(fd, $0.baseAddress, io, off_t(o)) } }
                fsync(fd)
            })
    }

    // MARK: growth of 100 clones

    func benchGrowth(_ sample: [UInt8], _ r: inout StoreBenchReport) throws {
        let size: UInt64 = quick ? 256 << 20 : 1 << 30
        let clones = quick ? 20 : 100
        progress(
            "store growth: \(clones) clones of a \(ByteSize.format(size)) file, each dirtying 1% of its 4 KiB pages")
        let (dir, store) = try freshStore("growth")
        defer {
            store.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
        let bs = store.defaultBlockSize
        let base = try store.createFile("base")
        var k: UInt64 = 0
        while k * UInt64(bs) < size {
            try base.write(Self.block(sample, k, size: bs), at: k * UInt64(bs))
            k += 1
        }
        try base.sync()
        let before = try store.stats().storedBytes + UInt64(try store.stats().nodes * 0)
        let pages = Int(size / 4096)
        let dirtyPages = pages / 100
        var rng = SplitMix64(seed: 99)
        var blocksDirtied = 0
        for c in 0..<clones {
            let f = try store.clone("base", to: "clone\(c)")
            var touched = Set<UInt64>()
            for _ in 0..<dirtyPages {
                let p = rng.next() % UInt64(pages)
                var page = [UInt8](repeating: 0, count: 4096)
                for i in stride(from: 0, to: 4096, by: 8) {
                    page.withUnsafeMutableBytes { $0.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
                }
                try f.write(page, at: p * 4096)
                touched.insert(p * 4096 / UInt64(bs))
            }
            try f.sync()
            blocksDirtied += touched.count
        }
        let after = try store.stats().storedBytes
        let dirtied = UInt64(blocksDirtied) * UInt64(bs)
        r.growth = .init(
            baseFileBytes: size, clones: clones, pagesDirtiedPerClone: dirtyPages, blocksDirtied: blocksDirtied,
            dirtiedBytesAtBlockGranularity: dirtied, storeGrowthBytes: after - before,
            growthRatio: Double(after - before) / Double(max(dirtied, 1)))
    }
}
