import APIServer
import Foundation
import FurcateEngine
import FurcateTestSupport
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Testing
import VMService

/// Idle timeouts, persistence (sticky eviction under a quota, ephemeral), lifetimes and the
/// ready signal — on real VMs over real HTTP. `tick(now:)` is driven with a clock of the
/// test's own, so nothing waits for minutes.
@Suite(.enabled(if: apiVMAvailable)) struct PolicyTests {
    @Test func idleSuspendWakeEvictAndExpire() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let app = APIServer.buildApplication(h.engine, host: "127.0.0.1", port: 0)
            let policies = h.engine.policies
            try await app.test(.live) { client in
                let a = h.keyA
                step("405 with Allow for a method a path does not have, in each dialect's shape; 404 for no path")
                let wrongMethod = try await call(client, .delete, "/v1/vms", a)
                #expect(
                    wrongMethod.status == .methodNotAllowed && wrongMethod.headers[.allow] == "GET, POST",
                    "\(wrongMethod.headers)")
                #expect(json(wrongMethod)["error"] as? String == "METHOD_NOT_ALLOWED")
                let wrongFile = try await call(client, .post, "/v1/vms/abc/files/etc/hostname", a)
                #expect(wrongFile.status == .methodNotAllowed && wrongFile.headers[.allow] == "GET, PUT")
                let instaWrong = try await call(client, .put, "/instavm/v1/snapshots", a)
                #expect(
                    instaWrong.status == .methodNotAllowed && json(instaWrong)["detail"] is String
                        && instaWrong.headers[.allow] != nil)
                #expect(try await call(client, .delete, "/v1/nothing-here", a).status == .notFound)
                // A literal segment wins over a capture, as in the router (schemathesis: DELETE was
                // advertised for /v1/vms/snapshots, from /v1/vms/{vm_id}).
                #expect(try await call(client, .options, "/v1/vms/snapshots", a).headers[.allow] == "GET, POST")

                step("policies: bad settings are refused")
                for (body, why) in [
                    (#"{"snapshotId":"\#(h.snapshot)","persistence":{"type":"forever"}}"#, "persistence.type"),
                    (#"{"snapshotId":"\#(h.snapshot)","persistence":{"type":"sticky","priority":11}}"#, "priority"),
                    (
                        #"{"snapshotId":"\#(h.snapshot)","persistence":{"type":"persistent","priority":1}}"#,
                        "no field 'priority'"
                    ),
                    (#"{"snapshotId":"\#(h.snapshot)","idleTimeoutSeconds":-1}"#, "idleTimeoutSeconds"),
                    (
                        #"{"snapshotId":"\#(h.snapshot)","readySignalTimeoutSeconds":99999}"#,
                        "readySignalTimeoutSeconds"
                    ),
                    (#"{"snapshotId":"\#(h.snapshot)","waitForReadySignal":1}"#, "waitForReadySignal"),
                    (
                        #"{"spec":{"snapshot":{"snapshotId":"\#(h.snapshot)","ports":[{"port":443,"targetPort":3000}]}}}"#,
                        "ports"
                    ),
                ] {
                    let r = try await call(client, .post, "/v1/vms", a, body)
                    #expect(
                        r.status == .badRequest && (json(r)["message"] as? String)?.contains(why) == true,
                        "\(body): \(String(buffer: r.body))")
                }
                #expect(await h.engine.vms.list().isEmpty, "a refused create leaves no VM")

                step("policies: a sticky VM with an idle timeout, an ephemeral one, a default one")
                let sticky = try await call(
                    client, .post, "/v1/vms", a,
                    #"{"snapshotId":"\#(h.snapshot)","idleTimeoutSeconds":30,"persistence":{"type":"sticky","priority":1}}"#
                )
                let s = try #require(json(sticky)["id"] as? String, "\(String(buffer: sticky.body))")
                // waitForReadySignal (the default): the agent answers as soon as create returns.
                let hi = try await call(client, .post, "/v1/vms/\(s)/exec-await", a, #"{"command":"echo ready"}"#)
                #expect(json(hi)["stdout"] as? String == "ready\n")
                let eph = try await call(
                    client, .post, "/v1/vms", a,
                    #"{"snapshotId":"\#(h.snapshot)","idleTimeoutSeconds":30,"waitForReadySignal":false,"persistence":{"type":"ephemeral"}}"#
                )
                let e = try #require(json(eph)["id"] as? String, "\(String(buffer: eph.body))")
                let plain = try await call(
                    client, .post, "/v1/vms", a, #"{"snapshotId":"\#(h.snapshot)","persistence":{"type":"persistent"}}"#
                )
                let p = try #require(json(plain)["id"] as? String)
                let shown = json(try await call(client, .get, "/v1/vms", a))["vms"] as? [[String: Any]] ?? []
                let persistence = Dictionary(
                    uniqueKeysWithValues: shown.map {
                        ($0["id"] as? String ?? "", $0["persistence"] as? [String: Any] ?? [:])
                    })
                #expect(
                    persistence[s]?["type"] as? String == "sticky" && persistence[s]?["priority"] as? Int == 1,
                    "\(shown)")
                #expect(
                    persistence[e]?["type"] as? String == "ephemeral"
                        && persistence[p]?["type"] as? String == "persistent", "\(shown)")
                #expect(try await policies.policy(p)?.idleTimeoutSeconds == 300, "the server's default idle timeout")

                step("policies: nothing is idle before its timeout")
                // Counted from now: the sticky VM's last request may be long ago on a loaded host.
                #expect(try await call(client, .get, "/v1/vms/\(s)", a).status == .ok)
                let t0 = Date().timeIntervalSince1970
                #expect(await policies.tick(engine: h.engine, now: t0 + 10).isEmpty)

                step("policies: a request in flight keeps its VM awake")
                let long = Task {
                    try await call(client, .post, "/v1/vms/\(s)/exec-await", a, #"{"command":"sleep 3; echo done"}"#)
                }
                for _ in 0..<100 where !(await policies.busy(s)) { try await Task.sleep(for: .milliseconds(20)) }
                #expect(await policies.busy(s))
                let during = await policies.tick(engine: h.engine, now: t0 + 100)
                #expect(!during.contains(.suspendedIdle(vm: s)) && during.contains(.deletedIdle(vm: e)), "\(during)")
                #expect(json(try await long.value)["stdout"] as? String == "done\n")
                #expect(
                    try await call(client, .get, "/v1/vms/\(e)", a).status == .notFound,
                    "the idle ephemeral VM is deleted")

                step("policies: idle sticky VM suspended; a request to its guest resumes it")
                let after = await policies.tick(engine: h.engine, now: Date().timeIntervalSince1970 + 31)
                #expect(after == [.suspendedIdle(vm: s)], "\(after)")
                #expect(json(try await call(client, .get, "/v1/vms/\(s)", a))["state"] as? String == "suspended")
                let woke = try await call(client, .post, "/v1/vms/\(s)/exec-await", a, #"{"command":"echo awake"}"#)
                #expect(json(woke)["stdout"] as? String == "awake\n", "\(String(buffer: woke.body))")
                #expect(json(try await call(client, .get, "/v1/vms/\(s)", a))["state"] as? String == "running")

                step("policies: over its quota, account a loses sticky things, lowest priority first")
                let snap = try await call(
                    client, .post, "/v1/vms/\(s)/snapshot", a, #"{"persistence":{"type":"sticky","priority":0}}"#)
                let sid = try #require(json(snap)["snapshotId"] as? String)
                #expect(try await call(client, .post, "/v1/vms/\(s)/suspend", a).status == .ok)
                #expect(await policies.tick(engine: h.engine).isEmpty, "no quota, nothing evicted")
                await policies.setQuota(1)
                let evicted = await policies.tick(engine: h.engine)
                #expect(evicted == [.evictedSnapshot(sid, account: "a"), .evictedVM(s, account: "a")], "\(evicted)")
                #expect(try await call(client, .get, "/v1/vms/\(s)", a).status == .notFound)
                #expect(try await call(client, .get, "/v1/snapshots/\(sid)", a).status == .notFound)
                #expect(
                    json(try await call(client, .get, "/v1/vms/\(p)", a))["state"] as? String == "running",
                    "persistent VMs stay")
                await policies.setQuota(nil)

                step("policies: an InstaVM lifetime is kept across a restart and ends the VM")
                var headers = HTTPFields()
                headers[HTTPField.Name("X-API-Key")!] = a
                headers[.contentType] = "application/json"
                let insta = try await client.execute(
                    uri: "/instavm/v1/vms", method: .post, headers: headers,
                    body: ByteBuffer(string: #"{"snapshot_id":"\#(h.snapshot)","vm_lifetime_seconds":20}"#))
                let iv = try #require(json(insta)["vm_id"] as? String, "\(String(buffer: insta.body))")
                let got = try await client.execute(uri: "/instavm/v1/vms/\(iv)", method: .get, headers: headers)
                #expect(json(got)["expires_at"] is String, "\(String(buffer: got.body))")
                let restarted = Engine(
                    vms: h.engine.vms, images: h.engine.images, builds: h.engine.builds, keys: h.engine.keys,
                    owners: h.engine.owners,
                    defaultImage: h.engine.defaultImage)
                let expiry = try #require(try await restarted.policies.policy(iv)?.expiresAt)
                #expect(await restarted.policies.tick(engine: restarted, now: expiry - 1).isEmpty)
                #expect(await restarted.policies.tick(engine: restarted, now: expiry + 1) == [.expired(vm: iv)])
                #expect(
                    try await client.execute(uri: "/instavm/v1/vms/\(iv)", method: .get, headers: headers).status
                        == .notFound)
            }
        }
    }
}

