// StoreServer — the storage process's control socket: `StoreCall`s from `furcate serve`
// answered against the store this process owns, one thread per connection (calls are
// synchronous store work, like FUSE requests: they stay off Swift's cooperative pool).
// Neighbours: BlockStore (the store answering), StoreFS (the mount the same process serves),
// StoreClient (the other end).
import BlockStore
import Foundation
import FurcateCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Serves a store's `StoreAccess` on a unix socket until `stop`.
public final class StoreServer: Sendable {
    /// The socket's path.
    public let socketPath: String
    private let store: BlockStore
    private let hello: StoreHello
    private let listener: Int32
    private let state = Mutex(State())
    private let logger: Logger
    /// Called once a `.shutdown` call has been answered.
    private let onShutdown: @Sendable () -> Void

    private struct State {
        var connections: Set<Int32> = []
        var stopped = false
    }

    /// Listens at `socketPath` (mode 0600: only this user may drive the store) and serves
    /// `store`, whose files are mounted at `mountpoint`.
    /// - Throws: `.invalidArgument` for a path too long for a socket, `.io` when it cannot listen.
    public init(
        store: BlockStore, mountpoint: String, socketPath: String, logger: Logger = Logger(label: "furcate.storage"),
        onShutdown: @escaping @Sendable () -> Void
    ) throws {
        self.store = store
        self.socketPath = socketPath
        self.logger = logger
        self.onShutdown = onShutdown
        hello = StoreHello(
            pid: getpid(), storeDirectory: store.directory, mountpoint: mountpoint, version: StoreHello.currentVersion)
        let old = umask(0o077)
        defer { umask(old) }
        listener = try UnixSocket.listen(socketPath)
        let t = Thread { [self] in acceptLoop() }
        t.name = "store-control"
        t.start()
    }

    /// Stops accepting, ends every connection (a recompression under way is cancelled) and
    /// removes the socket.
    public func stop() {
        let conns = state.withLock { s -> Set<Int32> in
            s.stopped = true
            return s.connections
        }
        _ = Glibc.shutdown(listener, Int32(SHUT_RDWR))
        for c in conns { _ = Glibc.shutdown(c, Int32(SHUT_RDWR)) }
        unlink(socketPath)
    }

    private func acceptLoop() {
        while !state.withLock({ $0.stopped }) {
            let c = Glibc.accept(listener, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                break
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            let admitted = state.withLock { s -> Bool in
                guard !s.stopped else { return false }
                s.connections.insert(c)
                return true
            }
            guard admitted else {
                close(c)
                break
            }
            let t = Thread { [self] in serve(c) }
            t.name = "store-conn-\(c)"
            t.start()
        }
        close(listener)
    }

    private func serve(_ fd: Int32) {
        defer {
            state.withLock { _ = $0.connections.remove(fd) }
            close(fd)
        }
        while true {
            let call: StoreCall
            do {
                guard let c = try Frame.receive(StoreCall.self, on: fd) else { return }
                call = c
            } catch {
                // A malformed frame: say why, then drop the connection (its framing is lost).
                try? Frame.send(StoreReply.failed(WireError(error)), on: fd)
                logger.warning("dropped a control connection", metadata: ["error": "\(error)"])
                return
            }
            let reply: StoreReply
            do { reply = try answer(call, on: fd) } catch { reply = .failed(WireError(error)) }
            do { try Frame.send(reply, on: fd) } catch { return }
            if call == .shutdown {
                onShutdown()
                return
            }
        }
    }

    private func answer(_ call: StoreCall, on fd: Int32) throws -> StoreReply {
        switch call {
        case .hello: return .hello(hello)
        case .defaultCodec: return .codec(store.defaultCodec.description)
        case .list: return .files(try store.listFiles())
        case .exists(let n): return .bool(try store.fileExists(n))
        case .make(let n, let bs, let size):
            try store.makeFile(n, blockSize: bs, size: size)
            return .ok
        case .size(let n): return .bytes(try store.fileSize(n))
        case .allocated(let n): return .bytes(try store.allocatedBytes(n))
        case .clone(let a, let b):
            try store.cloneFile(a, to: b)
            return .ok
        case .snapshot(let a, let b):
            try store.snapshotFile(a, as: b)
            return .ok
        case .replaceContents(let a, let b):
            try store.replaceFileContents(of: a, with: b)
            return .ok
        case .delete(let n):
            try store.deleteFile(n)
            return .ok
        case .importFile(let n, let path):
            try store.importFile(n, fromHostPath: path)
            return .ok
        case .compressionStats(let n): return .stats(try store.compressionStats(n))
        case .recompress(let n, let codec):
            let c = try Codec(parsing: codec)
            return .stats(try store.recompressFile(n, codec: c) { Self.peerClosed(fd) })
        case .fsck(let repair): return .fsck(try store.fsck(repair: repair))
        case .shutdown: return .ok
        }
    }

    /// True once the caller has closed its end (or sent more: a caller waits for its reply).
    static func peerClosed(_ fd: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN) | Int16(0x2000) /* POLLRDHUP */, revents: 0)
        return poll(&p, 1, 0) > 0
    }
}
