import CAgentInit
import CSpawn
import Glibc
import GuestAgentProtocol

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Runs a program in its own session (so a timeout kills it and all it started), with
/// stdout and stderr read concurrently through poll and kept up to a bound — or, with
/// `stream`, sent as output events as they come (a cancelled stream kills the program).
func runProgram(_ e: ExecRequest, stream: StreamContext? = nil) throws -> ExecResult {
    var argv: [String]
    switch (e.argv, e.command) {
    case (let a?, nil) where !a.isEmpty: argv = a
    case (nil, let c?): argv = ["/bin/sh", "-c", c]
    default: throw AgentError(code: "invalid_argument", message: "give either argv (non-empty) or command")
    }
    if let user = e.user, user != "root", user != "0" {
        let (uid, gid) = try resolveIDs(user: user, group: nil)
        argv = [selfExecutable(), "--run-as", "\(uid)", "\(gid)", "--"] + argv
    }
    let limit = min(max(e.maxOutputBytes ?? (1 << 20), 0), 8 << 20)
    if let cwd = e.cwd { try checkPath(cwd) }
    let cwd = e.cwd ?? imageWorkdir()

    var outPipe: [Int32] = [0, 0]
    var errPipe: [Int32] = [0, 0]
    var inPipe: [Int32] = [0, 0]
    try check(cspawn_pipe_cloexec(&outPipe), "pipe")
    try check(cspawn_pipe_cloexec(&errPipe), "pipe")
    try check(cspawn_pipe_cloexec(&inPipe), "pipe")

    var env: [String: String] = [:]
    var p = environ
    while let entry = p.pointee {
        let s = String(cString: entry)
        if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
        p += 1
    }
    if env["PATH"] == nil { env["PATH"] = String(defaultPATH.dropFirst(5)) }
    for (k, v) in imageEnvironment { env[k] = v }
    for (k, v) in e.env ?? [:] { env[k] = v }
    let start = monotonicMillis()
    let pid: pid_t
    do {
        pid = try spawnInSession(
            argv, env: env.map { "\($0.key)=\($0.value)" }, stdio: .descriptors(inPipe[0], outPipe[1], errPipe[1]),
            cwd: cwd)
    } catch {
        for fd in inPipe + outPipe + errPipe { close(fd) }
        throw error
    }
    close(inPipe[0])
    close(outPipe[1])
    close(errPipe[1])

    // stdin on its own thread: a child that does not read it must not block the output loop.
    let stdinBytes = e.stdin.map { [UInt8]($0) } ?? []
    let inFD = inPipe[1]
    startThread {
        var done = 0
        while done < stdinBytes.count {
            let n = stdinBytes.withUnsafeBytes {
                write(inFD, $0.baseAddress.map { $0 + done }, stdinBytes.count - done)
            }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            done += n
        }
        close(inFD)
    }

    var out: [UInt8] = []
    var err: [UInt8] = []
    var truncated = false
    var timedOut = false
    var open = [outPipe[0], errPipe[0]]
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    let deadline = e.timeoutMs.map { start + Int64($0) }
    while !open.isEmpty {
        var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        var wait: Int32 = stream == nil ? 1000 : 100
        if stream?.isCancelled == true {
            kill(-pid, SIGKILL)
            kill(pid, SIGKILL)
            break
        }
        if let deadline {
            let left = deadline - monotonicMillis()
            if left <= 0 {
                timedOut = true
                kill(-pid, SIGKILL)
                kill(pid, SIGKILL)
                break
            }
            wait = Int32(min(left, 1000))
        }
        let r = poll(&fds, nfds_t(fds.count), wait)
        if r < 0 && errno != EINTR { break }
        for f in fds where f.revents != 0 {
            let n = chunk.withUnsafeMutableBytes { read(f.fd, $0.baseAddress, $0.count) }
            if n <= 0 {
                if n < 0 && errno == EINTR { continue }
                close(f.fd)
                open.removeAll { $0 == f.fd }
                continue
            }
            if let stream {
                stream.emit(.output(fd: f.fd == outPipe[0] ? 1 : 2, data: Data(chunk[0..<n])))
            } else if f.fd == outPipe[0] {
                let room = max(0, limit - out.count)
                out.append(contentsOf: chunk[0..<min(n, room)])
                if n > room { truncated = true }
            } else {
                let room = max(0, limit - err.count)
                err.append(contentsOf: chunk[0..<min(n, room)])
                if n > room { truncated = true }
            }
        }
    }
    for fd in open { close(fd) }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let signaled = (status & 0x7f) != 0 && (status & 0x7f) != 0x7f
    return ExecResult(
        exitCode: signaled ? nil : (status >> 8) & 0xff, signal: signaled ? status & 0x7f : nil,
        stdout: Data(out), stderr: Data(err), truncated: truncated, timedOut: timedOut,
        durationMs: Int(monotonicMillis() - start))
}

/// Where a spawned program's descriptors 0, 1 and 2 come from.
enum StdioSetup {
    /// dup2 these descriptors onto 0, 1, 2.
    case descriptors(Int32, Int32, Int32)
    /// /dev/null as stdin, `output` as stdout and stderr.
    case nullInput(output: Int32)
    /// Open this tty as 0 (after setsid it becomes the controlling terminal), dup it to 1, 2.
    case terminal(String)
}

