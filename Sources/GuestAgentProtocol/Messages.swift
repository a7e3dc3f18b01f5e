#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What the host asks the agent. Encoded as JSON with an `op` member naming the case.
public enum AgentRequest: Sendable, Equatable {
    /// Readiness and identity.
    case ping
    /// Runs a program and waits for it (see `ExecRequest`).
    case exec(ExecRequest)
    /// Reads up to `length` bytes at `offset` (default: the whole file, at most 4 MiB).
    case readFile(path: String, offset: UInt64?, length: Int?)
    /// Writes `data` at `offset` (default: replace the file), creating parents when asked.
    case writeFile(path: String, data: Data, offset: UInt64?, mode: UInt32?, createParents: Bool)
    case stat(path: String)
    case list(path: String)
    case mkdir(path: String, parents: Bool)
    case delete(path: String, recursive: Bool)
    /// Sets the guest's wall clock (after a restore it still shows the snapshot's time).
    case setTime(epochNanos: Int64)
    case setHostname(String)
    /// Mixes host entropy into the kernel's pool, credits it, and forces the CRNG to reseed
    /// (after a fork every fork's CRNG state is the same as its siblings').
    case reseed(entropy: Data)
    /// sync(2).
    case sync
    /// `exec` whose output arrives as `output` events while it runs; the final `exec` result
    /// then has empty stdout and stderr.
    case execStream(ExecRequest)
    /// File events under `path` (recursive: new directories are watched too) until cancelled.
    case watch(path: String, recursive: Bool)
    /// A `stats` event every `intervalMs` (100 ms to 10 s) until cancelled.
    case stats(intervalMs: Int)
    /// Ends the stream started by request `id` (its final response is `ok`).
    case cancel(id: UInt32)
    /// Defines a service (replacing one of the same name, which is stopped first) and, when
    /// `start`, starts it. Answered with its status.
    case serviceCreate(ServiceSpec, start: Bool)
    /// `start`, `stop`, `restart` or `delete` a service. Answered with its status (`delete`: ok).
    case serviceControl(name: String, action: String)
    case serviceStatus(name: String)
    case serviceList
    /// The last `lines` lines (default 200) of a service's output, stdout and stderr merged.
    /// The last `lines` log lines of a service, those at or after `since` (Unix seconds) only.
    case serviceLogs(name: String, lines: Int?, since: Double? = nil)
    /// A pty session running `command` (default: /bin/sh) with TERM=xterm-256color.
    case terminalCreate(name: String, command: [String]?, cols: Int, rows: Int)
    case terminalList
    /// Bytes typed into a session.
    case terminalInput(name: String, data: Data)
    case terminalResize(name: String, cols: Int, rows: Int)
    /// The session's output: `raw` the last bytes as the terminal received them (xterm escape
    /// sequences included), otherwise the last `lines` lines as text.
    case terminalOutput(name: String, raw: Bool, lines: Int?)
    /// Ends a session (SIGHUP, then SIGKILL) and forgets it.
    case terminalClose(name: String)
    /// Adds a group (Freestyle's `LinuxGroupSpec`) unless one of that name exists.
    case addGroup(GroupSpec)
    /// Adds a user (Freestyle's `LinuxUserSpec`) unless one of that name exists; its home is
    /// created and its supplementary groups get it as a member.
    case addUser(UserSpec)
    /// FIFREEZE (true) or FITHAW (false) on each mount point (default: every ext4, xfs and
    /// btrfs mount) — a disk-only snapshot is then consistent.
    case freeze(mountPoints: [String]?, frozen: Bool)
    /// sync, then asks init to power off (systemd: SIGRTMIN+4, busybox: SIGUSR2); after
    /// `graceSeconds` powers off itself.
    case shutdown(graceSeconds: Int)

    /// True for requests answered by events before their response.
    public var isStream: Bool {
        switch self {
        case .execStream, .watch, .stats: return true
        default: return false
        }
    }
}

