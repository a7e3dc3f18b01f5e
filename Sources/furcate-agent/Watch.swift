import Glibc
import GuestAgentProtocol

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// inotify on `path` (and, when recursive, every directory below it, including ones created
/// while watching) until the stream is cancelled.
func watch(_ path: String, recursive: Bool, stream: StreamContext) throws {
    try checkPath(path)
    let fd = try check(inotify_init1(Int32(IN_CLOEXEC)), "inotify_init1")
    defer { close(fd) }
    let mask: UInt32 = UInt32(
        IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF)
    var dirs: [Int32: String] = [:]
    func add(_ dir: String) throws {
        let wd = inotify_add_watch(fd, dir, mask)
        if wd < 0 { throw errnoError(errno, "watch", path: dir) }
        dirs[wd] = dir
        guard recursive else { return }
        for e in (try? listDirectory(dir)) ?? [] where e.kind == .directory {
            try? add(dir.hasSuffix("/") ? dir + e.name : dir + "/" + e.name)
        }
    }
    try add(path)
    var buf = [UInt8](repeating: 0, count: 64 << 10)
    while !stream.isCancelled {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let r = poll(&p, 1, 200)
        if r <= 0 { continue }
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { continue }
        var off = 0
        while off + 16 <= n {
            // struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
            let wd = buf.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: off, as: Int32.self) }
            let m = buf.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: off + 4, as: UInt32.self) }
            let len = Int(buf.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: off + 12, as: UInt32.self) })
            let name = String(decoding: buf[(off + 16)..<(off + 16 + len)].prefix(while: { $0 != 0 }), as: UTF8.self)
            off += 16 + len
            guard let dir = dirs[wd] else { continue }
            let full = name.isEmpty ? dir : (dir.hasSuffix("/") ? dir + name : dir + "/" + name)
            let isDir = m & UInt32(IN_ISDIR) != 0
            let change: String
            if m & UInt32(IN_CREATE) != 0 {
                change = "create"
                if isDir && recursive { try? add(full) }
            } else if m & UInt32(IN_DELETE | IN_DELETE_SELF) != 0 {
                change = "delete"
            } else if m & UInt32(IN_MOVED_FROM) != 0 {
                change = "move_from"
            } else if m & UInt32(IN_MOVED_TO) != 0 {
                change = "move_to"
                if isDir && recursive { try? add(full) }
            } else if m & UInt32(IN_MODIFY | IN_CLOSE_WRITE) != 0 {
                change = "modify"
            } else {
                continue
            }
            stream.emit(.file(path: full, change: change, isDirectory: isDir))
        }
    }
}

/// A stats sample every `intervalMs` until cancelled.
func streamStats(intervalMs: Int, stream: StreamContext) throws {
    guard (100...10_000).contains(intervalMs) else {
        throw AgentError(code: "invalid_argument", message: "stats interval must be 100 to 10000 ms")
    }
    var previous: (busy: UInt64, total: UInt64)?
    while !stream.isCancelled {
        let cpu = cpuTimes()
        var busy = 0.0
        if let prev = previous, let cpu, cpu.total > prev.total {
            busy = Double(cpu.busy - min(cpu.busy, prev.busy)) / Double(cpu.total - prev.total)
        }
        previous = cpu
        let mem = memInfo()
        stream.emit(
            .stats(
                StatsSample(
                    memoryTotalBytes: mem.total, memoryAvailableBytes: mem.available, cpuBusy: busy,
                    cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), load1: load1(), uptimeSeconds: uptime())))
        var slept = 0
        while slept < intervalMs && !stream.isCancelled {
            usleep(UInt32(min(50, intervalMs - slept)) * 1000)
            slept += 50
        }
    }
}

/// A /proc file's text ("" when unreadable).
func procText(_ path: String) -> String {
    (try? readAll(path)).map { String(decoding: $0, as: UTF8.self) } ?? ""
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
func cpuTimes() -> (busy: UInt64, total: UInt64)? {
    guard let line = procText("/proc/stat").split(separator: "\n").first, line.hasPrefix("cpu ") else { return nil }
    let v = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
    guard v.count >= 5 else { return nil }
    let idle = v[3] + v[4]  // idle + iowait
    let total = v.reduce(0, +)
    return (total - idle, total)
}

func memInfo() -> (total: UInt64, available: UInt64) {
    var total: UInt64 = 0
    var available: UInt64 = 0
    for line in procText("/proc/meminfo").split(separator: "\n") {
        let f = line.split(separator: " ")
        guard f.count >= 2, let kb = UInt64(f[1]) else { continue }
        if f[0] == "MemTotal:" { total = kb * 1024 }
        if f[0] == "MemAvailable:" { available = kb * 1024 }
    }
    return (total, available)
}

func load1() -> Double {
    Double(procText("/proc/loadavg").split(separator: " ").first ?? "") ?? 0
}
