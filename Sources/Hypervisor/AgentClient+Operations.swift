// Typed guest operations: each asks the agent one thing and checks that the answer is the kind
// that request has, in one place. A guest that answers with another kind is misbehaving (the
// guest is an attacker): that is `.hypervisor` naming the operation, never a crash or a
// mismatched value passed on.
import Foundation
import FurcateCore
import GuestAgentProtocol

extension AgentClient {
    /// `request`, then `extract` the answer's kind.
    /// - Throws: the guest's error as `FurcateError`; `.hypervisor` for an answer of another kind.
    func expect<T>(
        _ request: AgentRequest, timeout: Duration = .seconds(30), _ operation: String, _ extract: (AgentResponse) -> T?
    ) async throws -> T {
        let r = try await self.request(request, timeout: timeout)
        guard let value = extract(r) else {
            throw FurcateError(
                .hypervisor, "the guest agent answered \(operation) with something else", operation: operation)
        }
        return value
    }

    /// `request` for operations that answer `ok`.
    func expectOK(_ request: AgentRequest, timeout: Duration = .seconds(30), _ operation: String) async throws {
        try await expect(request, timeout: timeout, operation) { (r: AgentResponse) -> Void? in
            guard case .ok = r else { return nil }
            return ()
        }
    }

    // MARK: files

    /// - Throws: `.notFound` when nothing is at `path`.
    public func stat(_ path: String) async throws -> FileStat {
        try await expect(.stat(path: path), "stat") { if case .stat(let s) = $0 { s } else { nil } }
    }

    /// The entries of directory `path`.
    public func list(_ path: String) async throws -> [FileStat] {
        try await expect(.list(path: path), "list") { if case .entries(let e) = $0 { e } else { nil } }
    }

    /// Up to `length` bytes of `path` from `offset` (nil: the whole file) and the file's size.
    public func readFile(_ path: String, offset: UInt64? = nil, length: Int? = nil, timeout: Duration = .seconds(30))
        async throws -> (
            data: Data, fileSize: UInt64
        )
    {
        try await expect(.readFile(path: path, offset: offset, length: length), timeout: timeout, "readFile") {
            if case .data(let d, let size) = $0 { (d, size) } else { nil }
        }
    }

    /// Writes `data` at `offset` (nil: replaces the file), creating missing parents when asked.
    public func writeFile(
        _ path: String, _ data: Data, offset: UInt64? = nil, mode: UInt32? = nil, createParents: Bool = true,
        timeout: Duration = .seconds(30)
    ) async throws {
        try await expectOK(
            .writeFile(path: path, data: data, offset: offset, mode: mode, createParents: createParents),
            timeout: timeout, "writeFile")
    }

    /// Makes a directory in the guest (with its missing parents when `parents`).
    public func makeDirectory(_ path: String, parents: Bool = true) async throws {
        try await expectOK(.mkdir(path: path, parents: parents), "mkdir")
    }

    /// Flushes the guest's filesystems.
    public func sync(timeout: Duration = .seconds(120)) async throws {
        try await expectOK(.sync, timeout: timeout, "sync")
    }

    /// Sets `vars` in the environment every process the agent starts reads (`/.furcate/env`),
    /// replacing earlier values of the same names and keeping the rest.
    public func setEnvironment(_ vars: [String: String]) async throws {
        var lines: [String] = []
        do {
            lines = String(decoding: try await readFile(Self.environmentFile).data, as: UTF8.self).split(
                separator: "\n"
            ).map(String.init)
        } catch let e as FurcateError where e.code == .notFound {}
        lines.removeAll { l in vars.keys.contains { l.hasPrefix($0 + "=") } }
        lines += vars.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        try await writeFile(Self.environmentFile, Data((lines.joined(separator: "\n") + "\n").utf8), mode: 0o644)
    }

    /// The file whose `NAME=value` lines the agent adds to every process's environment.
    public static let environmentFile = "/.furcate/env"

    // MARK: system

    /// Adds a group to the guest; one of that name already there is left as it is.
    /// - Throws: `AgentError` `exists` when the gid asked for is taken.
    public func addGroup(_ group: GroupSpec) async throws { _ = try await request(.addGroup(group)) }

    /// Adds a user (and a primary group of its name) to the guest; one of that name already there
    /// is left as it is.
    /// - Throws: `AgentError` `exists` when the uid asked for is taken.
    public func addUser(_ user: UserSpec) async throws { _ = try await request(.addUser(user)) }