/// A service, with the fields of Freestyle's `SystemdUnitSpec` that a supervisor can honour.
/// `exec` lines run one after another through `/bin/sh -c`; in `service` mode the last one is
/// the long-running main process.
public struct ServiceSpec: Codable, Sendable, Hashable {
    /// The unit's name: 1-64 of a-z 0-9 - _ . (see `problem`).
    public var name: String
    /// "oneshot" or "service".
    public var mode: String
    /// Command lines run in order through `/bin/sh -c`; in `service` mode the last is the main process.
    public var exec: [String]
    /// Variables added to the agent's environment for these commands.
    public var env: [String: String]?
    /// The user the commands run as (name or uid in the guest); nil: root.
    public var user: String?
    /// The group they run as; nil: the user's primary group.
    public var group: String?
    /// The working directory of the commands.
    public var workdir: String?
    /// Ordering only: when started together, these start first.
    public var after: [String]?
    /// Started first; if one fails to start, this one fails; if one stops, this one is stopped.
    public var requires: [String]?
    /// Whether and how a `service` is restarted when its main process ends.
    public var restartPolicy: RestartPolicy?
    /// How long a oneshot may run, and how long a stop waits before SIGKILL.
    public var timeoutSec: Int?
    /// Oneshot: removed once it succeeded.
    public var deleteAfterSuccess: Bool?
    /// Oneshot: stays "active (exited)" after success (default true).
    public var remainAfterExit: Bool?
    /// Started whenever the agent starts (default true).
    public var enable: Bool?

    /// A unit with every field given; nil fields take the defaults documented on each.
    public init(
        name: String, mode: String, exec: [String], env: [String: String]? = nil, user: String? = nil,
        group: String? = nil, workdir: String? = nil, after: [String]? = nil, requires: [String]? = nil,
        restartPolicy: RestartPolicy? = nil, timeoutSec: Int? = nil, deleteAfterSuccess: Bool? = nil,
        remainAfterExit: Bool? = nil, enable: Bool? = nil
    ) {
        self.name = name
        self.mode = mode
        self.exec = exec
        self.env = env
        self.user = user
        self.group = group
        self.workdir = workdir
        self.after = after
        self.requires = requires
        self.restartPolicy = restartPolicy
        self.timeoutSec = timeoutSec
        self.deleteAfterSuccess = deleteAfterSuccess
        self.remainAfterExit = remainAfterExit
        self.enable = enable
    }
}

/// A group the agent adds to the guest's /etc/group, as a build or the API asks.
public struct GroupSpec: Codable, Sendable, Hashable {
    /// The group's name.
    public var name: String
    /// Its gid; nil: the lowest free one of its range.
    public var gid: UInt32?
    /// A system group (gid from 100-999 rather than 1000-59999); nil: false.
    public var system: Bool?

    /// A group with the given fields; nil ones take the defaults documented on each.
    public init(name: String, gid: UInt32? = nil, system: Bool? = nil) {
        self.name = name
        self.gid = gid
        self.system = system
    }
}

/// A user the agent adds to the guest's /etc/passwd (with a primary group of its name), as a
/// build or the API asks.
public struct UserSpec: Codable, Sendable, Hashable {
    /// The login name.
    public var name: String
    /// Its uid; nil: the lowest free one of its range.
    public var uid: UInt32?
    /// The comment field of /etc/passwd (a full name).
    public var gecos: String?
    /// Supplementary groups, which must exist.
    public var groups: [String]?
    /// The home directory; nil: /home/NAME (created), or `/` for a system user.
    public var home: String?
    /// The login shell; nil: /bin/bash where it exists, else /bin/sh (/usr/sbin/nologin for a system
    /// user).
    public var shell: String?
    /// A system user (uid from 100-999, no home directory made); nil: false.
    public var system: Bool?

    /// A user with the given fields; nil ones take the defaults documented on each.
    public init(
        name: String, uid: UInt32? = nil, gecos: String? = nil, groups: [String]? = nil, home: String? = nil,
        shell: String? = nil, system: Bool? = nil
    ) {
        self.name = name
        self.uid = uid
        self.gecos = gecos
        self.groups = groups
        self.home = home
        self.shell = shell
        self.system = system
    }
}

/// Freestyle's `TerminalSession`, plus the pid.
public struct TerminalInfo: Codable, Sendable, Equatable {
    /// The terminal's name, unique in the guest.
    public var name: String
    /// running or exited
    public var status: String
    /// Seconds since 1970.
    public var created: Int64
    /// The pid of the program it runs, while it runs.
    public var pid: Int32?

