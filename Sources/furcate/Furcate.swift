// furcate — the one executable: argument parsing and wiring only.
import ArgumentParser
import FurcateCore
import Logging

#if canImport(Glibc)
import Glibc
#endif

@main
struct Furcate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "furcate",
        abstract: "A self-hosted microVM engine whose forks cost one O(1) store clone.",
        subcommands: [StoreCommand.self, MountCommand.self, BenchCommand.self]
    )
}

/// Runs a command body; a `FurcateError` (or any other error) becomes one line on stderr and
/// exit status 1, so scripts see what failed and where.
func reportingErrors(_ body: () throws -> Void) throws {
    try reportingErrors(of: Result { try body() })
}

/// `reportingErrors` for async bodies.
func reportingErrors(_ body: () async throws -> Void) async throws {
    do { try await body() } catch { try reportingErrors(of: .failure(error)) }
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
