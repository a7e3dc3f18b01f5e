import ArgumentParser
import BlockStore
import Foundation
import FurcateBench
import FurcateCore
import VMNetwork
import VMService

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "System benchmarks, each against a baseline measured in the same run.",
        subcommands: [Store.self, FS.self, Fork.self, Adopt.self, Agent.self, Image.self, API.self])

    struct API: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "api",
            abstract:
                "Fork over HTTP vs through the library, and wrk on GET /v1/vms with many VM records vs none; needs root, QEMU, the guest artifacts and wrk."
        )
        @Flag(help: "Print the report as JSON.") var json = false
        @Option(help: "Forks per path (HTTP and library).") var count = 20
        @Option(help: "VM records listed by GET /v1/vms.") var records = 1000
        @Option(help: "Seconds of each wrk run.") var wrkSeconds = 5
        @Option(help: "Directory to hold the store (default: the current directory).") var dir: String = "."
        @Option(help: "Guest artifacts (scripts/guest-artifacts.sh).") var guest: String = ForkBenchmark.defaultGuestDir

        func validate() throws {
            guard (1...1000).contains(count) else { throw ValidationError("--count must be 1 to 1000, not \(count)") }
            guard (1...100_000).contains(records) else {
                throw ValidationError("--records must be 1 to 100000, not \(records)")
            }
            guard (1...600).contains(wrkSeconds) else {
                throw ValidationError("--wrk-seconds must be 1 to 600, not \(wrkSeconds)")
            }
        }

        func run() throws {
            bootstrapOnce
            let b = APIBenchmark(
                workDir: dir, guestDir: guest, forkCount: count, records: records, wrkSeconds: wrkSeconds
            ) { FileHandleStderr.write("bench: \($0)\n") }
            let json = json
            try runBlocking {
                let r = try await b.run()
                if json { return try printJSON(r, snakeCase: true) }
                print(
                    "accelerator \(r.accelerator); \(r.forkCount) forks per path (verified \(r.forksVerified) of \(2 * r.forkCount))"
                )
                print(
                    "fork over HTTP p50 \(f1(r.httpForkP50Millis)) ms, p99 \(f1(r.httpForkP99Millis)) ms; library p50 \(f1(r.libraryForkP50Millis)) ms, p99 \(f1(r.libraryForkP99Millis)) ms; overhead ratio \(f2(r.forkOverheadRatio))"
                )
                print(
                    "GET /v1/vms, \(r.records) VMs (wrk \(r.wrkSeconds) s, \(r.wrkConnections) connections): \(f1(r.listRequestsPerSecond)) req/s, p99 \(f2(r.listP99Millis)) ms, \(r.listErrors) errors"
                )
                print(
                    "  baseline, no VMs: \(f1(r.emptyListRequestsPerSecond)) req/s, p99 \(f2(r.emptyListP99Millis)) ms; throughput ratio \(f2(r.listThroughputRatio))"
                )
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct Image: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "image",
            abstract:
                "Image pull + rootfs build vs tar -x + mkfs, dedup of two images sharing a base, snapshot memory compression per codec; compression needs root, QEMU and the guest artifacts."
        )
        @Flag(help: "Print the report as JSON.") var json = false
        @Flag(help: "Skip the snapshot memory compression part (no VM).") var noCompression = false
        @Option(help: "Directory for the scratch stores (default: the current directory).") var dir: String = "."
        @Option(help: "Guest artifacts (scripts/guest-artifacts.sh).") var guest: String = ForkBenchmark.defaultGuestDir

        func run() throws {
            bootstrapOnce
            let b = ImageBenchmark(workDir: dir, guestDir: guest, skipCompression: noCompression) {
                FileHandleStderr.write("bench: \($0)\n")
            }
            let json = json
            try runBlocking {
                let r = try await b.run()
                if json { return try printJSON(r, snakeCase: true) }
                for p in r.pulls {
                    print(
                        "pull+build \(p.image): \(p.layers) layers, \(formatBytes(p.contentBytes)) of files, \(formatBytes(p.diskBytes)) disk: furcate \(f2(p.furcateSeconds)) s, tar -x + mkfs \(f2(p.baselineSeconds)) s, ratio \(f2(p.ratio))"
                    )
                }
                if let d = r.dedup {
                    print(
                        "dedup: A alone \(formatBytes(d.aloneBytesA)), B alone \(formatBytes(d.aloneBytesB)), together \(formatBytes(d.togetherBytes)): ratio \(f2(d.ratio))"
                    )
                }
                if !r.compression.isEmpty {
                    print(
                        "snapshot memory: \(formatBytes(r.memoryUncompressedBytes)) in stored blocks; store default \(r.defaultCodec)"
                    )
                    for c in r.compression {
                        print(
                            "  \(c.codec.padding(toLength: 8, withPad: " ", startingAt: 0)) \(formatBytes(c.storedBytes).padding(toLength: 9, withPad: " ", startingAt: 0)) ratio \(f2(c.ratio)) (\(f2(c.ratioVsDefault))x the default), \(f1(c.mbPerSecond)) MB/s"
                        )
                    }
                }
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct Agent: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "agent",
            abstract:
                "Guest agent exec round trip and file throughput in a VM vs the serial shell and a local process; needs root, QEMU and the guest artifacts."
        )
        @Flag(help: "Print the report as JSON.") var json = false
        @Option(help: "Exec round trips per path.") var count = 200
        @Option(help: "MiB written and read through the agent.") var fileMib = 64
        @Option(help: "Directory to hold the store (default: the current directory).") var dir: String = "."
        @Option(help: "Guest artifacts (scripts/guest-artifacts.sh).") var guest: String = ForkBenchmark.defaultGuestDir

        func run() throws {
            bootstrapOnce
            guard (1...100_000).contains(count), (4...4096).contains(fileMib) else {
                throw ValidationError("--count must be 1 to 100000 and --file-mib 4 to 4096")
            }
            let b = AgentBenchmark(workDir: dir, guestDir: guest, execCount: count, fileMiB: fileMib) {
                FileHandleStderr.write("bench: \($0)\n")
            }
            let json = json
            try runBlocking {
                let r = try await b.run()
                if json { return try printJSON(r, snakeCase: true) }
                print("accelerator \(r.accelerator); \(r.execCount) round trips each")
                print(
                    "exec true: agent p50 \(f2(r.agentExecP50Millis)) ms, p99 \(f2(r.agentExecP99Millis)) ms; serial shell p50 \(f2(r.shellExecP50Millis)) ms, p99 \(f2(r.shellExecP99Millis)) ms; ratio \(f2(r.agentExecP50Millis / r.shellExecP50Millis))"
                )
                print("ping: agent p50 \(f2(r.agentPingP50Millis)) ms")
                print(
                    "files (\(r.fileMiB) MiB, 4 MiB requests): agent write \(f1(r.agentWriteMBps)) MB/s, read \(f1(r.agentReadMBps)) MB/s; local write \(f1(r.localWriteMBps)), read \(f1(r.localReadMBps)); ratios \(f2(r.agentWriteMBps / r.localWriteMBps)) / \(f2(r.agentReadMBps / r.localReadMBps))"
                )
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct Fork: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "fork",
            abstract:
                "Fork a running VM N ways per memory mode vs a cold boot of it; needs root, QEMU and the guest artifacts."
        )
        @Flag(help: "Print the report as JSON.") var json = false
        @Option(help: "Forks per memory mode.") var count = 8
        @Option(help: "Memory mode: a, b or both.") var memoryMode = "both"
        @Option(help: "Guest memory in MiB.") var memory = 512
        @Option(help: "Block size of guest memory files (e.g. 4K, 64K; default 64K).") var memoryBlockSize: String?
        @Option(help: "QEMUs kept waiting for mode-a forks (0: every fork spawns one).") var warmPool = 0
        @Option(help: "Single forks made one after another per memory mode, after the N-way fork (0: none).")
        var rounds = 10
        @Option(help: "Also draw the figure against its baseline as SVG into this file.") var plot: String?
        @Option(help: "Seconds the base VM runs on after booting before it is snapshotted (0: at once).") var settle =
            10
        @OptionGroup var store: StoreHostOption
        @Option(
            help:
                "Give every VM a network of its own from this IPv4 pool, as furcate serve --vm-network does (default: QEMU's user-mode network)."
        )
        var vmNetwork: String?
        @Option(help: "Directory to hold the store (default: the current directory).") var dir: String = "."
        @Option(help: "Guest artifacts (scripts/guest-artifacts.sh).") var guest: String = ForkBenchmark.defaultGuestDir

        func validate() throws {
            if let n = vmNetwork {
                do { _ = try IPv4Network(parsing: n) } catch let e as FurcateError {
                    throw ValidationError("--vm-network: \(e.message)")
                }
            }
        }

        func run() throws {
            bootstrapOnce
            let pool = try vmNetwork.map { try IPv4Network(parsing: $0) }
            let (count, memoryMode, memory, warmPool, dir, guest, json, memoryBlockSize, rounds, settle, plot) =
                (count, memoryMode, memory, warmPool, dir, guest, json, memoryBlockSize, rounds, settle, plot)
            let storeHost = store.storeHost
            try runBlocking {
                let modes: [MemoryMode]
                switch memoryMode {
                case "both": modes = [.shared, .privateBase]
                case let m:
                    guard let mode = MemoryMode(rawValue: m) else {
                        throw FurcateError(.invalidArgument, "--memory-mode must be a, b or both, not '\(m)'")
                    }
                    modes = [mode]
                }
                guard (1...1000).contains(count) else {
                    throw FurcateError(.invalidArgument, "--count must be 1 to 1000")
                }
                guard (0...1000).contains(warmPool) else {
                    throw FurcateError(.invalidArgument, "--warm-pool must be 0 to 1000")
                }
                guard (64...65536).contains(memory) else {
                    throw FurcateError(.invalidArgument, "--memory must be 64 to 65536 MiB")
                }
                guard (0...1000).contains(rounds) else {
                    throw FurcateError(.invalidArgument, "--rounds must be 0 to 1000")
                }
                guard (0...3600).contains(settle) else {
                    throw FurcateError(.invalidArgument, "--settle must be 0 to 3600 seconds")
                }
                var bs: Int?
                if let s = memoryBlockSize {
                    let v = Int(try ByteSize.parse(s))
                    try BlockStore.validateBlockSize(v)
                    bs = v
                }
                var b = ForkBenchmark(
                    workDir: dir, guestDir: guest, count: count, modes: modes, memoryMiB: memory, warmPool: warmPool
                ) {
                    FileHandleStderr.write("bench: \($0)\n")
                }
                b.memoryBlockSize = bs
                b.rounds = rounds
                b.settleSeconds = settle
                b.storeHost = storeHost
                b.vmNetwork = pool
                let r = try await b.run()
                if let plot { try writePlot(r.chart, to: plot) }
                if json { return try printJSON(r, snakeCase: true) }  // forks_verified, …
                print(
                    "accelerator \(r.accelerator), store in \(r.storeHost == "process" ? "a storage process" : "this process"), network \(r.vmNetwork.isEmpty ? "user-mode" : "own namespaces from " + r.vmNetwork), guest memory \(r.memoryMiB) MiB in \(ByteSize.format(UInt64(r.memoryBlockSize))) store blocks"
                )
                print(
                    "baseline: cold boot to first guest response \(f1(r.coldBootMillis)) ms; guest write \(r.guestWriteMiB) MiB \(f1(r.coldBootGuestWriteMBps)) MB/s"
                )
                print(
                    "first snapshot of the base VM, \(r.settleSeconds) s after boot: \(f1(r.firstSnapshotMillis)) ms (forks below start from a VM snapshotted once)"
                )
                for m in r.modes {
                    print(
                        "memory mode \(m.memoryMode), \(m.count) forks (verified \(m.forksVerified)), warm pool \(m.warmPool):"
                    )
                    print(
                        "  snapshot of the parent \(f1(m.snapshotMillis)) ms; all \(m.count) running after \(f1(m.wallMillis)) ms"
                    )
                    print(
                        "  fork p50 \(f1(m.forkP50Millis)) ms = \(f2(m.forkP50Millis / r.coldBootMillis)) of a cold boot"
                    )
                    for p in m.phases {
                        print(
                            "    \(p.name.rightPad(22)) p50 \(f2(p.p50Millis).leftPad(8)) ms   p99 \(f2(p.p99Millis).leftPad(8)) ms"
                        )
                    }
                    print(
                        "  per idle fork: PSS \(f1(m.pssPerForkMiB)) MiB; guest RAM PSS \(f2(m.ramPssPerForkMiB)) MiB, copied on write \(f2(m.ramAnonPerForkMiB)) MiB (\(f2(m.ramAnonAtReturnPerForkMiB)) MiB when the fork returned)"
                    )
                    print(
                        "  guest write \(f1(m.guestWriteMBps)) MB/s (\(f2(m.guestWriteMBps / r.coldBootGuestWriteMBps)) of the cold-booted VM)"
                    )
                    print("  snapshot of a fork \(f1(m.snapshotOfForkMillis)) ms")
                    if m.rounds > 0 {
                        print(
                            "  \(m.rounds) single forks in turn\(m.warmPool > 0 ? " (each with a pooled QEMU waiting)" : ""):"
                        )
                    }
                    for p in m.sequential {
                        print(
                            "    \(p.name.rightPad(22)) p50 \(f2(p.p50Millis).leftPad(8)) ms   p99 \(f2(p.p99Millis).leftPad(8)) ms"
                        )
                    }
                }
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct Adopt: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "adopt",
            abstract:
                "A new server taking over N running VMs vs resuming N suspended ones, until all answer; needs root, QEMU and the guest artifacts."
        )
        @Flag(help: "Print the report as JSON.") var json = false
        @Option(help: "The numbers of running VMs, comma-separated (each a round).") var counts = "1,8,32"
        @Option(help: "Guest memory in MiB.") var memory = 256
        @OptionGroup var store: StoreHostOption
        @Option(help: "Directory to hold the store (default: the current directory).") var dir: String = "."
        @Option(help: "Guest artifacts (scripts/guest-artifacts.sh).") var guest: String = ForkBenchmark.defaultGuestDir

        func parsedCounts() throws -> [Int] {
            let parts = counts.split(separator: ",", omittingEmptySubsequences: false)
            let ns = parts.compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard !ns.isEmpty, ns.count == parts.count, ns.allSatisfy({ (1...200).contains($0) }) else {
                throw ValidationError("--counts must be numbers from 1 to 200 separated by commas, not '\(counts)'")
            }
            return ns
        }

        func validate() throws {
            _ = try parsedCounts()
            guard (64...65536).contains(memory) else { throw ValidationError("--memory must be 64 to 65536 MiB") }
        }

        func run() throws {
            bootstrapOnce
            var b = AdoptBenchmark(workDir: dir, guestDir: guest, counts: try parsedCounts(), memoryMiB: memory) {
                FileHandleStderr.write("bench: \($0)\n")
            }
            b.storeHost = store.storeHost
            let (json, bench) = (json, b)
            try runBlocking {
                let r = try await bench.run()
                if json { return try printJSON(r, snakeCase: true) }
                print(
                    "accelerator \(r.accelerator), store in \(r.storeHost == "process" ? "a storage process" : "this process"), guest memory \(r.memoryMiB) MiB"
                )
                print("until all N answer with the value in their memory (ms): takeover vs resume from suspend")
                for x in r.rounds {
                    print(
                        "  N=\(String(x.count).leftPad(3))  takeover \(f1(x.adoptMillis).leftPad(9)) (recover \(f1(x.adoptRecoverMillis)))  resume \(f1(x.resumeMillis).leftPad(9))  ratio \(f2(x.ratio))  (the stop's suspend took \(f1(x.suspendMillis)))"
                    )
                }
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct FS: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "fs",
            abstract: "fio through the mount vs tmpfs (warm) and ext4 (cold), psync and mmap; needs root and fio.")
        @Flag(help: "Print the report as JSON.") var json = false
        @Flag(help: "256 MiB files and 2 s jobs instead of 1 GiB and 5 s.") var quick = false
        @Option(help: "Directory on the ext4 filesystem to measure (holds the store; default: the current directory).")
        var dir: String = "."
        @Flag(help: "Mount with the FUSE writeback cache.") var writebackCache = false
        @Option(help: "Mount with this readahead in KiB (see furcate mount).") var readaheadKb: Int?
        @Option(help: "Mount with this share of the dirty-page budget in percent (see furcate mount).")
        var maxDirtyRatio: Int?
        @Option(help: "Also draw the figure against its baselines as SVG into this file.") var plot: String?

        func run() throws {
            try reportingErrors {
                bootstrapOnce
                let exe =
                    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
                    ?? CommandLine.arguments[0]
                var flags = writebackCache ? ["--writeback-cache"] : []
                if let readaheadKb { flags += ["--readahead-kb", "\(readaheadKb)"] }
                if let maxDirtyRatio { flags += ["--max-dirty-ratio", "\(maxDirtyRatio)"] }
                let b = FSBenchmark(workDir: dir, quick: quick, furcate: exe, mountFlags: flags) {
                    FileHandleStderr.write("bench: \($0)\n")
                }
                let r = try b.run()
                if let plot { try writePlot(r.chart, to: plot) }
                if json { return try printJSON(r) }
                print("fio, \(ByteSize.format(r.fileBytes)) file, \(r.secondsPerJob) s per job (MB/s, p50 / p99 us):")
                for j in r.jobs {
                    print(
                        "  \(j.target.rightPad(6)) \(j.job.rightPad(24)) \(f1(j.mbps).leftPad(9))  \(f1(j.latencyP50Micros).leftPad(8)) / \(f1(j.latencyP99Micros))"
                    )
                }
                print("mount vs baseline:")
                for x in r.ratios {
                    print("  \(x.job.rightPad(24)) \(f2(x.ratio)) of \(x.baseline) (goal >= \(f2(x.goal)))")
                }
                print("total \(f1(r.seconds)) s")
            }
        }
    }

    struct Store: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Clone/snapshot time by file size, 4 KiB I/O vs a plain file, codec throughput, clone growth.")
        @Flag(help: "Print the report as JSON.") var json = false
        @Flag(help: "Smaller sizes (16 MiB-1 GiB files, 20 clones of 256 MiB) for a run of a minute or two.")
        var quick = false
        @Option(help: "Directory on the filesystem to measure (default: the current directory).") var dir: String = "."
        @Option(help: "Run only these parts (comma-separated): codecs, clone, io, growth.") var only: String?

        func run() throws {
            try reportingErrors {
                bootstrapOnce
                let parts = Set(
                    (only ?? "").split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }.filter {
                        !$0.isEmpty
                    })
                if let bad = parts.first(where: { !StoreBenchmark.parts.contains($0) }) {
                    throw FurcateError(
                        .invalidArgument,
                        "--only: unknown part '\(bad)'; parts are \(StoreBenchmark.parts.joined(separator: ", "))")
                }
                let b = StoreBenchmark(workDir: dir, quick: quick, only: parts) {
                    FileHandleStderr.write("bench: \($0)\n")
                }
                let r = try b.run()
                if json { return try printJSON(r) }
                if !r.clone.isEmpty { print("clone and snapshot (p50 / p99 ms):") }
                for c in r.clone {
                    print(
                        "  \(ByteSize.format(c.fileBytes).leftPad(8))  clone \(f3(c.cloneMillisP50)) / \(f3(c.cloneMillisP99))   snapshot \(f3(c.snapshotMillisP50)) / \(f3(c.snapshotMillisP99))"
                    )
                }
                if !r.clone.isEmpty {
                    print("  flatness (largest / smallest clone p50): \(f2(r.cloneFlatness)) (goal <= 2)")
                }
                if !r.io.isEmpty { print("4 KiB I/O, store vs plain file (MB/s):") }
                for i in r.io {
                    print(
                        "  \(i.pattern.rightPad(26)) store \(f1(i.storeMBps).leftPad(8))   plain \(f1(i.plainFileMBps).leftPad(8))   ratio \(f2(i.ratio))"
                    )
                }
                if !r.hashMBps.isEmpty {
                    print(
                        "SHA-256 (MB/s): "
                            + r.hashMBps.sorted { (Int($0.key) ?? 0) < (Int($1.key) ?? 0) }.map {
                                "\(ByteSize.format(UInt64($0.key) ?? 0)) \(Int($0.value))"
                            }.joined(separator: ", "))
                }
                if !r.codecs.isEmpty { print("codecs (compress / decompress MB/s, ratio):") }
                for c in r.codecs {
                    print(
                        "  \(c.codec.rightPad(7)) \(ByteSize.format(UInt64(c.blockSize)).leftPad(7))  \(f0(c.compressMBps).leftPad(6)) / \(f0(c.decompressMBps).leftPad(6))  \(f2(c.ratio))x"
                    )
                }
                if let g = r.growth {
                    print(
                        "growth: \(g.clones) clones of \(ByteSize.format(g.baseFileBytes)), \(g.blocksDirtied) blocks dirtied (\(ByteSize.format(g.dirtiedBytesAtBlockGranularity)) at block granularity): store grew \(ByteSize.format(g.storeGrowthBytes)), ratio \(f3(g.growthRatio)) (goal <= 1.5)"
                    )
                }
                print(String(format: "total %.1f s", r.seconds))
            }
        }
    }
}

func f0(_ v: Double) -> String { String(format: "%.0f", v) }
func f1(_ v: Double) -> String { String(format: "%.1f", v) }
func f2(_ v: Double) -> String { String(format: "%.2f", v) }
func f3(_ v: Double) -> String { String(format: "%.3f", v) }

extension String {
    func rightPad(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}

/// Writes a benchmark's figure as SVG (`--plot FILE`).
func writePlot(_ chart: BarChart, to path: String) throws {
    do { try Data(chart.svg.utf8).write(to: URL(fileURLWithPath: path), options: .atomic) } catch {
        throw FurcateError(.io, "cannot write the plot to \(path): \(error.localizedDescription)")
    }
    FileHandleStderr.write("bench: figure written to \(path)\n")
}

extension BenchStoreHost: ExpressibleByArgument {}

/// `--store-host`, shared by the VM benchmarks that can put the store in either place.
struct StoreHostOption: ParsableArguments {
    @Option(
        help: "Where the store lives: process (a storage process, as furcate serve has it) or local (in this process)."
    )
    var storeHost: BenchStoreHost = .process
}