    /// A terminal as the agent reports it.
    public init(name: String, status: String, created: Int64, pid: Int32?) {
        self.name = name
        self.status = status
        self.created = created
        self.pid = pid
    }
}

extension ServiceSpec {
    /// The modes a unit may have.
    public static let modes = ["oneshot", "service"]
    /// The restart policies a unit may have (systemd's `Restart=` values the supervisor honours).
    public static let restartPolicies = ["no", "on-failure", "always", "on-abnormal"]

    /// What makes this unit unacceptable wherever it is given — the API, a build recipe, the
    /// agent — or nil. (The agent also checks what only the guest knows: users, paths.)
    public var problem: String? {
        let nameOK =
            !name.isEmpty && name.utf8.count <= 64 && !name.hasPrefix(".")
            && name.utf8.allSatisfy {
                ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d || $0 == 0x5f || $0 == 0x2e
            }
        guard nameOK else { return "service name must be 1-64 of a-z 0-9 - _ . : '\(name.prefix(80))'" }
        guard Self.modes.contains(mode) else {
            return "service mode must be oneshot or service, not '\(mode.prefix(40))'"
        }
        guard !exec.isEmpty else { return "service \(name) has no exec lines" }
        if let p = restartPolicy?.policy, !Self.restartPolicies.contains(p) {
            return "restart policy must be no, on-failure, always or on-abnormal, not '\(p.prefix(40))'"
        }
        let counts: [(String, Int?)] = [
            ("timeoutSec", timeoutSec), ("restartPolicy.restartSec", restartPolicy?.restartSec),
            ("restartPolicy.startLimitBurst", restartPolicy?.startLimitBurst),
            ("restartPolicy.startLimitIntervalSec", restartPolicy?.startLimitIntervalSec),
        ]
        for (field, v) in counts where (v ?? 0) < 0 { return "service \(name): \(field) must not be negative" }
        return nil
    }
}

/// Freestyle's `SystemdRestartPolicy`: "no", "on-failure", "always", "on-abnormal".
public struct RestartPolicy: Codable, Sendable, Hashable {
    /// "no", "on-failure", "always" or "on-abnormal".
    public var policy: String
    /// Seconds to wait before a restart (at most 3600); nil: 0.
    public var restartSec: Int?
    /// Restarts allowed within `startLimitIntervalSec` before the unit fails; nil: 5.
    public var startLimitBurst: Int?
    /// The window for `startLimitBurst`, in seconds; nil: 10.
    public var startLimitIntervalSec: Int?

    /// A policy with the given fields; nil ones take the defaults documented on each.
    public init(policy: String, restartSec: Int? = nil, startLimitBurst: Int? = nil, startLimitIntervalSec: Int? = nil)
    {
        self.policy = policy
        self.restartSec = restartSec
        self.startLimitBurst = startLimitBurst
        self.startLimitIntervalSec = startLimitIntervalSec
    }
}

/// Freestyle's `SystemdServiceStatus`, plus what the supervisor knows.
public struct ServiceStatus: Codable, Sendable, Equatable {
    /// The unit's name.
    public var name: String
    /// active, activating, inactive, failed
    public var activeState: String
    /// running, exited, dead, failed, auto-restart, start
    public var subState: String
    /// "loaded", or "not-found" for a unit that does not exist.
    public var loadState: String
    /// What the unit is, in a few words.
    public var description: String
    /// The main process while it runs.
    public var mainPID: Int32?
    /// How many times it was restarted since the agent started it.
    public var restarts: Int
    /// The main process's exit code the last time it ended with one.
    public var lastExitCode: Int32?
    /// The signal that ended the main process last, if one did.
    public var lastSignal: Int32?

    /// A status with every field given.
    public init(
        name: String, activeState: String, subState: String, loadState: String, description: String,
        mainPID: Int32?, restarts: Int, lastExitCode: Int32?, lastSignal: Int32?
    ) {
        self.name = name
        self.activeState = activeState
        self.subState = subState
        self.loadState = loadState
        self.description = description
        self.mainPID = mainPID
        self.restarts = restarts
        self.lastExitCode = lastExitCode
        self.lastSignal = lastSignal
    }
}