@Suite struct OwnerStoreTests {
    /// Owners are served from memory and written through: a reopened store finds every row,
    /// by id and by account, and a removed or re-owned id is gone from its old account.
    @Test func ownersSurviveReopeningAndAreFoundByAccount() throws {
        let tmp = TempDir("owners")
        let path = tmp.sub("owners.sqlite")
        do {
            let owners = try OwnerStore(path: path)
            try owners.set("vm-1", account: "a", name: "first")
            try owners.set("vm-2", account: "a")
            try owners.set("vm-3", account: "b")
            try owners.set("vm-4", account: "a")
            try owners.remove("vm-4")
            try owners.set("vm-2", account: "b")
        }
        let owners = try OwnerStore(path: path)
        let mine = owners.owned(by: "a")
        #expect(Array(mine.keys) == ["vm-1"] && mine["vm-1"] == .some("first"), "\(mine)")
        #expect(owners.owned(by: "b").keys.sorted() == ["vm-2", "vm-3"])
        #expect(owners.owner("vm-2") == "b" && owners.owner("vm-4") == nil && owners.name("vm-1") == "first")
    }
}

@Suite(.enabled(if: apiVMAvailable)) struct CrossAccountTests {
    /// Every route with an id in it (taken from the router itself, so a new route is covered
    /// without editing this test), called by account B with account A's ids: 404 each time, and
    /// nothing of A's changes.
    @Test func anotherAccountsIdsAre404OnEveryRoute() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let router = APIServer.router(h.engine)
            let routes = router.routes.map { (path: $0.path.components.map(\.description), method: $0.method) }
            let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
            try await app.test(.live) { client in
                let (a, b) = (h.keyA, h.keyB)
                step("cross-account: account a's VM, snapshot, build, service, terminal, file")
                let vm = try #require(
                    json(try await call(client, .post, "/v1/vms", a, #"{"snapshotId":"\#(h.snapshot)"}"#))["id"]
                        as? String)
                let snap = try #require(
                    json(try await call(client, .post, "/v1/vms/\(vm)/snapshot", a, "{}"))["snapshotId"] as? String)
                let built = try await call(
                    client, .post, "/v1/vms/snapshots", a,
                    #"{"spec":{"snapshotId":"\#(snap)","additionalFiles":{"/etc/x":{"content":"x"}}}}"#)
                let builtId = try #require(json(built)["snapshotId"] as? String, "\(String(buffer: built.body))")
                var build: String?
                for _ in 0..<600 where build == nil {
                    build = json(try await call(client, .get, "/v1/vms/snapshots/\(builtId)", a))["buildId"] as? String
                    if build == nil { try await Task.sleep(for: .milliseconds(100)) }
                }
                let svc = try await call(
                    client, .post, "/v1/vms/\(vm)/systemd/services", a,
                    #"{"name":"svc","mode":"service","exec":["sleep 1000"]}"#)
                #expect(svc.status == .ok, "\(String(buffer: svc.body))")
                let wrote = try await call(
                    client, .post, "/v1/vms/\(vm)/exec-await", a,
                    #"{"command":"echo mine > /root/mine && cat /root/mine","terminal":"t"}"#)
                // A fresh-clone CI run found no /root/mine later; this says what the terminal did.
                #expect(
                    wrote.status == .ok && json(wrote)["statusCode"] as? Int == 0
                        && json(wrote)["stdout"] as? String == "mine\n", "\(wrote.status) \(String(buffer: wrote.body))"
                )

                step("cross-account: account b on every route")
                var checked = 0
                for route in routes {
                    var parts: [String] = []
                    var hasID = false
                    for (i, s) in route.path.enumerated() {
                        let previous = i > 0 ? route.path[i - 1] : ""
                        switch s {
                        case "{vm_id}": parts.append(vm)
                        case "{snapshot_id}": parts.append(snap)
                        case "{build_id}": parts.append(try #require(build))
                        case "{service_id}": parts.append("svc")
                        case "{terminal_id}": parts.append("t")
                        case "{id}": parts.append(previous == "snapshots" ? snap : vm)
                        case "**": parts.append("root/mine")
                        default:
                            parts.append(s)
                            continue
                        }
                        hasID = true
                    }
                    guard hasID else { continue }
                    let path = "/" + parts.joined(separator: "/")
                    let body: String? =
                        switch route.method {
                        case .get, .delete: nil
                        case .put: #"{"content":"theirs"}"#
                        default:
                            path.hasSuffix("/exec-await")
                                ? #"{"command":"echo theirs > /root/mine"}"#
                                : path.hasSuffix("/resize")
                                    ? #"{"rootfsSizeGb":2}"#
                                    : path.contains("/systemd/s") && !path.hasSuffix("/services")
                                        ? #"{"services":[{"id":"svc"}]}"#
                                        : path.hasSuffix("/services")
                                            ? #"{"name":"other","mode":"oneshot","exec":["true"]}"#
                                            : path.contains("/snapshots/") && route.method == .patch
                                                ? #"{"name":"theirs"}"# : "{}"
                        }
                    let r = try await call(client, route.method, path, b, body)
                    #expect(
                        r.status == .notFound,
                        "\(route.method) \(path): \(r.status) \(String(buffer: r.body).prefix(200))")
                    checked += 1
                }
                // The InstaVM session routes name the VM in their body.
                for (path, body) in [
                    ("/instavm/execute", #"{"command":"echo theirs > /root/mine","session_id":"\#(vm)"}"#),
                    ("/instavm/kill", #"{"session_id":"\#(vm)"}"#),
                ] {
                    let r = try await call(client, .post, path, b, body)
                    #expect(r.status == .notFound, "\(path): \(r.status) \(String(buffer: r.body).prefix(200))")
                }
                for (path, form) in [("/instavm/download", "filename=/root/mine&session_id=\(vm)")] {
                    let r = try await client.execute(
                        uri: path, method: .post,
                        headers: [.authorization: "Bearer " + b, .contentType: "application/x-www-form-urlencoded"],
                        body: ByteBuffer(string: form))
                    #expect(r.status == .notFound, "\(path): \(r.status) \(String(buffer: r.body).prefix(200))")
                }
                #expect(checked >= 40, "\(checked) routes with ids")

                step("cross-account: nothing of account a's changed")
                #expect(json(try await call(client, .get, "/v1/vms/\(vm)", a))["state"] as? String == "running")
                #expect(
                    json(try await call(client, .get, "/v1/vms", a))["totalCount"] as? Int == 1, "no fork, no new VM")
                let file = try await call(client, .get, "/v1/vms/\(vm)/files/root/mine", a)
                #expect(json(file)["content"] as? String == "mine\n", "\(String(buffer: file.body))")
                #expect(json(try await call(client, .get, "/v1/vms/snapshots/\(snap)", a))["deleted"] as? Bool == false)
                #expect(
                    json(try await call(client, .get, "/v1/vms/\(vm)/systemd/services/svc/status", a))["activeState"]
                        as? String == "active")
                let names =
                    (json(try await call(client, .get, "/v1/vms/\(vm)/systemd/services", a))["services"]
                    as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(names == ["svc"])
            }
        }
    }
}
