import CSpawn
import Foundation
import FurcateCore
import FurcateTestSupport
import GuestAgentProtocol
import Hypervisor
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The agent built beside the tests.
var agentBinary: String { (furcateBinary as NSString).deletingLastPathComponent + "/furcate-agent" }

/// `furcate-agent --stdio` as a host process on one end of a socketpair.
final class HostAgent {
    let pid: pid_t
    private let _client: AgentClient?
    /// The host end of the socketpair; only for a HostAgent made `raw` (a client would read
    /// from the same socket).
    let raw: Int32
    var client: AgentClient {
        guard let c = _client else { preconditionFailure("a raw HostAgent has no client") }
        return c
    }

    /// `inheritedFD`: the agent starts with /dev/null open as fd 7, as an agent may inherit
    /// something from whatever started it.
    init(
        stateDir: String? = nil, etc: String? = nil, raw rawOnly: Bool = false, environment: [String: String] = [:],
        inheritedFD: Bool = false
    ) throws {
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0 else {
            throw FurcateError.system("socketpair", errno: errno)
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, sv[1], 0)
        posix_spawn_file_actions_adddup2(&actions, sv[1], 1)
        // Nothing else of this process's: the agent would hold, for its whole life, the pipes
        // of commands other tests run meanwhile, and their readers would wait for the end of
        // output as long (seen: a whole test run deadlocked on that).
        cspawn_addclosefrom(&actions, 3)
        if inheritedFD { posix_spawn_file_actions_addopen(&actions, 7, "/dev/null", O_RDONLY, 0) }
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(agentBinary), strdup("--stdio"), nil]
        defer { for a in argv { free(a) } }
        var p: pid_t = 0
        // FURCATE_AGENT_NO_SYSTEMD: on a host whose init is systemd, services must still go to the
        // built-in supervisor, never into the host's systemd.
        var env: [UnsafeMutablePointer<CChar>?] = [
            strdup("PATH=/usr/sbin:/usr/bin:/sbin:/bin"), strdup("FURCATE_AGENT_NO_SYSTEMD=1"),
        ]
        if let stateDir { env.append(strdup("FURCATE_AGENT_STATE_DIR=\(stateDir)")) }
        if let etc { env.append(strdup("FURCATE_AGENT_ETC=\(etc)")) }
        for (k, v) in environment { env.append(strdup("\(k)=\(v)")) }
        env.append(nil)
        defer { for e in env { free(e) } }
        let rc = posix_spawn(&p, agentBinary, &actions, nil, argv, env)
        guard rc == 0 else { throw FurcateError.system("posix_spawn", errno: rc, path: agentBinary) }
        close(sv[1])
        pid = p
        if rawOnly {
            raw = sv[0]
            _client = nil
        } else {
            raw = -1
            _client = AgentClient(readFD: sv[0], writeFD: sv[0])
        }
    }

    deinit {
        _client?.close()
        if raw >= 0 { close(raw) }
        kill(pid, SIGKILL)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
    }
}

