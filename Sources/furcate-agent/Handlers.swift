import Glibc
import GuestAgentProtocol

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Carries out one request. Runs on its own thread; blocking is fine here. Streaming requests
/// get `stream` and send events through it before this returns their final response.
func handle(_ request: AgentRequest, stream: StreamContext? = nil) -> AgentResponse {
    do {
        switch request {
        case .execStream(let e):
            guard let stream else { throw AgentError(code: "invalid_argument", message: "not a stream") }
            return .exec(try runProgram(e, stream: stream))
        case .watch(let path, let recursive):
            guard let stream else { throw AgentError(code: "invalid_argument", message: "not a stream") }
            try watch(path, recursive: recursive, stream: stream)
            return .ok
        case .stats(let ms):
            guard let stream else { throw AgentError(code: "invalid_argument", message: "not a stream") }
            try streamStats(intervalMs: ms, stream: stream)
            return .ok
        case .cancel:
            return .ok  // answered by the server before a handler runs
        // Services: through systemd when it is the init, else the built-in supervisor.
        case .serviceCreate(let spec, let start):
            return .service(
                Systemd.isInit
                    ? try Systemd.create(spec, start: start) : try Supervisor.shared.create(spec, start: start))
        case .serviceControl(let name, let action):
            return Systemd.isInit ? try Systemd.control(name, action) : try Supervisor.shared.control(name, action)
        case .serviceStatus(let name):
            return .service(Systemd.isInit ? try Systemd.status(name) : try Supervisor.shared.status(name))
        case .serviceList:
            return .services(Systemd.isInit ? Systemd.list() : Supervisor.shared.list())
        case .serviceLogs(let name, let lines, let since):
            return .logs(
                Systemd.isInit
                    ? try Systemd.logs(name, lines: lines ?? 200, since: since)
                    : try Supervisor.shared.logs(name, lines: lines ?? 200, since: since))
        case .terminalCreate(let name, let command, let cols, let rows):
            return .terminal(try Terminals.shared.create(name, command: command, cols: cols, rows: rows))
        case .terminalList:
            return .terminals(Terminals.shared.list())
        case .terminalInput(let name, let data):
            try Terminals.shared.input(name, data)
            return .ok
        case .terminalResize(let name, let cols, let rows):
            try Terminals.shared.resize(name, cols: cols, rows: rows)
            return .ok
        case .terminalOutput(let name, let raw, let lines):
            return try Terminals.shared.output(name, raw: raw, lines: lines)
        case .terminalClose(let name):
            try Terminals.shared.close(name)
            return .ok
        case .addGroup(let g):
            _ = try addGroup(g)
            return .ok
        case .addUser(let u):
            _ = try addUser(u)
            return .ok
        case .freeze(let mps, let frozen):
            try freeze(mps, frozen: frozen)
            return .ok
        case .shutdown(let grace):
            shutdown(graceSeconds: grace)
            return .ok
        case .ping:
            return .pong(agentVersion: agentVersion, hostname: hostname(), uptimeSeconds: uptime())
        case .exec(let e):
            return .exec(try runProgram(e))
        case .readFile(let path, let offset, let length):
            return try readFile(path, offset: offset ?? 0, length: length)
        case .writeFile(let path, let data, let offset, let mode, let createParents):
            try writeFile(path, data, offset: offset, mode: mode ?? 0o644, createParents: createParents)
            return .ok
        case .stat(let path):
            return .stat(try statFile(path, name: lastComponent(path)))
        case .list(let path):
            return .entries(try listDirectory(path))
        case .mkdir(let path, let parents):
            try makeDirectory(path, parents: parents)
            return .ok
        case .delete(let path, let recursive):
            try remove(path, recursive: recursive)
            return .ok
        case .setTime(let ns):
            var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
            try check(clock_settime(CLOCK_REALTIME, &ts), "clock_settime")
            return .ok
        case .setHostname(let name):
            guard !name.isEmpty, name.utf8.count <= 64, !name.contains("/") else {
                throw AgentError(code: "invalid_argument", message: "hostname must be 1 to 64 bytes")
            }
            try check(sethostname(name, name.utf8.count), "sethostname")
            return .ok
        case .reseed(let entropy):
            try reseed(entropy)
            return .ok
        case .sync:
            Glibc.sync()
            return .ok
        }
    } catch let e as AgentError {
        return .error(e)
    } catch {
        return .error(AgentError(code: "io", message: "\(error)"))
    }
}

/// Throws an `AgentError` from errno when `r` is -1.
@discardableResult
func check(_ r: Int32, _ what: String, path: String? = nil) throws -> Int32 {
    guard r == -1 else { return r }
    throw errnoError(errno, what, path: path)
}

func errnoError(_ e: Int32, _ what: String, path: String?) -> AgentError {
    let code: String
    switch e {
    case ENOENT, ENOTDIR: code = "not_found"
    case EACCES, EPERM, EROFS: code = "permission_denied"
    case EEXIST, ENOTEMPTY: code = "exists"
    case EINVAL, EISDIR, ENAMETOOLONG: code = "invalid_argument"
    case EBUSY: code = "busy"
    default: code = "io"
    }
    let msg = String(cString: strerror(e))
    return AgentError(code: code, message: "\(what)\(path.map { " \($0)" } ?? ""): \(msg)")
}

