#if canImport(Glibc)
    import Glibc
#endif

/// Reads a whole file with read(2) until end of file. For /proc and /sys, whose files report
/// a size of 0 (Foundation's `String(contentsOfFile:)` returns only their first page).
/// - Returns: nil when the file cannot be opened or read.
public func readWholeFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        if n == 0 { break }
        out.append(contentsOf: chunk[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}
