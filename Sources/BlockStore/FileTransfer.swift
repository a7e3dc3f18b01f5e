import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Copies between local files and store files, keeping holes.
public enum FileTransfer {
    static let chunk = 1 << 20

    /// Imports the open local file `fd` into `file` (which should be empty): only data extents
    /// (SEEK_DATA/SEEK_HOLE_LINUX) are read, so holes stay holes; then syncs.
    public static func importFile(fd: Int32, path: String, into file: StoreFile) throws {
        var st = stat()
        try syscall("fstat", path: path) { fstat(fd, &st) }
        let size = UInt64(st.st_size)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        var pos: UInt64 = 0
        while pos < size {
            let data = lseek(fd, off_t(pos), SEEK_DATA_LINUX)
            if data < 0 {
                if errno == ENXIO { break }  // only a hole remains
                guard errno == EINVAL else { throw FurcateError.system("lseek", errno: errno, path: path, offset: pos) }
                pos = pos == 0 ? 0 : pos
            }
            let start = data < 0 ? pos : UInt64(data)
            var end = UInt64(max(lseek(fd, off_t(start), SEEK_HOLE_LINUX), 0))
            if end <= start { end = size }
            var p = start
            while p < end {
                let want = Int(min(UInt64(chunk), end - p))
                let n = try syscall("pread", path: path, offset: p) { pread(fd, buf.baseAddress, want, off_t(p)) }
                if n == 0 { break }
                try file.write(UnsafeRawBufferPointer(rebasing: buf[0..<n]), at: p)
                p += UInt64(n)
            }
            pos = end
        }
        try file.truncate(to: size)
        try file.sync()
    }

    /// Exports `file` into the open local file `fd`: data extents written, holes left as holes.
    public static func exportFile(_ file: StoreFile, fd: Int32, path: String) throws {
        let size = file.size
        try syscall("ftruncate", path: path) { ftruncate(fd, off_t(size)) }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        var pos: UInt64 = 0
        while pos < size, let start = try file.nextData(from: pos) {
            let end = try file.nextHole(from: start)
            var p = start
            while p < end {
                let want = Int(min(UInt64(chunk), end - p))
                let n = try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<want]), at: p)
                if n == 0 { break }
                var done = 0
                while done < n {
                    let w = try syscall("pwrite", path: path, offset: p + UInt64(done)) {
                        pwrite(fd, buf.baseAddress.map { $0 + done }, n - done, off_t(p) + off_t(done))
                    }
                    done += w
                }
                p += UInt64(n)
            }
            pos = end
        }
        try syscall("fsync", path: path) { fsync(fd) }
    }
}
