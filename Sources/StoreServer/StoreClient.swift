// StoreClient — `StoreAccess` over the storage process's control socket: what `furcate serve`
// uses, so that the store (its index, packs, dirty blocks) and the mount QEMU's files live on
// belong to a process a crash of the server does not end.
import BlockStore
import Foundation
import FurcateCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The storage process's store, by name, over its socket. Calls block their thread for one
/// round trip (a local socket; the store work itself is what takes time), so callers treat
/// them like `BlockStore`'s own synchronous calls.
public final class StoreClient: StoreAccess {
    /// The control socket.
    public let socketPath: String
    /// Who answered the first call.
    public let hello: StoreHello
    private let idle = Mutex<[Int32]>([])
    private let codec: Codec

    /// Connects to the storage process at `socketPath`, waiting up to `timeout` for it to
    /// accept, and checks that it speaks this build's protocol.
    /// - Throws: `.timedOut`/`.unavailable` when nothing answers, `.unsupportedFormat` for
    ///   another protocol version.
    public init(socketPath: String, timeout: Duration = .seconds(5), alive: () -> Bool = { true }) throws {
        self.socketPath = socketPath
        let fd = try UnixSocket.connect(socketPath, deadline: .now + timeout, alive: alive)
        let reply: StoreReply?
        do {
            try Frame.send(StoreCall.hello, on: fd)
            reply = try Frame.receive(StoreReply.self, on: fd)
        } catch {
            close(fd)
            throw error
        }
        guard case .hello(let h) = reply else {
            close(fd)
            throw FurcateError(.unavailable, "the storage process did not say who it is", path: socketPath)
        }
        guard h.version == StoreHello.currentVersion else {
            close(fd)
            throw FurcateError(
                .unsupportedFormat,
                "the storage process (pid \(h.pid)) speaks protocol \(h.version), this build \(StoreHello.currentVersion): stop it (furcate serve stops it at a graceful shutdown) and start again",
                path: socketPath)
        }
        hello = h
        var c = Codec.default
        if (try? Frame.send(StoreCall.defaultCodec, on: fd)) != nil,
            case .codec(let s)? = try? Frame.receive(StoreReply.self, on: fd), let parsed = try? Codec(parsing: s)
        {
            c = parsed
        }
        codec = c
        idle.withLock { $0.append(fd) }
    }

    deinit { for fd in idle.withLock({ $0 }) { close(fd) } }

    /// Closes the idle connections (the process itself goes on).
    public func disconnect() {
        for fd in idle.withLock({ l in
            defer { l.removeAll() }; return l
        }) { close(fd) }
    }

    /// `BlockStore.fsck`, run by the storage process on the store it holds (the VMs it serves
    /// go on meanwhile).
    public func fsck(repair: Bool) throws -> FsckReport {
        let r = try call(.fsck(repair: repair))
        guard case .fsck(let report) = r else { throw unexpected(r, .fsck(repair: repair)) }
        return report
    }

    /// Asks the storage process to unmount, close the store and exit; returns once it answered.
    public func shutdown() throws { _ = try call(.shutdown) }

    // MARK: the round trip

    private func connection() throws -> (fd: Int32, reused: Bool) {
        if let fd = idle.withLock({ $0.popLast() }) { return (fd, true) }
        do { return (try UnixSocket.connect(socketPath, deadline: .now + .seconds(5)), false) } catch {
            throw unreachable(error)
        }
    }

    private func unreachable(_ error: any Error) -> FurcateError {
        FurcateError(
            .unavailable, "the storage process (pid \(hello.pid)) is not answering: \(error)", path: socketPath,
            underlying: error as? FurcateError)
    }

    /// One call and its reply; a failed call's error is thrown as the store threw it.
    @discardableResult
    func call(_ c: StoreCall) throws -> StoreReply {
        var attempt = 0
        while true {
            attempt += 1
            let (fd, reused) = try connection()
            do { try Frame.send(c, on: fd) } catch {
                close(fd)
                // A pooled connection the process had closed: the call never left; try a new one.
                if reused && attempt == 1 { continue }
                throw unreachable(error)
            }
            let reply: StoreReply?
            do { reply = try Frame.receive(StoreReply.self, on: fd) } catch {
                close(fd)
                throw unreachable(error)
            }
            guard let reply else {
                close(fd)
                throw unreachable(FurcateError(.unavailable, "connection closed before the reply"))
            }
            idle.withLock { $0.append(fd) }
            if case .failed(let e) = reply { throw e.error }
            return reply
        }
    }