@Suite(.serialized) struct GuestAgentTests {
    @Test func framesRoundTripAndRejectGarbage() throws {
        let f = Frame(kind: .request, id: 7, payload: Array("{\"op\":\"ping\"}".utf8))
        var d = FrameDecoder()
        let bytes = f.encoded()
        d.append(bytes.prefix(5))
        #expect(try d.next() == nil)
        d.append(bytes.dropFirst(5))
        #expect(try d.next() == f)
        var bad = FrameDecoder()
        bad.append([0x46, 0x41, 1, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
        #expect(throws: FrameError.self) { try bad.next() }
        var wrong = FrameDecoder()
        wrong.append(Array("GET / HTTP/1.1\r\n".utf8))
        #expect(throws: FrameError.self) { try wrong.next() }
        let req = AgentRequest.writeFile(
            path: "/a", data: Data([0, 1, 255]), offset: 3, mode: 0o600, createParents: true)
        #expect(try JSONDecoder().decode(AgentRequest.self, from: JSONEncoder().encode(req)) == req)
        // File bytes travel as a raw attachment beside the JSON, not as base64 inside it.
        let framed = try req.frame(id: 9)
        #expect(framed.attachment == [0, 1, 255] && !String(decoding: framed.payload, as: UTF8.self).contains("AAH/"))
        var withAttachment = FrameDecoder()
        withAttachment.append(framed.encoded())
        let back = try #require(try withAttachment.next())
        #expect(try AgentRequest.from(back) == req && back.id == 9)
        let resp = AgentResponse.data(Data([7, 8]), fileSize: 2)
        var rd = FrameDecoder()
        rd.append(try resp.frame(id: 3).encoded())
        #expect(try AgentResponse.from(try #require(try rd.next())) == resp)
        var lying = FrameDecoder()
        lying.append([0x46, 0x41, 1, 0x81, 1, 0, 0, 0, 6, 0, 0, 0, 0xff, 0, 0, 0, 0x7b, 0x7d])
        #expect(throws: FrameError.self) { try lying.next() }
    }

    /// A guest restored from a snapshot answers the old connection's in-flight requests on the
    /// new one; such a stale answer must not be taken for a new request's (ids counted from 1
    /// on every connection collided: a terminalList "answered" with another request's `ok`).
    @Test func aStaleAnswerFromAnEarlierConnectionIsNotTakenForANewRequest() async throws {
        func readRequestID(_ fd: Int32) throws -> UInt32 {
            var decoder = FrameDecoder()
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                if let f = try decoder.next() { return f.id }
                let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                guard n > 0 else { throw FurcateError(.io, "the client closed") }
                decoder.append(buf[0..<n])
            }
        }
        func pair() throws -> (Int32, Int32) {
            var sv: [Int32] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0 else {
                throw FurcateError.system("socketpair", errno: errno)
            }
            return (sv[0], sv[1])
        }
        // The first connection's request is never answered (the VM was snapshotted meanwhile).
        let (c1, g1) = try pair()
        let old = AgentClient(readFD: c1, writeFD: c1)
        let unanswered = Task { try? await old.request(.terminalList, timeout: .seconds(30)) }
        let staleID = try readRequestID(g1)
        old.close()
        _ = await unanswered.value
        close(g1)
        // The restored guest answers it on the next connection, before the new request's answer.
        let (c2, g2) = try pair()
        defer { close(g2) }
        let client = AgentClient(readFD: c2, writeFD: c2)
        defer { client.close() }
        let answer = Task { try await client.request(.terminalList, timeout: .seconds(30)) }
        let id = try readRequestID(g2)
        for frame in [try AgentResponse.ok.frame(id: staleID), try AgentResponse.terminals([]).frame(id: id)] {
            try UnixSocket.writeAll(g2, frame.encoded())
        }
        #expect(try await answer.value == .terminals([]))
    }

    /// Connecting to an agent whose channel closes (the VM's QEMU ended: stopped, or suspended
    /// while a fork was being freshened) fails at once with `.io`. It used to ask again until its
    /// timeout, each ask failing without a wait: a spin that held a thread of the cooperative
    /// pool — two of them held both of this host's for the whole agent timeout. A process that
    /// is gone ends the wait for its socket the same way.
    @Test(.timeLimit(.minutes(1))) func connectingGivesUpAtOnceWhenTheChannelCloses() async throws {
        let tmp = TempDir()
        let path = tmp.sub("channel.sock")
        let listener = try UnixSocket.listen(path)
        defer { close(listener) }
        let server = Thread {
            // Accepts and reads the first ping, then closes: a QEMU that ended.
            guard let c = try? UnixSocket.accept(listener, deadline: .now + .seconds(30)) else { return }
            var b = [UInt8](repeating: 0, count: 64)
            _ = b.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
            close(c)
        }
        server.start()
        // Far longer than the test may take: only failing at once passes.
        await #expect {
            _ = try await AgentClient.connect(socket: path, timeout: .seconds(600))
        } throws: { ($0 as? FurcateError)?.code == .io }
        await #expect {
            _ = try await AgentClient.connect(socket: tmp.sub("gone.sock"), timeout: .seconds(600)) { false }
        } throws: { ($0 as? FurcateError)?.code == .io }
    }

    /// A program the agent starts holds nothing of the agent's beyond its stdio: not a
    /// descriptor the agent inherited (fd 7 here), not another exec's pipe — one a long-running
    /// program held would keep that pipe's reader from ever seeing its end.
    @Test func programsInheritNoneOfTheAgentsDescriptors() async throws {
        let a = try HostAgent(inheritedFD: true)
        let r = try await a.client.exec(ExecRequest(argv: ["/bin/ls", "/proc/self/fd"]))
        let fds = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n").compactMap { Int($0) }
        // 0-2, and the directory ls reads.
        #expect(
            r.exitCode == 0 && !fds.isEmpty && fds.allSatisfy { $0 <= 3 },
            "descriptors of a program the agent started: \(fds)")
    }

    @Test func pingAndExec() async throws {
        let a = try HostAgent()
        guard case .pong(let v, _, let up) = try await a.client.request(.ping) else { Issue.record("no pong"); return }
        #expect(v == "1" && up > 0)
        let r = try await a.client.exec(ExecRequest(command: "echo out; echo err >&2; exit 3"))
        #expect(
            r.exitCode == 3 && String(decoding: r.stdout, as: UTF8.self) == "out\n"
                && String(decoding: r.stderr, as: UTF8.self) == "err\n")
        let cat = try await a.client.exec(ExecRequest(argv: ["/bin/cat"], stdin: Data("piped".utf8)))
        #expect(cat.exitCode == 0 && String(decoding: cat.stdout, as: UTF8.self) == "piped")
        let env = try await a.client.exec(ExecRequest(command: "echo $FOO; pwd", env: ["FOO": "bar"], cwd: "/tmp"))
        #expect(String(decoding: env.stdout, as: UTF8.self) == "bar\n/tmp\n")
        let missing = try await a.client.call(.exec(ExecRequest(argv: ["/nonexistent/program"])))
        guard case .error(let e) = missing else { Issue.record("exec of a missing program succeeded"); return }
        #expect(e.code == "not_found")
    }

    @Test func execTakesTheImagesEnvironmentWorkdirAndUser() async throws {
        let t = TempDir("imgenv")
        try "FROM_IMAGE=yes\nOVERRIDDEN=image\n".write(toFile: t.sub("env"), atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: t.sub("work"), withIntermediateDirectories: true)
        try (t.sub("work") + "\n").write(toFile: t.sub("workdir"), atomically: true, encoding: .utf8)
        let a = try HostAgent(environment: [
            "FURCATE_AGENT_ENV_FILE": t.sub("env"), "FURCATE_AGENT_WORKDIR_FILE": t.sub("workdir"),
        ])
        let r = try await a.client.exec(
            ExecRequest(command: "echo $FROM_IMAGE $OVERRIDDEN; pwd", env: ["OVERRIDDEN": "request"]))
        let lines = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n")
        #expect(lines.first == "yes request" && lines.last?.hasSuffix("/work") == true, "\(lines)")
        // The file is read at every start: a build step that appends to it reaches later execs.
        try "FROM_IMAGE=changed\n".write(toFile: t.sub("env"), atomically: true, encoding: .utf8)
        let r2 = try await a.client.exec(ExecRequest(command: "echo $FROM_IMAGE", cwd: "/"))
        #expect(String(decoding: r2.stdout, as: UTF8.self) == "changed\n")
        // Children get default signal dispositions: the agent's ignored SIGPIPE would make
        // `yes` spin forever once `head` exits.
        let ign = try await a.client.exec(ExecRequest(argv: ["grep", "SigIgn", "/proc/self/status"]))
        // Signals 1-31 (32 and 33 are glibc's own, which posix_spawn leaves alone).
        let mask = UInt64(
            String(decoding: ign.stdout, as: UTF8.self).split(separator: "\t").last?.trimmingCharacters(
                in: .whitespacesAndNewlines) ?? "", radix: 16)
        #expect(mask.map { $0 & 0x7fff_ffff } == 0, "\(String(decoding: ign.stdout, as: UTF8.self))")
        if geteuid() == 0 {
            let r3 = try await a.client.exec(ExecRequest(argv: ["id", "-u"], user: "nobody"))
            #expect(String(decoding: r3.stdout, as: UTF8.self) == "65534\n", "\(r3)")
            await #expect(throws: (any Error).self) {
                try await a.client.exec(ExecRequest(argv: ["id", "-u"], user: "no-such-user"))
            }
        }
    }

    @Test func execTimeoutKillsTheWholeGroupAndOutputIsBounded() async throws {
        let a = try HostAgent()
        let t0 = ContinuousClock.now
        let r = try await a.client.exec(ExecRequest(command: "sleep 30 & sleep 30; echo never", timeoutMs: 300))
        #expect(r.timedOut && r.signal == SIGKILL && r.exitCode == nil)
        // Well under the 30 s the group's sleeps would take had they not been killed (not a speed
        // check: under CI load the call itself once took 15 s).
        #expect(ContinuousClock.now - t0 < .seconds(25))
        let big = try await a.client.exec(
            ExecRequest(command: "head -c 200000 /dev/zero | tr '\\0' x", maxOutputBytes: 1000))
        #expect(big.truncated && big.stdout.count == 1000 && big.exitCode == 0)
    }

    @Test func filesAreBinarySafeAndLargeFilesStreamInChunks() async throws {
        let a = try HostAgent()
        let dir = TempDir("agent")
        let all = Data((0..<256).map { UInt8($0) })
        _ = try await a.client.request(
            .writeFile(path: dir.sub("x/y/bin"), data: all, offset: nil, mode: 0o600, createParents: true))
        guard
            case .data(let back, let size) = try await a.client.request(
                .readFile(path: dir.sub("x/y/bin"), offset: nil, length: nil))
        else {
            Issue.record("no data")
            return
        }
        #expect(back == all && size == 256)
        guard case .stat(let st) = try await a.client.request(.stat(path: dir.sub("x/y/bin"))) else { return }
        #expect(st.kind == .file && st.mode == 0o600 && st.size == 256)
        _ = try await a.client.request(.mkdir(path: dir.sub("x/z"), parents: false))
        guard case .entries(let es) = try await a.client.request(.list(path: dir.sub("x"))) else { return }
        #expect(es.map(\.name) == ["y", "z"] && es.allSatisfy { $0.kind == .directory })

        // 100 MiB in 4 MiB chunks, read back and compared.
        let chunk = 4 << 20
        var pattern = [UInt8](repeating: 0, count: chunk)
        for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 13) }
        let path = dir.sub("big")
        for k in 0..<25 {
            var c = pattern
            c[0] = UInt8(k)
            _ = try await a.client.request(
                .writeFile(path: path, data: Data(c), offset: UInt64(k * chunk), mode: nil, createParents: false),
                timeout: .seconds(60))
        }
        for k in 0..<25 {
            guard
                case .data(let d, let size) = try await a.client.request(
                    .readFile(path: path, offset: UInt64(k * chunk), length: chunk), timeout: .seconds(60))
            else {
                Issue.record("chunk \(k) missing")
                return
            }
            var c = pattern
            c[0] = UInt8(k)
            #expect(size == 100 << 20 && sameBytes([UInt8](d), c), "chunk \(k)")
        }
        _ = try await a.client.request(.delete(path: dir.sub("x"), recursive: true))
        let gone = try await a.client.call(.stat(path: dir.sub("x")))
        #expect(
            gone == .error(AgentError(code: "not_found", message: "stat \(dir.sub("x")): No such file or directory")))
        let relative = try await a.client.call(.readFile(path: "etc/passwd", offset: nil, length: nil))
        guard case .error(let e) = relative else { Issue.record("a relative path was accepted"); return }
        #expect(e.code == "invalid_argument")
    }

    @Test func execStreamsOutputAndCancelKills() async throws {
        let a = try HostAgent()
        let (_, items) = try a.client.stream(
            .execStream(ExecRequest(command: "for i in 1 2 3; do echo $i; sleep 0.1; done; echo e >&2")))
        var out = ""
        var err = ""
        var end: AgentResponse?
        for try await item in items {
            switch item {
            case .event(.output(let fd, let data)):
                if fd == 1 {
                    out += String(decoding: data, as: UTF8.self)
                } else {
                    err += String(decoding: data, as: UTF8.self)
                }
            case .event: Issue.record("unexpected event")
            case .end(let r): end = r
            }
        }
        #expect(out == "1\n2\n3\n" && err == "e\n")
        guard case .exec(let r) = end else { Issue.record("no final exec result"); return }
        #expect(r.exitCode == 0 && r.stdout.isEmpty)

        let (id, sleeper) = try a.client.stream(.execStream(ExecRequest(argv: ["sleep", "30"])))
        try await Task.sleep(for: .milliseconds(200))
        let t0 = ContinuousClock.now
        try await a.client.cancel(id)
        var last: AgentResponse?
        for try await item in sleeper { if case .end(let r) = item { last = r } }
        guard case .exec(let k) = last else { Issue.record("no result after cancel"); return }
        // Killed, well before the 30 s sleep would end (a bound loose enough for CI load).
        #expect(k.signal == SIGKILL && ContinuousClock.now - t0 < .seconds(25))
    }

    @Test func watchSeesCreateModifyDeleteRecursively() async throws {
        let a = try HostAgent()
        let dir = TempDir("watch")
        let (id, items) = try a.client.stream(.watch(path: dir.path, recursive: true))
        // Events are gathered as they come; each step waits for the event that shows the watch
        // saw the step before (a fixed 300 ms missed the first files in a loaded CI run).
        let seen = LockedSet()
        let reader = Task { () -> AgentResponse? in
            var end: AgentResponse?
            for try await item in items {
                switch item {
                case .event(.file(let path, let change, _)): seen.insert("\(change) \(path)")
                case .event: break
                case .end(let r): end = r
                }
            }
            return end
        }
        func saw(_ want: String) async throws -> Bool {
            try await eventually(within: .seconds(30), every: .milliseconds(20)) {
                seen.contains(want) ? true : nil
            } == true
        }
        let probe = dir.sub("probe")
        _ = try await eventually(within: .seconds(30)) {  // the watch is in place once it sees a file made
            try Data("p".utf8).write(to: URL(fileURLWithPath: probe))
            return seen.contains("create \(probe)") || seen.contains("modify \(probe)") ? true : nil
        }
        let f = dir.sub("f")
        try Data("1".utf8).write(to: URL(fileURLWithPath: f))
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: f))
        try h.seekToEnd()
        try h.write(contentsOf: Data("2".utf8))
        try h.close()
        try FileManager.default.createDirectory(atPath: dir.sub("sub"), withIntermediateDirectories: false)
        _ = try await saw("create \(dir.sub("sub"))")
        // The new directory gets its watch after its create event: write into it until seen.
        _ = try await eventually(within: .seconds(30)) {
            try Data("x".utf8).write(to: URL(fileURLWithPath: dir.sub("sub/inner")))
            return seen.contains("create \(dir.sub("sub/inner"))") ? true : nil
        }
        try FileManager.default.removeItem(atPath: f)
        _ = try await saw("delete \(f)")
        try await a.client.cancel(id)
        let end = try await reader.value
        #expect(end == .ok)
        let all = seen.all
        for want in [
            "create \(f)", "modify \(f)", "delete \(f)", "create \(dir.sub("sub"))", "create \(dir.sub("sub/inner"))",
        ] {
            #expect(all.contains(want), "missing '\(want)' in \(all.sorted())")
        }
    }

    @Test func statsStreamAtAnInterval() async throws {
        let a = try HostAgent()
        let (id, items) = try a.client.stream(.stats(intervalMs: 100))
        var samples: [StatsSample] = []
        for try await item in items {
            if case .event(.stats(let s)) = item {
                samples.append(s)
                if samples.count == 3 { try await a.client.cancel(id) }
            }
        }
        #expect(samples.count >= 3)
        #expect(
            samples.allSatisfy {
                $0.memoryTotalBytes > 0 && $0.memoryAvailableBytes <= $0.memoryTotalBytes && $0.cpus > 0
            })
        let (_, bad) = try a.client.stream(.stats(intervalMs: 5))
        var end: AgentResponse?
        for try await item in bad { if case .end(let r) = item { end = r } }
        guard case .error(let e) = end else { Issue.record("an interval of 5 ms was accepted"); return }
        #expect(e.code == "invalid_argument")
    }

    @Test func malformedFrameGetsAnErrorAndEndsTheStream() async throws {
        let a = try HostAgent(raw: true)
        try UnixSocket.writeAll(a.raw, Array("this is not a frame at all".utf8))
        var decoder = FrameDecoder()
        var buf = [UInt8](repeating: 0, count: 4096)
        var frame: Frame?
        while frame == nil {
            let n = recv(a.raw, &buf, buf.count, 0)
            if n <= 0 { break }
            decoder.append(buf[0..<n])
            frame = try decoder.next()
        }
        let f = try #require(frame)
        #expect(f.id == 0)
        let r = try JSONDecoder().decode(AgentResponse.self, from: Data(f.payload))
        guard case .error(let e) = r else { Issue.record("expected an error"); return }
        #expect(e.code == "invalid_argument")
        // The agent (stdio mode) ends the stream: it exits.
        var st: Int32 = 0
        let deadline = ContinuousClock.now + .seconds(5)
        var exited = false
        while ContinuousClock.now < deadline {
            if waitpid(a.pid, &st, WNOHANG) == a.pid { exited = true; break }
            usleep(10_000)
        }
        #expect(exited)
    }
}

