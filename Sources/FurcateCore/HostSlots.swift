import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A limit shared by every process of a host: at most `count` holders at once across all the
/// processes that use the same directory (`furcate serve`, a `furcate build` beside it, the
/// test suite and the `furcate` commands its tests run).
///
/// A slot is an exclusive `flock` on `DIR/NAME-K.lock`: the kernel drops the lock of a process
/// that dies, so a crashed holder never keeps a slot. Within a process, waiters queue in order
/// (FIFO) and only as many as there are slots look for a free lock file, polling every 20 ms
/// while other processes hold them all.
public final class HostSlots: Sendable {
    /// Where the lock files are.
    public let directory: String
    /// The limit's name: lock files are `NAME-K.lock`.
    public let name: String
    /// How many holders the host allows at once.
    public let count: Int
    private let local: AsyncSemaphore

    /// The directory every Furcate process of this host uses by default: `/run/furcate` for
    /// root, else a per-user directory under the temporary directory.
    public static var defaultDirectory: String {
        if geteuid() == 0, access("/run", W_OK) == 0 { return "/run/furcate" }
        return NSTemporaryDirectory() + "furcate-\(geteuid())"
    }

    /// - Parameter count: slots, at least 1.
    public init(name: String, count: Int, directory: String = HostSlots.defaultDirectory) {
        self.directory = directory
        self.name = name
        self.count = max(1, count)
        local = AsyncSemaphore(width: max(1, count))
    }

    /// A held slot; `release()` (or the end of the object) frees it.
    public final class Slot: Sendable {
        private let fd: Mutex<Int32>
        private let local: AsyncSemaphore
        /// Which slot (0-based), for logs.
        public let index: Int

        init(fd: Int32, index: Int, local: AsyncSemaphore) {
            self.fd = Mutex(fd)
            self.index = index
            self.local = local
        }

        /// Frees the slot. Idempotent.
        public func release() {
            let held = fd.withLock { fd -> Int32 in
                defer { fd = -1 }
                return fd
            }
            guard held >= 0 else { return }
            Glibc.close(held)  // drops the flock
            local.signal()
        }

        deinit { release() }
    }

    /// Takes a free slot, waiting for one.
    /// - Throws: `CancellationError` when the task is cancelled while waiting; `.io` when the
    ///   directory cannot be made or a lock file opened.
    public func acquire() async throws -> Slot {
        try await local.wait()
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            while true {
                for k in 0..<count {
                    let path = "\(directory)/\(name)-\(k).lock"
                    let fd = try syscall("open", path: path) { open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644) }
                    if flock(fd, LOCK_EX | LOCK_NB) == 0 { return Slot(fd: fd, index: k, local: local) }
                    Glibc.close(fd)
                }
                try await Task.sleep(for: .milliseconds(20))  // other processes hold them all
            }
        } catch {
            local.signal()
            if let e = error as? FurcateError { throw e }
            if error is CancellationError { throw error }
            throw FurcateError(
                .io, "cannot use the slot directory", path: directory, underlying: UnderlyingMessage(error))
        }
    }
}

/// A counting semaphore for async code: `width` holders at once, waiters served in order.
public final class AsyncSemaphore: Sendable {
    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Void, any Error>
    }
    private struct State {
        var free: Int
        var waiters: [Waiter] = []
        var nextID: UInt64 = 0
    }
    private let state: Mutex<State>

    /// A semaphore with `width` holders at once.
    public init(width: Int) { state = Mutex(State(free: width)) }

    /// Waits for a unit. - Throws: `CancellationError` when cancelled while waiting (no unit taken).
    public func wait() async throws {
        let id = state.withLock { s -> UInt64 in
            s.nextID += 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                // Cancelled before it queued: onCancel ran (or will) and found nothing to end.
                let outcome = state.withLock { s -> Bool? in
                    if Task.isCancelled { return false }
                    if s.free > 0 && s.waiters.isEmpty {
                        s.free -= 1
                        return true
                    }
                    s.waiters.append(Waiter(id: id, continuation: c))
                    return nil
                }
                switch outcome {
                case true?: c.resume()
                case false?: c.resume(throwing: CancellationError())
                case nil: break
                }
            }
        } onCancel: {
            let w = state.withLock { s -> Waiter? in
                guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: i)
            }
            w?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Returns a unit: the longest waiter gets it.
    public func signal() {
        let next = state.withLock { s -> Waiter? in
            if s.waiters.isEmpty {
                s.free += 1
                return nil
            }
            return s.waiters.removeFirst()
        }
        next?.continuation.resume()
    }
}