/// Starts a program in its own session (a timeout or a stop can kill its whole group), with
/// an empty signal mask, default signal dispositions, the given stdio and no other descriptor,
/// working directory and environment ("K=V").
/// `search`: look `argv[0]` up in PATH.
func spawnInSession(_ argv: [String], env: [String], stdio: StdioSetup, cwd: String? = nil, search: Bool = true) throws
    -> pid_t
{
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    switch stdio {
    case .descriptors(let i, let o, let e):
        posix_spawn_file_actions_adddup2(&actions, i, 0)
        posix_spawn_file_actions_adddup2(&actions, o, 1)
        posix_spawn_file_actions_adddup2(&actions, e, 2)
    case .nullInput(let out):
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, out, 1)
        posix_spawn_file_actions_adddup2(&actions, out, 2)
    case .terminal(let tty):
        posix_spawn_file_actions_addopen(&actions, 0, tty, O_RDWR, 0)
        posix_spawn_file_actions_adddup2(&actions, 0, 1)
        posix_spawn_file_actions_adddup2(&actions, 0, 2)
    }
    if let cwd { cagent_spawn_addchdir(&actions, cwd) }
    // Nothing of the agent's beyond stdio: a descriptor it inherited, or another exec's pipe
    // opened in the meantime, held by a long-running program would keep that pipe's reader
    // from ever seeing its end.
    cspawn_addclosefrom(&actions, 3)
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    // Every signal back to its default: the agent ignores SIGPIPE, and ignored signals survive
    // exec (busybox's `yes | head` would spin forever).
    var defaults = sigset_t()
    sigfillset(&defaults)
    posix_spawnattr_setsigdefault(&attr, &defaults)
    posix_spawnattr_setflags(&attr, Int16(0x80 | 0x08 | 0x04))  // POSIX_SPAWN_SETSID | SETSIGMASK | SETSIGDEF
    let cargv: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    let cenv: [UnsafeMutablePointer<CChar>?] = env.map { strdup($0) } + [nil]
    defer {
        for a in cargv { free(a) }
        for a in cenv { free(a) }
    }
    var pid: pid_t = 0
    let rc =
        search
        ? posix_spawnp(&pid, argv[0], &actions, &attr, cargv, cenv)
        : posix_spawn(&pid, argv[0], &actions, &attr, cargv, cenv)
    guard rc == 0 else { throw errnoError(rc, "exec", path: argv[0]) }
    return pid
}

/// The PATH programs get when the agent's own environment has none.
let defaultPATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/// The image's `Env` (KEY=VALUE lines in /.furcate/env, written when the image was imported;
/// FURCATE_AGENT_ENV_FILE names another file, for tests): every process the agent starts gets
/// it, over the agent's defaults and under what a request sets.
/// Read at every start, so a build step that adds to it reaches later processes (and the VMs
/// made from the build's snapshot, whose agent is this same process).
var imageEnvironment: [(String, String)] {
    let path = getenv("FURCATE_AGENT_ENV_FILE").map { String(cString: $0) } ?? "/.furcate/env"
    guard let bytes = try? readAll(path) else { return [] }
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
        guard let eq = line.firstIndex(of: "="), eq != line.startIndex else { return nil }
        return (String(line[..<eq]), String(line[line.index(after: eq)...]))
    }
}

/// The directory programs start in when a request names none: the image's WorkingDir (or a
/// build's workdir) from /.furcate/workdir, when that is an existing directory; else nil ("/").
func imageWorkdir() -> String? {
    let path = getenv("FURCATE_AGENT_WORKDIR_FILE").map { String(cString: $0) } ?? "/.furcate/workdir"
    guard let bytes = try? readAll(path) else { return nil }
    let dir = String(decoding: bytes.prefix { $0 != 10 && $0 != 13 }, as: UTF8.self)
    var st = stat()
    guard dir.hasPrefix("/"), stat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else { return nil }
    return dir
}

/// Defaults, then the image's environment, then `extra` ("K=V" each).
func processEnvironment(_ defaults: [String], _ extra: [String: String]?) -> [String] {
    var order: [String] = []
    var values: [String: String] = [:]
    func set(_ k: String, _ v: String) {
        if values[k] == nil { order.append(k) }
        values[k] = v
    }
    for d in defaults { if let eq = d.firstIndex(of: "=") { set(String(d[..<eq]), String(d[d.index(after: eq)...])) } }
    for (k, v) in imageEnvironment { set(k, v) }
    for (k, v) in (extra ?? [:]).sorted(by: { $0.key < $1.key }) { set(k, v) }
    return order.map { "\($0)=\(values[$0, default: ""])" }
}

func monotonicMillis() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// A detached pthread running `body` (Foundation's Thread is not in FoundationEssentials).
func startThread(_ body: @escaping () -> Void) {
    final class Box {
        let body: () -> Void
        init(_ b: @escaping () -> Void) { body = b }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var t = pthread_t()
    let rc = pthread_create(
        &t, nil,
        { raw in
            guard let raw else { return nil }
            let b = Unmanaged<Box>.fromOpaque(raw).takeRetainedValue()
            b.body()
            return nil
        }, box)
    if rc == 0 { pthread_detach(t) } else { Unmanaged<Box>.fromOpaque(box).release() }
}