/// The built-in supervisor, on the host (no systemd in test images either).
@Suite(.serialized) struct AgentServiceTests {
    func status(_ a: HostAgent, _ name: String) async throws -> ServiceStatus {
        guard case .service(let st) = try await a.client.request(.serviceStatus(name: name)) else {
            throw AgentError(code: "io", message: "no status")
        }
        return st
    }

    /// Polls a service's status until `ok` (or `seconds` pass: 30, since under CI load — QEMU
    /// guests on both cores — a restart once took longer than 10 s to show).
    func waitFor(_ a: HostAgent, _ name: String, seconds: Double = 30, _ ok: (ServiceStatus) -> Bool) async throws
        -> ServiceStatus
    {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        var st = try await status(a, name)
        while !ok(st) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
            st = try await status(a, name)
        }
        return st
    }

    @Test func oneshotRunsItsLinesInOrderKeepsLogsAndCanDeleteItself() async throws {
        let state = TempDir("svc")
        let a = try HostAgent(stateDir: state.path)
        _ = try await a.client.request(
            .serviceCreate(
                ServiceSpec(name: "setup", mode: "oneshot", exec: ["echo one", "echo two >&2"], env: ["X": "1"]),
                start: true))
        let st = try await waitFor(a, "setup") { $0.subState == "exited" }
        #expect(st.activeState == "active" && st.lastExitCode == 0)
        guard case .logs(let logs) = try await a.client.request(.serviceLogs(name: "setup", lines: nil)) else {
            Issue.record("no logs"); return
        }
        #expect(logs.map(\.text) == ["one", "two"])
        // Each line has its time; `since` keeps those at or after it.
        let t = Date().timeIntervalSince1970
        #expect(logs.allSatisfy { $0.time > t - 60 && $0.time <= t }, "\(logs)")
        #expect(
            try await a.client.request(.serviceLogs(name: "setup", lines: nil, since: logs[1].time)) == .logs([logs[1]])
        )
        #expect(try await a.client.request(.serviceLogs(name: "setup", lines: nil, since: t + 1)) == .logs([]))
        _ = try await a.client.request(
            .serviceCreate(
                ServiceSpec(name: "once", mode: "oneshot", exec: ["true"], deleteAfterSuccess: true), start: true))
        try await Task.sleep(for: .milliseconds(500))
        guard case .services(let list) = try await a.client.request(.serviceList) else { return }
        #expect(list.map(\.name) == ["setup"])
        let bad = try await a.client.call(
            .serviceCreate(ServiceSpec(name: "../x", mode: "oneshot", exec: ["true"]), start: true))
        guard case .error(let e) = bad else { Issue.record("a bad name was accepted"); return }
        #expect(e.code == "invalid_argument")
        let failing = try await a.client.request(
            .serviceCreate(ServiceSpec(name: "fails", mode: "oneshot", exec: ["exit 3", "echo never"]), start: true))
        _ = failing
        let f = try await waitFor(a, "fails") { $0.activeState == "failed" }
        #expect(f.activeState == "failed" && f.lastExitCode == 3)
        #expect(try await a.client.request(.serviceLogs(name: "fails", lines: nil)) == .logs([]))
    }

    @Test func serviceIsRestartedAfterSIGKILLAndStopEndsIt() async throws {
        let state = TempDir("svc")
        let a = try HostAgent(stateDir: state.path)
        _ = try await a.client.request(
            .serviceCreate(
                ServiceSpec(
                    name: "web", mode: "service", exec: ["exec sleep 300"],
                    restartPolicy: RestartPolicy(policy: "always")), start: true))
        let first = try await waitFor(a, "web") { $0.subState == "running" && $0.mainPID != nil }
        let pid = try #require(first.mainPID)
        kill(pid, SIGKILL)
        let second = try await waitFor(a, "web") { $0.restarts == 1 && $0.subState == "running" && $0.mainPID != pid }
        #expect(second.restarts == 1 && second.mainPID != nil && second.mainPID != pid)
        let newPID = try #require(second.mainPID)
        guard case .service(let stopped) = try await a.client.request(.serviceControl(name: "web", action: "stop"))
        else { return }
        #expect(stopped.activeState == "inactive")
        try await Task.sleep(for: .milliseconds(100))
        #expect(!isRunning(newPID))
    }

    @Test func restartLimitAndDependencies() async throws {
        let state = TempDir("svc")
        let a = try HostAgent(stateDir: state.path)
        _ = try await a.client.request(
            .serviceCreate(
                ServiceSpec(
                    name: "crashy", mode: "service", exec: ["exit 2"],
                    restartPolicy: RestartPolicy(policy: "on-failure", startLimitBurst: 3)),
                start: true))
        let st = try await waitFor(a, "crashy") { $0.activeState == "failed" }
        #expect(st.activeState == "failed" && st.restarts == 2 && st.lastExitCode == 2)

        _ = try await a.client.request(
            .serviceCreate(ServiceSpec(name: "db", mode: "service", exec: ["exec sleep 300"]), start: false))
        _ = try await a.client.request(
            .serviceCreate(
                ServiceSpec(name: "app", mode: "service", exec: ["exec sleep 300"], requires: ["db"]), start: true))
        #expect(try await waitFor(a, "db") { $0.subState == "running" }.subState == "running")
        #expect(try await waitFor(a, "app") { $0.subState == "running" }.subState == "running")
        _ = try await a.client.request(.serviceControl(name: "db", action: "stop"))
        #expect(try await status(a, "app").activeState == "inactive")
        let missing = try await a.client.call(
            .serviceCreate(
                ServiceSpec(name: "orphan", mode: "service", exec: ["true"], requires: ["nope"]), start: true))
        guard case .error(let e) = missing else { Issue.record("a missing requirement was accepted"); return }
        #expect(e.code == "not_found")
    }

    @Test func aRestartedAgentStartsEnabledServicesAgainAndEndsTheOldOnes() async throws {
        let state = TempDir("svc")
        var oldPID: Int32 = 0
        do {
            let a = try HostAgent(stateDir: state.path)
            _ = try await a.client.request(
                .serviceCreate(ServiceSpec(name: "daemon", mode: "service", exec: ["exec sleep 300"]), start: true))
            oldPID = try #require(try await waitFor(a, "daemon") { $0.mainPID != nil }.mainPID)
        }  // the agent is SIGKILLed here; its service runs on in its own session
        #expect(isRunning(oldPID))
        let b = try HostAgent(stateDir: state.path)
        let st = try await waitFor(b, "daemon") { $0.subState == "running" }
        #expect(st.subState == "running" && st.mainPID != oldPID)
        try await Task.sleep(for: .milliseconds(100))
        #expect(!isRunning(oldPID), "the old agent's service still runs")
        _ = try await b.client.request(.serviceControl(name: "daemon", action: "delete"))
        #expect(access(state.sub("daemon.json"), F_OK) != 0)
    }
}

