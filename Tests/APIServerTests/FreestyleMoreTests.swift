import APIServer
import AsyncHTTPClient
import Foundation
import FurcateCore
import FurcateEngine
import FurcateTestSupport
import GuestAgentProtocol
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import NIOHTTP1
import Testing
import VMService

/// A response read by `call`.
struct Reply: Sendable {
    let status: HTTPResponse.Status
    let headers: HTTPFields
    let body: ByteBuffer
}

func json(_ r: Reply) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(buffer: r.body))) as? [String: Any] ?? [:]
}

/// Sends a JSON body as account `key` to the test server. Through AsyncHTTPClient with a
/// 5-minute limit: HummingbirdTesting's live client gives up after 20 s without a byte, which a
/// snapshot under CI load (other suites' VMs and I/O on 2 cores) once exceeded.
/// The client of the API tests: a request may wait as long as its 300 s deadline without a
/// byte (a cold boot answering once its agent does, on a loaded TCG host), where the shared
/// client's read timeout cut one off in a fresh-clone CI run.
let testHTTPClient = HTTPClient(
    eventLoopGroupProvider: .singleton,
    configuration: HTTPClient.Configuration(timeout: .init(connect: .seconds(10), read: .seconds(300))))

func call(
    _ client: some TestClientProtocol, _ method: HTTPRequest.Method, _ uri: String, _ key: String, _ body: String? = nil
) async throws -> Reply {
    let port = try #require(client.port, "a live test server has a port")
    var req = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(uri)")
    req.method = HTTPMethod(rawValue: method.rawValue)
    req.headers.add(name: "Authorization", value: "Bearer " + key)
    req.headers.add(name: "Content-Type", value: "application/json")
    if let body { req.body = .bytes(ByteBuffer(string: body)) }
    let response = try await testHTTPClient.execute(req, timeout: .seconds(300))
    var headers = HTTPFields()
    for (name, value) in response.headers {
        if let n = HTTPField.Name(name) { headers.append(HTTPField(name: n, value: value)) }
    }
    return Reply(
        status: HTTPResponse.Status(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase),
        headers: headers,
        body: try await response.body.collect(upTo: 256 << 20))
}

/// Reads NDJSON lines from a live server until `enough` says stop, then goes away: its own
/// client is shut down, which closes the connection (the server must then end the stream).
func ndjsonLines(
    port: Int, _ method: HTTPMethod, _ path: String, key: String, body: String? = nil, timeout: Duration = .seconds(60),
    enough: @escaping @Sendable ([[String: Any]]) -> Bool
) async throws -> [[String: Any]] {
    let http = HTTPClient(eventLoopGroupProvider: .singleton)
    var req = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)")
    req.method = method
    req.headers.add(name: "Authorization", value: "Bearer " + key)
    if let body { req.body = .bytes(ByteBuffer(string: body)) }
    func parse(_ raw: [String]) -> [[String: Any]] {
        raw.compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
    }
    let reader = Task { () throws -> [String] in
        let response = try await http.execute(req, timeout: .seconds(Int64(timeout.components.seconds)))
        #expect(response.status == .ok && response.headers["content-type"].first == "application/x-ndjson")
        var lines: [String] = []
        var pending = ""
        for try await chunk in response.body {
            pending += String(buffer: chunk)
            while let nl = pending.firstIndex(of: "\n") {
                let line = String(pending[..<nl])
                pending = String(pending[pending.index(after: nl)...])
                lines.append(line)
            }
            if enough(parse(lines)) { return lines }
        }
        return lines
    }
    let deadline = Task {
        try await Task.sleep(for: timeout)
        reader.cancel()
    }
    defer { deadline.cancel() }
    let result = await reader.result
    try await http.shutdown()
    return parse(try result.get())
}

/// Progress of a long test on stderr, so a hang shows where it is.
func step(_ what: String) {
    FileHandle.standardError.write(Data("[\(Date().ISO8601Format())] test step: \(what)\n".utf8))
}