/// One item of a stream.
public enum AgentEvent: Codable, Sendable, Equatable {
    /// A chunk of a running program's stdout (`fd` 1) or stderr (2).
    case output(fd: Int, data: Data)
    /// Something happened to `path`: create, modify, delete, move_from, move_to.
    case file(path: String, change: String, isDirectory: Bool)
    case stats(StatsSample)
}

/// Memory and CPU of the guest, from /proc.
public struct StatsSample: Codable, Sendable, Equatable {
    /// The guest's memory (MemTotal).
    public var memoryTotalBytes: UInt64
    /// Memory the guest could use without swapping (MemAvailable).
    public var memoryAvailableBytes: UInt64
    /// Busy share of all CPUs since the previous sample, 0...1 (0 in the first).
    public var cpuBusy: Double
    /// Online CPUs in the guest.
    public var cpus: Int
    /// The one-minute load average.
    public var load1: Double
    /// Seconds since the guest booted.
    public var uptimeSeconds: Double

    /// A sample with every field given.
    public init(
        memoryTotalBytes: UInt64, memoryAvailableBytes: UInt64, cpuBusy: Double, cpus: Int, load1: Double,
        uptimeSeconds: Double
    ) {
        self.memoryTotalBytes = memoryTotalBytes
        self.memoryAvailableBytes = memoryAvailableBytes
        self.cpuBusy = cpuBusy
        self.cpus = cpus
        self.load1 = load1
        self.uptimeSeconds = uptimeSeconds
    }
}

/// A program to run: `argv`, or a `command` for `/bin/sh -c`.
public struct ExecRequest: Codable, Sendable, Equatable {
    /// The program and its arguments, run without a shell.
    public var argv: [String]?
    /// A command line for `/bin/sh -c` (when `argv` is nil).
    public var command: String?
    /// Added to (and overriding) the agent's environment.
    public var env: [String: String]?
    /// The working directory; nil: the image's working directory, else `/`.
    public var cwd: String?
    /// Bytes written to the program's stdin, which is then closed; nil: none.
    public var stdin: Data?
    /// Killed (SIGKILL, whole process group) after this long; nil: no limit.
    public var timeoutMs: Int?
    /// Each of stdout and stderr is kept up to this many bytes (default 1 MiB, at most 8 MiB);
    /// the rest is read and dropped, and `truncated` says so.
    public var maxOutputBytes: Int?
    /// Run as this user (name or uid from the guest's /etc/passwd, with its primary group);
    /// nil: root. (Added in agent protocol 1 without a version bump: older agents ignore it.)
    public var user: String?

    /// A request with the given fields; nil ones take the defaults documented on each.
    public init(
        argv: [String]? = nil, command: String? = nil, env: [String: String]? = nil, cwd: String? = nil,
        stdin: Data? = nil, timeoutMs: Int? = nil, maxOutputBytes: Int? = nil, user: String? = nil
    ) {
        self.user = user
        self.argv = argv
        self.command = command
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.timeoutMs = timeoutMs
        self.maxOutputBytes = maxOutputBytes
    }
}

/// How a program run by `exec` ended and what it wrote.
public struct ExecResult: Codable, Sendable, Equatable {
    /// The exit code, or nil when a signal ended it.
    public var exitCode: Int32?
    /// The signal that ended it, or nil when it exited.
    public var signal: Int32?
    /// What it wrote to stdout, up to the request's `maxOutputBytes`.
    public var stdout: Data
    /// What it wrote to stderr, up to the request's `maxOutputBytes`.
    public var stderr: Data
    /// Whether stdout or stderr was cut at `maxOutputBytes`.
    public var truncated: Bool
    /// Whether it was killed at the request's `timeoutMs`.
    public var timedOut: Bool
    /// Wall time from start to exit.
    public var durationMs: Int

    /// A result with every field given.
    public init(
        exitCode: Int32?, signal: Int32?, stdout: Data, stderr: Data, truncated: Bool, timedOut: Bool, durationMs: Int
    ) {
        self.exitCode = exitCode
        self.signal = signal
        self.stdout = stdout
        self.stderr = stderr
        self.truncated = truncated
        self.timedOut = timedOut
        self.durationMs = durationMs
    }
}