    private func unexpected(_ r: StoreReply, _ c: StoreCall) -> FurcateError {
        FurcateError(.internalError, "the storage process answered \(c) with \(r)", path: socketPath)
    }

    private func bytes(_ c: StoreCall) throws -> UInt64 {
        let r = try call(c)
        guard case .bytes(let n) = r else { throw unexpected(r, c) }
        return n
    }

    // MARK: StoreAccess

    /// `StoreAccess.defaultCodec`, answered by the storage process.
    public var defaultCodec: Codec { codec }

    /// `StoreAccess.listFiles`, answered by the storage process.
    public func listFiles() throws -> [FileInfo] {
        let r = try call(.list)
        guard case .files(let f) = r else { throw unexpected(r, .list) }
        return f
    }

    /// `StoreAccess.fileExists`, answered by the storage process.
    public func fileExists(_ name: String) throws -> Bool {
        let r = try call(.exists(name))
        guard case .bool(let b) = r else { throw unexpected(r, .exists(name)) }
        return b
    }

    /// `StoreAccess.makeFile`, answered by the storage process.
    public func makeFile(_ name: String, blockSize: Int?, size: UInt64) throws {
        try call(.make(name, blockSize: blockSize, size: size))
    }
    /// `StoreAccess.fileSize`, answered by the storage process.
    public func fileSize(_ name: String) throws -> UInt64 { try bytes(.size(name)) }
    /// `StoreAccess.allocatedBytes`, answered by the storage process.
    public func allocatedBytes(_ name: String) throws -> UInt64 { try bytes(.allocated(name)) }
    /// `StoreAccess.cloneFile`, answered by the storage process.
    public func cloneFile(_ source: String, to destination: String) throws { try call(.clone(source, to: destination)) }
    /// `StoreAccess.snapshotFile`, answered by the storage process.
    public func snapshotFile(_ name: String, as snapshotName: String) throws {
        try call(.snapshot(name, as: snapshotName))
    }
    /// `StoreAccess.replaceFileContents`, answered by the storage process.
    public func replaceFileContents(of destination: String, with source: String) throws {
        try call(.replaceContents(of: destination, with: source))
    }
    /// `StoreAccess.deleteFile`, answered by the storage process.
    public func deleteFile(_ name: String) throws { try call(.delete(name)) }
    /// `StoreAccess.importFile`, answered by the storage process.
    public func importFile(_ name: String, fromHostPath path: String) throws {
        try call(.importFile(name, fromHostPath: path))
    }

    /// `StoreAccess.compressionStats`, answered by the storage process.
    public func compressionStats(_ name: String) throws -> CompressionStats {
        let r = try call(.compressionStats(name))
        guard case .stats(let s) = r else { throw unexpected(r, .compressionStats(name)) }
        return s
    }

    /// On a connection of its own: cancelling closes it, which the storage process sees
    /// between blocks and stops.
    public func recompressFile(_ name: String, codec: Codec, isCancelled: @escaping @Sendable () -> Bool) throws
        -> CompressionStats
    {
        let fd: Int32
        do { fd = try UnixSocket.connect(socketPath, deadline: .now + .seconds(5)) } catch { throw unreachable(error) }
        defer { close(fd) }
        let c = StoreCall.recompress(name, codec: codec.description)
        do { try Frame.send(c, on: fd) } catch { throw unreachable(error) }
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, 100)
            if r > 0 { break }
            if r < 0 && errno != EINTR { throw FurcateError.system("poll", errno: errno, path: socketPath) }
            if isCancelled() {
                throw FurcateError(.invalidState, "recompression of \(name) was cancelled", path: socketPath)
            }
        }
        let reply: StoreReply?
        do { reply = try Frame.receive(StoreReply.self, on: fd) } catch { throw unreachable(error) }
        switch reply {
        case .stats(let s)?: return s
        case .failed(let e)?: throw e.error
        case let r?: throw unexpected(r, c)
        case nil: throw unreachable(FurcateError(.unavailable, "connection closed before the reply"))
        }
    }
}