@Suite(.enabled(if: apiVMAvailable)) struct FreestyleGuestAndSnapshotTests {
    @Test func snapshotsBuildsServicesStreamsResize() async throws {
        step("harness")
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            step("snapshot made")
            let app = APIServer.buildApplication(h.engine, host: "127.0.0.1", port: 0)
            try await app.test(.live) { client in
                step("server up")
                let (a, b) = (h.keyA, h.keyB)
                let created = try await call(client, .post, "/v1/vms", a, #"{"snapshotId":"\#(h.snapshot)"}"#)
                let id = try #require(json(created)["id"] as? String)

                step("Snapshots: list with counts; name; anoth")
                // Snapshots: list with counts; name; another account sees none of it.
                let named = try await call(
                    client, .post, "/v1/vms/\(id)/snapshot", a,
                    #"{"name":"first","persistence":{"type":"sticky","priority":7}}"#)
                let sid = try #require(json(named)["snapshotId"] as? String, "\(String(buffer: named.body))")
                let got = try await call(client, .get, "/v1/vms/snapshots/\(sid)", a)
                #expect(
                    json(got)["state"] as? String == "ready" && json(got)["name"] as? String == "first"
                        && json(got)["sourceVmId"] as? String == id)
                #expect(
                    (json(got)["snapshotPersistence"] as? [String: Any])?["priority"] as? Int == 7,
                    "\(String(buffer: got.body))")
                let badPriority = try await call(
                    client, .post, "/v1/vms/\(id)/snapshot", a, #"{"persistence":{"type":"sticky","priority":11}}"#)
                #expect(badPriority.status == .badRequest)
                // The document requires a body on this PATCH (schemathesis found none accepted).
                #expect(try await call(client, .patch, "/v1/vms/snapshots/\(sid)", a).status == .badRequest)
                let renamed = try await call(client, .patch, "/v1/vms/snapshots/\(sid)", a, #"{"name":"renamed"}"#)
                #expect(json(renamed)["name"] as? String == "renamed" && json(renamed)["snapshot_id"] as? String == sid)
                let list = try await call(client, .get, "/v1/vms/snapshots", a)
                #expect(
                    json(list)["totalCount"] as? Int == 2 && json(list)["readyCount"] as? Int == 2,
                    "\(String(buffer: list.body))")
                #expect(try await call(client, .get, "/v1/vms/snapshots/\(sid)", b).status == .notFound)
                #expect(try await call(client, .delete, "/v1/vms/snapshots/\(sid)", b).status == .notFound)
                #expect(
                    try await call(client, .patch, "/v1/vms/snapshots/\(sid)", b, #"{"name":"x"}"#).status == .notFound)
                #expect(json(try await call(client, .get, "/v1/vms/snapshots", b))["totalCount"] as? Int == 0)

                step("A build from a spec on that snapshot: bu")
                // A build from a spec on that snapshot: building → ready, its build and phases, a
                // VM from it has the spec's file.
                let spec =
                    #"{"name":"built","spec":{"snapshotId":"\#(sid)","additionalFiles":{"/root/spec.txt":{"content":"from the spec\n"}}}}"#
                let build = try await call(client, .post, "/v1/vms/snapshots", a, spec)
                let bsid = try #require(json(build)["snapshotId"] as? String, "\(String(buffer: build.body))")
                var state = ""
                var info: [String: Any] = [:]
                for _ in 0..<600 {
                    info = json(try await call(client, .get, "/v1/vms/snapshots/\(bsid)", a))
                    state = info["state"] as? String ?? ""
                    if state != "building" { break }
                    try await Task.sleep(for: .milliseconds(200))
                }
                #expect(state == "ready", "\(info)")
                let buildId = try #require(info["buildId"] as? String)
                let rec = try await call(client, .get, "/v1/vms/builds/\(buildId)", a)
                #expect(
                    json(rec)["state"] as? String == "succeeded"
                        && (json(rec)["plannedPhases"] as? [String])?.isEmpty == false, "\(String(buffer: rec.body))")
                let phases =
                    (json(try await call(client, .get, "/v1/vms/builds/\(buildId)/phases", a))["phases"]
                    as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(phases.contains("snapshot"), "\(phases)")
                #expect(try await call(client, .get, "/v1/vms/builds/\(buildId)", b).status == .notFound)
                let fromBuild = try await call(client, .post, "/v1/vms", a, #"{"snapshotId":"\#(bsid)"}"#)
                let bvm = try #require(json(fromBuild)["id"] as? String, "\(String(buffer: fromBuild.body))")
                let specFile = try await call(client, .get, "/v1/vms/\(bvm)/files/root/spec.txt", a)
                #expect(json(specFile)["content"] as? String == "from the spec\n")
                let vmBuild = try await call(client, .get, "/v1/vms/\(bvm)/build", a)
                #expect(json(vmBuild)["buildId"] as? String == buildId, "\(String(buffer: vmBuild.body))")
                _ = try await call(client, .delete, "/v1/vms/\(bvm)", a)

                step("Delete: soft, then 409 the second time; ")
                // Delete: soft, then 409 the second time; listed only with includeDeleted.
                #expect(try await call(client, .delete, "/v1/vms/snapshots/\(sid)", a).status == .ok)
                let again = try await call(client, .delete, "/v1/vms/snapshots/\(sid)", a)
                #expect(
                    again.status == .conflict && json(again)["error"] as? String == "SNAPSHOT_ALREADY_DELETED",
                    "\(String(buffer: again.body))")
                #expect(json(try await call(client, .get, "/v1/vms/snapshots", a))["totalCount"] as? Int == 2)
                let withDeleted = try await call(client, .get, "/v1/vms/snapshots?includeDeleted=true", a)
                #expect(json(withDeleted)["totalCount"] as? Int == 3 && json(withDeleted)["deletedCount"] as? Int == 1)
                let useDeleted = try await call(client, .post, "/v1/vms", a, #"{"snapshotId":"\#(sid)"}"#)
                #expect(useDeleted.status == .notFound && json(useDeleted)["error"] as? String == "SNAPSHOT_NOT_FOUND")

                // Content fields on create: an outer layer built over snapshotId (then cached).
                let withFiles =
                    #"{"snapshotId":"\#(bsid)","name":"with-files","additionalFiles":{"/root/at-create.txt":{"content":"made at create\n"}}}"#
                let made1 = try await call(client, .post, "/v1/vms", a, withFiles)
                let cvm = try #require(json(made1)["id"] as? String, "\(String(buffer: made1.body))")
                let atCreate = try await call(client, .get, "/v1/vms/\(cvm)/files/root/at-create.txt", a)
                #expect(json(atCreate)["content"] as? String == "made at create\n")
                #expect(json(try await call(client, .get, "/v1/vms/\(cvm)", a))["name"] as? String == "with-files")
                let found =
                    (json(try await call(client, .get, "/v1/vms?search=with-files", a))["vms"] as? [[String: Any]] ?? [])
                    .compactMap { $0["id"] as? String }
                #expect(found == [cvm])
                let made2 = try await call(client, .post, "/v1/vms", a, withFiles)
                let phases2 = try await call(
                    client, .get, "/v1/vms/\(try #require(json(made2)["id"] as? String))/build", a)
                #expect(json(phases2)["state"] as? String == "succeeded", "\(String(buffer: phases2.body))")
                // Found by schemathesis: credentials of the wrong shape were accepted.
                let badCreds = try await call(
                    client, .post, "/v1/vms", a,
                    #"{"workdir":"/root","dockerCredentials":{"registry":1,"username":"u","password":"p"}}"#)
                #expect(
                    badCreds.status == .badRequest && json(badCreds)["error"] as? String == "BAD_REQUEST",
                    "\(String(buffer: badCreds.body))")
                // …and a string there trapped JSONSerialization (the server died).
                let stringCreds = try await call(
                    client, .post, "/v1/vms", a, #"{"workdir":"/root","dockerCredentials":"AAA"}"#)
                #expect(
                    stringCreds.status == .badRequest && json(stringCreds)["error"] as? String == "BAD_REQUEST",
                    "\(String(buffer: stringCreds.body))")
                let failing = try await call(
                    client, .post, "/v1/vms", a, #"{"snapshotId":"\#(bsid)","aptDeps":["no-such-package-here"]}"#)
                #expect(
                    failing.status == .badRequest && json(failing)["error"] as? String == "BUILD_FAILED",
                    "\(String(buffer: failing.body))")
                // The deprecated template is spec.snapshot (its persistence the VM's); gitRepos join
                // git.repos (an empty list here: no repository to clone).
                let legacy = try await call(
                    client, .post, "/v1/vms", a,
                    #"{"template":{"snapshotId":"\#(bsid)","additionalFiles":{"/root/t.txt":{"content":"from the template\n"}},"gitRepos":[],"persistence":{"type":"persistent"}},"gitRepos":[]}"#
                )
                let lvm = try #require(json(legacy)["id"] as? String, "\(String(buffer: legacy.body))")
                #expect(
                    json(try await call(client, .get, "/v1/vms/\(lvm)/files/root/t.txt", a))["content"] as? String
                        == "from the template\n")
                let listed =
                    json(try await call(client, .get, "/v1/vms?search=\(lvm)", a))["vms"] as? [[String: Any]] ?? []
                #expect(
                    (listed.first?["persistence"] as? [String: Any])?["type"] as? String == "persistent", "\(listed)")
                let badRepos = try await call(
                    client, .post, "/v1/vms", a, #"{"git":{"config":{},"repos":{}},"gitRepos":[]}"#)
                #expect(badRepos.status == .badRequest, "\(String(buffer: badRepos.body))")
                let both = try await call(
                    client, .post, "/v1/vms", a,
                    #"{"template":{"snapshotId":"\#(bsid)"},"spec":{"snapshotId":"\#(bsid)"}}"#)
                #expect(
                    both.status == .badRequest
                        && (json(both)["message"] as? String)?.contains("mutually exclusive") == true)
                for v in [cvm, lvm, json(made2)["id"] as? String ?? ""] {
                    _ = try await call(client, .delete, "/v1/vms/\(v)", a)
                }

                step("Services through the agent's supervisor.")
                // Services through the agent's supervisor.
                let svc =
                    #"{"name":"ticker","mode":"service","exec":["/bin/sh -c 'while true; do echo tick; sleep 0.2; done'"]}"#
                let made = try await call(client, .post, "/v1/vms/\(id)/systemd/services", a, svc)
                #expect(
                    made.status == .ok && json(made)["serviceName"] as? String == "ticker",
                    "\(String(buffer: made.body))")
                #expect(try await call(client, .post, "/v1/vms/\(id)/systemd/services", a, svc).status == .conflict)
                let watchdog = try await call(
                    client, .post, "/v1/vms/\(id)/systemd/services", a,
                    #"{"name":"w","mode":"service","exec":["sleep 9"],"watchdogSec":5}"#)
                #expect(
                    watchdog.status == .badRequest && json(watchdog)["error"] as? String == "UNSUPPORTED_FIELD",
                    "\(String(buffer: watchdog.body))")
                let names =
                    (json(try await call(client, .get, "/v1/vms/\(id)/systemd/services", a))["services"]
                    as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(names == ["ticker"])
                // Three ticks take 0.6 s of the guest's time, more on a loaded TCG host: wait for
                // them rather than guess (one fresh-clone CI run had two after 1 s).
                let logs: [[String: Any]] =
                    try await eventually {
                        let got =
                            json(try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/logs?lines=3", a))[
                                "logs"] as? [[String: Any]] ?? []
                        return got.count >= 3 ? got : nil
                    } ?? []
                let status = try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/status", a)
                let statusLogs = try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/logs", a)
                #expect(
                    json(status)["activeState"] as? String == "active",
                    "\(String(buffer: status.body)) \(String(buffer: statusLogs.body))")
                #expect(
                    logs.count == 3 && logs.allSatisfy { ($0["message"] as? String)?.hasSuffix("tick") == true },
                    "\(logs)")
                // since: ISO 8601 or Unix seconds; lines carry their times.
                let lastTime = try #require(logs.last?["timestamp"] as? String)
                let recent =
                    json(
                        try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/logs?since=\(lastTime)", a))[
                        "logs"] as? [[String: Any]] ?? []
                #expect(
                    !recent.isEmpty && recent.allSatisfy { ($0["timestamp"] as? String ?? "") >= lastTime }, "\(recent)"
                )
                let future = Int(Date().timeIntervalSince1970) + 3600
                #expect(
                    (json(
                        try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/logs?since=\(future)", a))[
                            "logs"] as? [Any])?.isEmpty == true)
                #expect(
                    try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/logs?since=yesterday", a).status
                        == .badRequest)
                let offset = try await call(
                    client, .get,
                    "/v1/vms/\(id)/systemd/services/ticker/logs?since=2020-01-01T01:00:00.5%2B01:00&lines=2", a)
                #expect(
                    offset.status == .ok && (json(offset)["logs"] as? [Any])?.count == 2,
                    "an offset and fractions parse: \(String(buffer: offset.body))")
                let stop = try await call(
                    client, .post, "/v1/vms/\(id)/systemd/stop", a, #"{"services":[{"id":"ticker"},{"id":"nope"}]}"#)
                let results = json(stop)["results"] as? [[String: Any]] ?? []
                #expect(
                    results.count == 2 && results[0]["success"] as? Bool == true
                        && results[1]["success"] as? Bool == false, "\(results)")
                #expect(
                    json(try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/status", a))["activeState"]
                        as? String != "active")
                _ = try await call(client, .post, "/v1/vms/\(id)/systemd/start", a, #"{"services":[{"id":"ticker"}]}"#)
                let restarted = try await eventually {
                    json(try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/status", a))["activeState"]
                        as? String == "active" ? true : nil
                }
                #expect(restarted == true, "the ticker did not become active again after start")
                #expect(try await call(client, .delete, "/v1/vms/\(id)/systemd/services/ticker", a).status == .ok)
                let goneSvc = try await call(client, .get, "/v1/vms/\(id)/systemd/services/ticker/status", a)
                #expect(goneSvc.status == .notFound && json(goneSvc)["error"] as? String == "SERVICE_NOT_FOUND")
                #expect(try await call(client, .get, "/v1/vms/\(id)/systemd/services", b).status == .notFound)

                step("Terminals (made through the agent: the A")
                // Terminals (made through the agent: the API lists and reads them).
                _ = try await h.engine.vms.agent(id).request(
                    .terminalCreate(
                        name: "t1", command: ["/bin/sh", "-c", "echo term-out; sleep 30"], cols: 80, rows: 24))
                let terms =
                    (json(try await call(client, .get, "/v1/vms/\(id)/terminals", a))["terminals"] as? [[String: Any]]
                    ?? []).compactMap { $0["name"] as? String }
                #expect(terms == ["t1"])
                // The shell's echo lands when the guest gets to it: wait for it.
                var tlogs: [[String: Any]] = []
                _ = try await eventually {
                    tlogs =
                        json(try await call(client, .get, "/v1/vms/\(id)/terminals/t1/logs", a))["logs"]
                        as? [[String: Any]] ?? []
                    return tlogs.contains { ($0["line"] as? String)?.contains("term-out") == true } ? true : nil
                }
                #expect(tlogs.contains { ($0["line"] as? String)?.contains("term-out") == true }, "\(tlogs)")
                let xterm = try await call(client, .get, "/v1/vms/\(id)/terminals/t1/xterm-256color", a)
                #expect((json(xterm)["output"] as? String)?.contains("term-out") == true)
                #expect(try await call(client, .get, "/v1/vms/\(id)/terminals/nope/logs", a).status == .notFound)
                // exec-await in a terminal: made on first use; the shell's state (cwd, variables) stays;
                // output and status are the command's; a timeout interrupts it.
                let t1 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"cd /tmp && X=\"it's\" && echo \"$X\" here; echo err >&2","terminal":"work"}"#)
                #expect(
                    json(t1)["stdout"] as? String == "it's here\nerr\n" && json(t1)["statusCode"] as? Int == 0,
                    "\(String(buffer: t1.body))")
                let t2 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"pwd; echo $X\nexit_with() { return $1; }\nexit_with 3","terminal":"work"}"#)
                #expect(
                    json(t2)["stdout"] as? String == "/tmp\nit's\n" && json(t2)["statusCode"] as? Int == 3,
                    "\(String(buffer: t2.body))")
                let t3 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"sleep 30","terminal":"work","timeoutMs":500}"#)
                #expect(t3.status == .requestTimeout && json(t3)["error"] as? String == "EXEC_TIMED_OUT")
                let t4 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"echo after","terminal":"work"}"#)
                #expect(
                    json(t4)["stdout"] as? String == "after\n",
                    "the interrupted terminal takes the next command: \(String(buffer: t4.body))")
                // A syntax error (or a special built-in's error) ends the command, not the line: the
                // end marker still comes (once waited for the whole timeout: a fuzzer's "then").
                let t5 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"then","terminal":"work","timeoutMs":20000}"#)
                #expect(
                    t5.status == .ok && json(t5)["statusCode"] as? Int == 2
                        && (json(t5)["stdout"] as? String)?.contains("then") == true, "\(String(buffer: t5.body))")
                let t6 = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"shift 5","terminal":"work","timeoutMs":20000}"#)
                #expect(t6.status == .ok && (json(t6)["statusCode"] as? Int ?? 0) != 0, "\(String(buffer: t6.body))")
                #expect(
                    try await call(
                        client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"true","terminal":"../x"}"#
                    ).status == .badRequest)
                // Found by schemathesis: fields the document does not have were ignored.
                let extra = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"true","shell":"bash"}"#)
                #expect(
                    extra.status == .badRequest && json(extra)["error"] as? String == "UNSUPPORTED_FIELD",
                    "\(String(buffer: extra.body))")

                step("Streams: stats every 100 ms; file events")
                // Streams: stats every 100 ms; file events; both end when the client leaves, and the
                // VM's agent keeps answering.
                let stats = try await ndjsonLines(
                    port: client.port!, .GET, "/v1/vms/\(id)/stats/stream?interval_ms=100", key: a
                ) { $0.count >= 3 }
                #expect(stats.count >= 3 && stats.allSatisfy { ($0["memoryTotalBytes"] as? Int ?? 0) > 0 }, "\(stats)")
                _ = try await call(client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"mkdir -p /root/w"}"#)
                let port = client.port!
                let toucher = Task {
                    try await Task.sleep(for: .milliseconds(700))
                    _ = try await h.engine.vms.agent(id).exec(ExecRequest(argv: ["/bin/touch", "/root/w/new-file"]))
                }
                let events = try await ndjsonLines(
                    port: port, .POST, "/v1/vms/\(id)/watch-files", key: a, body: #"{"path":"/root/w"}"#
                ) { lines in
                    lines.contains { ($0["path"] as? String)?.hasSuffix("new-file") == true }
                }
                try await toucher.value
                #expect(events.contains { ($0["path"] as? String)?.hasSuffix("new-file") == true }, "\(events)")
                let after = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"echo still-here"}"#)
                #expect(json(after)["stdout"] as? String == "still-here\n")

                step("Optimize trims what the guest freed: the")
                // Optimize trims what the guest freed: the disk's stored data shrinks.
                _ = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", a,
                    #"{"command":"dd if=/dev/urandom of=/root/big bs=1M count=16 2>/dev/null; sync; rm /root/big; sync"}"#
                )
                step("optimize")
                let opt = try await call(client, .post, "/v1/vms/\(id)/optimize", a)
                let message = json(opt)["message"] as? String ?? ""
                let sizes = message.split(separator: " ").compactMap { Int($0) }
                #expect(
                    opt.status == .ok && message.contains("trimmed") && sizes.count >= 2
                        && sizes[sizes.count - 1] + 8 <= sizes[sizes.count - 2], "\(message)")
                #expect(try await call(client, .post, "/v1/vms/\(id)/optimize", b).status == .notFound)
                step("Resize grows the disk the guest sees; me")
                // Resize grows the disk the guest sees; memory cannot change live.
                let sectors = { () async throws -> Int in
                    Int(
                        (json(
                            try await call(
                                client, .post, "/v1/vms/\(id)/exec-await", a, #"{"command":"cat /sys/block/vda/size"}"#)
                        )["stdout"] as? String ?? "")
                        .trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
                }
                #expect(try await sectors() < 2 << 21)
                let resized = try await call(client, .post, "/v1/vms/\(id)/resize", a, #"{"rootfsSizeGb":2}"#)
                #expect(resized.status == .ok, "\(String(buffer: resized.body))")
                #expect(try await sectors() == 2 << 21)
                #expect(
                    try await call(client, .post, "/v1/vms/\(id)/resize", a, #"{"memSizeGb":2}"#).status == .badRequest)
                #expect(
                    try await call(client, .post, "/v1/vms/\(id)/resize", a, #"{"rootfsSizeGb":1}"#).status
                        == .badRequest)

            }
            step("teardown")
        }
        step("done")
    }
}