func hostname() -> String {
    var buf = [CChar](repeating: 0, count: 256)
    _ = gethostname(&buf, 255)
    return String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func uptime() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_BOOTTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func lastComponent(_ path: String) -> String {
    path.split(separator: "/").last.map(String.init) ?? "/"
}

/// Paths must be absolute: the agent's working directory means nothing to the host.
func checkPath(_ path: String) throws {
    guard path.hasPrefix("/"), !path.utf8.contains(0) else {
        throw AgentError(code: "invalid_argument", message: "path must be absolute: '\(path)'")
    }
}

// MARK: files

let maxReadChunk = 4 << 20

func readFile(_ path: String, offset: UInt64, length: Int?) throws -> AgentResponse {
    try checkPath(path)
    let fd = try check(open(path, O_RDONLY | O_CLOEXEC), "open", path: path)
    defer { close(fd) }
    var st = stat()
    try check(fstat(fd, &st), "stat", path: path)
    if (st.st_mode & S_IFMT) == S_IFDIR {
        throw AgentError(code: "invalid_argument", message: "\(path) is a directory")
    }
    let size = UInt64(st.st_size)
    let want = min(length ?? maxReadChunk, maxReadChunk)
    guard want >= 0 else { throw AgentError(code: "invalid_argument", message: "negative length") }
    var buf = [UInt8](repeating: 0, count: want)
    var got = 0
    while got < want {
        let n = buf.withUnsafeMutableBytes {
            pread(fd, $0.baseAddress.map { $0 + got }, want - got, off_t(offset) + off_t(got))
        }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw errnoError(errno, "read", path: path) }
        if n == 0 { break }
        got += n
    }
    return .data(Data(buf[0..<got]), fileSize: size)
}

func writeFile(_ path: String, _ data: Data, offset: UInt64?, mode: UInt32, createParents: Bool) throws {
    try checkPath(path)
    if createParents {
        let parent = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !parent.isEmpty { try makeDirectory(parent, parents: true) }
    }
    let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (offset == nil ? O_TRUNC : 0)
    let fd = try check(open(path, flags, mode_t(mode)), "open", path: path)
    defer { close(fd) }
    let bytes = [UInt8](data)
    var done = 0
    let base = off_t(offset ?? 0)
    while done < bytes.count {
        let n = bytes.withUnsafeBytes {
            pwrite(fd, $0.baseAddress.map { $0 + done }, bytes.count - done, base + off_t(done))
        }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw errnoError(errno, "write", path: path) }
        done += n
    }
    if offset == nil { _ = fchmod(fd, mode_t(mode)) }
}

func statFile(_ path: String, name: String) throws -> FileStat {
    try checkPath(path)
    var st = stat()
    try check(lstat(path, &st), "stat", path: path)
    let kind: FileKind
    switch st.st_mode & S_IFMT {
    case S_IFREG: kind = .file
    case S_IFDIR: kind = .directory
    case S_IFLNK: kind = .symlink
    default: kind = .other
    }
    return FileStat(
        name: name, kind: kind, size: UInt64(st.st_size), mode: UInt32(st.st_mode & 0o7777),
        modifiedEpochSeconds: Int64(st.st_mtim.tv_sec))
}

func listDirectory(_ path: String) throws -> [FileStat] {
    try checkPath(path)
    guard let dir = opendir(path) else { throw errnoError(errno, "opendir", path: path) }
    defer { closedir(dir) }
    var out: [FileStat] = []
    while let ent = readdir(dir) {
        let name = withUnsafeBytes(of: ent.pointee.d_name) {
            String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name == "." || name == ".." { continue }
        let full = path.hasSuffix("/") ? path + name : path + "/" + name
        if let s = try? statFile(full, name: name) { out.append(s) }
    }
    return out.sorted { $0.name < $1.name }
}

func makeDirectory(_ path: String, parents: Bool) throws {
    try checkPath(path)
    if parents {
        var prefix = ""
        for part in path.split(separator: "/") {
            prefix += "/" + part
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST { throw errnoError(errno, "mkdir", path: prefix) }
        }
        return
    }
    try check(mkdir(path, 0o755), "mkdir", path: path)
}

func remove(_ path: String, recursive: Bool) throws {
    try checkPath(path)
    guard path != "/" else { throw AgentError(code: "invalid_argument", message: "refusing to delete /") }
    var st = stat()
    try check(lstat(path, &st), "stat", path: path)
    if (st.st_mode & S_IFMT) == S_IFDIR {
        if recursive {
            for e in try listDirectory(path) { try remove(path + "/" + e.name, recursive: true) }
        }
        try check(rmdir(path), "rmdir", path: path)
    } else {
        try check(unlink(path), "unlink", path: path)
    }
}

// MARK: entropy

/// RNDADDENTROPY with the bytes credited, then RNDRESEEDCRNG: the next read of
/// /dev/urandom or getrandom(2) comes from a key no sibling fork shares.
func reseed(_ entropy: Data) throws {
    guard (16...512).contains(entropy.count) else {
        throw AgentError(code: "invalid_argument", message: "entropy must be 16 to 512 bytes")
    }
    let fd = try check(open("/dev/urandom", O_RDWR | O_CLOEXEC), "open", path: "/dev/urandom")
    defer { close(fd) }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    var info = [UInt8](repeating: 0, count: 8 + entropy.count)
    withUnsafeBytes(of: Int32(entropy.count * 8)) { info.replaceSubrange(0..<4, with: $0) }
    withUnsafeBytes(of: Int32(entropy.count)) { info.replaceSubrange(4..<8, with: $0) }
    info.replaceSubrange(8..., with: entropy)
    let rndAddEntropy: UInt = 0x4008_5203  // _IOW('R', 0x03, int[2])
    let rndReseedCRNG: UInt = 0x5207  // _IO('R', 0x07)
    let r = info.withUnsafeMutableBytes { p -> Int32 in
        guard let base = p.baseAddress else { return -1 }
        return ioctl(fd, rndAddEntropy, base)
    }
    try check(r, "ioctl RNDADDENTROPY")
    try check(ioctl(fd, rndReseedCRNG), "ioctl RNDRESEEDCRNG")
}