/// A file's kind, as the Freestyle document names them.
public enum FileKind: String, Codable, Sendable {
    case file, directory, symlink, other
}

/// A directory entry or a path's metadata (`lstat`: a link is not followed).
public struct FileStat: Codable, Sendable, Equatable {
    /// The entry's name (its last path component).
    public var name: String
    /// File, directory, symlink or other.
    public var kind: FileKind
    /// Size in bytes.
    public var size: UInt64
    /// Permission bits and file type, as `st_mode`.
    public var mode: UInt32
    /// Last modification, Unix seconds.
    public var modifiedEpochSeconds: Int64

    /// An entry with every field given.
    public init(name: String, kind: FileKind, size: UInt64, mode: UInt32, modifiedEpochSeconds: Int64) {
        self.name = name
        self.kind = kind
        self.size = size
        self.mode = mode
        self.modifiedEpochSeconds = modifiedEpochSeconds
    }
}

/// A log line and when it was written (Unix seconds).
public struct LogEntry: Codable, Sendable, Equatable {
    /// Unix seconds.
    public var time: Double
    /// The line, without its newline.
    public var text: String

    /// An entry with both fields given.
    public init(time: Double, text: String) {
        self.time = time
        self.text = text
    }
}

/// What the agent answers.
public enum AgentResponse: Sendable, Equatable {
    case pong(agentVersion: String, hostname: String, uptimeSeconds: Double)
    case exec(ExecResult)
    case data(Data, fileSize: UInt64)
    case stat(FileStat)
    case entries([FileStat])
    case service(ServiceStatus)
    case services([ServiceStatus])
    case lines([String])
    /// Log lines with their times (service logs).
    case logs([LogEntry])
    case terminal(TerminalInfo)
    case terminals([TerminalInfo])
    /// Success with nothing to say.
    case ok
    case error(AgentError)
}

/// A failed request: a stable code (`not_found`, `permission_denied`, `invalid_argument`,
/// `exists`, `io`, `busy`, `unsupported`) and a message naming the path or operation.
public struct AgentError: Error, Codable, Sendable, Equatable, CustomStringConvertible {
    /// A stable code: not_found, permission_denied, invalid_argument, exists, io, busy, unsupported.
    public var code: String
    /// What failed, naming the path or operation.
    public var message: String

    /// An error with both fields given.
    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code): \(message)" }
}

// MARK: - JSON shape: {"op": "...", ...members}

extension AgentRequest: Codable {
    private enum K: String, CodingKey {
        case op, exec, path, offset, length, data, mode, createParents, parents, recursive, epochNanos, name, entropy
        case intervalMs, id, spec, start, action, lines, command, cols, rows, raw, group, user, mountPoints, frozen,
            graceSeconds, since
    }