    /// Asks the guest to power off: the agent syncs and has the image's init power off, and
    /// powers off itself after `graceSeconds` when init does not.
    public func shutdown(graceSeconds: Int, timeout: Duration = .seconds(2)) async throws {
        _ = try await request(.shutdown(graceSeconds: graceSeconds), timeout: timeout)
    }

    // MARK: services

    /// Every service the guest's supervisor (or systemd) knows, with its state.
    public func services() async throws -> [ServiceStatus] {
        try await expect(.serviceList, "serviceList") { if case .services(let l) = $0 { l } else { nil } }
    }

    /// - Throws: `.notFound` for a service the agent does not manage.
    public func serviceStatus(_ name: String) async throws -> ServiceStatus {
        try await expect(.serviceStatus(name: name), "serviceStatus") {
            if case .service(let s) = $0 { s } else { nil }
        }
    }

    /// Creates a service and, with `start`, starts it, waiting up to `timeout`.
    public func createService(_ spec: ServiceSpec, start: Bool = true, timeout: Duration = .seconds(120)) async throws {
        _ = try await request(.serviceCreate(spec, start: start), timeout: timeout)
    }

    /// `start`, `stop`, `restart` or `delete`. - Throws: `.notFound` for an unknown service.
    public func controlService(_ name: String, _ action: String, timeout: Duration = .seconds(120)) async throws {
        _ = try await request(.serviceControl(name: name, action: action), timeout: timeout)
    }

    /// A service's last `lines` log lines (all when nil), those after `since` (Unix seconds) only.
    public func serviceLogs(_ name: String, lines: Int?, since: Double? = nil) async throws -> ServiceLogs {
        try await expect(.serviceLogs(name: name, lines: lines, since: since), "serviceLogs") {
            switch $0 {
            case .logs(let entries): .timed(entries)
            case .lines(let lines): .lines(lines)
            default: nil
            }
        }
    }

    // MARK: terminals

    /// The guest's terminals.
    public func terminals() async throws -> [TerminalInfo] {
        try await expect(.terminalList, "terminalList") { if case .terminals(let t) = $0 { t } else { nil } }
    }

    /// Opens a terminal of `cols`×`rows` running `command` (`/bin/sh` when nil).
    /// - Throws: `AgentError` `exists` when one of that name is open.
    public func createTerminal(_ name: String, command: [String]? = nil, cols: Int = 80, rows: Int = 24) async throws {
        _ = try await request(.terminalCreate(name: name, command: command, cols: cols, rows: rows))
    }

    /// Writes `data` to a terminal as if typed.
    public func terminalInput(_ name: String, _ data: Data) async throws {
        _ = try await request(.terminalInput(name: name, data: data))
    }

    /// Closes a terminal, ending what runs in it.
    public func closeTerminal(_ name: String) async throws { _ = try await request(.terminalClose(name: name)) }

    /// The terminal's raw output (escape sequences and all). - Throws: `.notFound`.
    public func terminalBytes(_ name: String) async throws -> Data {
        try await expect(.terminalOutput(name: name, raw: true, lines: nil), "terminalOutput") {
            if case .data(let d, _) = $0 { d } else { nil }
        }
    }

    /// The terminal's last `lines` lines of text. - Throws: `.notFound`.
    public func terminalLines(_ name: String, lines: Int? = nil) async throws -> [String] {
        try await expect(.terminalOutput(name: name, raw: false, lines: lines), "terminalOutput") {
            if case .lines(let l) = $0 { l } else { nil }
        }
    }

    /// A regular file's bytes, read in 4 MiB requests.
    /// - Throws: `.notFound`; `.invalidArgument` when it is larger than `apiFileLimit`.
    public func readWholeFile(_ path: String, size: UInt64) async throws -> Data {
        guard size <= Self.apiFileLimit else { throw FurcateError(.invalidArgument, "\(path) is larger than 64 MiB") }
        var data = Data()
        while UInt64(data.count) < size {
            let chunk = try await readFile(path, offset: UInt64(data.count), length: 4 << 20).data
            if chunk.isEmpty { break }  // the file shrank meanwhile
            data += chunk
        }
        return data
    }

    /// The largest file the API returns in one response.
    public static let apiFileLimit: UInt64 = 64 << 20
}
