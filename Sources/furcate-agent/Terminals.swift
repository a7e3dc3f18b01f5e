import CAgentInit
import Glibc
import GuestAgentProtocol
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Pty sessions: a program on a pseudo-terminal (its controlling tty), its output kept raw
/// (the last MiB, escape sequences included) and as text lines.
final class Terminals: Sendable {
    static let shared = Terminals()
    static let maxRaw = 1 << 20
    static let maxLines = 10_000

    private struct Session {
        var master: Int32
        var pid: pid_t
        var created: Int64
        var exited = false
        var raw: [UInt8] = []
        var lines: [String] = []
        var partial: [UInt8] = []
    }
    private let sessions = Mutex<[String: Session]>([:])

    func create(_ name: String, command: [String]?, cols: Int, rows: Int) throws -> TerminalInfo {
        guard !name.isEmpty, name.count <= 64, !name.contains("/") else {
            throw AgentError(code: "invalid_argument", message: "terminal name must be 1-64 bytes without '/'")
        }
        guard (1...1000).contains(cols), (1...1000).contains(rows) else {
            throw AgentError(code: "invalid_argument", message: "terminal size must be 1-1000 columns and rows")
        }
        guard sessions.withLock({ $0[name] }) == nil else {
            throw AgentError(code: "exists", message: "terminal \(name) exists")
        }
        var slave = [CChar](repeating: 0, count: 128)
        let master = cagent_openpt(&slave, 128)
        guard master >= 0 else { throw errnoError(errno, "posix_openpt", path: nil) }
        _ = cagent_set_winsize(master, UInt16(cols), UInt16(rows))
        let argv = command ?? ["/bin/sh"]
        guard !argv.isEmpty else { throw AgentError(code: "invalid_argument", message: "empty terminal command") }
        let pid: pid_t
        do {
            pid = try spawnInSession(
                argv, env: processEnvironment(["TERM=xterm-256color", defaultPATH, "HOME=/root"], nil),
                stdio: .terminal(
                    String(decoding: slave.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))
        } catch {
            Glibc.close(master)
            throw error
        }
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        sessions.withLock { $0[name] = Session(master: master, pid: pid, created: Int64(ts.tv_sec)) }
        startThread { [self] in pump(name, master, pid) }
        return try info(name)
    }

    func list() -> [TerminalInfo] {
        sessions.withLock { s in s.map { Self.info($0.key, $0.value) } }.sorted { $0.name < $1.name }
    }

    func input(_ name: String, _ data: Data) throws {
        let master = try session(name).master
        let bytes = [UInt8](data)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(master, $0.baseAddress.map { $0 + done }, bytes.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw errnoError(errno, "write to terminal", path: name) }
            done += n
        }
    }

    func resize(_ name: String, cols: Int, rows: Int) throws {
        guard (1...1000).contains(cols), (1...1000).contains(rows) else {
            throw AgentError(code: "invalid_argument", message: "terminal size must be 1-1000 columns and rows")
        }
        try check(cagent_set_winsize(try session(name).master, UInt16(cols), UInt16(rows)), "resize", path: name)
    }

    func output(_ name: String, raw: Bool, lines: Int?) throws -> AgentResponse {
        let s = try session(name)
        if raw { return .data(Data(s.raw), fileSize: UInt64(s.raw.count)) }
        var all = s.lines
        if !s.partial.isEmpty { all.append(Self.text(s.partial)) }
        return .lines(Array(all.suffix(max(0, lines ?? 200))))
    }

    func close(_ name: String) throws {
        let s = try session(name)
        kill(-s.pid, SIGHUP)
        kill(-s.pid, SIGKILL)
        sessions.withLock { $0[name] = nil }
        // The pump thread sees end-of-file, reaps the child and closes the master.
    }

    func info(_ name: String) throws -> TerminalInfo { Self.info(name, try session(name)) }

    private func session(_ name: String) throws -> Session {
        guard let s = sessions.withLock({ $0[name] }) else {
            throw AgentError(code: "not_found", message: "no terminal \(name)")
        }
        return s
    }

    private static func info(_ name: String, _ s: Session) -> TerminalInfo {
        TerminalInfo(
            name: name, status: s.exited ? "exited" : "running", created: s.created, pid: s.exited ? nil : s.pid)
    }

    /// Reads the master until the program and everything holding the tty are gone.
    private func pump(_ name: String, _ master: Int32, _ pid: pid_t) {
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { read(master, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }  // EIO once the slave side is closed
            sessions.withLock { t in
                guard var s = t[name], s.master == master else { return }
                s.raw.append(contentsOf: buf[0..<n])
                if s.raw.count > Self.maxRaw { s.raw.removeFirst(s.raw.count - Self.maxRaw) }
                s.partial.append(contentsOf: buf[0..<n])
                while let nl = s.partial.firstIndex(of: 0x0a) {
                    s.lines.append(Self.text(Array(s.partial[..<nl])))
                    s.partial.removeSubrange(...nl)
                }
                if s.lines.count > Self.maxLines { s.lines.removeFirst(s.lines.count - Self.maxLines) }
                t[name] = s
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        Glibc.close(master)
        sessions.withLock { t in
            if t[name]?.master == master { t[name]?.exited = true }
        }
    }

    /// Terminal output as plain text: escape sequences (CSI, OSC) and carriage returns removed.
    static func text(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            if b == 0x1b, i + 1 < bytes.count {
                if bytes[i + 1] == 0x5b {  // CSI: ESC [ params final(0x40-0x7e)
                    i += 2
                    while i < bytes.count && !(0x40...0x7e).contains(bytes[i]) { i += 1 }
                    i += 1
                    continue
                }
                if bytes[i + 1] == 0x5d {  // OSC: ESC ] ... BEL or ESC \
                    i += 2
                    while i < bytes.count && bytes[i] != 0x07
                        && !(bytes[i] == 0x1b && i + 1 < bytes.count && bytes[i + 1] == 0x5c)
                    { i += 1 }
                    i += bytes.count > i && bytes[i] == 0x07 ? 1 : 2
                    continue
                }
                i += 2
                continue
            }
            if b != 0x0d { out.append(b) }
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}
