import Foundation
import FurcateCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A QEMU Machine Protocol client over a unix socket: commands with ids and typed errors,
/// and asynchronous events.
///
/// One dedicated thread reads the socket (a blocking read per VM is cheaper than a hop per
/// line through an event loop, and keeps the cooperative pool free); commands and event waits
/// are `async`. When the connection ends (QEMU exited or was killed) every waiting call fails
/// with `.hypervisor` "QMP connection closed".
public final class QMPClient: Sendable {
    private struct Waiter {
        var name: String
        var matching: @Sendable (JSONValue) -> Bool
        var cont: CheckedContinuation<JSONValue, any Error>
    }

    private struct State {
        var nextID = 1
        var pending: [Int: CheckedContinuation<JSONValue, any Error>] = [:]
        /// Events not yet taken by a waiter, oldest first, bounded.
        var events: [JSONValue] = []
        var waiters: [Int: Waiter] = [:]
        var closed: (any Error & Sendable)?
    }

    /// The QMP socket's path.
    public let path: String
    private let fd: Int32
    private let state = Mutex(State())
    private let writeLock = Mutex(())
    private static let maxBufferedEvents = 256

    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    /// - Parameters:
    ///   - deadline: how long to keep trying while QEMU starts up (a run-time deadline on its
    ///     process does not count the time it waited for a CPU).
    ///   - alive: asked between connection attempts; false (QEMU exited) stops them.
    /// - Throws: `.timedOut`, `.io`, `.hypervisor`.
    public init(path: String, deadline: Deadline, alive: () -> Bool = { true }) async throws {
        self.path = path
        fd = try await UnixSocket.connect(path, deadline: deadline, alive: alive)
        let t = Thread { [self] in readLoop() }
        t.name = "qmp-reader"
        t.start()
        _ = try await execute("qmp_capabilities")
    }

    deinit { Glibc.close(fd) }

    /// Shuts the connection down; waiting calls fail. Idempotent.
    public func close() { shutdown(fd, Int32(SHUT_RDWR)) }

    /// Runs `command` with `arguments` and returns its `return` member.
    /// - Throws: `.hypervisor` with QEMU's class and description when it refuses, or when the
    ///   connection closes first; `.timedOut` after `timeout`.
    @discardableResult
    public func execute(
        _ command: String, _ arguments: [String: JSONValue] = [:], timeout: Duration = .seconds(30)
    ) async throws -> JSONValue {
        let id = state.withLock { s -> Int in
            defer { s.nextID += 1 }
            return s.nextID
        }
        var msg: [String: JSONValue] = ["execute": .string(command), "id": .number(Double(id))]
        if !arguments.isEmpty { msg["arguments"] = .object(arguments) }
        let line = Array((JSONValue.object(msg).description + "\n").utf8)
        let timer = Task { [weak self] in
            try await Task.sleep(for: timeout)
            self?.fail(
                id: id, FurcateError(.timedOut, "QMP \(command) got no reply within \(timeout)", path: self?.path))
        }
        defer { timer.cancel() }
        let reply = try await withCheckedThrowingContinuation { (c: CheckedContinuation<JSONValue, any Error>) in
            let closed = state.withLock { s -> (any Error)? in
                if let e = s.closed { return e }
                s.pending[id] = c
                return nil
            }
            if let closed { return c.resume(throwing: closed) }
            do {
                try writeLock.withLock { _ in try UnixSocket.writeAll(fd, line) }
            } catch {
                fail(
                    id: id,
                    FurcateError(
                        .hypervisor, "cannot send QMP \(command)", path: path, underlying: error as? FurcateError))
            }
        }
        if let err = reply["error"] {
            let cls = err["class"]?.string ?? "Error"
            let desc = err["desc"]?.string ?? "\(err)"
            throw FurcateError(.hypervisor, "QEMU refused \(command): \(desc) (\(cls))", path: path, operation: command)
        }
        return reply["return"] ?? .null
    }

    /// Waits for the next event called `name` that `matching` accepts (taking an already
    /// buffered one first).
    /// - Throws: `.timedOut`, or `.hypervisor` when the connection closes first.
    @discardableResult
    public func waitForEvent(
        _ name: String, timeout: Duration, matching: @escaping @Sendable (JSONValue) -> Bool = { _ in true }
    ) async throws -> JSONValue {
        let key = state.withLock { s -> Int in
            defer { s.nextID += 1 }
            return s.nextID
        }
        let timer = Task { [weak self] in
            try await Task.sleep(for: timeout)
            self?.failWaiter(key, FurcateError(.timedOut, "no QMP event \(name) within \(timeout)"))
        }
        defer { timer.cancel() }
        return try await withCheckedThrowingContinuation { (c: CheckedContinuation<JSONValue, any Error>) in
            let now = state.withLock { s -> Result<JSONValue, any Error>? in
                if let i = s.events.firstIndex(where: { $0["event"]?.string == name && matching($0) }) {
                    return .success(s.events.remove(at: i))
                }
                if let e = s.closed { return .failure(e) }
                s.waiters[key] = Waiter(name: name, matching: matching, cont: c)
                return nil
            }
            if let now { c.resume(with: now) }
        }
    }

    /// Takes the oldest buffered event called `name`, if one came; never waits.
    public func takeEvent(named name: String) -> JSONValue? {
        state.withLock { s in s.events.firstIndex { $0["event"]?.string == name }.map { s.events.remove(at: $0) } }
    }

    /// Drops buffered events (before an operation whose events should be waited for afresh);
    /// only those called `name` when given.
    public func discardEvents(named name: String? = nil) {
        state.withLock { s in
            if let name { s.events.removeAll { $0["event"]?.string == name } } else { s.events.removeAll() }
        }
    }

    private func fail(id: Int, _ error: any Error) {
        state.withLock { $0.pending.removeValue(forKey: id) }?.resume(throwing: error)
    }

    private func failWaiter(_ key: Int, _ error: any Error) {
        state.withLock { $0.waiters.removeValue(forKey: key) }?.cont.resume(throwing: error)
    }

    // MARK: reading

    private func readLoop() {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            buffer.append(contentsOf: chunk[0..<n])
            while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                if let msg = try? JSONDecoder().decode(JSONValue.self, from: Data(line)) { dispatch(msg) }
            }
        }
        let closed = FurcateError(.hypervisor, "QMP connection closed (QEMU exited)", path: path)
        let (pending, waiters) = state.withLock { s in
            s.closed = closed
            defer {
                s.pending.removeAll()
                s.waiters.removeAll()
            }
            return (Array(s.pending.values), Array(s.waiters.values))
        }
        for c in pending { c.resume(throwing: closed) }
        for w in waiters { w.cont.resume(throwing: closed) }
    }

    private func dispatch(_ msg: JSONValue) {
        if let id = msg["id"]?.int, msg["return"] != nil || msg["error"] != nil {
            state.withLock { $0.pending.removeValue(forKey: id) }?.resume(returning: msg)
        } else if let name = msg["event"]?.string {
            let waiter = state.withLock { s -> CheckedContinuation<JSONValue, any Error>? in
                if let (k, w) = s.waiters.first(where: { $0.value.name == name && $0.value.matching(msg) }) {
                    s.waiters[k] = nil
                    return w.cont
                }
                s.events.append(msg)
                if s.events.count > Self.maxBufferedEvents { s.events.removeFirst() }
                return nil
            }
            waiter?.resume(returning: msg)
        }
        // Anything else (the greeting) needs no answer.
    }
}
