// furcate — the one executable: argument parsing and wiring only.
import ArgumentParser
import Dispatch
import FurcateCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

@main
struct Furcate: ParsableCommand {
    // Synchronous on purpose: `furcate mount` blocks SIGTERM/SIGINT/SIGHUP before any other
    // thread starts, and an async root would start Swift's cooperative threads first (with the
    // signals unblocked: a SIGTERM would then kill the server without unmounting or syncing).
    // Async commands run through `runBlocking`.
    static let configuration = CommandConfiguration(
        commandName: "furcate",
        abstract: "A self-hosted microVM engine whose forks cost one O(1) store clone.",
        subcommands: [
            ServeCommand.self, StoreCommand.self, MountCommand.self, ImageCommand.self, BuildCommand.self,
            RunCommand.self, KeysCommand.self, VMCommand.self, BenchCommand.self, DoctorCommand.self,
        ]
    )
}

/// Runs a command body; a `FurcateError` (or any other error) becomes one line on stderr and
/// exit status 1, so scripts see what failed and where.
func reportingErrors(_ body: () throws -> Void) throws {
    try reportingErrors(of: Result { try body() })
}

/// Runs an async body to completion from a synchronous command, reporting errors like
/// `reportingErrors`.
func runBlocking(_ body: @escaping @Sendable () async throws -> Void) throws {
    let done = DispatchSemaphore(value: 0)
    let result = Mutex<Result<Void, any Error>>(.success(()))
    Task {
        do { try await body() } catch { result.withLock { $0 = .failure(error) } }
        done.signal()
    }
    done.wait()
    try reportingErrors(of: result.withLock { $0 })
}

private func reportingErrors(of result: Result<Void, any Error>) throws {
    do {
        try result.get()
    } catch let e as ExitCode {
        throw e
    } catch let e as FurcateError {
        FileHandleStderr.write("furcate: \(e.description)\n")
        throw ExitCode(1)
    } catch {
        FileHandleStderr.write("furcate: \(error)\n")
        throw ExitCode(1)
    }
}

enum FileHandleStderr {
    static func write(_ s: String) {
        _ = s.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}

/// Logs to stderr at warning and above unless FURCATE_LOG_LEVEL says otherwise.
func bootstrapLogging() {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        if let l = getenv("FURCATE_LOG_LEVEL").map({ String(cString: $0) }), let level = Logger.Level(rawValue: l) {
            h.logLevel = level
        } else {
            h.logLevel = .warning
        }
        return h
    }
}
