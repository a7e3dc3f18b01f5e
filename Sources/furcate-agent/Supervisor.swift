import CAgentInit
import CSpawn
import Glibc
import GuestAgentProtocol
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The built-in service supervisor: slim images have no systemd, so the agent runs services
/// itself with systemd's semantics for the fields of `ServiceSpec`. Specs are kept in the
/// state directory (`/.furcate/services`, or `FURCATE_AGENT_STATE_DIR`) so an agent that was
/// restarted (it died, or the VM rebooted) starts enabled services again; process groups a
/// dead agent left running are killed first (their pids are kept beside the specs).
final class Supervisor: Sendable {
    static let shared = Supervisor(
        stateDir: getenv("FURCATE_AGENT_STATE_DIR").map { String(cString: $0) } ?? "/.furcate/services")

    private struct Entry {
        var spec: ServiceSpec
        var active = "inactive"
        var sub = "dead"
        var pid: pid_t?
        var restarts = 0
        var lastExit: Int32?
        var lastSignal: Int32?
        /// Bumped by every start and stop: a runner whose generation is stale stops caring.
        var generation = 0
        var startTimes: [Int64] = []
        var logs: [LogEntry] = []
    }

    let stateDir: String
    private let table = Mutex<[String: Entry]>([:])
    static let maxLogLines = 10_000

    init(stateDir: String) { self.stateDir = stateDir }

    // MARK: requests

    func create(_ spec: ServiceSpec, start: Bool) throws -> ServiceStatus {
        try Self.validate(spec)
        if table.withLock({ $0[spec.name] }) != nil { _ = stop(spec.name) }
        table.withLock { $0[spec.name] = Entry(spec: spec) }
        try persist(spec)
        return start ? try self.start(spec.name) : try status(spec.name)
    }

    func control(_ name: String, _ action: String) throws -> AgentResponse {
        switch action {
        case "start": return .service(try start(name))
        case "stop":
            guard let st = stop(name) else { throw notFound(name) }
            return .service(st)
        case "restart":
            _ = stop(name)
            return .service(try start(name))
        case "delete":
            _ = stop(name)
            guard table.withLock({ $0.removeValue(forKey: name) }) != nil else { throw notFound(name) }
            unlink("\(stateDir)/\(name).json")
            unlink("\(stateDir)/\(name).pid")
            return .ok
        default:
            throw AgentError(
                code: "invalid_argument",
                message: "service action must be start, stop, restart or delete, not '\(action)'")
        }
    }

    func status(_ name: String) throws -> ServiceStatus {
        guard let e = table.withLock({ $0[name] }) else { throw notFound(name) }
        return Self.status(e)
    }

    func list() -> [ServiceStatus] { table.withLock { $0.values.map(Self.status) }.sorted { $0.name < $1.name } }

    func logs(_ name: String, lines: Int, since: Double?) throws -> [LogEntry] {
        guard let e = table.withLock({ $0[name] }) else { throw notFound(name) }
        let kept = since.map { s in e.logs.filter { $0.time >= s } } ?? e.logs
        return Array(kept.suffix(max(0, min(lines, Self.maxLogLines))))
    }

