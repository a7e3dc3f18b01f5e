import Glibc
import GuestAgentProtocol

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Services through systemd when it is the guest's init: the spec becomes a unit file in
/// /etc/systemd/system (marked as the agent's), and systemctl and journalctl do the rest, so
/// the services behave as the image's own units do (journal, dependencies, `systemctl status`).
/// Images without systemd get the built-in `Supervisor` with the same request shapes.
enum Systemd {
    static let unitDirectory = "/etc/systemd/system"
    static let marker = "# Created by furcate-agent (serviceCreate); replaced or deleted through the agent."

    /// systemd is PID 1 (true from its first instant, before its bus is up).
    static var isInit: Bool {
        if getenv("FURCATE_AGENT_NO_SYSTEMD") != nil { return false }
        return readLink("/proc/1/exe")?.hasSuffix("/systemd") ?? false
    }

    static func unitPath(_ name: String) -> String { "\(unitDirectory)/\(name).service" }

    static func create(_ spec: ServiceSpec, start: Bool) throws -> ServiceStatus {
        try Supervisor.validate(spec)
        try waitForManager()
        try writeAll(unitPath(spec.name), Array(unitFile(spec).utf8))
        try systemctl(["daemon-reload"])
        if spec.enable ?? true { try systemctl(["enable", "--quiet", spec.name + ".service"]) }
        if start {
            // A oneshot's start returns when it finished; a failure is in its status.
            _ = try? systemctl(["start", spec.name + ".service"], timeoutMs: (spec.timeoutSec ?? 600) * 1000 + 10_000)
            let st = try status(spec.name)
            if spec.mode == "oneshot", spec.deleteAfterSuccess == true, st.lastExitCode == 0, st.activeState != "failed"
            {
                try delete(spec.name)
            }
            return st
        }
        return try status(spec.name)
    }

    static func control(_ name: String, _ action: String) throws -> AgentResponse {
        try waitForManager()
        guard owned(name) else { throw AgentError(code: "not_found", message: "no service \(name)") }
        switch action {
        case "start", "stop", "restart":
            _ = try? systemctl([action, name + ".service"], timeoutMs: 610_000)
            return .service(try status(name))
        case "delete":
            try delete(name)
            return .ok
        default:
            throw AgentError(
                code: "invalid_argument",
                message: "service action must be start, stop, restart or delete, not '\(action)'")
        }
    }

    static func status(_ name: String) throws -> ServiceStatus {
        try waitForManager()
        guard owned(name) else { throw AgentError(code: "not_found", message: "no service \(name)") }
        let out = try systemctl([
            "show", name + ".service", "-p",
            "ActiveState,SubState,LoadState,Description,MainPID,NRestarts,ExecMainStatus,ExecMainCode",
        ])
        var p: [String: String] = [:]
        for line in out.split(separator: "\n") {
            if let eq = line.firstIndex(of: "=") { p[String(line[..<eq])] = String(line[line.index(after: eq)...]) }
        }
        let code = Int32(p["ExecMainCode"] ?? "") ?? 0  // 1 exited, 2 killed, 3 dumped
        let mainStatus = Int32(p["ExecMainStatus"] ?? "")
        let pid = Int32(p["MainPID"] ?? "") ?? 0
        return ServiceStatus(
            name: name, activeState: p["ActiveState"] ?? "unknown", subState: p["SubState"] ?? "unknown",
            loadState: p["LoadState"] ?? "unknown", description: p["Description"] ?? name, mainPID: pid > 0 ? pid : nil,
            restarts: Int(p["NRestarts"] ?? "") ?? 0, lastExitCode: code == 1 ? mainStatus : nil,
            lastSignal: code == 2 || code == 3 ? mainStatus : nil)
    }