    /// Decodes the wire form `{"op": NAME, ...members}`.
    /// - Throws: `DecodingError` for an unknown op or a missing member.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: K.self)
        switch try c.decode(String.self, forKey: .op) {
        case "ping": self = .ping
        case "exec": self = .exec(try c.decode(ExecRequest.self, forKey: .exec))
        case "readFile":
            self = .readFile(
                path: try c.decode(String.self, forKey: .path),
                offset: try c.decodeIfPresent(UInt64.self, forKey: .offset),
                length: try c.decodeIfPresent(Int.self, forKey: .length))
        case "writeFile":
            self = .writeFile(
                path: try c.decode(String.self, forKey: .path), data: try c.decode(Data.self, forKey: .data),
                offset: try c.decodeIfPresent(UInt64.self, forKey: .offset),
                mode: try c.decodeIfPresent(UInt32.self, forKey: .mode),
                createParents: try c.decodeIfPresent(Bool.self, forKey: .createParents) ?? false)
        case "stat": self = .stat(path: try c.decode(String.self, forKey: .path))
        case "list": self = .list(path: try c.decode(String.self, forKey: .path))
        case "mkdir":
            self = .mkdir(
                path: try c.decode(String.self, forKey: .path),
                parents: try c.decodeIfPresent(Bool.self, forKey: .parents) ?? false)
        case "delete":
            self = .delete(
                path: try c.decode(String.self, forKey: .path),
                recursive: try c.decodeIfPresent(Bool.self, forKey: .recursive) ?? false)
        case "setTime": self = .setTime(epochNanos: try c.decode(Int64.self, forKey: .epochNanos))
        case "setHostname": self = .setHostname(try c.decode(String.self, forKey: .name))
        case "reseed": self = .reseed(entropy: try c.decode(Data.self, forKey: .entropy))
        case "sync": self = .sync
        case "execStream": self = .execStream(try c.decode(ExecRequest.self, forKey: .exec))
        case "watch":
            self = .watch(
                path: try c.decode(String.self, forKey: .path),
                recursive: try c.decodeIfPresent(Bool.self, forKey: .recursive) ?? true)
        case "stats": self = .stats(intervalMs: try c.decode(Int.self, forKey: .intervalMs))
        case "cancel": self = .cancel(id: try c.decode(UInt32.self, forKey: .id))
        case "serviceCreate":
            self = .serviceCreate(
                try c.decode(ServiceSpec.self, forKey: .spec),
                start: try c.decodeIfPresent(Bool.self, forKey: .start) ?? true)
        case "serviceControl":
            self = .serviceControl(
                name: try c.decode(String.self, forKey: .name), action: try c.decode(String.self, forKey: .action))
        case "serviceStatus": self = .serviceStatus(name: try c.decode(String.self, forKey: .name))
        case "serviceList": self = .serviceList
        case "serviceLogs":
            self = .serviceLogs(
                name: try c.decode(String.self, forKey: .name), lines: try c.decodeIfPresent(Int.self, forKey: .lines),
                since: try c.decodeIfPresent(Double.self, forKey: .since))
        case "terminalCreate":
            self = .terminalCreate(
                name: try c.decode(String.self, forKey: .name),
                command: try c.decodeIfPresent([String].self, forKey: .command),
                cols: try c.decodeIfPresent(Int.self, forKey: .cols) ?? 80,
                rows: try c.decodeIfPresent(Int.self, forKey: .rows) ?? 24)
        case "terminalList": self = .terminalList
        case "terminalInput":
            self = .terminalInput(
                name: try c.decode(String.self, forKey: .name), data: try c.decode(Data.self, forKey: .data))
        case "terminalResize":
            self = .terminalResize(
                name: try c.decode(String.self, forKey: .name), cols: try c.decode(Int.self, forKey: .cols),
                rows: try c.decode(Int.self, forKey: .rows))
        case "terminalOutput":
            self = .terminalOutput(
                name: try c.decode(String.self, forKey: .name),
                raw: try c.decodeIfPresent(Bool.self, forKey: .raw) ?? false,
                lines: try c.decodeIfPresent(Int.self, forKey: .lines))
        case "terminalClose": self = .terminalClose(name: try c.decode(String.self, forKey: .name))
        case "addGroup": self = .addGroup(try c.decode(GroupSpec.self, forKey: .group))
        case "addUser": self = .addUser(try c.decode(UserSpec.self, forKey: .user))
        case "freeze":
            self = .freeze(
                mountPoints: try c.decodeIfPresent([String].self, forKey: .mountPoints),
                frozen: try c.decode(Bool.self, forKey: .frozen))
        case "shutdown": self = .shutdown(graceSeconds: try c.decodeIfPresent(Int.self, forKey: .graceSeconds) ?? 10)
        case let op:
            throw DecodingError.dataCorruptedError(forKey: .op, in: c, debugDescription: "unknown operation '\(op)'")
        }
    }

    /// Encodes the wire form `{"op": NAME, ...members}`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: K.self)
        switch self {
        case .ping: try c.encode("ping", forKey: .op)
        case .exec(let e):
            try c.encode("exec", forKey: .op)
            try c.encode(e, forKey: .exec)
        case .readFile(let path, let offset, let length):
            try c.encode("readFile", forKey: .op)
            try c.encode(path, forKey: .path)
            try c.encodeIfPresent(offset, forKey: .offset)
            try c.encodeIfPresent(length, forKey: .length)
        case .writeFile(let path, let data, let offset, let mode, let createParents):
            try c.encode("writeFile", forKey: .op)
            try c.encode(path, forKey: .path)
            try c.encode(data, forKey: .data)
            try c.encodeIfPresent(offset, forKey: .offset)
            try c.encodeIfPresent(mode, forKey: .mode)
            try c.encode(createParents, forKey: .createParents)
        case .stat(let path):
            try c.encode("stat", forKey: .op)
            try c.encode(path, forKey: .path)
        case .list(let path):
            try c.encode("list", forKey: .op)
            try c.encode(path, forKey: .path)
        case .mkdir(let path, let parents):
            try c.encode("mkdir", forKey: .op)
            try c.encode(path, forKey: .path)
            try c.encode(parents, forKey: .parents)
        case .delete(let path, let recursive):
            try c.encode("delete", forKey: .op)
            try c.encode(path, forKey: .path)
            try c.encode(recursive, forKey: .recursive)
        case .setTime(let ns):
            try c.encode("setTime", forKey: .op)
            try c.encode(ns, forKey: .epochNanos)
        case .setHostname(let name):
            try c.encode("setHostname", forKey: .op)
            try c.encode(name, forKey: .name)
        case .reseed(let entropy):
            try c.encode("reseed", forKey: .op)
            try c.encode(entropy, forKey: .entropy)
        case .sync: try c.encode("sync", forKey: .op)
        case .execStream(let e):
            try c.encode("execStream", forKey: .op)
            try c.encode(e, forKey: .exec)
        case .watch(let path, let recursive):
            try c.encode("watch", forKey: .op)
            try c.encode(path, forKey: .path)
            try c.encode(recursive, forKey: .recursive)
        case .stats(let ms):
            try c.encode("stats", forKey: .op)
            try c.encode(ms, forKey: .intervalMs)
        case .cancel(let id):
            try c.encode("cancel", forKey: .op)
            try c.encode(id, forKey: .id)
        case .serviceCreate(let spec, let start):
            try c.encode("serviceCreate", forKey: .op)
            try c.encode(spec, forKey: .spec)
            try c.encode(start, forKey: .start)
        case .serviceControl(let name, let action):
            try c.encode("serviceControl", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encode(action, forKey: .action)
        case .serviceStatus(let name):
            try c.encode("serviceStatus", forKey: .op)
            try c.encode(name, forKey: .name)
        case .serviceList: try c.encode("serviceList", forKey: .op)
        case .serviceLogs(let name, let lines, let since):
            try c.encode("serviceLogs", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encodeIfPresent(lines, forKey: .lines)
            try c.encodeIfPresent(since, forKey: .since)
        case .terminalCreate(let name, let command, let cols, let rows):
            try c.encode("terminalCreate", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encodeIfPresent(command, forKey: .command)
            try c.encode(cols, forKey: .cols)
            try c.encode(rows, forKey: .rows)
        case .terminalList: try c.encode("terminalList", forKey: .op)
        case .terminalInput(let name, let data):
            try c.encode("terminalInput", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encode(data, forKey: .data)
        case .terminalResize(let name, let cols, let rows):
            try c.encode("terminalResize", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encode(cols, forKey: .cols)
            try c.encode(rows, forKey: .rows)
        case .terminalOutput(let name, let raw, let lines):
            try c.encode("terminalOutput", forKey: .op)
            try c.encode(name, forKey: .name)
            try c.encode(raw, forKey: .raw)
            try c.encodeIfPresent(lines, forKey: .lines)
        case .terminalClose(let name):
            try c.encode("terminalClose", forKey: .op)
            try c.encode(name, forKey: .name)
        case .addGroup(let g):
            try c.encode("addGroup", forKey: .op)
            try c.encode(g, forKey: .group)
        case .addUser(let u):
            try c.encode("addUser", forKey: .op)
            try c.encode(u, forKey: .user)
        case .freeze(let mps, let frozen):
            try c.encode("freeze", forKey: .op)
            try c.encodeIfPresent(mps, forKey: .mountPoints)
            try c.encode(frozen, forKey: .frozen)
        case .shutdown(let grace):
            try c.encode("shutdown", forKey: .op)
            try c.encode(grace, forKey: .graceSeconds)
        }
    }
}

extension AgentResponse: Codable {
    private enum K: String, CodingKey {
        case kind, agentVersion, hostname, uptimeSeconds, exec, data, fileSize, stat, entries, error, service, services,
            lines, logs, terminal, terminals
    }

    /// Decodes the wire form `{"kind": NAME, ...members}`.
    /// - Throws: `DecodingError` for an unknown kind or a missing member.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: K.self)
        switch try c.decode(String.self, forKey: .kind) {
        case "pong":
            self = .pong(
                agentVersion: try c.decode(String.self, forKey: .agentVersion),
                hostname: try c.decode(String.self, forKey: .hostname),
                uptimeSeconds: try c.decode(Double.self, forKey: .uptimeSeconds))
        case "exec": self = .exec(try c.decode(ExecResult.self, forKey: .exec))
        case "data":
            self = .data(try c.decode(Data.self, forKey: .data), fileSize: try c.decode(UInt64.self, forKey: .fileSize))
        case "stat": self = .stat(try c.decode(FileStat.self, forKey: .stat))
        case "entries": self = .entries(try c.decode([FileStat].self, forKey: .entries))
        case "ok": self = .ok
        case "error": self = .error(try c.decode(AgentError.self, forKey: .error))
        case "service": self = .service(try c.decode(ServiceStatus.self, forKey: .service))
        case "services": self = .services(try c.decode([ServiceStatus].self, forKey: .services))
        case "lines": self = .lines(try c.decode([String].self, forKey: .lines))
        case "logs": self = .logs(try c.decode([LogEntry].self, forKey: .logs))
        case "terminal": self = .terminal(try c.decode(TerminalInfo.self, forKey: .terminal))
        case "terminals": self = .terminals(try c.decode([TerminalInfo].self, forKey: .terminals))
        case let k:
            throw DecodingError.dataCorruptedError(forKey: .kind, in: c, debugDescription: "unknown response '\(k)'")
        }
    }

    /// Encodes the wire form `{"kind": NAME, ...members}`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: K.self)
        switch self {
        case .pong(let v, let h, let u):
            try c.encode("pong", forKey: .kind)
            try c.encode(v, forKey: .agentVersion)
            try c.encode(h, forKey: .hostname)
            try c.encode(u, forKey: .uptimeSeconds)
        case .exec(let r):
            try c.encode("exec", forKey: .kind)
            try c.encode(r, forKey: .exec)
        case .data(let d, let size):
            try c.encode("data", forKey: .kind)
            try c.encode(d, forKey: .data)
            try c.encode(size, forKey: .fileSize)
        case .stat(let s):
            try c.encode("stat", forKey: .kind)
            try c.encode(s, forKey: .stat)
        case .entries(let e):
            try c.encode("entries", forKey: .kind)
            try c.encode(e, forKey: .entries)
        case .ok: try c.encode("ok", forKey: .kind)
        case .service(let st):
            try c.encode("service", forKey: .kind)
            try c.encode(st, forKey: .service)
        case .services(let list):
            try c.encode("services", forKey: .kind)
            try c.encode(list, forKey: .services)
        case .lines(let l):
            try c.encode("lines", forKey: .kind)
            try c.encode(l, forKey: .lines)
        case .logs(let l):
            try c.encode("logs", forKey: .kind)
            try c.encode(l, forKey: .logs)
        case .terminal(let t):
            try c.encode("terminal", forKey: .kind)
            try c.encode(t, forKey: .terminal)
        case .terminals(let t):
            try c.encode("terminals", forKey: .kind)
            try c.encode(t, forKey: .terminals)
        case .error(let e):
            try c.encode("error", forKey: .kind)
            try c.encode(e, forKey: .error)
        }
    }
}

/// A service's logs: with their times, or plain lines from an agent that predates times
/// (a VM restored from an old snapshot).
public enum ServiceLogs: Sendable, Equatable {
    case timed([LogEntry])
    case lines([String])
}

/// What a streaming request (`execStream`, `watch`, `stats`) yields: events, then the request's
/// final response.
public enum AgentStreamItem: Sendable, Equatable {
    case event(AgentEvent)
    case end(AgentResponse)
}
