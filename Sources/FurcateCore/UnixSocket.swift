import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Blocking AF_UNIX stream sockets: the control channels to QEMU (QMP) and to guests.
public enum UnixSocket {
    /// Connects to `path`, retrying until `deadline` while the socket does not exist yet or
    /// refuses (a server still starting). `alive` is asked between tries: when it says no (the
    /// server process exited), connecting stops at once. Blocks its thread between tries: for
    /// threads of its own (the async overload waits without holding one).
    /// - Returns: a connected descriptor (close-on-exec).
    /// - Throws: `.timedOut` after the deadline, `.invalidArgument` for a path too long.
    public static func connect(
        _ path: String, deadline: ContinuousClock.Instant, alive: () -> Bool = { true }
    ) throws -> Int32 {
        let deadline = Deadline.at(deadline)
        var addr = try address(path)
        while true {
            if let fd = try attempt(&addr, path, deadline: deadline, alive: alive) { return fd }
            usleep(2000)
        }
    }

    /// `connect` for async callers: between tries it sleeps as a task, so a QEMU that takes
    /// 50 ms to create its QMP socket does not hold a thread of the cooperative pool (a host
    /// with 2 cores has 2) for those 50 ms while other forks wait to spawn.
    public static func connect(
        _ path: String, deadline: ContinuousClock.Instant, alive: () -> Bool = { true }
    ) async throws -> Int32 {
        try await connect(path, deadline: .at(deadline), alive: alive)
    }

    /// The async `connect` with a `Deadline` (a run-time one waits on a starved server longer).
    public static func connect(_ path: String, deadline: Deadline, alive: () -> Bool = { true }) async throws -> Int32 {
        var addr = try address(path)
        while true {
            if let fd = try attempt(&addr, path, deadline: deadline, alive: alive) { return fd }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    /// One try of `connect`: the descriptor, or nil when another try is worth it.
    private static func attempt(
        _ addr: inout sockaddr_un, _ path: String, deadline: Deadline, alive: () -> Bool
    ) throws -> Int32? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FurcateError.system("socket", errno: errno, path: path) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if r == 0 { return fd }
        let e = errno
        Glibc.close(fd)
        guard e == ENOENT || e == ECONNREFUSED || e == EINTR || e == EAGAIN else {
            throw FurcateError.system("connect", errno: e, path: path)
        }
        guard alive() else {
            throw FurcateError(.io, "the server exited before its socket accepted a connection", path: path)
        }
        if deadline.hasPassed {
            throw FurcateError(.timedOut, "socket did not accept a connection within \(deadline)", path: path, errno: e)
        }
        return nil
    }

    /// A listening socket at `path` (an existing file there is replaced).
    /// - Returns: the listening descriptor (close-on-exec).
    public static func listen(_ path: String) throws -> Int32 {
        var addr = try address(path)
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FurcateError.system("socket", errno: errno, path: path) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard r == 0, Glibc.listen(fd, 4) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw FurcateError.system("bind/listen", errno: e, path: path)
        }
        return fd
    }

    /// Accepts one connection on `listener`, waiting until `deadline`.
    /// - Throws: `.timedOut`.
    public static func accept(_ listener: Int32, deadline: ContinuousClock.Instant) throws -> Int32 {
        while true {
            var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let left = deadline - .now
            let ms = max(
                1,
                min(1000, Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)))
            let r = poll(&pfd, 1, ms)
            if r > 0 {
                // accept4 needs _GNU_SOURCE; set close-on-exec right after.
                let c = Glibc.accept(listener, nil, nil)
                if c >= 0 {
                    _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                    return c
                }
                if errno != EINTR && errno != EAGAIN { throw FurcateError.system("accept", errno: errno) }
            } else if r < 0 && errno != EINTR {
                throw FurcateError.system("poll", errno: errno)
            }
            if ContinuousClock.now >= deadline { throw FurcateError(.timedOut, "no connection arrived in time") }
        }
    }

    /// Reads from `fd` until end of stream, handing each chunk to `body`.
    /// - Returns: the bytes read.
    @discardableResult
    public static func readToEnd(_ fd: Int32, chunk: Int = 1 << 20, _ body: (UnsafeRawBufferPointer) throws -> Void)
        throws -> Int
    {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        defer { buf.deallocate() }
        var total = 0
        while true {
            let n = recv(fd, buf.baseAddress, chunk, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError.system("recv", errno: errno)
            }
            if n == 0 { return total }
            try body(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            total += n
        }
    }

    static func address(_ path: String) throws -> sockaddr_un {
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
        return addr
    }

    /// Writes all of `data`, retrying on EINTR and short writes.
    /// - Throws: `.io` when the peer is gone (EPIPE) or another error occurs.
    public static func writeAll(_ fd: Int32, _ data: [UInt8]) throws {
        try data.withUnsafeBytes { try writeAll(fd, $0) }
    }

    /// Writes all of `data`, retrying on EINTR and short writes.
    public static func writeAll(_ fd: Int32, _ data: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < data.count {
            let n = send(fd, data.baseAddress.map { $0 + done }, data.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError.system("send", errno: errno)
            }
            done += n
        }
    }
}