/// True when `pid` exists and is not a zombie (a killed orphan may wait a while to be reaped).
func isRunning(_ pid: Int32) -> Bool {
    guard let stat = readWholeFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return false }
    return stat[stat.index(close, offsetBy: 2)] != "Z"
}

@Suite(.serialized) struct AgentTerminalTests {
    func text(_ a: HostAgent, _ name: String) async throws -> String {
        guard case .lines(let l) = try await a.client.request(.terminalOutput(name: name, raw: false, lines: 1000))
        else { return "" }
        return l.joined(separator: "\n")
    }

    /// Polls the terminal's text until it holds `needle` (60 s: with the whole suite running on
    /// two cores, the polls themselves waited seconds for a thread, and 10 s once ran out).
    func waitForText(_ a: HostAgent, _ name: String, _ needle: String) async throws -> String {
        let deadline = ContinuousClock.now + .seconds(60)
        var t = try await text(a, name)
        while !t.contains(needle) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
            t = try await text(a, name)
        }
        return t
    }

    @Test func aTerminalEchoesInputResizesAndCloses() async throws {
        let a = try HostAgent()
        guard
            case .terminal(let t) = try await a.client.request(
                .terminalCreate(name: "t1", command: ["/bin/sh"], cols: 80, rows: 24))
        else {
            Issue.record("no terminal")
            return
        }
        #expect(t.status == "running" && t.pid != nil)
        _ = try await a.client.request(.terminalInput(name: "t1", data: Data("echo hello-$((40+2))\n".utf8)))
        #expect(try await waitForText(a, "t1", "hello-42").contains("hello-42"))
        _ = try await a.client.request(.terminalResize(name: "t1", cols: 100, rows: 40))
        _ = try await a.client.request(.terminalInput(name: "t1", data: Data("stty size; tty\n".utf8)))
        let out = try await waitForText(a, "t1", "/dev/pts/")
        #expect(out.contains("40 100") && out.contains("/dev/pts/"), "\(out)")
        guard case .data(let raw, _) = try await a.client.request(.terminalOutput(name: "t1", raw: true, lines: nil))
        else { return }
        #expect(String(decoding: raw, as: UTF8.self).contains("hello-42\r\n"))  // as a terminal received it
        let dup = try await a.client.call(.terminalCreate(name: "t1", command: nil, cols: 80, rows: 24))
        guard case .error(let e) = dup else { Issue.record("a duplicate terminal was made"); return }
        #expect(e.code == "exists")
        guard case .terminals(let list) = try await a.client.request(.terminalList) else { return }
        #expect(list.map(\.name) == ["t1"])
        let pid = try #require(t.pid)
        _ = try await a.client.request(.terminalClose(name: "t1"))
        try await Task.sleep(for: .milliseconds(200))
        #expect(!isRunning(pid))
        guard case .terminals(let after) = try await a.client.request(.terminalList) else { return }
        #expect(after.isEmpty)
    }
}

