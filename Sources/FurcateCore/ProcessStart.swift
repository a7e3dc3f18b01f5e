import CSpawn
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

extension Process {
    /// `run()` with no signal blocked in the child. A child inherits the signal mask of the
    /// thread that starts it, and the threads Swift concurrency and Dispatch run code on block
    /// nearly every signal (SIGTERM, SIGINT, SIGALRM, …): started from one of them, a child
    /// ignored `terminate()`, and `timeout` never fired. The mask is cleared on this thread
    /// only while the child is started.
    public func runWithSignalsUnblocked() throws {
        var empty = sigset_t()
        var previous = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        try run()
    }
}

/// Runs host tools (mkfs.ext4, ip, nft, …) to completion.
public enum HostTool {
    /// Runs `tool` (found on PATH) with `arguments`, writing `input` to its stdin; returns its
    /// stdout. A non-zero exit throws its stderr: `.diskFull` when it says the disk is full,
    /// else `.io`; a tool that cannot be started throws `.notFound` naming `package`.
    @discardableResult
    public static func run(_ tool: String, _ arguments: [String], input: String? = nil, package: String? = nil)
        throws -> String
    {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [tool] + arguments
        // Close-on-exec pipes, not Foundation's Pipe: a process started meanwhile by another
        // thread (a QEMU) must not inherit a write end, or reading to the end waits for it.
        let (outR, outW) = try cloexecPipe()
        let (errR, errW) = try cloexecPipe()
        let (inR, inW) = try cloexecPipe()
        p.standardOutput = outW
        p.standardError = errW
        p.standardInput = input == nil ? FileHandle.nullDevice : inR
        do { try p.runWithSignalsUnblocked() } catch {
            for h in [outW, errW, inR, inW] { try? h.close() }
            throw FurcateError(
                .notFound, "cannot run \(tool)\(package.map { " (install \($0))" } ?? "")",
                underlying: UnderlyingMessage(error))
        }
        for h in [outW, errW, inR] { try? h.close() }
        // Small inputs (rulesets) are written whole before the outputs are read.
        if let input { inW.write(Data(input.utf8)) }
        try? inW.close()
        // stderr is read on another thread so that neither pipe fills while the other is read.
        let errData = ErrorCollector()
        let reader = Thread { errData.set(errR.readDataToEndOfFile()) }
        reader.start()
        let out = outR.readDataToEndOfFile()
        p.waitUntilExit()
        let err = errData.wait()
        guard p.terminationStatus == 0 else {
            let msg = String(decoding: err, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            let full = msg.contains("No space left") || msg.contains("Could not allocate")
            throw FurcateError(
                full ? .diskFull : .io,
                "\(tool) \(arguments.prefix(4).joined(separator: " ")) failed (status \(p.terminationStatus)): \(msg.suffix(600))"
            )
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func cloexecPipe() throws -> (read: FileHandle, write: FileHandle) {
        var fds: [Int32] = [0, 0]
        guard cspawn_pipe_cloexec(&fds) == 0 else { throw FurcateError.system("pipe2", errno: errno) }
        return (
            FileHandle(fileDescriptor: fds[0], closeOnDealloc: true),
            FileHandle(fileDescriptor: fds[1], closeOnDealloc: true)
        )
    }

    /// The stderr bytes of a tool, handed from the reading thread.
    private final class ErrorCollector: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private var data = Data()
        func set(_ d: Data) {
            data = d
            done.signal()
        }
        func wait() -> Data {
            done.wait()
            return data
        }
    }
}