@Suite(.enabled(if: apiVMAvailable)) struct VMCommandTests {
    /// `furcate vm` against a live server: create, ls, exec (exit status passed through), fork,
    /// snapshot, rm; a wrong key and a missing VM fail with the server's reason.
    @Test func cliClient() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let app = APIServer.buildApplication(h.engine, host: "127.0.0.1", port: 0)
            try await app.test(.live) { client in
                let env = ["FURCATE_URL": "http://127.0.0.1:\(client.port!)", "FURCATE_API_KEY": h.keyA]
                // On a thread of its own: the server answering it runs on the cooperative pool,
                // which a command waited for synchronously would hold a thread of.
                func vm(_ args: [String], key: String? = nil) async throws -> (status: Int32, output: String) {
                    let e = key.map { env.merging(["FURCATE_API_KEY": $0]) { $1 } } ?? env
                    return try await onThread("furcate-vm") { try runCommand([furcateBinary, "vm"] + args, env: e) }
                }
                let created = try await vm(["create", "--snapshot", h.snapshot])
                let id = created.output.trimmingCharacters(in: .whitespacesAndNewlines)
                #expect(created.status == 0 && id.count == 20, "\(created)")
                #expect(try await vm(["ls"]).output.contains(id))
                let exec = try await vm(["exec", id, "--", "echo out; echo err >&2; exit 7"])
                #expect(exec.status == 7 && exec.output.contains("out") && exec.output.contains("err"), "\(exec)")
                let forks = try await vm(["fork", "--count", "2", id])
                #expect(forks.status == 0 && forks.output.split(separator: "\n").count == 2, "\(forks)")
                let snap = try await vm(["snapshot", "--name", "cli", id])
                #expect(snap.status == 0 && snap.output.hasPrefix("sc-"), "\(snap)")
                #expect(try await vm(["rm", id]).status == 0)
                let gone = try await vm(["exec", id, "--", "true"])
                #expect(gone.status == 1 && gone.output.contains("404"), "\(gone)")
                let wrongKey = try await vm(["ls"], key: "fk_wrong")
                #expect(wrongKey.status == 1 && wrongKey.output.contains("401"), "\(wrongKey)")
            }
        }
    }
}

@Suite(.enabled(if: apiVMAvailable)) struct DescriptorTests {
    /// QEMU gets none of the server's descriptors: one opened without O_CLOEXEC (as the HTTP
    /// server's accepted connections were) stays out of the VM process.
    @Test func qemuInheritsNoDescriptors() async throws {
        try await withAPIHarness { h in
            let marker = h.tmp.sub("inherited-marker")
            let fd = open(marker, O_CREAT | O_RDWR, 0o600)  // deliberately without O_CLOEXEC
            #expect(fd >= 0)
            defer { close(fd) }
            let vm = try await h.engine.vms.create(CreateVMRequest(image: "rootfs"))
            let pid = try #require(try await h.engine.vms.info(vm.id).pid)
            let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
            let targets = fds.compactMap {
                try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")
            }
            // (The kernel's link has no doubled slashes; compare the file name.)
            #expect(!targets.isEmpty && !targets.contains { $0.hasSuffix("/inherited-marker") }, "\(targets)")
        }
    }
}