@Suite struct AgentAccountTests {
    @Test func usersAndGroupsAreAddedOnceWithFreeIDs() async throws {
        let etc = TempDir("etc")
        try "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh".write(
            toFile: etc.sub("passwd"), atomically: true, encoding: .utf8)
        try "root:x:0:\nalice:x:1000:\ndocker:x:998:\n".write(
            toFile: etc.sub("group"), atomically: true, encoding: .utf8)
        let a = try HostAgent(etc: etc.path)
        _ = try await a.client.request(.addGroup(GroupSpec(name: "devs")))
        _ = try await a.client.request(.addGroup(GroupSpec(name: "svc", system: true)))
        _ = try await a.client.request(
            .addUser(
                UserSpec(
                    name: "bob", gecos: "Bob: B", groups: ["devs", "docker"], home: etc.sub("home/bob"),
                    shell: "/bin/sh")))
        _ = try await a.client.request(.addUser(UserSpec(name: "bob")))  // exists: unchanged
        _ = try await a.client.request(.addUser(UserSpec(name: "daemon1", system: true)))
        let passwd = try String(contentsOfFile: etc.sub("passwd"), encoding: .utf8)
        let group = try String(contentsOfFile: etc.sub("group"), encoding: .utf8)
        let users = passwd.split(separator: "\n").map(String.init)
        let groups = group.split(separator: "\n").map(String.init)
        // devs took gid 1001, so bob's own group gets the next free one.
        #expect(
            users.filter { $0.hasPrefix("bob:") } == ["bob:x:1001:1002:Bob  B:\(etc.sub("home/bob")):/bin/sh"],
            "\(passwd)")
        #expect(users.contains("daemon1:x:100:101::/:/usr/sbin/nologin"), "\(passwd)")
        for g in ["devs:x:1001:bob", "docker:x:998:bob", "svc:x:100:", "bob:x:1002:", "daemon1:x:101:"] {
            #expect(groups.contains(g), "missing \(g) in \(group)")
        }
        var st = stat()
        #expect(stat(etc.sub("home/bob"), &st) == 0 && st.st_uid == 1001)
        let bad = try await a.client.call(.addUser(UserSpec(name: "Robert; rm")))
        guard case .error(let e) = bad else { Issue.record("a bad user name was accepted"); return }
        #expect(e.code == "invalid_argument")
        let taken = try await a.client.call(.addUser(UserSpec(name: "carol", uid: 1000)))
        guard case .error(let t) = taken else { Issue.record("a taken uid was accepted"); return }
        #expect(t.code == "exists")
    }
}

/// Strings gathered on one task and read on another.
final class LockedSet: Sendable {
    private let items = Mutex<Set<String>>([])
    func insert(_ s: String) { _ = items.withLock { $0.insert(s) } }
    func contains(_ s: String) -> Bool { items.withLock { $0.contains(s) } }
    var all: Set<String> { items.withLock { $0 } }
}
