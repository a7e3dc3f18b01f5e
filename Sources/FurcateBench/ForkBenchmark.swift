import BlockStore
import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor
import StoreFS
import VMNetwork
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Results of `furcate bench fork`: a base VM forked N ways per memory mode, against a cold
/// boot of the same VM measured in the same run.
public struct ForkBenchReport: Codable, Sendable {
    /// One step's latency over the forks measured.
    public struct Phase: Codable, Sendable {
        /// The step.
        public var name: String
        /// Its median.
        public var p50Millis: Double
        /// Its 99th percentile.
        public var p99Millis: Double
    }
    /// The figures of one memory mode.
    public struct Mode: Codable, Sendable {
        /// "a" (each fork's RAM its own store file, shared mapping) or "b" (forks map the
        /// snapshot's memory privately).
        public var memoryMode: String
        /// Forks of the N-way fork.
        public var count: Int
        /// QEMUs the warm pool kept waiting.
        public var warmPool: Int
        /// The one snapshot of the running parent a fork takes.
        public var snapshotMillis: Double
        /// From the fork call to all N running.
        public var wallMillis: Double
        /// Store clone, process spawn (or pool take), migrate-incoming, resume, and first
        /// guest response (the fork's shell answering), per fork.
        public var phases: [Phase]
        /// Fork call to running, per fork (what "fork of a running VM" costs).
        public var forkP50Millis: Double
        /// Host memory per idle fork: PSS of the whole QEMU process, and of the guest RAM
        /// mapping alone (page cache shares divided among mappers + private copies).
        public var pssPerForkMiB: Double
        /// The same for the guest RAM mapping alone.
        public var ramPssPerForkMiB: Double
        /// Anonymous guest RAM pages of each fork: the pages it copied on write (mode b). In
        /// mode a a fork's RAM is its own file, so all of its RAM PSS is its own.
        public var ramAnonPerForkMiB: Double
        /// The same, read as soon as the fork call returned (each fork running, before its
        /// freshening): what the restore itself copied, before the guest's own activity.
        public var ramAnonAtReturnPerForkMiB: Double
        /// The guest writes `guestWriteMiB` to its tmpfs in one fork.
        public var guestWriteMBps: Double
        /// Snapshot of one of the forks.
        public var snapshotOfForkMillis: Double
        /// Forks that answered and proved isolated (own marker seen, no other VM sees it).
        public var forksVerified: Int
        /// Single forks of the parent one after another (`rounds` of them, each removed before
        /// the next; with a warm pool, each starts once a pooled QEMU waits again): fork end to
        /// end, the restore step (migrate-incoming + resume) and its parts.
        public var rounds: Int = 0
        /// The sequential forks' steps (see `rounds`).
        public var sequential: [Phase] = []
    }
    /// KVM or TCG, as the run used.
    public var accelerator: String
    /// Where the store lived: "process" (a storage process, as `furcate serve` has it) or
    /// "local" (in the benchmark's process).
    public var storeHost = BenchStoreHost.local.rawValue
    /// The VM network pool every VM's network came from ("" : QEMU's user-mode network).
    public var vmNetwork = ""
    /// Each VM's guest RAM in MiB.
    public var memoryMiB: Int
    /// Block size of the memory files.
    public var memoryBlockSize: Int
    /// What one fork writes to its tmpfs.
    public var guestWriteMiB: Int
    /// Baseline: cold boot of the same image to its first guest response.
    public var coldBootMillis: Double
    /// The same guest write in the cold-booted VM.
    public var coldBootGuestWriteMBps: Double
    /// The base VM's first snapshot after boot (mode a writes back every page the boot
    /// dirtied); the forks below start from a VM snapshotted once already.
    public var firstSnapshotMillis: Double = 0
    /// How long the base VM ran on after it first answered, before that snapshot.
    public var settleSeconds = 0
    /// One entry per memory mode measured.
    public var modes: [Mode] = []
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench fork`: needs root (it mounts the store), QEMU and the guest artifacts.
public struct ForkBenchmark: Sendable {
    /// Where the run keeps its store, mount and data (removed afterwards).
    public var workDir: String
    /// The guest kernel, initramfs and test rootfs.
    public var guestDir: String
    /// Forks of the N-way fork.
    public var count: Int
    /// The memory modes measured, in order.
    public var modes: [MemoryMode]
    /// Each VM's guest RAM in MiB.
    public var memoryMiB: Int
    /// QEMUs the warm pool keeps waiting.
    public var warmPool: Int
    /// Block size of memory files (nil: the service's default).
    public var memoryBlockSize: Int?
    /// Sequential single forks per memory mode after the N-way fork (see `Mode.sequential`).
    public var rounds = 10
    /// Seconds the base VM runs on after it first answers before it is snapshotted: a VM
    /// forked while still finishing its boot (the kernel's first writeback, IPv6 address
    /// configuration, ext4's bitmap prefetch) has every fork go on with that work, each into
    /// pages of its own — a warmed VM has done it.
    public var settleSeconds = 10
    /// Where the store lives.
    public var storeHost = BenchStoreHost.local
    /// When set, every VM gets a network of its own from this pool (VMNetwork), as
    /// `furcate serve --vm-network` has it; nil: QEMU's user-mode network.
    public var vmNetwork: IPv4Network?
    /// Called with a line for each step.
    public var progress: @Sendable (String) -> Void

    /// A run with the given settings; the rest take the defaults above.
    public init(
        workDir: String, guestDir: String, count: Int, modes: [MemoryMode], memoryMiB: Int = 512, warmPool: Int = 0,
        progress: @escaping @Sendable (String) -> Void
    ) {
        self.workDir = workDir
        self.guestDir = guestDir
        self.count = count
        self.modes = modes
        self.memoryMiB = memoryMiB
        self.warmPool = warmPool
        self.progress = progress
    }

    /// Where scripts/guest-artifacts.sh puts guests by default.
    public static var defaultGuestDir: String {
        DataLayout().guest
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing (root, QEMU, the guest artifacts) or a step fails.
    public func run() async throws -> ForkBenchReport {
        let t0 = ContinuousClock.now
        let env = try VMBenchEnvironment(workDir: workDir, guestDir: guestDir, name: "fork", storeHost: storeHost) {
            opts in
            opts.defaultMemoryMiB = memoryMiB
            opts.warmPoolSize = warmPool
            if let pool = vmNetwork,
                let o = try? NetworkOptions(pool: pool, tag: NetworkOptions.tag(for: workDir + "/bench"))
            {
                opts.networks = NetworkHost(options: o)
            }
            // N TCG guests restored at once on a small host take longer than the service's 10 s
            // to answer their freshening; the benchmark reports how long it took instead.
            opts.agentTimeout = .seconds(max(10, 4 * count))
            if let memoryBlockSize { opts.memoryBlockSize = memoryBlockSize }
        }
        let svc = env.service
        let diskBytes = env.diskBytes
        let opts = svc.options
        let writeMiB = min(256, memoryMiB / 2)
        var report = ForkBenchReport(
            accelerator: opts.accelerator.rawValue, memoryMiB: memoryMiB, memoryBlockSize: opts.memoryBlockSize,
            guestWriteMiB: writeMiB, coldBootMillis: 0,
            coldBootGuestWriteMBps: 0)
        report.storeHost = storeHost.rawValue
        report.vmNetwork = vmNetwork?.description ?? ""
        do {
            progress("cold boot (baseline)")
            let b0 = ContinuousClock.now
            let cold = try await svc.create(CreateVMRequest(image: "rootfs"))
            let coldShell = try await svc.guestShell(cold.id, timeout: .seconds(120))
            report.coldBootMillis = Self.ms(ContinuousClock.now - b0)
            report.coldBootGuestWriteMBps = try await Self.guestWrite(coldShell, mib: writeMiB)
            _ = try await svc.kill(cold.id)
            try await svc.delete(cold.id)

            progress("base VM")
            let base = try await svc.create(CreateVMRequest(image: "rootfs"))
            // Closed before the forks: the debug shell is a facility of the test image, and a
            // session open across the snapshot ends in every fork right after its restore — the
            // shell's exit frees pages and writes their `struct page`s: measured, 0.2-0.35 MiB
            // more copied per mode-b fork that a fork of a production image (no such session)
            // does not copy.
            _ = try await svc.guestShell(base.id, timeout: .seconds(120)).run("echo base > /tmp/who")
            // One command through the guest agent, as anything using the VM would have run:
            // forks of a VM whose agent never served a request page its code in from disk, and
            // in mode b every page the guest reads in is a page copied on write in each fork
            // (measured: 4.5 MiB vs 1.7 MiB per fork at freshening).
            let warm = try await svc.agent(base.id).exec(ExecRequest(argv: ["/bin/sh", "-c", "true"]))
            guard warm.exitCode == 0 else {
                throw FurcateError(.io, "the base VM's agent could not run a command: \(warm)")
            }
            if settleSeconds > 0 {
                progress("base VM settling for \(settleSeconds) s")
                try await Task.sleep(for: .seconds(settleSeconds))
            }
            report.settleSeconds = settleSeconds
            let f0 = ContinuousClock.now
            let first = try await svc.snapshot(base.id)
            report.firstSnapshotMillis = Self.ms(ContinuousClock.now - f0)
            try await svc.deleteSnapshot(first.id)
            for mode in modes {
                if warmPool > 0 && mode == .shared {
                    progress("warm pool: \(warmPool) QEMUs waiting")
                    await svc.prewarm(memoryMiB: memoryMiB, vcpus: 1, diskBytes: diskBytes)
                }
                progress("fork \(count) (memory mode \(mode.rawValue))")
                report.modes.append(try await forkRun(svc, base: base.id, mode: mode, writeMiB: writeMiB))
            }
        } catch {
            await env.close()
            throw error
        }
        await env.close()
        report.seconds = Double((ContinuousClock.now - t0).components.seconds)
        return report
    }

    private func forkRun(_ svc: VMService, base: String, mode: MemoryMode, writeMiB: Int) async throws
        -> ForkBenchReport.Mode
    {
        let start = ContinuousClock.now
        let fork = try await svc.fork(base, count: count, memoryMode: mode)
        let wall = ContinuousClock.now - start
        var atReturn: [Double] = []
        for vm in fork.vms {
            guard let p = await svc.process(vm.id) else { continue }
            atReturn.append(Self.memoryUsage(pid: p.pid, mapping: Self.ramMapping(vm, fork, mode)).ramAnon)
        }
        // Until each fork's agent has reseeded its RNG and set its clock (in the background from
        // resume on; whatever reaches a fork through the service waits for it).
        // (Awaited in turn: a later fork's figure is when it was seen done, at most that late.)
        var freshen: [Double] = []
        for vm in fork.vms {
            guard await svc.awaitFreshened(vm.id) else {
                throw FurcateError(.io, "fork \(vm.id) was not freshened by its agent")
            }
            freshen.append(Self.ms(ContinuousClock.now - start))
        }
        // Host memory per idle fork: freshened, then left alone for a second (before the
        // benchmark's own shell commands below touch more of each guest).
        try await Task.sleep(for: .seconds(1))
        var usage: [Self.Usage] = []
        for vm in fork.vms {
            guard let p = await svc.process(vm.id) else { continue }
            usage.append(Self.memoryUsage(pid: p.pid, mapping: Self.ramMapping(vm, fork, mode)))
        }
        // First guest response of every fork, and isolation: each writes its own marker.
        var firstResponse: [Double] = []
        var shells: [(String, GuestShell)] = []
        for vm in fork.vms {
            let s0 = ContinuousClock.now
            let sh = try await svc.guestShell(vm.id, timeout: .seconds(60))
            firstResponse.append(Self.ms(ContinuousClock.now - s0))
            _ = try await sh.run("echo \(vm.id) > /tmp/who")
            shells.append((vm.id, sh))
        }
        var verified = 0
        for (id, sh) in shells where await Self.shellOutput(sh, "cat /tmp/who") == id {
            verified += 1
        }
        // The parent's debug session is closed again at once (its shell ends with it): one open
        // across a later snapshot ends in every fork of that snapshot right after its restore.
        if try await Self.shellOutput(svc.guestShell(base, timeout: .seconds(30)), "cat /tmp/who") != "base" {
            verified = 0
        }
        let write = try await Self.guestWrite(shells[0].1, mib: writeMiB)
        let s0 = ContinuousClock.now
        let snapOfFork = try await svc.snapshot(fork.vms[0].id)
        let snapMillis = Self.ms(ContinuousClock.now - s0)
        try? await svc.deleteSnapshot(snapOfFork.id)
        let t = fork.timings
        let phases: [(String, [Double])] = [
            ("store clone", t.map { Self.ms($0.storeClone) }), ("spawn", t.map { Self.ms($0.spawn) }),
            ("migrate-incoming", t.map { Self.ms($0.migrateIncoming) }),
            (Self.resumeLabel, t.map { Self.ms($0.resume) }),
            ("freshened (from the fork call)", freshen),
            ("first guest response", firstResponse),
        ]
        for vm in fork.vms { try? await svc.delete(vm.id) }
        let sequential = try await sequentialForks(svc, base: base, mode: mode)
        return ForkBenchReport.Mode(
            memoryMode: mode.rawValue, count: count, warmPool: mode == .shared ? warmPool : 0,
            snapshotMillis: Self.ms(fork.snapshotDuration),
            wallMillis: Self.ms(wall),
            phases: Self.summary(phases),
            forkP50Millis: Self.ms(fork.snapshotDuration) + Self.percentile(t.map { Self.ms($0.total) }, 0.5),
            pssPerForkMiB: Self.mean(usage.map(\.pss)), ramPssPerForkMiB: Self.mean(usage.map(\.ramPss)),
            ramAnonPerForkMiB: Self.mean(usage.map(\.ramAnon)), ramAnonAtReturnPerForkMiB: Self.mean(atReturn),
            guestWriteMBps: write,
            snapshotOfForkMillis: snapMillis, forksVerified: verified, rounds: rounds, sequential: sequential)
    }

    /// `rounds` single forks of `base`, one after another, each freshened and removed before
    /// the next. With a warm pool a round starts once a pooled QEMU waits again: the pool's
    /// steady state when forks come no faster than it refills.
    private func sequentialForks(_ svc: VMService, base: String, mode: MemoryMode) async throws -> [ForkBenchReport
        .Phase]
    {
        guard rounds > 0 else { return [] }
        progress("\(rounds) single forks in turn (memory mode \(mode.rawValue))")
        var fork: [Double] = [], restore: [Double] = [], clone: [Double] = [], spawn: [Double] = [],
            incoming: [Double] = [], resume: [Double] = []
        for _ in 0..<rounds {
            if mode == .shared && warmPool > 0 {
                let deadline = ContinuousClock.now + .seconds(60)
                while await svc.poolCount() == 0 {
                    guard ContinuousClock.now < deadline else {
                        throw FurcateError(.timedOut, "the warm pool did not refill within 60 s")
                    }
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            let r = try await svc.fork(base, count: 1, memoryMode: mode)
            let t = r.timings[0]
            fork.append(Self.ms(r.snapshotDuration + t.total))
            restore.append(Self.ms(t.migrateIncoming + t.resume))
            clone.append(Self.ms(t.storeClone))
            spawn.append(Self.ms(t.spawn))
            incoming.append(Self.ms(t.migrateIncoming))
            resume.append(Self.ms(t.resume))
            guard await svc.awaitFreshened(r.vms[0].id) else {
                throw FurcateError(.io, "fork \(r.vms[0].id) was not freshened by its agent")
            }
            try await svc.delete(r.vms[0].id)
            try? await svc.deleteSnapshot(r.snapshot.id)
        }
        return Self.summary([
            ("fork, end to end", fork), ("restore (migrate-incoming + resume)", restore), ("store clone", clone),
            ("spawn", spawn),
            ("migrate-incoming", incoming), (Self.resumeLabel, resume),
        ])
    }

    /// What `command` prints in a guest shell, trimmed; nil when it fails.
    static func shellOutput(_ sh: GuestShell, _ command: String) async -> String? {
        try? await sh.run(command).output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// QEMU starts a restored guest itself as the load completes; a `cont` is sent only for a
    /// stream saved with the paused run state.
    static let resumeLabel = "resume (cont; 0: QEMU started it)"

    /// The guest writes `mib` MiB of non-zero bytes (zero pages could be special-cased on
    /// the way) into its tmpfs, i.e. into guest RAM; MB/s including the shell's round trip.
    static func guestWrite(_ sh: GuestShell, mib: Int) async throws -> Double {
        _ = try await sh.run("rm -f /tmp/w; dd if=/dev/zero bs=1M count=1 2>/dev/null | tr '\\0' 'x' > /tmp/pattern")
        let t0 = ContinuousClock.now
        let (out, status) = try await sh.run(
            "i=0; while [ $i -lt \(mib) ]; do cat /tmp/pattern; i=$((i+1)); done > /tmp/w; sync", timeout: .seconds(300)
        )
        let elapsed = ContinuousClock.now - t0
        guard status == 0 else { throw FurcateError(.io, "guest write failed: \(out)") }
        _ = try await sh.run("rm -f /tmp/w")
        return Double(mib) * 1.048576
            / (Double(elapsed.components.attoseconds) / 1e18 + Double(elapsed.components.seconds))
    }

    struct Usage {
        var pss = 0.0
        var ramPss = 0.0
        var ramAnon = 0.0
    }

    /// The part of a fork's QEMU mappings' paths that names its guest RAM.
    static func ramMapping(_ vm: VMInfo, _ fork: ForkResult, _ mode: MemoryMode) -> String {
        mode == .shared ? "/files/\(vm.memoryFile)" : "/files/\(fork.snapshot.privateBaseFile)"
    }

    /// PSS of a process, and PSS and anonymous (copied-on-write) pages of its mappings whose
    /// path contains `mapping` (the guest RAM), in MiB, from /proc/PID/smaps.
    static func memoryUsage(pid: Int32, mapping: String) -> Usage {
        var u = Usage()
        guard let text = readWholeFile("/proc/\(pid)/smaps") else { return u }
        var inRAM = false
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard let key = fields.first else { continue }
            if !key.hasSuffix(":") {  // a mapping's header: "start-end perms offset dev inode path"
                inRAM = line.contains(mapping)
                continue
            }
            let mib = (Double(fields.count > 1 ? fields[1] : "") ?? 0) / 1024
            switch key {
            case "Pss:":
                u.pss += mib
                if inRAM { u.ramPss += mib }
            case "Anonymous:":
                if inRAM { u.ramAnon += mib }
            default: break
            }
        }
        return u
    }

    static func ms(_ d: Duration) -> Double { millis(d) }

    /// p50 and p99 of each named series of milliseconds.
    static func summary(_ series: [(String, [Double])]) -> [ForkBenchReport.Phase] {
        series.map { .init(name: $0.0, p50Millis: percentile($0.1, 0.5), p99Millis: percentile($0.1, 0.99)) }
    }

    static func mean(_ xs: [Double]) -> Double { xs.isEmpty ? 0 : xs.reduce(0, +) / Double(xs.count) }

    static func percentile(_ xs: [Double], _ p: Double) -> Double { StoreBenchmark.percentile(xs, p) }
}
