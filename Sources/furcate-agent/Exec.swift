import CAgentInit
import GuestAgentProtocol
import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Runs a program in its own session (so a timeout kills it and all it started), with
/// stdout and stderr read concurrently through poll and kept up to a bound — or, with
/// `stream`, sent as output events as they come (a cancelled stream kills the program).
func runProgram(_ e: ExecRequest, stream: StreamContext? = nil) throws -> ExecResult {
    let argv: [String]
    switch (e.argv, e.command) {
    case (let a?, nil) where !a.isEmpty: argv = a
    case (nil, let c?): argv = ["/bin/sh", "-c", c]
    default: throw AgentError(code: "invalid_argument", message: "give either argv (non-empty) or command")
    }
    let limit = min(max(e.maxOutputBytes ?? (1 << 20), 0), 8 << 20)
    if let cwd = e.cwd { try checkPath(cwd) }

    var outPipe: [Int32] = [0, 0]
    var errPipe: [Int32] = [0, 0]
    var inPipe: [Int32] = [0, 0]
    try check(cagent_pipe_cloexec(&outPipe), "pipe")
    try check(cagent_pipe_cloexec(&errPipe), "pipe")
    try check(cagent_pipe_cloexec(&inPipe), "pipe")

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    if let cwd = e.cwd { cagent_spawn_addchdir(&actions, cwd) }
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    posix_spawnattr_setflags(&attr, Int16(0x80 | 0x08))  // POSIX_SPAWN_SETSID | SETSIGMASK

    var env: [String: String] = [:]
    var p = environ
    while let entry = p.pointee {
        let s = String(cString: entry)
        if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
        p += 1
    }
    if env["PATH"] == nil { env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" }
    for (k, v) in e.env ?? [:] { env[k] = v }
    let cargv: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    let cenv: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        for a in cargv { free(a) }
        for a in cenv { free(a) }
    }
    let start = monotonicMillis()
    var pid: pid_t = 0
    let rc = posix_spawnp(&pid, argv[0], &actions, &attr, cargv, cenv)
    close(inPipe[0])
    close(outPipe[1])
    close(errPipe[1])
    guard rc == 0 else {
        close(inPipe[1])
        close(outPipe[0])
        close(errPipe[0])
        throw errnoError(rc, "exec", path: argv[0])
    }

    // stdin on its own thread: a child that does not read it must not block the output loop.
    let stdinBytes = e.stdin.map { [UInt8]($0) } ?? []
    let inFD = inPipe[1]
    startThread {
        var done = 0
        while done < stdinBytes.count {
            let n = stdinBytes.withUnsafeBytes { write(inFD, $0.baseAddress! + done, stdinBytes.count - done) }
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
    let rc = pthread_create(&t, nil, { raw in
        let b = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        b.body()
        return nil
    }, box)
    if rc == 0 { pthread_detach(t) } else { Unmanaged<Box>.fromOpaque(box).release() }
}
