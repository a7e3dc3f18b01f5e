import BlockStore
import Foundation
import FurcateCore
import StoreFS

#if canImport(Glibc)
    import Glibc
#endif

/// Results of `furcate bench fs`: fio on a store file through the mount, on tmpfs and on ext4
/// (the filesystem holding the store), in one run.
public struct FSBenchReport: Codable, Sendable {
    /// One fio job on one target.
    public struct Job: Codable, Sendable {
        /// mount, tmpfs or ext4.
        public var target: String
        /// e.g. "randread 4k psync cold".
        public var job: String
        /// Throughput, MB/s.
        public var mbps: Double
        /// Median completion latency.
        public var latencyP50Micros: Double
        /// 99th-percentile completion latency.
        public var latencyP99Micros: Double
    }
    /// The mount against one baseline on one job.
    public struct Ratio: Codable, Sendable {
        /// The fio job.
        public var job: String
        /// mount / baseline throughput.
        public var ratio: Double
        /// tmpfs or ext4.
        public var baseline: String
        /// The ratio the mount is meant to reach.
        public var goal: Double
    }
    /// The test file's size.
    public var fileBytes: UInt64
    /// How long each fio job ran.
    public var secondsPerJob: Int
    /// Every job on every target.
    public var jobs: [Job] = []
    /// The mount against each baseline.
    public var ratios: [Ratio] = []
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench fs`: needs root (mount, drop_caches) and fio.
public struct FSBenchmark {
    /// Where the run keeps its store, mount and files (removed afterwards).
    public var workDir: String
    /// Shorter jobs and a smaller file.
    public var quick: Bool
    /// The furcate executable that serves the mount.
    public var furcate: String
    /// Extra `furcate mount` flags (e.g. --writeback-cache) to measure a setting.
    public var mountFlags: [String]
    /// Called with a line for each step.
    public var progress: (String) -> Void

    /// A run with the given settings.
    public init(
        workDir: String, quick: Bool, furcate: String, mountFlags: [String] = [], progress: @escaping (String) -> Void
    ) {
        self.workDir = workDir
        self.quick = quick
        self.furcate = furcate
        self.mountFlags = mountFlags
        self.progress = progress
    }

    struct Spec {
        var rw: String
        var bs: String
        var engine: String
        var cold: Bool
        var name: String { "\(rw) \(bs) \(engine)\(cold ? " cold" : " warm")" }
    }

    static var specs: [Spec] {
        var s: [Spec] = []
        for engine in ["psync", "mmap"] {
            for (rw, bs) in [("read", "1m"), ("write", "1m"), ("randread", "4k"), ("randwrite", "4k")] {
                s.append(Spec(rw: rw, bs: bs, engine: engine, cold: false))
                if rw.hasSuffix("read") { s.append(Spec(rw: rw, bs: bs, engine: engine, cold: true)) }
            }
        }
        return s
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing (root, fio) or a step fails.
    public func run() throws -> FSBenchReport {
        guard geteuid() == 0 else {
            throw FurcateError(.notPermitted, "bench fs needs root (it mounts and drops caches)")
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/fio") else {
            throw FurcateError(.notFound, "fio is not installed (apt-get install fio)")
        }
        let t0 = Date()
        let size: UInt64 = quick ? 256 << 20 : 1 << 30
        let runtime = quick ? 2 : 5
        var r = FSBenchReport(fileBytes: size, secondsPerJob: runtime)
        let base = workDir + "/furcate-bench-fs-\(getpid())"
        let shm = "/dev/shm/furcate-bench-fs-\(getpid())"
        let fm = FileManager.default
        try fm.createDirectory(atPath: base + "/mnt", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: base + "/ext4", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: shm, withIntermediateDirectories: true)
        defer {
            try? fm.removeItem(atPath: shm)
            try? fm.removeItem(atPath: base)
        }
        let storeDir = base + "/store"
        try BlockStore.create(at: storeDir).close()
        var server = try mount(storeDir, base + "/mnt")
        defer { unmount(server, base + "/mnt") }

        let targets = [
            ("mount", base + "/mnt/files/fio.bin"), ("tmpfs", shm + "/fio.bin"), ("ext4", base + "/ext4/fio.bin"),
        ]
        for (target, path) in targets {
            for spec in Self.specs {
                progress("\(target): \(spec.name)")
                if spec.cold {
                    dropCaches()
                    if target == "mount" {  // the store's block cache too
                        unmount(server, base + "/mnt")
                        server = try mount(storeDir, base + "/mnt")
                    }
                }
                let (bw, p50, p99) = try fio(path: path, size: size, spec: spec, runtime: runtime)
                r.jobs.append(
                    .init(target: target, job: spec.name, mbps: bw / 1e6, latencyP50Micros: p50, latencyP99Micros: p99))
            }
        }
        for spec in Self.specs {
            guard let m = r.jobs.first(where: { $0.target == "mount" && $0.job == spec.name }) else { continue }
            let baseline = spec.cold ? "ext4" : "tmpfs"
            guard let b = r.jobs.first(where: { $0.target == baseline && $0.job == spec.name }), b.mbps > 0 else {
                continue
            }
            r.ratios.append(
                .init(job: spec.name, ratio: m.mbps / b.mbps, baseline: baseline, goal: spec.cold ? 0.85 : 0.95))
        }
        r.seconds = Date().timeIntervalSince(t0)
        return r
    }

    func dropCaches() {
        sync()
        let fd = open("/proc/sys/vm/drop_caches", O_WRONLY)
        if fd >= 0 {
            _ = write(fd, "3\n", 2)
            close(fd)
        }
    }

    func mount(_ store: String, _ mountpoint: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: furcate)
        p.arguments = ["mount", store, mountpoint, "--foreground"] + mountFlags
        p.standardOutput = FileHandle.nullDevice
        try p.runWithSignalsUnblocked()
        let deadline = Date().addingTimeInterval(20)
        var st = statvfs()
        while Date() < deadline {
            if StoreFS.isMountPoint(mountpoint) && statvfs(mountpoint, &st) == 0 { return p }
            if !p.isRunning { break }
            usleep(10_000)
        }
        throw FurcateError(.io, "furcate mount did not come up", path: mountpoint)
    }

    func unmount(_ p: Process, _ mountpoint: String) {
        guard p.isRunning else { return }
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
    }

    /// Runs one fio job; returns (bytes/s, p50 µs, p99 µs).
    func fio(path: String, size: UInt64, spec: Spec, runtime: Int) throws -> (Double, Double, Double) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        p.arguments = [
            "--name=j", "--filename=\(path)", "--size=\(size)", "--rw=\(spec.rw)", "--bs=\(spec.bs)",
            "--ioengine=\(spec.engine)", "--runtime=\(runtime)", "--time_based", "--output-format=json",
            "--invalidate=\(spec.cold ? 1 : 0)", "--fsync_on_close=1",
        ]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.runWithSignalsUnblocked()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0,
            let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let job = (json["jobs"] as? [[String: Any]])?.first,
            let side = job[spec.rw.hasSuffix("read") ? "read" : "write"] as? [String: Any]
        else {
            throw FurcateError(.io, "fio failed (\(spec.name), status \(p.terminationStatus))", path: path)
        }
        let bw = (side["bw_bytes"] as? NSNumber)?.doubleValue ?? 0
        let pct = ((side["clat_ns"] as? [String: Any])?["percentile"] as? [String: Any]) ?? [:]
        let p50 = ((pct["50.000000"] as? NSNumber)?.doubleValue ?? 0) / 1000
        let p99 = ((pct["99.000000"] as? NSNumber)?.doubleValue ?? 0) / 1000
        return (bw, p50, p99)
    }
}
