import APIServer
import Accounts
import BlockStore
import Builds
import Foundation
import FurcateCore
import FurcateEngine
import FurcateTestSupport
import GuestAgentProtocol
import Hummingbird
import HummingbirdTesting
import Hypervisor
import Images
import StoreFS
import Testing
import VMNetwork
import VMService

#if canImport(Glibc)
    import Glibc
#endif

let guestDir =
    ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"] ?? (NSHomeDirectory() + "/.local/share/furcate/guest")

let apiVMUnavailable: String? = {
    if access("/dev/fuse", R_OK | W_OK) != 0 { return "/dev/fuse is not usable" }
    if geteuid() != 0 { return "mounting needs root" }
    if access(QEMUProcess.binary, X_OK) != 0 { return "\(QEMUProcess.binary) is not installed" }
    for a in ["vmlinuz", "initrd.img", "furcate-agent", "test-rootfs.ext4"] where access(guestDir + "/" + a, R_OK) != 0
    {
        return "\(guestDir)/\(a) is missing (scripts/guest-artifacts.sh builds it)"
    }
    return nil
}()
let apiVMAvailable = facilityAvailable("API VM tests", unavailable: apiVMUnavailable)

/// The engine over a temporary directory (store, mount, services), keys for two accounts, and a
/// snapshot of the test rootfs owned by account a.
final class APIHarness: @unchecked Sendable {
    let tmp = TempDir("api")
    let store: BlockStore
    let mount: BackgroundMount
    let engine: Engine
    let keyA: String
    let keyB: String
    var snapshot = ""

    init(networks: NetworkHost? = nil) throws {
        store = try BlockStore.create(at: tmp.sub("store"))
        let rootfs = try store.createFile("rootfs")
        let fd = open(guestDir + "/test-rootfs.ext4", O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        try FileTransfer.importFile(fd: fd, path: guestDir + "/test-rootfs.ext4", into: rootfs)
        try FileManager.default.createDirectory(atPath: tmp.sub("mnt"), withIntermediateDirectories: true)
        mount = try StoreFS(store: store, mountpoint: tmp.sub("mnt")).startInBackground()
        var o = VMServiceOptions(dataDirectory: tmp.sub("vms"), mountpoint: tmp.sub("mnt"), guestDirectory: guestDir)
        o.defaultMemoryMiB = 128
        o.gracefulStopTimeout = .milliseconds(300)
        // The same limit on every host (the default grows with its cores and memory).
        o.capacity = VMCapacity(vcpus: 16, memoryMiB: 16 << 10)
        o.networks = networks
        let vms = try VMService(store: store, options: o)
        let images = try ImageService(
            store: store,
            options: ImageServiceOptions(directory: tmp.sub("images"), agentPath: guestDir + "/furcate-agent"))
        let builds = try BuildService(
            images: images, vms: vms, options: BuildServiceOptions(directory: tmp.sub("builds")))
        let keys = try KeyStore(path: tmp.sub("keys.sqlite"))
        keyA = try keys.create(account: "a").secret
        keyB = try keys.create(account: "b").secret
        engine = Engine(
            vms: vms, images: images, builds: builds, keys: keys,
            owners: try OwnerStore(path: tmp.sub("owners.sqlite")),
            defaultImage: tmp.sub("no-default-image.tar"))
    }

    /// Boots the test rootfs, snapshots it for account a, deletes the VM.
    func makeSnapshot() async throws {
        let vm = try await engine.vms.create(CreateVMRequest(image: "rootfs"))
        let agent = try await engine.vms.agent(vm.id, timeout: .seconds(60))
        // The agent answers before the test rootfs's init has mounted /tmp and /dev/pts (and
        // set the hostname, its last step): a snapshot taken then has init still mounting in
        // every VM made from it (a terminal opened meanwhile failed: posix_openpt ENOENT).
        let booted = try await eventually(within: .seconds(60)) { () async throws -> Bool? in
            let r = try await agent.exec(
                ExecRequest(
                    argv: [
                        "/bin/sh", "-c",
                        "grep -q ' /dev/pts devpts ' /proc/mounts && [ \"$(hostname)\" = furcate-test ]",
                    ],
                    timeoutMs: 10_000))
            return r.exitCode == 0 ? true : nil
        }
        guard booted == true else { throw FurcateError(.timedOut, "the test rootfs's init did not finish") }
        snapshot = try engine.recordVMSnapshot(try await engine.vms.snapshot(vm.id), account: "a").id
        try await engine.vms.delete(vm.id)
    }

    func tearDown() async {
        for vm in await engine.vms.list() { try? await engine.vms.delete(vm.id) }
        mount.stopChecked()
        store.close()
    }
}

/// Runs `body` with a fresh harness and tears it down even when `body` fails (a failed test
/// otherwise left its QEMUs running and its store mounted).
func withAPIHarness(networks: NetworkHost? = nil, _ body: (APIHarness) async throws -> Void) async throws {
    let h = try APIHarness(networks: networks)
    do { try await body(h) } catch {
        await h.tearDown()
        throw error
    }
    await h.tearDown()
}

func json(_ r: TestResponse) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(buffer: r.body))) as? [String: Any] ?? [:]
}

