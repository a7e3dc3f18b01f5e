import Foundation
import FurcateCore
import GuestAgentProtocol
import VMService

/// Results of `furcate bench adopt`: N running VMs taken over by a new server after the old
/// one let go of them (a crash, or `--keep-vms-running`), against the graceful path that was
/// there before: suspend all N at the stop, resume all N at the next start. Both end when every
/// VM has answered a command through its agent with the value it held in memory.
public struct AdoptBenchReport: Codable, Sendable {
    /// One N.
    public struct Round: Codable, Sendable {
        /// Running VMs (the base VM and N-1 forks of it).
        public var count: Int
        /// Subject: from opening the new service to all N answering (adopted: QMP again, the
        /// exit watch, the agent channel).
        public var adoptMillis: Double
        /// Of that, `recover()` alone (before the first command).
        public var adoptRecoverMillis: Double
        /// VMs whose answer after the takeover was the marker they held in tmpfs before it.
        public var adoptVerified: Int
        /// Baseline: from opening the new service to all N answering, the N having been
        /// suspended by the previous service's graceful stop (resumed by `recover()`).
        public var resumeMillis: Double
        /// The same markers read after the resume.
        public var resumeVerified: Int
        /// What the baseline's stop spent suspending the N (not in `resumeMillis`).
        public var suspendMillis: Double
        /// `adoptMillis / resumeMillis`: below 1, a takeover is the faster way back.
        public var ratio: Double
    }
    /// KVM or TCG.
    public var accelerator: String
    /// "process" (a storage process, as `furcate serve` has it) or "local".
    public var storeHost: String
    /// Each VM's guest RAM in MiB.
    public var memoryMiB: Int
    /// One entry per N, in the order run.
    public var rounds: [Round] = []
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench adopt`: needs root (it mounts the store), QEMU and the guest artifacts.
public struct AdoptBenchmark: Sendable {
    /// Where the run keeps its store, mount and data (removed afterwards).
    public var workDir: String
    /// The guest kernel, initramfs and test rootfs.
    public var guestDir: String
    /// The Ns measured, each a round.
    public var counts: [Int]
    /// Each VM's guest RAM in MiB.
    public var memoryMiB: Int
    /// Where the store lives.
    public var storeHost = BenchStoreHost.process
    /// Called with a line for each step.
    public var progress: @Sendable (String) -> Void

    /// A run over `counts`; the rest take the defaults above.
    public init(
        workDir: String, guestDir: String, counts: [Int], memoryMiB: Int = 256,
        progress: @escaping @Sendable (String) -> Void
    ) {
        self.workDir = workDir
        self.guestDir = guestDir
        self.counts = counts
        self.memoryMiB = memoryMiB
        self.progress = progress
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing, a step fails, or a VM does not answer
    ///   with its marker after a takeover or a resume (`.io`).
    public func run() async throws -> AdoptBenchReport {
        let most = counts.max() ?? 1
        let (report, seconds) = try await VMBenchEnvironment.run(
            workDir: workDir, guestDir: guestDir, name: "adopt", storeHost: storeHost,
            configure: {
                $0.defaultMemoryMiB = memoryMiB
                // N TCG guests resumed at once on a small host answer their freshening late.
                $0.agentTimeout = .seconds(max(30, 4 * most))
            }
        ) { env in try await measure(env) }
        var r = report
        r.seconds = seconds
        return r
    }

    private func measure(_ env: VMBenchEnvironment) async throws -> AdoptBenchReport {
        var report = AdoptBenchReport(
            accelerator: env.service.options.accelerator.rawValue, storeHost: storeHost.rawValue, memoryMiB: memoryMiB)
        progress("base VM")
        let base = try await env.service.create(CreateVMRequest(image: "rootfs"))
        try await Self.mark(env.service, base.id, timeout: .seconds(120))
        for n in counts {
            var ids = [base.id]
            if n > 1 {
                progress("N=\(n): forking the base VM \(n - 1) ways")
                let fork = try await env.service.fork(base.id, count: n - 1, memoryMode: .shared)
                try? await env.service.deleteSnapshot(fork.snapshot.id)
                for vm in fork.vms {
                    try await Self.mark(env.service, vm.id, timeout: .seconds(max(60, 4 * n)))
                    ids.append(vm.id)
                }
            }
            var round = AdoptBenchReport.Round(
                count: n, adoptMillis: 0, adoptRecoverMillis: 0, adoptVerified: 0, resumeMillis: 0,
                resumeVerified: 0, suspendMillis: 0, ratio: 0)

            progress("N=\(n): the service lets go; a new one takes over")
            await env.service.detachAll()
            var t0 = ContinuousClock.now
            var svc = try env.reopenService()
            let taken = await svc.recover()
            round.adoptRecoverMillis = millis(ContinuousClock.now - t0)
            round.adoptVerified = await Self.verify(svc, ids)
            round.adoptMillis = millis(ContinuousClock.now - t0)
            guard Set(taken).isSuperset(of: ids), round.adoptVerified == n else {
                throw FurcateError(
                    .io, "after the takeover \(round.adoptVerified) of \(n) VMs answered with their marker")
            }

            progress("N=\(n): a graceful stop suspends them; a new service resumes them (baseline)")
            let s0 = ContinuousClock.now
            await svc.shutdown()
            round.suspendMillis = millis(ContinuousClock.now - s0)
            t0 = ContinuousClock.now
            svc = try env.reopenService()
            _ = await svc.recover()
            round.resumeVerified = await Self.verify(svc, ids)
            round.resumeMillis = millis(ContinuousClock.now - t0)
            guard round.resumeVerified == n else {
                throw FurcateError(
                    .io, "after the resume \(round.resumeVerified) of \(n) VMs answered with their marker")
            }
            round.ratio = round.adoptMillis / round.resumeMillis
            report.rounds.append(round)
            for id in ids.dropFirst() { try? await svc.delete(id) }
        }
        return report
    }

    /// Writes the VM's id into its tmpfs through its agent (waiting for a fork's freshening,
    /// and for a booting guest's init to have mounted the tmpfs: the agent answers before).
    private static func mark(_ svc: VMService, _ id: String, timeout: Duration) async throws {
        let script = "until grep -q ' /tmp tmpfs ' /proc/mounts; do sleep 0.1; done; echo \(id) > /tmp/furcate-marker"
        var request = ExecRequest(argv: ["/bin/sh", "-c", script])
        request.timeoutMs = 60_000
        let r = try await svc.agent(id, timeout: timeout).exec(request)
        guard r.exitCode == 0 else { throw FurcateError(.io, "VM \(id) could not write its marker: \(r)") }
    }

    /// How many of `ids` answer, all asked at once, with the marker they hold.
    private static func verify(_ svc: VMService, _ ids: [String]) async -> Int {
        await withTaskGroup(of: Bool.self) { group in
            for id in ids {
                group.addTask {
                    let r = try? await svc.agent(id, timeout: .seconds(120)).exec(
                        ExecRequest(argv: ["cat", "/tmp/furcate-marker"]))
                    return r.map { String(decoding: $0.stdout, as: UTF8.self) == id + "\n" } ?? false
                }
            }
            var n = 0
            for await ok in group where ok { n += 1 }
            return n
        }
    }
}
