import Foundation
import FurcateCore
import GuestAgentProtocol
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The host's side of the guest agent protocol (docs/AGENT.md) over the guest channel socket,
/// or any connected stream socket (tests run the agent as a host process on a socketpair).
///
/// A reader thread matches responses to requests by id. The guest drops what arrives while its
/// end of the port is closed, so `connect` repeats a ping until the agent answers. When the
/// channel closes (the VM stopped, or was snapshotted and this connection belongs to the old
/// process) every waiting call fails with `.io`.
public final class AgentClient: Sendable {
    private struct State {
        /// Starts at random: a guest restored from a snapshot still has the requests of the
        /// snapshotted VM's connection in flight, and answers them on this one. Counting from
        /// 1 on every connection, such a stale answer took the place of a new request's
        /// (schemathesis: terminalList "answered" with another request's response).
        var nextID = UInt32.random(in: 1...UInt32.max)
        var pending: [UInt32: CheckedContinuation<AgentResponse, any Error>] = [:]
        var streams: [UInt32: AsyncThrowingStream<StreamItem, any Error>.Continuation] = [:]
        var closed: (any Error & Sendable)?

        mutating func takeID() -> UInt32 {
            defer { nextID = nextID == UInt32.max ? 1 : nextID + 1 }
            return nextID
        }
    }

    /// What a stream yields: events, then the request's final response, then it finishes.
    public typealias StreamItem = AgentStreamItem
    private let readFD: Int32
    private let writeFD: Int32
    private let state = Mutex(State())
    private let writeLock = Mutex(())

    /// Uses `readFD`/`writeFD` (stream sockets, may be the same one); the client owns and
    /// closes them.
    public init(readFD: Int32, writeFD: Int32) {
        self.readFD = readFD
        self.writeFD = writeFD
        let t = Thread { [self] in readLoop() }
        t.name = "agent-reader"
        t.start()
    }

    /// Connects to a VM's channel socket and waits until its agent answers a ping. `alive`
    /// says whether the VM's process still runs: once it does not, nothing can answer.
    /// - Throws: `.timedOut` when the agent does not answer by `timeout`; `.io` as soon as the
    ///   channel closes or the process is gone (a VM stopped or suspended meanwhile).
    public static func connect(
        socket: String, timeout: Duration, alive: () -> Bool = { true }
    ) async throws -> AgentClient {
        try await connect(socket: socket, deadline: .after(timeout), alive: alive)
    }

    /// `connect` until `deadline`: a run-time deadline on the VM's QEMU waits longer for a guest
    /// that a loaded host has not given the CPU to answer (see `Deadline`).
    public static func connect(
        socket: String, deadline: Deadline, alive: () -> Bool = { true }
    ) async throws -> AgentClient {
        let fd = try await UnixSocket.connect(socket, deadline: deadline, alive: alive)
        let client = AgentClient(readFD: fd, writeFD: fd)
        // Short first tries: right after a restore the first ping can be lost while the port
        // reconnects, and a fork waits on this.
        var wait = Duration.milliseconds(10)
        while true {
            let asked = ContinuousClock.now
            do {
                if case .pong = try await client.call(.ping, timeout: wait) { return client }
            } catch let e as FurcateError where e.code == .timedOut {
                // Unanswered: asked again below, until the deadline.
            } catch {
                // A closed channel fails every call at once, without waiting: asked again, it
                // spun on a thread of the cooperative pool until the deadline (a fork
                // suspended while it was being freshened held one for the agent timeout).
                client.close()
                throw FurcateError(
                    .io, "the guest agent's channel closed before it answered", path: socket, underlying: error)
            }
            if deadline.hasPassed {
                client.close()
                throw FurcateError(.timedOut, "the guest agent did not answer within \(deadline)", path: socket)
            }
            // Not a pong (an error answer comes at once): never ask faster than `wait`.
            let spent = ContinuousClock.now - asked
            if spent < wait {
                do { try await Task.sleep(for: wait - spent) } catch {
                    client.close()  // cancelled
                    throw error
                }
            }
            wait = min(wait * 2, .milliseconds(200))
        }
    }

    deinit {
        Glibc.close(readFD)
        if writeFD != readFD { Glibc.close(writeFD) }
    }

    /// False once the connection was closed or failed.
    public var isOpen: Bool { state.withLock { $0.closed == nil } }

    /// Ends the connection; waiting calls fail. Idempotent.
    public func close() {
        Glibc.shutdown(readFD, Int32(SHUT_RDWR))
        if writeFD != readFD { Glibc.shutdown(writeFD, Int32(SHUT_RDWR)) }
        failAll(FurcateError(.io, "the guest agent connection was closed"))
    }

    /// Sends `request` and waits for its response. An `.error` response is returned as is.
    /// - Throws: `.timedOut`, `.io` when the channel closes first.
    public func call(_ request: AgentRequest, timeout: Duration = .seconds(30)) async throws -> AgentResponse {
        let id = state.withLock { $0.takeID() }
        let bytes = try request.frame(id: id).encoded()
        let timer = Task { [weak self] in
            try await Task.sleep(for: timeout)
            self?.fail(id, FurcateError(.timedOut, "the guest agent did not answer within \(timeout)"))
        }
        defer { timer.cancel() }
        return try await withCheckedThrowingContinuation { c in
            let closed = state.withLock { s -> (any Error)? in
                if let e = s.closed { return e }
                s.pending[id] = c
                return nil
            }
            if let closed { return c.resume(throwing: closed) }
            do { try writeLock.withLock { _ in try UnixSocket.writeAll(writeFD, bytes) } } catch {
                fail(id, FurcateError(.io, "cannot send to the guest agent", underlying: error as? FurcateError))
            }
        }
    }