func auth(_ key: String) -> HTTPFields {
    var h = HTTPFields()
    h[.authorization] = "Bearer " + key
    h[.contentType] = "application/json"
    return h
}

@Suite(.enabled(if: apiVMAvailable)) struct FreestyleAPITests {
    @Test func vmsOverRealHTTPWithKeysAndAccounts() async throws {
        try await withAPIHarness { h in
            try await h.makeSnapshot()
            let app = APIServer.buildApplication(h.engine, host: "127.0.0.1", port: 0)
            try await app.test(.ahc(.http)) { client in
                // No key, a wrong key: 401 with the document's error body.
                let anon = try await client.execute(uri: "/v1/vms", method: .get)
                #expect(anon.status == .unauthorized && json(anon)["error"] as? String == "UNAUTHORIZED")
                let wrong = try await client.execute(uri: "/v1/vms", method: .get, headers: auth("fk_nope"))
                #expect(wrong.status == .unauthorized)

                // Fields not honoured yet are refused, not ignored.
                let recreate = try await call(
                    client, .post, "/v1/vms", h.keyA, #"{"snapshotId":"\#(h.snapshot)","recreate":true}"#)
                #expect(
                    recreate.status == .badRequest && json(recreate)["error"] as? String == "UNSUPPORTED_FIELD",
                    "\(String(buffer: recreate.body))")
                // Ports Freestyle does not expose, malformed domains: 400 naming the field.
                let port80 = try await call(
                    client, .post, "/v1/vms", h.keyA,
                    #"{"snapshotId":"\#(h.snapshot)","ports":[{"port":80,"targetPort":3000}]}"#)
                #expect(
                    port80.status == .badRequest
                        && (json(port80)["message"] as? String)?.contains("ports.0.port") == true,
                    "\(String(buffer: port80.body))")
                let badDomain = try await call(
                    client, .post, "/v1/vms", h.keyA,
                    #"{"snapshotId":"\#(h.snapshot)","domains":[{"domain":"no spaces.example","vmPort":3000}]}"#)
                #expect(
                    badDomain.status == .badRequest
                        && (json(badDomain)["message"] as? String)?.contains("domains.0.domain") == true,
                    "\(String(buffer: badDomain.body))")
                // Fields a port or domain object does not have are refused (found by schemathesis).
                let extraField = try await call(
                    client, .post, "/v1/vms", h.keyA,
                    #"{"snapshotId":"\#(h.snapshot)","domains":[{"domain":"a.example","vmPort":1,"x":42}]}"#)
                #expect(
                    extraField.status == .badRequest && json(extraField)["error"] as? String == "UNSUPPORTED_FIELD",
                    "\(String(buffer: extraField.body))")
                // A VmSpec whose name is not a string is refused, not built (found by schemathesis).
                let badSpec = try await call(client, .post, "/v1/vms", h.keyA, #"{"spec":{"snapshot":null,"name":{}}}"#)
                #expect(
                    badSpec.status == .badRequest
                        && (json(badSpec)["message"] as? String)?.contains("spec.name") == true,
                    "\(String(buffer: badSpec.body))")
                // A multipart part whose header name is not ASCII is a 422, not the end of the
                // server (MultipartKit traps on it; found by schemathesis).
                var form = auth(h.keyA)
                form[.contentType] = "multipart/form-data; boundary=zz"
                let malformed = try await client.execute(
                    uri: "/instavm/upload", method: .post, headers: form,
                    body: ByteBuffer(bytes: Array("--zz\r\n".utf8) + [0xC1, 0xB4, 0xF0] + Array("CY--zz--\r\n".utf8)))
                #expect(malformed.status == .unprocessableContent, "\(String(buffer: malformed.body))")

                let created = try await call(client, .post, "/v1/vms", h.keyA, #"{"snapshotId":"\#(h.snapshot)"}"#)
                #expect(created.status == .ok, "\(String(buffer: created.body))")
                let id = try #require(json(created)["id"] as? String)
                #expect(
                    json(created)["snapshotId"] as? String == h.snapshot
                        && (json(created)["domains"] as? [String]) == [])

                let list = try await call(client, .get, "/v1/vms", h.keyA)
                #expect(json(list)["totalCount"] as? Int == 1 && json(list)["runningCount"] as? Int == 1)
                let got = try await call(client, .get, "/v1/vms/\(id)", h.keyA)
                #expect(json(got)["state"] as? String == "running")

                // Another account: the VM does not exist for it, on every route; its snapshot neither.
                let other = try await call(client, .get, "/v1/vms/\(id)", h.keyB)
                #expect(other.status == .notFound && json(other)["error"] as? String == "VM_NOT_FOUND")
                let otherExec = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", h.keyB, #"{"command":"true"}"#)
                #expect(otherExec.status == .notFound)
                let otherDelete = try await call(client, .delete, "/v1/vms/\(id)", h.keyB)
                #expect(otherDelete.status == .notFound)
                let otherList = try await call(client, .get, "/v1/vms", h.keyB)
                #expect(json(otherList)["totalCount"] as? Int == 0)
                let otherSnap = try await call(client, .post, "/v1/vms", h.keyB, #"{"snapshotId":"\#(h.snapshot)"}"#)
                #expect(otherSnap.status == .notFound)

                // exec-await: output and status; a timeout is 408 ExecTimedOut.
                let exec = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", h.keyA, #"{"command":"echo hi; echo err >&2; exit 3"}"#)
                #expect(
                    json(exec)["stdout"] as? String == "hi\n" && json(exec)["stderr"] as? String == "err\n"
                        && json(exec)["statusCode"] as? Int == 3, "\(String(buffer: exec.body))")
                let slow = try await call(
                    client, .post, "/v1/vms/\(id)/exec-await", h.keyA, #"{"command":"sleep 5","timeoutMs":300}"#)
                #expect(
                    slow.status == .requestTimeout && json(slow)["error"] as? String == "EXEC_TIMED_OUT",
                    "\(String(buffer: slow.body))")
                let bad = try await call(client, .post, "/v1/vms/\(id)/exec-await", h.keyA, #"{"cmd":"x"}"#)
                #expect(bad.status == .badRequest, "\(String(buffer: bad.body))")

                // Files: write (utf8 and base64, parents made), read back, list a directory, errors.
                let put = try await call(
                    client, .put, "/v1/vms/\(id)/files/root/api/hello.txt", h.keyA, #"{"content":"hello über\n"}"#)
                #expect(put.status == .ok, "\(String(buffer: put.body))")
                let bin = Data([0, 1, 2, 255, 254])
                let putBin = try await client.execute(
                    uri: "/v1/vms/\(id)/files/root/api/blob", method: .put, headers: auth(h.keyA),
                    body: ByteBuffer(string: #"{"content":"\#(bin.base64EncodedString())","encoding":"base64"}"#))
                #expect(putBin.status == .ok)
                let text = try await call(client, .get, "/v1/vms/\(id)/files/root/api/hello.txt", h.keyA)
                #expect(
                    json(text)["content"] as? String == "hello über\n" && json(text)["encoding"] as? String == "utf8",
                    "\(String(buffer: text.body))")
                let blob = try await call(client, .get, "/v1/vms/\(id)/files/root/api/blob", h.keyA)
                #expect(
                    json(blob)["encoding"] as? String == "base64"
                        && Data(base64Encoded: json(blob)["content"] as? String ?? "") == bin)
                let dir = try await call(client, .get, "/v1/vms/\(id)/files/root/api", h.keyA)
                let names = (json(dir)["files"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(names == ["blob", "hello.txt"], "\(String(buffer: dir.body))")
                let missing = try await call(client, .get, "/v1/vms/\(id)/files/root/api/nope", h.keyA)
                #expect(missing.status == .notFound && json(missing)["error"] as? String == "FILE_NOT_FOUND")
                let traversal = try await call(client, .get, "/v1/vms/\(id)/files/root/../etc/passwd", h.keyA)
                #expect(traversal.status == .badRequest || traversal.status == .notFound, "\(traversal.status)")
                let otherFile = try await call(client, .get, "/v1/vms/\(id)/files/root/api/hello.txt", h.keyB)
                #expect(otherFile.status == .notFound && json(otherFile)["error"] as? String == "VM_NOT_FOUND")

                // Snapshot, fork, suspend/start, stop, await, kill.
                let snap = try await call(client, .post, "/v1/vms/\(id)/snapshot", h.keyA, "{}")
                #expect(
                    snap.status == .ok && (json(snap)["snapshotId"] as? String)?.hasPrefix("sc-") == true
                        && json(snap)["sourceVmId"] as? String == id)
                let fork = try await call(client, .post, "/v1/vms/\(id)/fork", h.keyA, #"{"count":2}"#)
                let forks = (json(fork)["forks"] as? [[String: Any]] ?? []).compactMap { $0["id"] as? String }
                #expect(
                    fork.status == .ok && forks.count == 2 && json(fork)["vmId"] as? String == id,
                    "\(String(buffer: fork.body))")
                let badCount = try await call(client, .post, "/v1/vms/\(id)/fork", h.keyA, #"{"count":0}"#)
                #expect(badCount.status == .badRequest)
                let otherFork = try await call(client, .post, "/v1/vms/\(id)/fork", h.keyB, "{}")
                #expect(otherFork.status == .notFound)
                let tooMany = try await call(client, .post, "/v1/vms/\(id)/fork", h.keyA, #"{"count":100}"#)
                #expect(
                    tooMany.status == .tooManyRequests && json(tooMany)["error"] as? String == "HOST_AT_CAPACITY"
                        && (json(tooMany)["message"] as? String)?.contains("of 16 this host admits") == true,
                    "\(tooMany.status) \(String(buffer: tooMany.body))")
                let afterFork = try await call(client, .get, "/v1/vms", h.keyA)
                #expect(json(afterFork)["totalCount"] as? Int == 3)
                let f0 = forks[0]
                let forkExec = try await call(
                    client, .post, "/v1/vms/\(f0)/exec-await", h.keyA,
                    #"{"command":"echo synced > /root/fork-marker && sync && hostname"}"#)
                #expect(
                    (json(forkExec)["stdout"] as? String)?.hasPrefix(f0) == true,
                    "a fork gets its own identity: \(String(buffer: forkExec.body))")
                let suspended = try await call(client, .post, "/v1/vms/\(f0)/suspend", h.keyA)
                #expect(
                    suspended.status == .ok
                        && (json(suspended)["snapshotLayerId"] as? String)?.hasPrefix("sl-") == true,
                    "\(String(buffer: suspended.body))")
                #expect(json(try await call(client, .get, "/v1/vms/\(f0)", h.keyA))["state"] as? String == "suspended")
                let started = try await call(client, .post, "/v1/vms/\(f0)/start", h.keyA, "{}")
                #expect(started.status == .ok && json(started)["id"] as? String == f0)
                #expect(json(try await call(client, .get, "/v1/vms/\(f0)", h.keyA))["state"] as? String == "running")
                let stopped = try await call(client, .post, "/v1/vms/\(f0)/stop", h.keyA)
                #expect(stopped.status == .ok && json(stopped)["vmId"] as? String == f0)
                let again = try await call(client, .post, "/v1/vms/\(f0)/stop", h.keyA)
                #expect(again.status == .badRequest && json(again)["error"] as? String == "VM_NOT_RUNNING")
                let waited = try await call(client, .post, "/v1/vms/\(f0)/await", h.keyA)
                #expect(json(waited)["exitStatus"] as? String == "stopped")
                let killed = try await call(client, .post, "/v1/vms/\(forks[1])/kill", h.keyA)
                #expect(killed.status == .ok)
                #expect(
                    json(try await call(client, .get, "/v1/vms/\(forks[1])", h.keyA))["state"] as? String == "stopped")
                // A stopped VM boots again from its disk: by Freestyle's start, or InstaVM's resume.
                let restarted = try await call(client, .post, "/v1/vms/\(f0)/start", h.keyA, "{}")
                #expect(restarted.status == .ok, "\(String(buffer: restarted.body))")
                let rebooted = try await call(
                    client, .post, "/v1/vms/\(f0)/exec-await", h.keyA, #"{"command":"cat /root/fork-marker"}"#)
                #expect(json(rebooted)["stdout"] as? String == "synced\n", "\(String(buffer: rebooted.body))")
                let resumed = try await call(client, .post, "/instavm/v1/vms/\(forks[1])/resume", h.keyA)
                #expect(
                    resumed.status == .ok && json(resumed)["status"] as? String == "running",
                    "\(String(buffer: resumed.body))")
                let runningAgain = try await call(client, .post, "/instavm/v1/vms/\(forks[1])/resume", h.keyA)
                #expect(runningAgain.status == .conflict, "\(String(buffer: runningAgain.body))")

                let deleted = try await call(client, .delete, "/v1/vms/\(id)", h.keyA)
                #expect(deleted.status == .ok)
                let gone = try await call(client, .get, "/v1/vms/\(id)", h.keyA)
                #expect(gone.status == .notFound)
                // No snapshot and no default image here: a clear 404 naming the missing image.
                let noDefault = try await call(client, .post, "/v1/vms", h.keyA, "{}")
                #expect(
                    noDefault.status == .notFound && String(buffer: noDefault.body).contains("default image"),
                    "\(String(buffer: noDefault.body))")
            }
        }
    }
}
