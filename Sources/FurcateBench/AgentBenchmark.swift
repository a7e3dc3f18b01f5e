import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Results of `furcate bench agent`: the guest agent in a VM against baselines in the same
/// run — the same command through the serial debug shell, and the same file bytes written
/// and read by a local process.
public struct AgentBenchReport: Codable, Sendable {
    /// KVM or TCG, as the run used.
    public var accelerator: String
    /// Round trips measured per path.
    public var execCount: Int
    /// Round trip of `true` through the agent (spawn, wait, reply).
    public var agentExecP50Millis: Double
    /// The same, 99th percentile.
    public var agentExecP99Millis: Double
    /// The same through the debug shell on the serial port (a shell builtin: no spawn).
    public var shellExecP50Millis: Double
    /// The same, 99th percentile.
    public var shellExecP99Millis: Double
    /// A no-op request (ping): the protocol's own round trip.
    public var agentPingP50Millis: Double
    /// The file written and read through the agent, MiB.
    public var fileMiB: Int
    /// Its write throughput through the agent.
    public var agentWriteMBps: Double
    /// Its read throughput through the agent.
    public var agentReadMBps: Double
    /// The same bytes in 4 MiB pwrite/pread calls by this process on a local file.
    public var localWriteMBps: Double
    /// The same read by this process.
    public var localReadMBps: Double
    /// The whole run's wall time.
    public var seconds = 0.0
}

/// `furcate bench agent`: needs root, QEMU and the guest artifacts (with the agent).
public struct AgentBenchmark: Sendable {
    /// Where the run keeps its store, mount and data (removed afterwards).
    public var workDir: String
    /// The guest kernel, initramfs and test rootfs.
    public var guestDir: String
    /// Round trips measured per path.
    public var execCount: Int
    /// The file written and read, MiB.
    public var fileMiB: Int
    /// Called with a line for each step.
    public var progress: @Sendable (String) -> Void

    /// A run with the given settings.
    public init(
        workDir: String, guestDir: String, execCount: Int = 200, fileMiB: Int = 64,
        progress: @escaping @Sendable (String) -> Void
    ) {
        self.workDir = workDir
        self.guestDir = guestDir
        self.execCount = execCount
        self.fileMiB = fileMiB
        self.progress = progress
    }

    /// Runs the benchmark.
    /// - Throws: when a facility it needs is missing (root, QEMU, the agent) or a step fails.
    public func run() async throws -> AgentBenchReport {
        var (r, seconds) = try await VMBenchEnvironment.run(
            workDir: workDir, guestDir: guestDir, name: "agent", configure: { $0.defaultMemoryMiB = 512 }
        ) {
            try await measure($0)
        }
        r.seconds = seconds
        return r
    }

    private func measure(_ env: VMBenchEnvironment) async throws -> AgentBenchReport {
        let svc = env.service
        progress("boot")
        let vm = try await svc.create(CreateVMRequest(image: "rootfs"))
        let shell = try await svc.guestShell(vm.id, timeout: .seconds(120))
        let agent = try await svc.agent(vm.id, timeout: .seconds(60))
        defer { agent.close() }

        progress("exec round trips: agent, then the serial shell")
        var agentExec: [Double] = []
        var ping: [Double] = []
        var shellExec: [Double] = []
        for _ in 0..<execCount {
            let a = ContinuousClock.now
            let r = try await agent.exec(ExecRequest(argv: ["true"]))
            guard r.exitCode == 0 else { throw FurcateError(.io, "exec of true failed in the guest") }
            agentExec.append(millis(ContinuousClock.now - a))
            let p = ContinuousClock.now
            _ = try await agent.request(.ping)
            ping.append(millis(ContinuousClock.now - p))
            let s = ContinuousClock.now
            _ = try await shell.run("true")
            shellExec.append(millis(ContinuousClock.now - s))
        }

        // Into the guest's tmpfs: the agent's path, not the guest's disk, is measured.
        progress("files: \(fileMiB) MiB through the agent, then locally")
        let chunk = 4 << 20
        var data = [UInt8](repeating: 0, count: chunk)
        var rng = SystemRandomNumberGenerator()
        for i in stride(from: 0, to: chunk, by: 8) {
            let v = rng.next() as UInt64
            withUnsafeBytes(of: v) { data.replaceSubrange(i..<(i + 8), with: $0) }
        }
        let chunks = max(1, fileMiB / 4)
        let w0 = ContinuousClock.now
        for k in 0..<chunks {
            _ = try await agent.request(
                .writeFile(
                    path: "/tmp/bench", data: Data(data), offset: UInt64(k * chunk), mode: nil, createParents: false),
                timeout: .seconds(120))
        }
        let agentWrite = Double(chunks * chunk) / 1e6 / (millis(ContinuousClock.now - w0) / 1000)
        let r0 = ContinuousClock.now
        for k in 0..<chunks {
            guard
                case .data(let d, _) = try await agent.request(
                    .readFile(path: "/tmp/bench", offset: UInt64(k * chunk), length: chunk), timeout: .seconds(120)),
                d.count == chunk
            else { throw FurcateError(.io, "short read from the guest") }
        }
        let agentRead = Double(chunks * chunk) / 1e6 / (millis(ContinuousClock.now - r0) / 1000)
        let (localWrite, localRead) = try localBaseline(env.root + "/local-bench", data, chunks)

        return AgentBenchReport(
            accelerator: svc.options.accelerator.rawValue, execCount: execCount,
            agentExecP50Millis: StoreBenchmark.percentile(agentExec, 0.5),
            agentExecP99Millis: StoreBenchmark.percentile(agentExec, 0.99),
            shellExecP50Millis: StoreBenchmark.percentile(shellExec, 0.5),
            shellExecP99Millis: StoreBenchmark.percentile(shellExec, 0.99),
            agentPingP50Millis: StoreBenchmark.percentile(ping, 0.5), fileMiB: chunks * 4, agentWriteMBps: agentWrite,
            agentReadMBps: agentRead,
            localWriteMBps: localWrite, localReadMBps: localRead)
    }

    /// The same chunks written and read by this process (pwrite + fsync, then pread).
    private func localBaseline(_ path: String, _ data: [UInt8], _ chunks: Int) throws -> (Double, Double) {
        let fd = try syscall("open", path: path) { open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644) }
        defer {
            close(fd)
            unlink(path)
        }
        let w0 = ContinuousClock.now
        for k in 0..<chunks {
            _ = try data.withUnsafeBytes { p in
                try syscall("pwrite", path: path) { pwrite(fd, p.baseAddress, p.count, off_t(k * data.count)) }
            }
        }
        try syscall("fsync", path: path) { fsync(fd) }
        let write = Double(chunks * data.count) / 1e6 / (millis(ContinuousClock.now - w0) / 1000)
        var buf = [UInt8](repeating: 0, count: data.count)
        let r0 = ContinuousClock.now
        for k in 0..<chunks {
            _ = try buf.withUnsafeMutableBytes { p in
                try syscall("pread", path: path) { pread(fd, p.baseAddress, p.count, off_t(k * data.count)) }
            }
        }
        let read = Double(chunks * data.count) / 1e6 / (millis(ContinuousClock.now - r0) / 1000)
        return (write, read)
    }
}