    /// Starts a streaming request (`execStream`, `watch`, `stats`): its events, then its final
    /// response. `cancel(_:)` with the returned id ends it. The stream finishes with an error
    /// when the channel closes.
    public func stream(_ request: AgentRequest) throws -> (
        id: UInt32, items: AsyncThrowingStream<StreamItem, any Error>
    ) {
        _ = try request.frame(id: 0)  // encodable, before anything is registered
        let (items, continuation) = AsyncThrowingStream<StreamItem, any Error>.makeStream()
        let id = try state.withLock { s -> UInt32 in
            if let e = s.closed { throw e }
            let id = s.takeID()
            s.streams[id] = continuation
            return id
        }
        do {
            try writeLock.withLock { _ in
                try UnixSocket.writeAll(writeFD, try request.frame(id: id).encoded())
            }
        } catch {
            state.withLock { $0.streams[id] = nil }
            continuation.finish(throwing: error)
        }
        return (id, items)
    }

    /// Ends the stream started as `id`; its final response follows on the stream.
    public func cancel(_ id: UInt32) async throws {
        _ = try await request(.cancel(id: id))
    }

    /// `call` that turns an `.error` response into a thrown `FurcateError` (its code mapped:
    /// not_found, exists, invalid_argument, permission_denied → not_permitted, busy, else io).
    public func request(_ request: AgentRequest, timeout: Duration = .seconds(30)) async throws -> AgentResponse {
        let r = try await call(request, timeout: timeout)
        if case .error(let e) = r {
            let code: FurcateError.Code
            switch e.code {
            case "not_found": code = .notFound
            case "exists": code = .exists
            case "invalid_argument": code = .invalidArgument
            case "permission_denied": code = .notPermitted
            case "busy": code = .busy
            default: code = .io
            }
            throw FurcateError(code, "guest: \(e.message)", operation: "agent")
        }
        return r
    }

    /// Runs a program in the guest (see `ExecRequest`); the call waits a little longer than
    /// the program's own timeout.
    public func exec(_ e: ExecRequest) async throws -> ExecResult {
        let wait = Duration.milliseconds((e.timeoutMs ?? 600_000) + 10_000)
        guard case .exec(let r) = try await request(.exec(e), timeout: wait) else {
            throw FurcateError(.io, "the guest agent answered exec with something else")
        }
        return r
    }

    /// What a fork needs at once: fresh entropy, the host's clock, and (when given) a hostname.
    public func afterRestore(hostname: String? = nil, timeout: Duration = .seconds(30)) async throws {
        var entropy = [UInt8](repeating: 0, count: 64)
        var rng = SystemRandomNumberGenerator()
        for i in entropy.indices { entropy[i] = rng.next() }
        _ = try await request(.reseed(entropy: Data(entropy)), timeout: timeout)
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        _ = try await request(
            .setTime(epochNanos: Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)), timeout: timeout)
        if let hostname { _ = try await request(.setHostname(hostname), timeout: timeout) }
    }

    // MARK: internals

    private func fail(_ id: UInt32, _ error: any Error) {
        state.withLock { $0.pending.removeValue(forKey: id) }?.resume(throwing: error)
    }

    private func failAll(_ error: any Error & Sendable) {
        let (waiting, streams) = state.withLock { s in
            if s.closed == nil { s.closed = error }
            defer {
                s.pending.removeAll()
                s.streams.removeAll()
            }
            return (Array(s.pending.values), Array(s.streams.values))
        }
        for c in waiting { c.resume(throwing: error) }
        for c in streams { c.finish(throwing: error) }
    }

    private func dispatch(_ f: Frame) {
        switch f.kind {
        case .event:
            guard let e = try? JSONDecoder().decode(AgentEvent.self, from: Data(f.payload)) else { return }
            _ = state.withLock { $0.streams[f.id] }?.yield(.event(e))
        case .response:
            guard let r = try? AgentResponse.from(f) else { return }
            let (call, stream) = state.withLock {
                ($0.pending.removeValue(forKey: f.id), $0.streams.removeValue(forKey: f.id))
            }
            // Responses to requests nobody waits for (timed out, or sent before a reconnect)
            // are dropped.
            call?.resume(returning: r)
            if let stream {
                stream.yield(.end(r))
                stream.finish()
            }
        case .request:
            return
        }
    }

    private func readLoop() {
        var decoder = FrameDecoder()
        var buf = [UInt8](repeating: 0, count: 256 << 10)
        loop: while true {
            let n = buf.withUnsafeMutableBytes { read(readFD, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            decoder.append(buf[0..<n])
            do {
                while let f = try decoder.next() { dispatch(f) }
            } catch {
                failAll(FurcateError(.io, "malformed frame from the guest agent: \(error)"))
                break loop
            }
        }
        failAll(FurcateError(.io, "the guest agent channel closed"))
    }
}
