#if canImport(Glibc)
    import Glibc
#endif

/// Writes all of `bytes` to a file descriptor, retrying on EINTR and short writes.
/// - Throws: the write's errno as a FurcateError naming `path`.
public func writeFully(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
    var done = 0
    while done < bytes.count {
        let n = write(fd, bytes.baseAddress.map { $0 + done }, bytes.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            throw FurcateError.system("write", errno: errno, path: path)
        }
        done += n
    }
}
