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
        let pid = try spawn(binary, config.arguments(incoming: incoming), logPath: logPath)
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
        let argv: [UnsafeMutablePointer<CChar>?] = ([exe] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let envp: [UnsafeMutablePointer<CChar>?] = [
            strdup("PATH=/usr/local/bin:/usr/bin:/bin"), strdup("LANG=C.UTF-8"), nil,
        ]
        defer { for e in envp { free(e) } }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSID (glibc values).
        posix_spawnattr_setflags(&attr, Int16(0x04 | 0x08 | 0x80))
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // Nothing else of ours: descriptors opened without O_CLOEXEC (the HTTP server's accepted
        // connections among them) would otherwise live as long as the VM, holding connections
        // open after the server closed them.
        cspawn_addclosefrom(&actions, 3)

        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, argv, envp)
        guard rc == 0 else {
            throw FurcateError(
                rc == ENOENT ? .notFound : .io, "cannot start QEMU (install qemu-system-x86 or set FURCATE_QEMU)",
                path: exe, operation: "posix_spawn", errno: rc)
        }
        return pid
    }

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

    init(_ pid: pid_t) {
        let t = Thread { [self] in
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            let waiters = state.withLock { st -> [CheckedContinuation<Int32, Never>] in
                st.status = status
                defer { st.waiters.removeAll() }
                return st.waiters
            }
            for w in waiters { w.resume(returning: status) }
        }
        t.name = "qemu-reaper-\(pid)"
        t.start()
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
