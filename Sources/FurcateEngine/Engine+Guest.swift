import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor
import VMService

/// What a path in a guest holds, as the API hands it over.
public enum GuestFile: Sendable, Equatable {
    case file(Data)
    case directory([FileStat])
}

/// A command's output as a terminal showed it (stdout and stderr together) and its status.
public struct TerminalExecResult: Sendable, Equatable {
    /// What the terminal showed while the command ran.
    public var output: String
    /// The command's exit status.
    public var status: Int
}

/// Guest use cases on an account's VM: files, commands in a terminal.
extension Engine {
    /// The file at `path` (whole, up to the API's limit) or the directory's entries.
    /// - Throws: `.notFound` when nothing is there; `.tooLarge` past `AgentClient.apiFileLimit`.
    public func readFile(_ vm: VMInfo, _ path: String, wake: WakePolicy) async throws -> GuestFile {
        let agent = try await agentClient(vm, wake: wake)
        let st = try await agent.stat(path)
        if st.kind == .directory { return .directory(try await agent.list(path)) }
        guard st.size <= AgentClient.apiFileLimit else {
            throw FurcateError(.tooLarge, "\(path) is larger than \(AgentClient.apiFileLimit >> 20) MiB")
        }
        return .file(try await agent.readWholeFile(path, size: st.size))
    }

    /// Replaces the file at `path` (its parents made as needed).
    public func writeFile(_ vm: VMInfo, _ path: String, _ data: Data, wake: WakePolicy) async throws {
        try await agentClient(vm, wake: wake).writeFile(path, data, timeout: .seconds(300))
    }

    /// Runs `command` in the named terminal (made with `/bin/sh` when it does not exist), as
    /// if typed there: one line that prints a start marker, evals the command (base64, so any
    /// text is one line) and prints an end marker with its status. `command eval`: a syntax
    /// error or a special built-in's error then ends the command with a status, not the whole
    /// line (a plain `eval` dropped the end marker and the request waited out its timeout).
    /// The answer is what the terminal showed between the markers; the command's effects on
    /// the shell (cd, variables) stay for the next one.
    /// - Throws: `.timedOut` after sending Ctrl-C to the terminal.
    public func execInTerminal(_ vm: VMInfo, terminal name: String, _ command: String, timeoutMs: Int, wake: WakePolicy)
        async throws
        -> TerminalExecResult
    {
        let agent = try await agentClient(vm, wake: wake)
        let ts = try await agent.terminals()
        if !ts.contains(where: { $0.name == name && $0.status == "running" }) {
            if ts.contains(where: { $0.name == name }) { try await agent.closeTerminal(name) }
            try await agent.createTerminal(name, command: ["/bin/sh"], cols: 200, rows: 50)
        }
        let nonce = String(UInt64.random(in: 1...UInt64.max), radix: 36)
        let encoded = Data(command.utf8).base64EncodedString()
        let line =
            "printf '\\036S%s\\n' \(nonce); command eval \"$(printf %s '\(encoded)' | base64 -d)\"; printf '\\036E%s:%d\\n' \(nonce) \"$?\"\n"
        try await agent.terminalInput(name, Data(line.utf8))
        let deadline = ContinuousClock.now + .milliseconds(timeoutMs)
        while ContinuousClock.now < deadline {
            if let done = Self.terminalResult(try await agent.terminalBytes(name), nonce: nonce) { return done }
            try await Task.sleep(for: .milliseconds(50))
        }
        try? await agent.terminalInput(name, Data([0x03]))
        throw FurcateError(
            .timedOut, "the command did not finish within \(timeoutMs) ms in terminal \(name) (Ctrl-C was sent)")
    }

    /// The output between the markers of `nonce` and the status after the end marker, once the
    /// terminal has shown the whole status line; nil before.
    static func terminalResult(_ raw: Data, nonce: String) -> TerminalExecResult? {
        let bytes = [UInt8](raw)
        let start = Array("\u{1E}S\(nonce)".utf8)
        let end = Array("\u{1E}E\(nonce):".utf8)
        guard let e = bytes.lastRange(of: end) else { return nil }
        let statusDigits = bytes[e.upperBound...].prefix { (0x30...0x39).contains($0) }
        // The status line is not complete yet.
        guard statusDigits.count < bytes.count - e.upperBound else { return nil }
        var from = bytes.startIndex
        if let s = bytes[..<e.lowerBound].lastRange(of: start) {
            from = s.upperBound
            if bytes[from...].starts(with: [0x0D, 0x0A]) { from += 2 }
        }
        let out = String(decoding: bytes[from..<e.lowerBound], as: UTF8.self).replacingOccurrences(
            of: "\r\n", with: "\n")
        return TerminalExecResult(output: out, status: Int(String(decoding: statusDigits, as: UTF8.self)) ?? 0)
    }
}
