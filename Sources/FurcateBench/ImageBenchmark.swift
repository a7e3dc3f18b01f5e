import BlockStore
import Foundation
import FurcateCore
import Images
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// `furcate bench image`: image import, dedup between images, snapshot memory compression —
/// each against a baseline measured in the same run.
///
/// - Pull + rootfs build of a generated two-layer image (OCI layout, gzip) and, when the guest
///   artifacts have it, the Debian 12 systemd rootfs (200 MB tar): Furcate's whole pipeline
///   (verify, unpack with whiteouts, inject, mkfs.ext4 -d, import into the store) against the
///   naive one (GNU tar -x of each layer, mkfs.ext4 -d of the same size, no store).
/// - Dedup: two images sharing their base layer, pulled into one store, against each pulled
///   into a store of its own.
/// - Compression of a VM snapshot's memory for zstd and lz4 levels, against the store's default.
public struct ImageBenchmark: Sendable {
    /// One image's pull against the naive pipeline.
    public struct PullFigures: Codable, Sendable {
        /// The image pulled.
        public var image: String
        /// Its layers.
        public var layers: Int
        /// Its unpacked content.
        public var contentBytes: UInt64
        /// The rootfs built for it.
        public var diskBytes: UInt64
        /// Furcate's pull + rootfs build.
        public var furcateSeconds: Double
        /// tar -x of each layer + mkfs.ext4 -d of the same size.
        public var baselineSeconds: Double
        /// Furcate over the baseline (lower is better).
        public var ratio: Double
    }
    /// Two images sharing a base layer, in one store and apart.
    public struct DedupFigures: Codable, Sendable {
        /// Store bytes of image A pulled alone.
        public var aloneBytesA: UInt64
        /// Store bytes of image B pulled alone.
        public var aloneBytesB: UInt64
        /// Store bytes of both pulled into one store.
        public var togetherBytes: UInt64
        /// (A alone + B alone) / together.
        public var ratio: Double
    }
    /// One codec on a snapshot's memory.
    public struct CompressionFigures: Codable, Sendable {
        /// The codec (`zstd:N`, `lz4:N`).
        public var codec: String
        /// The memory's bytes as stored with it.
        public var storedBytes: UInt64
        /// Uncompressed over stored bytes.
        public var ratio: Double
        /// How long recompressing took.
        public var seconds: Double
        /// Uncompressed MB per second of that.
        public var mbPerSecond: Double
        /// ratio / the store default's ratio.
        public var ratioVsDefault: Double
    }
    /// Everything the run measured.
    public struct Report: Codable, Sendable {
        /// One entry per image pulled.
        public var pulls: [PullFigures] = []
        /// The dedup figures, when both images were pulled.
        public var dedup: DedupFigures?
        /// The snapshot memory's distinct bytes, uncompressed.
        public var memoryUncompressedBytes: UInt64 = 0
        /// The store's default codec, the compression baseline.
        public var defaultCodec = ""
        /// One entry per codec measured.
        public var compression: [CompressionFigures] = []
        /// The whole run's wall time.
        public var seconds = 0.0
    }

    let workDir: String
    let guestDir: String
    let skipCompression: Bool
    let log: @Sendable (String) -> Void

