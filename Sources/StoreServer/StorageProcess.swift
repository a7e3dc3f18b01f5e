// StorageProcess — how `furcate serve` gets its store: the storage process (`furcate store
// serve`) that owns the store and its mount, found at its socket if one is running for the
// data directory (a server that crashed or was stopped with --keep-vms-running left it), else
// started detached in its own session so that it outlives this server.
import CSpawn
import Foundation
import FurcateCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The storage process of a data directory, as seen by `furcate serve`.
public final class StorageProcess: Sendable {
    /// Its store, over the control socket (a new process at the same socket is reached too).
    public let client: StoreClient
    /// True when this server started it (false: it was running already).
    public let startedHere: Bool
    private let exit: Mutex<ExitWatch>
    private let launch: Launch

    /// How to start one.
    struct Launch {
        var socketPath, executable, logPath: String
        var arguments: [String]
        var timeout: Duration
    }

    private init(client: StoreClient, startedHere: Bool, launch: Launch) throws {
        self.client = client
        self.startedHere = startedHere
        self.launch = launch
        exit = Mutex(try ExitWatch(client.hello.pid))
    }

    /// Its pid (the current one's, after a `restart`).
    public var pid: pid_t { exit.withLock { $0.pid } }

    /// The running storage process at `socketPath`, or a new one: `executable arguments…`
    /// started detached (its own session, no descriptors of ours, output appended to
    /// `logPath`), waited for until its socket answers.
    /// - Throws: `.io` with the end of its log when it exits before answering, `.timedOut`
    ///   when it does not answer within `timeout`.
    public static func attachOrStart(
        socketPath: String, executable: String, arguments: [String], logPath: String,
        timeout: Duration = .seconds(60)
    ) throws -> StorageProcess {
        let launch = Launch(
            socketPath: socketPath, executable: executable, logPath: logPath, arguments: arguments, timeout: timeout)
        if let running = try? StoreClient(socketPath: socketPath, timeout: .milliseconds(200)) {
            return try StorageProcess(client: running, startedHere: false, launch: launch)
        }
        return try StorageProcess(client: try start(launch), startedHere: true, launch: launch)
    }

    /// Starts a new storage process after this one ended (its mount is cleared and made
    /// again); the client reaches it at the same socket.
    public func restart() throws {
        let c = try Self.start(launch)
        let w = try ExitWatch(c.hello.pid)
        c.disconnect()
        exit.withLock { $0 = w }
    }

    private static func start(_ l: Launch) throws -> StoreClient {
        // The environment as it is: FURCATE_GUEST_DIR and the like mean the same to it.
        let pid = try spawnDetached(
            l.executable, l.arguments, environment: ProcessInfo.processInfo.environment.map { "\($0.key)=\($0.value)" },
            logPath: l.logPath)
        let reaper = Thread {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        reaper.name = "storage-reaper"
        reaper.start()
        let watch = try? ExitWatch(pid)
        do {
            return try StoreClient(socketPath: l.socketPath, timeout: l.timeout) { watch?.hasExited == false }
        } catch {
            Glibc.kill(pid, SIGKILL)
            let tail =
                (try? String(contentsOfFile: l.logPath, encoding: .utf8))?.split(separator: "\n").suffix(5)
                .joined(separator: " | ") ?? ""
            throw FurcateError(
                (error as? FurcateError)?.code == .timedOut ? .timedOut : .io,
                "the storage process did not start: \(tail.isEmpty ? "\(error)" : tail)", path: l.logPath,
                underlying: error as? FurcateError)
        }
    }

    /// True once the storage process has ended.
    public var hasExited: Bool { exit.withLock { $0 }.hasExited }

    /// Returns once the (current) storage process has ended; looks every 200 ms, so that a
    /// cancelled wait ends at once (throwing `CancellationError`).
    public func waitForExit() async throws {
        while !hasExited { try await Task.sleep(for: .milliseconds(200)) }
    }

    /// Asks it to unmount, close the store and exit, and waits up to `timeout` for it to end
    /// (SIGKILL after that: the store's index is crash-safe).
    public func stop(timeout: Duration = .seconds(60)) async {
        try? client.shutdown()
        client.disconnect()
        let watch = exit.withLock { $0 }
        let deadline = ContinuousClock.now + timeout
        while !watch.hasExited && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(20)) }
        if !watch.hasExited {
            Glibc.kill(watch.pid, SIGKILL)
            await watch.wait()
        }
    }
}
