import CSpawn
import Foundation
import FurcateCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One running QEMU process and its QMP connection.
///
/// Spawned in its own session (`setsid`: a terminal's ^C or the parent's process group
/// signals never reach guests), with a minimal environment, default signal dispositions and
/// an empty signal mask (the parent blocks termination signals for its FUSE server; QEMU must
/// not inherit that), stdout/stderr appended to a per-VM log. A dedicated thread reaps it.
public final class QEMUProcess: Sendable {
    /// QEMU's process id.
    public let pid: pid_t
    /// The machine it was started with.
    public let config: MachineConfig
    /// Its QMP connection, open once `spawn` returns.
    public let qmp: QMPClient
    /// QEMU's own stdout/stderr.
    public let logPath: String
    private let exit: ExitTracker

    /// The QEMU binary: `FURCATE_QEMU` or qemu-system-x86_64 on PATH.
    public static var binary: String {
        if let b = ProcessInfo.processInfo.environment["FURCATE_QEMU"] { return b }
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/libexec"] where access(dir + "/qemu-system-x86_64", X_OK) == 0 {
            return dir + "/qemu-system-x86_64"
        }
        return "qemu-system-x86_64"
    }

    /// Starts QEMU for `config` (booting paused, or waiting for an incoming migration when
    /// `incoming`) and connects to QMP.
    /// - Throws: `.io` when QEMU cannot start or exits during start-up (with the end of its
    ///   log in the message), `.timedOut` when QMP does not answer within `readyTimeout` of time QEMU could run
    ///   (time it waited for a CPU on a loaded host does not count; see `Deadline`).
    public static func launch(
        _ config: MachineConfig, incoming: Bool, binary: String = QEMUProcess.binary, logPath: String,
        readyTimeout: Duration = .seconds(20)
    ) async throws -> QEMUProcess {
        unlink(config.qmpSocket)
        unlink(config.channelSocket)
        if let shell = config.shellSocket { unlink(shell) }
        let pid: pid_t
        if let ns = config.netTap?.namespace {
            // nsenter joins the network namespace only and execs QEMU (the pid stays QEMU's).
            // Not `ip netns exec`: it also makes a new mount namespace, a copy of every mount of
            // the host's, which kept other stores' FUSE mounts from ending when unmounted.
            pid = try spawn(
                Self.nsenterTool, ["--net=/run/netns/\(ns)", "--", binary] + config.arguments(incoming: incoming),
                logPath: logPath)
        } else {
            pid = try spawn(binary, config.arguments(incoming: incoming), logPath: logPath)
        }
        let exit = ExitTracker(pid)
        let qmp: QMPClient
        do {
            qmp = try await QMPClient(
                path: config.qmpSocket, deadline: .runTime(readyTimeout, of: pid), alive: { exit.status == nil })
        } catch {
            Glibc.kill(pid, SIGKILL)
            let tail = Self.logTail(logPath)
            throw FurcateError(
                .io, "QEMU did not start: \(tail.isEmpty ? "\(error)" : tail)", path: logPath, operation: "launch",
                underlying: error as? FurcateError)
        }
        return QEMUProcess(pid: pid, config: config, qmp: qmp, logPath: logPath, exit: exit)
    }

    /// Takes over a QEMU a previous server started (and left running when it crashed or was
    /// stopped with its VMs kept running): its QMP socket accepts a new client once the old
    /// one is gone. Its exit is seen through a pidfd; only its parent could read its status,
    /// so `exitStatus` is then 0 when QEMU announced a guest-initiated shutdown, else
    /// `QEMUProcess.unknownExit`.
    /// - Throws: `.notFound` when `pid` is not running, `.timedOut`/`.io` when its QMP does not answer.
    public static func adopt(pid: pid_t, config: MachineConfig, logPath: String, timeout: Duration = .seconds(10))
        async throws -> QEMUProcess
    {
        let watch = try ExitWatch(pid)
        let qmp = try await QMPClient(path: config.qmpSocket, deadline: .after(timeout)) { !watch.hasExited }
        let exit = ExitTracker(watching: watch) {
            guard let e = qmp.takeEvent(named: "SHUTDOWN") else { return unknownExit }
            return e["data"]?["guest"]?.bool == true ? 0 : unknownExit
        }
        return QEMUProcess(pid: pid, config: config, qmp: qmp, logPath: logPath, exit: exit)
    }

    /// The exit status of an adopted QEMU that ended other than by a guest-initiated shutdown
    /// (how, only its parent could tell).
    public static let unknownExit: Int32 = -1

    private init(pid: pid_t, config: MachineConfig, qmp: QMPClient, logPath: String, exit: ExitTracker) {
        self.pid = pid
        self.config = config
        self.qmp = qmp
        self.logPath = logPath
        self.exit = exit
    }

    /// The exit status once QEMU has exited (wait status as from waitpid), else nil.
    public var exitStatus: Int32? { exit.status }

    /// Waits until QEMU exits; returns its wait status.
    public func waitForExit() async -> Int32 { await exit.wait() }

    /// Waits up to `timeout` for QEMU to exit; true when it has.
    public func waitForExit(timeout: Duration) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while exitStatus == nil {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }

    /// Ends QEMU: `quit` over QMP (or SIGTERM), then SIGKILL after `grace`. Returns once reaped.
    public func terminate(grace: Duration = .seconds(5)) async {
        guard exitStatus == nil else { return }
        if (try? await qmp.execute("quit", timeout: .seconds(1))) == nil { Glibc.kill(pid, SIGTERM) }
        if await waitForExit(timeout: grace) { return }
        await kill()
    }

    /// SIGKILL; returns once reaped.
    public func kill() async {
        if exitStatus == nil { Glibc.kill(pid, SIGKILL) }
        _ = await waitForExit()
        qmp.close()
    }

    // MARK: spawning

    private static func spawn(_ exe: String, _ args: [String], logPath: String) throws -> pid_t {
        do {
            return try spawnDetached(
                exe, args, environment: ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"], logPath: logPath)
        } catch let e as FurcateError {
            throw FurcateError(
                e.code, "cannot start QEMU (install qemu-system-x86 or set FURCATE_QEMU)", path: exe,
                operation: "posix_spawn", errno: e.errno)
        }
    }

    /// util-linux's `nsenter`, which starts QEMU in a VM's network namespace.
    static let nsenterTool: String =
        ["/usr/bin/nsenter", "/bin/nsenter", "/usr/sbin/nsenter"].first { access($0, X_OK) == 0 } ?? "/usr/bin/nsenter"

    /// The last lines of QEMU's log, for error messages.
    public static func logTail(_ path: String, lines: Int = 5) -> String {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "" }
        return text.split(separator: "\n").suffix(lines).joined(separator: " | ")
    }
}

/// Reaps one child on a dedicated thread and wakes everyone waiting for its exit.
final class ExitTracker: Sendable {
    private struct State {
        var status: Int32?
        var waiters: [CheckedContinuation<Int32, Never>] = []
    }
    private let state = Mutex(State())

    /// A process this one did not start: `status` says what its end means once its pidfd fires.
    init(watching watch: ExitWatch, status: @escaping @Sendable () -> Int32) {
        Task.detached { [self] in
            await watch.wait()
            finish(status())
        }
    }

    init(_ pid: pid_t) {
        let t = Thread { [self] in
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            finish(status)
        }
        t.name = "qemu-reaper-\(pid)"
        t.start()
    }

    private func finish(_ status: Int32) {
        let waiters = state.withLock { st -> [CheckedContinuation<Int32, Never>] in
            st.status = status
            defer { st.waiters.removeAll() }
            return st.waiters
        }
        for w in waiters { w.resume(returning: status) }
    }

    var status: Int32? { state.withLock { $0.status } }

    func wait() async -> Int32 {
        await withCheckedContinuation { c in
            let s = state.withLock { st -> Int32? in
                if let s = st.status { return s }
                st.waiters.append(c)
                return nil
            }
            if let s { c.resume(returning: s) }
        }
    }
}