    /// A run keeping its files in `workDir`, with the guest artifacts of `guestDir`; `skipCompression` leaves the
    /// compression part out.
    public init(
        workDir: String, guestDir: String, skipCompression: Bool = false, log: @escaping @Sendable (String) -> Void
    ) {
        self.workDir = workDir
        self.guestDir = guestDir
        self.skipCompression = skipCompression
        self.log = log
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing or a step fails.
    public func run() async throws -> Report {
        let start = Date()
        let root = workDir + "/furcate-bench-image-\(getpid())"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        var r = Report()
        let agent = guestDir + "/furcate-agent"
        let agentPath = FileManager.default.isReadableFile(atPath: agent) ? agent : nil

        // Generated images: a 24 MiB base shared by A and B, 6 MiB of their own each.
        log("generating test images")
        let base = try Self.layerTar(root + "/gen-base", files: 3000, seed: 1, scratch: root)
        let a = try Self.layerTar(root + "/gen-a", files: 750, seed: 2, scratch: root)
        let b = try Self.layerTar(root + "/gen-b", files: 750, seed: 3, scratch: root)
        let config = ImageConfig(env: ["PATH=/usr/bin:/bin"])
        try OCILayoutWriter.write(root + "/layout-a", tag: "a", layers: [base, a], config: config)
        try OCILayoutWriter.write(root + "/layout-b", tag: "b", layers: [base, b], config: config)

        // Pull + build, Furcate vs the naive pipeline.
        var sources: [(String, String, [String])] = [
            ("generated (2 layers, 30 MiB)", "oci:\(root)/layout-a:a", [root + "/layout-a"])
        ]
        let debian = guestDir + "/debian-12-systemd.tar"
        if FileManager.default.isReadableFile(atPath: debian) {
            sources.append(("debian-12-systemd (mmdebstrap)", "rootfs:\(debian)", []))
        }
        for (name, ref, _) in sources {
            log("pull \(name)")
            let dir = root + "/pull-\(r.pulls.count)"
            let store = try BlockStore.create(at: dir + "/store")
            defer { store.close() }
            var o = ImageServiceOptions(directory: dir + "/images", agentPath: agentPath)
            o.logger.logLevel = .warning
            let svc = try ImageService(store: store, options: o)
            let t0 = Date()
            let rec = try await svc.pull(ref)
            let furcate = Date().timeIntervalSince(t0)
            let tarballs: [String]
            if ref.hasPrefix("rootfs:") {
                tarballs = [debian]
            } else {
                tarballs = try Self.layerBlobs(layout: root + "/layout-a", cache: dir + "/images/blobs/sha256")
            }
            let baseline = try await onThread("baseline") {
                try Self.naiveBuild(tarballs, size: rec.diskBytes, scratch: dir + "/naive")
            }
            r.pulls.append(
                PullFigures(
                    image: name, layers: rec.layers, contentBytes: rec.contentBytes, diskBytes: rec.diskBytes,
                    furcateSeconds: furcate,
                    baselineSeconds: baseline, ratio: furcate / baseline))
        }

        // Dedup between two images sharing a base.
        log("dedup: two images sharing a base")
        func storedAfter(_ refs: [String], _ dir: String) async throws -> UInt64 {
            let store = try BlockStore.create(at: dir + "/store")
            defer { store.close() }
            var o = ImageServiceOptions(directory: dir + "/images", agentPath: agentPath)
            o.logger.logLevel = .warning
            let svc = try ImageService(store: store, options: o)
            for ref in refs { _ = try await svc.pull(ref) }
            return try store.stats().storedBytes
        }
        let ra = "oci:\(root)/layout-a:a", rb = "oci:\(root)/layout-b:b"
        let aloneA = try await storedAfter([ra], root + "/dedup-a")
        let aloneB = try await storedAfter([rb], root + "/dedup-b")
        let together = try await storedAfter([ra, rb], root + "/dedup-ab")
        r.dedup = DedupFigures(
            aloneBytesA: aloneA, aloneBytesB: aloneB, togetherBytes: together,
            ratio: Double(aloneA + aloneB) / Double(max(together, 1)))

        if !skipCompression { try await compression(&r, root: root) }
        r.seconds = Date().timeIntervalSince(start)
        return r
    }

    /// A VM's snapshot memory recompressed per codec; each run starts from the default codec.
    private func compression(_ r: inout Report, root: String) async throws {
        log("compression: booting a VM to snapshot its memory")
        // Not under `root`: unix socket paths in the VM run directories must stay under 108 bytes.
        let env = try VMBenchEnvironment(workDir: workDir, guestDir: guestDir, name: "compress") { o in
            o.defaultMemoryMiB = 256
            o.network = false
        }
        do {
            let vm = try await env.service.create(CreateVMRequest(image: "rootfs"))
            // Fill page cache and tmpfs with text and some random bytes, as a working guest would.
            let sh = try await env.service.guestShell(vm.id, timeout: .seconds(60))
            _ = try await sh.run(
                "i=0; while [ $i -lt 3000 ]; do echo \"line $i of a log a guest wrote while working\"; i=$((i+1)); done > /root/log; cat /bin/busybox /root/log > /dev/null; head -c 8000000 /dev/urandom > /root/random; sync"
            )
            let snap = try await env.service.snapshot(vm.id)
            let file = snap.memoryPayloadFile
            let base = try env.store.compressionStats(file)
            r.memoryUncompressedBytes = base.uncompressedBytes
            r.defaultCodec = try env.store.defaultCodec.description
            let defaultRatio = base.ratio
            for codec in [
                Codec.lz4, .lz4hc(level: 9), .zstd(level: 1), .zstd(level: 3), .zstd(level: 9), .zstd(level: 19),
            ] {
                log("compression: \(codec)")
                guard let store = env.localStore else { throw FurcateError(.invalidState, "no local store") }
                let t0 = Date()
                let st = try await onThread("recompress") { try store.recompress(file, codec: codec) }
                let secs = Date().timeIntervalSince(t0)
                r.compression.append(
                    CompressionFigures(
                        codec: codec.description, storedBytes: st.storedBytes, ratio: st.ratio, seconds: secs,
                        mbPerSecond: Double(st.uncompressedBytes) / 1e6 / max(secs, 1e-9),
                        ratioVsDefault: st.ratio / defaultRatio))
            }
        } catch {
            await env.close()
            throw error
        }
        await env.close()
    }

    /// A tar of `files` generated files (text with some noise, 8 KiB each) under DIR/data-SEED.
    static func layerTar(_ dir: String, files: Int, seed: UInt64, scratch: String) throws -> OCILayoutWriter.Layer {
        let d = dir + "/data-\(seed)"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        var x = seed &* 0x9E37_79B9_7F4A_7C15
        let words = ["fork", "snapshot", "memory", "agent", "block", "store", "layer", "image", "kernel", "guest"]
        for i in 0..<files {
            var s = ""
            while s.utf8.count < 8192 {
                x ^= x << 13
                x ^= x >> 7
                x ^= x << 17
                s += words[Int(x % 10)] + (x % 7 == 0 ? String(x, radix: 36) : "") + " "
            }
            try Data(s.utf8.prefix(8192)).write(to: URL(fileURLWithPath: d + "/f\(i).txt"))
        }
        let tar = dir + ".tar"
        try RootfsBuilder.runTool(
            "tar",
            [
                "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "--mtime=@1700000000", "-C", dir, "-cf",
                tar, ".",
            ])
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: tar)))
        return try OCILayoutWriter.Layer.tar(bytes, gzip: true, scratch: scratch)
    }

    /// The layer blobs of a layout's image, in order (from the pull's blob cache).
    static func layerBlobs(layout: String, cache: String) throws -> [String] {
        struct Index: Decodable { struct M: Decodable { var digest: String }; var manifests: [M] }
        struct Manifest: Decodable { struct L: Decodable { var digest: String }; var layers: [L] }
        let idx = try JSONDecoder().decode(
            Index.self, from: Data(contentsOf: URL(fileURLWithPath: layout + "/index.json")))
        let m = try JSONDecoder().decode(
            Manifest.self,
            from: Data(
                contentsOf: URL(fileURLWithPath: layout + "/blobs/sha256/" + idx.manifests[0].digest.dropFirst(7))))
        return m.layers.map { cache + "/" + $0.digest.dropFirst(7) }
    }

    /// GNU tar -x of each layer, then mkfs.ext4 -d of `size`: seconds.
    static func naiveBuild(_ tarballs: [String], size: UInt64, scratch: String) throws -> Double {
        try FileManager.default.createDirectory(atPath: scratch + "/root", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let t0 = Date()
        for t in tarballs { try RootfsBuilder.runTool("tar", ["-xf", t, "-C", scratch + "/root"]) }
        try RootfsBuilder.mkfs(root: scratch + "/root", output: scratch + "/fs.ext4", size: size, label: "naive")
        return Date().timeIntervalSince(t0)
    }
}
