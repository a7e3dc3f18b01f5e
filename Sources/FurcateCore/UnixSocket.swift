import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Blocking AF_UNIX stream sockets: the control channels to QEMU (QMP) and to guests.
public enum UnixSocket {
    /// Connects to `path`, retrying until `deadline` while the socket does not exist yet or
    /// refuses (a server still starting). `alive` is asked between tries: when it says no (the
    /// server process exited), connecting stops at once.
    /// - Returns: a connected descriptor (close-on-exec).
    /// - Throws: `.timedOut` after the deadline, `.invalidArgument` for a path too long.
    public static func connect(
        _ path: String, deadline: ContinuousClock.Instant, alive: () -> Bool = { true }
    ) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let cap = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < cap else {
            throw FurcateError(.invalidArgument, "socket path is longer than \(cap - 1) bytes", path: path)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            p.copyBytes(from: bytes)
            p[bytes.count] = 0
        }
        var lastErrno: Int32 = 0
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw FurcateError.system("socket", errno: errno, path: path) }
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            if r == 0 { return fd }
            lastErrno = errno
            Glibc.close(fd)
            guard lastErrno == ENOENT || lastErrno == ECONNREFUSED || lastErrno == EINTR || lastErrno == EAGAIN else {
                throw FurcateError.system("connect", errno: lastErrno, path: path)
            }
            guard alive() else {
                throw FurcateError(.io, "the server exited before its socket accepted a connection", path: path)
            }
            if ContinuousClock.now >= deadline {
                throw FurcateError(.timedOut, "socket did not accept a connection in time", path: path, errno: lastErrno)
            }
            usleep(2000)
        }
    }

    /// Writes all of `data`, retrying on EINTR and short writes.
    /// - Throws: `.io` when the peer is gone (EPIPE) or another error occurs.
    public static func writeAll(_ fd: Int32, _ data: [UInt8]) throws {
        var done = 0
        while done < data.count {
            let n = data.withUnsafeBytes { p in
                send(fd, p.baseAddress! + done, data.count - done, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError.system("send", errno: errno)
            }
            done += n
        }
    }
}
