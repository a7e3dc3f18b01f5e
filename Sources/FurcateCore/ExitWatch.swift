import CSpawn
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Sees a process end through a pidfd: one this process did not start (a QEMU or storage
/// process a previous server left running, whose exit status only its parent could read) or
/// one it did. A pidfd names the process itself, so a pid reused after the exit is never
/// mistaken for it.
public final class ExitWatch: Sendable {
    /// The process watched.
    public let pid: pid_t
    private let fd: Int32

    /// Watches `pid`.
    /// - Throws: `.notFound` when no such process runs, `.io` when pidfds are not available.
    public init(_ pid: pid_t) throws {
        self.pid = pid
        let fd = cspawn_pidfd_open(pid)
        guard fd >= 0 else {
            let e = errno
            throw FurcateError(
                e == ESRCH ? .notFound : .io, e == ESRCH ? "process \(pid) is not running" : "pidfd_open failed",
                operation: "pidfd_open", errno: e)
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        self.fd = fd
    }

    deinit { close(fd) }

    /// True once the process has ended.
    public var hasExited: Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) > 0
    }

    /// Returns once the process has ended (waiting on a thread of its own, not the pool's).
    public func wait() async {
        if hasExited { return }
        let fd = self.fd
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let t = Thread {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                while poll(&p, 1, -1) < 0 && errno == EINTR {}
                c.resume()
            }
            t.name = "exit-watch-\(pid)"
            t.start()
        }
        _ = self  // the descriptor stays open until the thread is done with it
    }
}