    /// Loads kept specs, kills what a previous agent left running, starts the enabled ones.
    func bootStart() {
        guard let dir = opendir(stateDir) else { return }
        var specs: [ServiceSpec] = []
        while let ent = readdir(dir) {
            let n = withUnsafeBytes(of: ent.pointee.d_name) {
                String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            guard n.hasSuffix(".json") else { continue }
            if let data = try? readAll("\(stateDir)/\(n)"),
                let spec = try? JSONDecoder().decode(ServiceSpec.self, from: Data(data))
            {
                specs.append(spec)
            }
        }
        closedir(dir)
        for spec in specs {
            if let pidText = try? readAll("\(stateDir)/\(spec.name).pid"),
                let pid = Int32(String(decoding: pidText.filter { $0 >= 0x30 && $0 <= 0x39 }, as: UTF8.self)), pid > 1
            {
                kill(-pid, SIGKILL)  // its own process group (setsid)
            }
            table.withLock { $0[spec.name] = Entry(spec: spec) }
        }
        for spec in specs where spec.enable ?? true { _ = try? start(spec.name) }
    }

    // MARK: start and stop

    func start(_ name: String, chain: Set<String> = []) throws -> ServiceStatus {
        guard let e = table.withLock({ $0[name] }) else { throw notFound(name) }
        if e.active == "active" || e.active == "activating" { return Self.status(e) }
        guard !chain.contains(name) else {
            throw AgentError(code: "invalid_argument", message: "service dependency cycle at \(name)")
        }
        // requires: started first; after: ordering only (started first when known).
        for dep in (e.spec.requires ?? []) + (e.spec.after ?? []) {
            let required = e.spec.requires?.contains(dep) == true
            guard table.withLock({ $0[dep] }) != nil else {
                if required {
                    throw AgentError(
                        code: "not_found", message: "service \(name) requires \(dep), which does not exist")
                }
                continue
            }
            if required {
                let st = try start(dep, chain: chain.union([name]))
                if st.activeState == "failed" {
                    throw AgentError(code: "io", message: "service \(name) requires \(dep), which failed")
                }
            }
        }
        guard
            let gen = table.withLock({ t -> Int? in
                guard var entry = t[name] else { return nil }  // deleted meanwhile
                entry.generation += 1
                entry.active = "activating"
                entry.sub = "start"
                entry.startTimes.append(monotonicMillis())
                t[name] = entry
                return entry.generation
            })
        else { throw notFound(name) }
        startThread { [self] in run(name, generation: gen) }
        // Give a quick failure (a missing program) the chance to show in the answer.
        usleep(20_000)
        // A oneshot with deleteAfterSuccess may already be gone: it succeeded.
        return (try? status(name))
            ?? ServiceStatus(
                name: name, activeState: "inactive", subState: "dead", loadState: "not-found",
                description: e.spec.exec.last ?? "",
                mainPID: nil, restarts: 0, lastExitCode: 0, lastSignal: nil)
    }

    /// Stops a service (SIGTERM to its process group, SIGKILL after its timeout) and every
    /// service that requires it. Returns nil when there is no such service.
    @discardableResult
    func stop(_ name: String) -> ServiceStatus? {
        guard
            let (pid, timeout) = table.withLock({ t -> (pid_t?, Int)? in
                guard var entry = t[name] else { return nil }
                entry.generation += 1
                let p = entry.pid
                entry.pid = nil
                entry.active = "inactive"
                entry.sub = "dead"
                t[name] = entry
                return (p, entry.spec.timeoutSec ?? 10)
            })
        else { return nil }
        if let pid {
            kill(-pid, SIGTERM)
            let deadline = monotonicMillis() + Int64(timeout) * 1000
            while kill(pid, 0) == 0 && monotonicMillis() < deadline { usleep(10_000) }
            kill(-pid, SIGKILL)
        }
        unlink("\(stateDir)/\(name).pid")
        let dependents = table.withLock {
            $0.values.filter { $0.spec.requires?.contains(name) == true }.map(\.spec.name)
        }
        for d in dependents { stop(d) }
        return try? status(name)
    }

    /// One start of a service: its exec lines in order, then the restart policy.
    private func run(_ name: String, generation gen: Int) {
        while true {
            guard let spec = table.withLock({ t in t[name].flatMap { $0.generation == gen ? $0.spec : nil } }) else {
                return
            }
            var failed = false
            var signalled = false
            for (i, line) in spec.exec.enumerated() {
                let isMain = spec.mode == "service" && i == spec.exec.count - 1
                let (code, sig) = runLine(name, gen, spec, line, main: isMain || spec.mode == "oneshot")
                guard current(name, gen) else { return }
                if code != 0 || sig != nil {
                    failed = true
                    signalled = sig != nil
                    table.withLock { t in
                        t[name]?.lastExit = sig == nil ? code : nil
                        t[name]?.lastSignal = sig
                    }
                    break
                }
                table.withLock { $0[name]?.lastExit = 0 }
                if spec.mode == "service" && isMain { break }  // the main process ended cleanly
            }
            let policy = spec.restartPolicy?.policy ?? "no"
            let again: Bool
            switch policy {
            case "always": again = spec.mode == "service" || failed
            case "on-failure": again = failed
            case "on-abnormal": again = signalled
            default: again = false
            }
            if again {
                let burst = spec.restartPolicy?.startLimitBurst ?? 5
                let window = Int64(spec.restartPolicy?.startLimitIntervalSec ?? 10) * 1000
                let limited = table.withLock { t -> Bool in
                    let now = monotonicMillis()
                    t[name]?.startTimes.removeAll { now - $0 > window }
                    return (t[name]?.startTimes.count ?? 0) >= burst
                }
                if !limited {
                    table.withLock { t in
                        t[name]?.active = "activating"
                        t[name]?.sub = "auto-restart"
                        t[name]?.restarts += 1
                        t[name]?.startTimes.append(monotonicMillis())
                    }
                    usleep(UInt32(max(0, min(spec.restartPolicy?.restartSec ?? 0, 3600))) * 1_000_000 + 100_000)
                    continue
                }
            }
            table.withLock { t in
                guard t[name]?.generation == gen else { return }
                t[name]?.pid = nil
                if failed {
                    t[name]?.active = "failed"
                    t[name]?.sub = "failed"
                } else if spec.mode == "oneshot" && (spec.remainAfterExit ?? true) {
                    t[name]?.active = "active"
                    t[name]?.sub = "exited"
                } else {
                    t[name]?.active = "inactive"
                    t[name]?.sub = "dead"
                }
            }
            unlink("\(stateDir)/\(name).pid")
            if !failed && spec.mode == "oneshot" && spec.deleteAfterSuccess == true { _ = try? control(name, "delete") }
            return
        }
    }

    private func current(_ name: String, _ gen: Int) -> Bool { table.withLock { $0[name]?.generation == gen } }

    /// Runs one exec line with its output kept in the service's log; returns (exit code, signal).
    private func runLine(_ name: String, _ gen: Int, _ spec: ServiceSpec, _ line: String, main: Bool) -> (Int32, Int32?)
    {
        var argv = ["/bin/sh", "-c", line]
        if spec.user != nil || spec.group != nil {
            do {
                let (uid, gid) = try resolveIDs(user: spec.user, group: spec.group)
                argv = [selfExecutable(), "--run-as", "\(uid)", "\(gid)", "--"] + argv
            } catch {
                appendLog(name, "furcate-agent: \(error)")
                return (127, nil)
            }
        }
        var pipeFDs: [Int32] = [0, 0]
        guard cspawn_pipe_cloexec(&pipeFDs) == 0 else { return (127, nil) }
        let env = processEnvironment([defaultPATH, "HOME=/root"], spec.env)
        let pid: pid_t
        do {
            pid = try spawnInSession(
                argv, env: env, stdio: .nullInput(output: pipeFDs[1]), cwd: spec.workdir, search: false)
            close(pipeFDs[1])
        } catch {
            close(pipeFDs[0])
            close(pipeFDs[1])
            appendLog(name, "furcate-agent: cannot start '\(line)': \(error)")
            return (127, nil)
        }
        let stillCurrent = table.withLock { t -> Bool in
            guard t[name]?.generation == gen else { return false }
            t[name]?.pid = pid
            if main {
                t[name]?.active = "active"
                t[name]?.sub = "running"
            }
            return true
        }
        if !stillCurrent { kill(-pid, SIGKILL) }
        _ = try? writeAll("\(stateDir)/\(name).pid", Array("\(pid)\n".utf8))
        // Oneshot lines are bounded by timeoutSec; a long-running main process is not.
        let deadline = (spec.mode == "oneshot" ? spec.timeoutSec : nil).map { monotonicMillis() + Int64($0) * 1000 }
        var partial: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            var p = pollfd(fd: pipeFDs[0], events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, 200)
            if let deadline, monotonicMillis() > deadline {
                kill(-pid, SIGKILL)
                appendLog(name, "furcate-agent: timed out after \(spec.timeoutSec ?? 0) s")
            }
            if r <= 0 { continue }
            let n = buf.withUnsafeMutableBytes { read(pipeFDs[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            partial.append(contentsOf: buf[0..<n])
            while let nl = partial.firstIndex(of: 0x0a) {
                appendLog(name, String(decoding: partial[..<nl], as: UTF8.self))
                partial.removeSubrange(...nl)
            }
        }
        if !partial.isEmpty { appendLog(name, String(decoding: partial, as: UTF8.self)) }
        close(pipeFDs[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let sig = status & 0x7f
        return sig != 0 ? (128 + sig, sig) : ((status >> 8) & 0xff, nil)
    }

    private func appendLog(_ name: String, _ line: String) {
        table.withLock { t in
            t[name]?.logs.append(LogEntry(time: now(), text: line))
            if let c = t[name]?.logs.count, c > Self.maxLogLines { t[name]?.logs.removeFirst(c - Self.maxLogLines) }
        }
    }

    // MARK: helpers

    static func validate(_ spec: ServiceSpec) throws {
        if let p = spec.problem { throw AgentError(code: "invalid_argument", message: p) }
        if let wd = spec.workdir { try checkPath(wd) }
        _ = try resolveIDs(user: spec.user, group: spec.group)
    }

    private func notFound(_ name: String) -> AgentError { AgentError(code: "not_found", message: "no service \(name)") }

    private func persist(_ spec: ServiceSpec) throws {
        try makeDirectory(stateDir, parents: true)
        try writeAll("\(stateDir)/\(spec.name).json", [UInt8](try JSONEncoder().encode(spec)))
    }

    private static func status(_ e: Entry) -> ServiceStatus {
        ServiceStatus(
            name: e.spec.name, activeState: e.active, subState: e.sub, loadState: "loaded",
            description: e.spec.exec.last ?? "", mainPID: e.pid, restarts: e.restarts, lastExitCode: e.lastExit,
            lastSignal: e.lastSignal)
    }
}

/// The uid and gid of a user and group from /etc/passwd and /etc/group (no NSS in a static
/// binary). A user alone runs with its primary group; a group alone as root in that group.
func resolveIDs(user: String?, group: String?) throws -> (uid_t, gid_t) {
    var uid: uid_t = 0
    var gid: gid_t = 0
    if let user {
        guard
            let line = (try? readAll("/etc/passwd")).map({ String(decoding: $0, as: UTF8.self) })?
                .split(separator: "\n").map({ $0.split(separator: ":", omittingEmptySubsequences: false) })
                .first(where: { $0.count >= 4 && $0[0] == user }),
            let u = uid_t(line[2]), let g = gid_t(line[3])
        else { throw AgentError(code: "not_found", message: "no user \(user) in /etc/passwd") }
        uid = u
        gid = g
    }
    if let group {
        guard
            let line = (try? readAll("/etc/group")).map({ String(decoding: $0, as: UTF8.self) })?
                .split(separator: "\n").map({ $0.split(separator: ":", omittingEmptySubsequences: false) })
                .first(where: { $0.count >= 3 && $0[0] == group }),
            let g = gid_t(line[2])
        else { throw AgentError(code: "not_found", message: "no group \(group) in /etc/group") }
        gid = g
    }
    return (uid, gid)
}

/// `--run-as UID GID -- PROGRAM ARGS`: drop to the ids, then exec (posix_spawn cannot).
func runAs(_ args: [String]) -> Never {
    guard args.count >= 4, let uid = uid_t(args[0]), let gid = gid_t(args[1]), args[2] == "--" else { usage() }
    let prog = Array(args.dropFirst(3))
    if setgroups(0, nil) != 0 || setgid(gid) != 0 || setuid(uid) != 0 {
        complain("furcate-agent: cannot switch to \(uid):\(gid): \(String(cString: strerror(errno)))")
        exit(126)
    }
    let cargs: [UnsafeMutablePointer<CChar>?] = prog.map { strdup($0) } + [nil]
    execvp(prog[0], cargs)  // a bare name is looked up in the PATH the parent gave
    complain("furcate-agent: cannot exec \(prog[0]): \(String(cString: strerror(errno)))")
    exit(127)
}

func selfExecutable() -> String { readLink("/proc/self/exe") ?? "/.furcate/agent" }

/// Where a symbolic link points, or nil.
func readLink(_ path: String) -> String? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
}

func readAll(_ path: String) throws -> [UInt8] {
    let fd = try check(open(path, O_RDONLY | O_CLOEXEC), "open", path: path)
    defer { close(fd) }
    var out: [UInt8] = []
    var b = [UInt8](repeating: 0, count: 16 << 10)
    while true {
        let n = b.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw errnoError(errno, "read", path: path) }
        if n == 0 { return out }
        out.append(contentsOf: b[0..<n])
    }
}

func writeAll(_ path: String, _ bytes: [UInt8]) throws {
    try writeFile(path, Data(bytes), offset: nil, mode: 0o644, createParents: false)
}

/// The wall clock in Unix seconds.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