    static func list() -> [ServiceStatus] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: unitDirectory)) ?? [])
            .filter { $0.hasSuffix(".service") }.map { String($0.dropLast(8)) }.filter(owned)
        return names.sorted().compactMap { try? status($0) }
    }

    /// The unit's journal as `journalctl -o json` gives it: each entry's time
    /// (`__REALTIME_TIMESTAMP`, microseconds) and `MESSAGE` (a string, or bytes when binary).
    static func logs(_ name: String, lines: Int, since: Double?) throws -> [LogEntry] {
        guard owned(name) else { throw AgentError(code: "not_found", message: "no service \(name)") }
        var argv = [
            "journalctl", "-u", name + ".service", "-n", "\(max(0, min(lines, 10_000)))", "--no-pager", "-o", "json",
            "--output-fields=MESSAGE",
        ]
        if let since { argv += ["--since", "@\(Int64(since.rounded(.down)))"] }
        let r = try runProgram(ExecRequest(argv: argv, timeoutMs: 30_000, maxOutputBytes: 16 << 20))
        struct Entry: Decodable {
            var time: String
            var text: String?
            var bytes: [UInt8]?
            enum K: String, CodingKey { case time = "__REALTIME_TIMESTAMP", message = "MESSAGE" }
            init(from d: any Decoder) throws {
                let c = try d.container(keyedBy: K.self)
                time = try c.decode(String.self, forKey: .time)
                text = try? c.decode(String.self, forKey: .message)
                bytes = text == nil ? try? c.decode([UInt8].self, forKey: .message) : nil
            }
        }
        return r.stdout.split(separator: 0x0A).compactMap { line -> LogEntry? in
            guard let e = try? JSONDecoder().decode(Entry.self, from: Data(line)), let micros = Double(e.time) else {
                return nil
            }
            let entry = LogEntry(time: micros / 1e6, text: e.text ?? String(decoding: e.bytes ?? [], as: UTF8.self))
            return since.map { entry.time >= $0 } ?? true ? entry : nil
        }
    }

    private static func delete(_ name: String) throws {
        _ = try? systemctl(["disable", "--now", "--quiet", name + ".service"], timeoutMs: 610_000)
        unlink(unitPath(name))
        _ = try? systemctl(["daemon-reload"])
        _ = try? systemctl(["reset-failed", name + ".service"])
    }

    /// The unit file exists and is the agent's (never touch the image's own units).
    private static func owned(_ name: String) -> Bool {
        guard let bytes = try? readAll(unitPath(name)) else { return false }
        return String(decoding: bytes.prefix(200), as: UTF8.self).hasPrefix(marker)
    }

    /// systemctl talks to the manager over /run/systemd/private, which appears some time after
    /// systemd starts (the agent answers before): wait for it, up to 60 s.
    private static func waitForManager() throws {
        for _ in 0..<600 {
            var st = stat()
            if stat("/run/systemd/private", &st) == 0 { return }
            usleep(100_000)
        }
        throw AgentError(
            code: "busy", message: "systemd has not started its manager yet (/run/systemd/private missing after 60 s)")
    }

    @discardableResult
    private static func systemctl(_ args: [String], timeoutMs: Int = 60_000) throws -> String {
        let r = try runProgram(ExecRequest(argv: ["systemctl"] + args, timeoutMs: timeoutMs))
        guard r.exitCode == 0 else {
            let err = String(decoding: r.stderr.isEmpty ? r.stdout : r.stderr, as: UTF8.self)
            throw AgentError(code: "io", message: "systemctl \(args.joined(separator: " ")) failed: \(err.prefix(500))")
        }
        return String(decoding: r.stdout, as: UTF8.self)
    }

    /// A value for a double-quoted unit file word: C escapes, and `%`/`$` not expanded.
    static func quote(_ s: String) -> String {
        var out = "\""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "%": out += "%%"
            case "$": out += "$$"
            default: out.append(c)
            }
        }
        return out + "\""
    }

    static func unitFile(_ s: ServiceSpec) -> String {
        func units(_ names: [String]?) -> String {
            (names ?? []).map { $0.contains(".") ? $0 : $0 + ".service" }.joined(separator: " ")
        }
        var u = [marker, "[Unit]", "Description=\(s.name) (furcate)"]
        if let a = s.after, !a.isEmpty { u.append("After=\(units(a))") }
        if let r = s.requires, !r.isEmpty { u += ["Requires=\(units(r))", "After=\(units(r))"] }
        if let rp = s.restartPolicy {
            if let b = rp.startLimitBurst { u.append("StartLimitBurst=\(b)") }
            if let i = rp.startLimitIntervalSec { u.append("StartLimitIntervalSec=\(i)") }
        }
        u += ["", "[Service]"]
        let execs = s.exec.map { "/bin/sh -c " + quote($0) }
        if s.mode == "oneshot" {
            u.append("Type=oneshot")
            u += execs.map { "ExecStart=" + $0 }
            if s.remainAfterExit == true { u.append("RemainAfterExit=yes") }
        } else {
            u.append("Type=simple")
            u += execs.dropLast().map { "ExecStartPre=" + $0 }
            u += execs.suffix(1).map { "ExecStart=" + $0 }
        }
        for (k, v) in (s.env ?? [:]).sorted(by: { $0.key < $1.key }) { u.append("Environment=" + quote("\(k)=\(v)")) }
        u.append("EnvironmentFile=-/.furcate/env")
        if let user = s.user { u.append("User=\(user)") }
        if let group = s.group { u.append("Group=\(group)") }
        if let w = s.workdir { u.append("WorkingDirectory=" + quote(w)) }
        if let rp = s.restartPolicy {
            u.append("Restart=\(rp.policy)")
            if let sec = rp.restartSec { u.append("RestartSec=\(sec)") }
        }
        if let t = s.timeoutSec { u.append("TimeoutSec=\(t)") }
        u += ["", "[Install]", "WantedBy=multi-user.target", ""]
        return u.joined(separator: "\n")
    }
}
