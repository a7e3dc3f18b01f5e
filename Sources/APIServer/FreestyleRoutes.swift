import Builds
import Foundation
import FurcateCore
import FurcateEngine
import GuestAgentProtocol
import Hummingbird
import Images
import VMService

/// The Freestyle VMs dialect (`/v1`, seed 004): shapes as the document has them (camelCase).
struct FreestyleRoutes: Sendable {
    let engine: Engine

    struct VmInfo: ResponseCodable {
        var id: String
        var name: String?
        var state: String
        var createdAt: String?
        var snapshotId: String?
        var persistence: VMPersistence?
        var deleted: Bool
        var createdDeclaratively: Bool
    }
    struct ListVmsResponse: ResponseCodable {
        var vms: [VmInfo]
        var totalCount, buildingCount, runningCount, startingCount, suspendingCount, suspendedCount, stoppedCount, lostCount: Int
    }
    struct CreateVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
        var consoleUrl: String?
        var snapshotId: String?
    }
    struct GetVmResponse: ResponseCodable {
        var id: String
        var name: String?
        var state: String
        var createdAt: String?
        var snapshotId: String?
    }
    struct IdResponse: ResponseCodable { var id: String }
    struct ExecAwaitRequest: Decodable {
        var command: String
        var terminal: String?
        var timeoutMs: Int?
    }
    struct ExecAwaitVmResponse: ResponseCodable {
        var stdout: String?
        var stderr: String?
        var statusCode: Int?
    }

    struct ForkVmRequest: Decodable { var count: Int? }
    struct ForkedVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
        var consoleUrl: String?
    }
    struct ForkVmResponse: ResponseCodable {
        var vmId: String
        var forks: [ForkedVmResponse]
    }
    struct SnapshotVmResponse: ResponseCodable {
        var snapshotId: String
        var sourceVmId: String
    }
    struct StopVmResponse: ResponseCodable {
        var vmId: String
        var vmInstanceId: String
    }
    struct SuspendVmResponse: ResponseCodable {
        var id: String
        var vmInstanceId: String
        var snapshotLayerId: String
    }
    struct StartedVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
    }
    struct WaitVmResponse: ResponseCodable {
        var id: String
        var exitStatus: String
    }

    struct FileInfo: Codable {
        var name: String
        var kind: String
    }
    struct FileContent: ResponseCodable {
        var content: String
        var encoding: String
    }
    struct DirectoryListing: ResponseCodable { var files: [FileInfo] }
    struct WriteFileRequest: Decodable {
        var content: String
        var encoding: String?
    }
    struct Empty: ResponseCodable {}

    /// CreateVmRequest fields this server honours; any other field present is refused (400),
    /// never silently ignored.
    static let createFields = Set(["snapshotId", "name", "dockerCredentials", "spec", "persistence", "template", "gitRepos"]).union(layerFields).union(
        VMSettings.fields)

    /// The deprecated forms in today's: `template` (one layer, plus the VM's `persistence`) is
    /// `spec.snapshot`; `gitRepos` (top level or in the template) are `git.repos`.
    static func legacyFields(_ body: [String: Any]) throws -> [String: Any] {
        func present(_ v: Any?) -> Bool { v != nil && !(v is NSNull) }
        func withRepos(_ o: [String: Any]) throws -> [String: Any] {
            var o = o
            guard let raw = o.removeValue(forKey: "gitRepos"), present(raw) else { return o }
            guard let repos = raw as? [Any] else { throw APIError(.badRequest, "BAD_REQUEST", "gitRepos must be an array") }
            if o["git"] != nil && !(o["git"] is NSNull) && !(o["git"] is [String: Any]) { throw APIError(.badRequest, "BAD_REQUEST", "git must be an object") }
            var git = o["git"] as? [String: Any] ?? ["config": [String: Any]()]
            let existing = git["repos"]
            // (Found by schemathesis: a git.repos of the wrong type was replaced, not refused.)
            guard existing == nil || existing is NSNull || existing is [Any] else { throw APIError(.badRequest, "BAD_REQUEST", "git.repos must be an array") }
            git["repos"] = (existing as? [Any] ?? []) + repos
            o["git"] = git
            return o
        }
        var obj = try withRepos(body)
        if let t = obj.removeValue(forKey: "template"), present(t) {
            guard !present(obj["spec"]) else { throw APIError(.badRequest, "BAD_REQUEST", "template (deprecated) and spec are mutually exclusive; use spec") }
            guard var layer = t as? [String: Any] else { throw APIError(.badRequest, "BAD_REQUEST", "template must be an object") }
            if let p = layer.removeValue(forKey: "persistence"), present(p) {
                guard !present(obj["persistence"]) else { throw APIError(.badRequest, "BAD_REQUEST", "give persistence once: at the top level or in the template") }
                obj["persistence"] = p
            }
            obj["spec"] = ["snapshot": try withRepos(layer)]
        }
        return obj
    }
    /// CreateVmRequest fields that describe the VM's contents: with them, the VM is made from a
    /// build (cached by template hash) whose outer layer they are, on `spec` or `snapshotId`.
    static let layerFields: Set<String> = ["workdir", "systemd", "users", "groups", "additionalFiles", "git", "aptDeps"]

    func register(on v1: RouterGroup<APIContext>) {
        v1.get("vms") { req, ctx in try await list(req, ctx) }
        v1.post("vms") { req, ctx in try await create(req, ctx) }
        v1.get("vms/{vm_id}") { _, ctx in try await get(ctx) }
        v1.delete("vms/{vm_id}") { _, ctx in try await delete(ctx) }
        v1.post("vms/{vm_id}/exec-await") { req, ctx in try await exec(req, ctx) }
        v1.post("vms/{vm_id}/fork") { req, ctx in try await fork(req, ctx) }
        v1.post("vms/{vm_id}/snapshot") { req, ctx in try await snapshot(req, ctx) }
        v1.post("vms/{vm_id}/stop") { _, ctx in
            let vm = try await ownedVM(ctx)
            guard vm.state == .running else { throw APIError(.badRequest, "VM_NOT_RUNNING", "VM \(vm.id) is \(vm.state.rawValue), not running") }
            _ = try await engine.vms.stop(vm.id)
            return StopVmResponse(vmId: vm.id, vmInstanceId: vm.id)
        }
        v1.post("vms/{vm_id}/kill") { _, ctx in
            let vm = try await ownedVM(ctx)
            _ = try await engine.vms.kill(vm.id)
            return IdResponse(id: vm.id)
        }
        v1.post("vms/{vm_id}/suspend") { _, ctx in
            let vm = try await ownedVM(ctx)
            let s = try await engine.vms.suspend(vm.id)
            return SuspendVmResponse(id: vm.id, vmInstanceId: vm.id, snapshotLayerId: "sl-" + (s.suspendedSnapshot ?? "").dropFirst(3))
        }
        v1.post("vms/{vm_id}/start") { req, ctx in try await start(req, ctx) }
        v1.get("vms/{vm_id}/files/**") { req, ctx in try await getFile(req, ctx) }
        v1.put("vms/{vm_id}/files/**") { req, ctx in try await putFile(req, ctx) }
        registerSnapshots(on: v1)
        registerGuest(on: v1)
        v1.post("vms/{vm_id}/await") { _, ctx in
            let vm = try await ownedVM(ctx)
            // Only a running VM has an exit to wait for; any other answers its state at once.
            guard vm.state == .running || vm.state == .starting else { return WaitVmResponse(id: vm.id, exitStatus: vm.state.rawValue) }
            let done = try await engine.vms.awaitExit(vm.id, timeout: .seconds(3600))
            return WaitVmResponse(id: vm.id, exitStatus: done.state.rawValue)
        }
    }

    /// Every field the Freestyle document gives a request body, by schema name: a field of the
    /// document this server does not honour may be sent as null (unset); any other field is refused.
    static let documentFields: [String: Set<String>] = [
        "CreateVmRequest": [
            "spec", "name", "idleTimeoutSeconds", "ports", "waitForReadySignal", "readySignalTimeoutSeconds", "workdir", "persistence", "systemd",
            "users", "groups", "additionalFiles", "snapshotId", "template", "gitRepos", "git", "recreate", "aptDeps", "domains",
            "activityThresholdBytes", "dockerCredentials",
        ],
        "CreateSnapshotRequest": ["name", "spec", "template", "persistence", "dockerCredentials"],
        "StartVmRequest": ["idleTimeoutSeconds", "readySignalTimeoutSeconds", "waitForReadySignal", "activityThresholdBytes"],
        "ResizeVmRequest": ["rootfsSizeGb", "memSizeGb", "vcpuCount"],
        "SystemdUnitSpec": [
            "name", "mode", "exec", "env", "user", "group", "workdir", "after", "requires", "onFailure", "wantedBy", "enable", "timeoutSec",
            "deleteAfterSuccess", "remainAfterExit", "readySignal", "watchdogSec", "restartPolicy",
        ],
    ]

    /// The body as a JSON object. Fields other than `allowed` are refused (400
    /// UNSUPPORTED_FIELD), never silently ignored — except the document's own fields sent as
    /// null, which mean "unset".
    static func object(_ body: ByteBuffer, allowed: Set<String>, what: String) throws -> [String: Any] {
        guard body.readableBytes > 0 else { return [:] }
        guard let obj = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any] else {
            throw APIError(.badRequest, "BAD_REQUEST", "the body must be a JSON object (\(what))")
        }
        let known = documentFields[what] ?? allowed
        let unsupported = obj.filter { !allowed.contains($0.key) && !($0.value is NSNull && known.contains($0.key)) }.keys.sorted()
        guard unsupported.isEmpty else {
            throw APIError(
                .badRequest, "UNSUPPORTED_FIELD",
                "this server does not honour \(unsupported.map { "'\($0.prefix(60))'" }.joined(separator: ", ")) (supported: \(allowed.sorted().joined(separator: ", ")))")
        }
        return obj
    }

    /// The VM-instance settings of a create or start request, or of a spec layer.
    struct VMSettings {
        static let fields: Set<String> = ["idleTimeoutSeconds", "waitForReadySignal", "readySignalTimeoutSeconds"]
        var idleTimeoutSeconds: Int?
        var waitForReadySignal: Bool?
        var readySignalTimeoutSeconds: Int?

        init(_ obj: [String: Any]) throws {
            func int(_ k: String, _ range: ClosedRange<Int>) throws -> Int? {
                guard let v = obj[k], !(v is NSNull) else { return nil }
                guard let n = jsonInteger(v), range.contains(n) else { throw APIError(.badRequest, "BAD_REQUEST", "\(k) must be an integer from \(range.lowerBound) to \(range.upperBound)") }
                return n
            }
            idleTimeoutSeconds = try int("idleTimeoutSeconds", 0...Int(Int32.max))
            readySignalTimeoutSeconds = try int("readySignalTimeoutSeconds", 0...3600)
            if let v = obj["waitForReadySignal"], !(v is NSNull) {
                guard let b = jsonBool(v) else { throw APIError(.badRequest, "BAD_REQUEST", "waitForReadySignal must be true or false") }
                waitForReadySignal = b
            }
        }

        /// Settings of `self`, with what it leaves unset taken from `other`.
        func over(_ other: VMSettings) -> VMSettings {
            var r = self
            r.idleTimeoutSeconds = idleTimeoutSeconds ?? other.idleTimeoutSeconds
            r.waitForReadySignal = waitForReadySignal ?? other.waitForReadySignal
            r.readySignalTimeoutSeconds = readySignalTimeoutSeconds ?? other.readySignalTimeoutSeconds
            return r
        }
    }

    /// A VmPersistence (default: sticky, priority 5): a type and only that type's fields.
    static func vmPersistence(_ v: Any?) throws -> VMPersistence {
        guard let v, !(v is NSNull) else { return .sticky }
        guard let o = v as? [String: Any], let type = o["type"] as? String else {
            throw APIError(.badRequest, "BAD_REQUEST", "persistence must be an object with a type: sticky, ephemeral or persistent")
        }
        let allowed: Set<String> = type == "sticky" ? ["type", "priority"] : type == "ephemeral" ? ["type", "deleteEvent"] : ["type"]
        if let extra = o.keys.first(where: { !allowed.contains($0) }) {
            throw APIError(.badRequest, "BAD_REQUEST", "persistence of type \(type.prefix(20)) has no field '\(extra.prefix(40))'")
        }
        if let p = o["priority"], !(p is NSNull), jsonInteger(p) == nil {
            throw APIError(.badRequest, "BAD_REQUEST", "persistence.priority must be an integer from 0 to 10")
        }
        return try JSONDecoder().decode(VMPersistence.self, from: JSONSerialization.data(withJSONObject: o.filter { !($0.value is NSNull) }))
    }

    /// With `waitForReadySignal` (the default), waits until the VM's guest agent answers — up
    /// to `readySignalTimeoutSeconds` (0 or unset: 120 s).
    /// - Throws: 504 `READY_SIGNAL_TIMED_OUT`; the VM is left as it is.
    func awaitReady(_ id: String, _ settings: VMSettings) async throws {
        guard settings.waitForReadySignal ?? true else { return }
        let seconds = settings.readySignalTimeoutSeconds.flatMap { $0 > 0 ? $0 : nil } ?? 120
        do { _ = try await engine.vms.agent(id, timeout: .seconds(seconds)) } catch let e as FurcateError where e.code == .timedOut {
            throw APIError(.gatewayTimeout, "READY_SIGNAL_TIMED_OUT", "VM \(id) did not signal ready within \(seconds) s; it is still there (GET /v1/vms/\(id))")
        }
    }

    func fork(_ req: Request, _ ctx: APIContext) async throws -> ForkVmResponse {
        let vm = try await ownedVM(ctx)
        let obj = try Self.object(try await req.body.collect(upTo: 1 << 20), allowed: ["count"], what: "ForkVmRequest")
        let raw = obj["count"]
        let count: Int? = raw == nil || raw is NSNull ? 1 : jsonInteger(raw)
        guard let count, (1...100).contains(count) else { throw APIError(.badRequest, "BAD_REQUEST", "count must be an integer from 1 to 100") }
        let r = try await engine.fork(vm, account: ctx.account, count: count)
        return ForkVmResponse(vmId: vm.id, forks: r.forks.map { ForkedVmResponse(id: $0.id, domains: [], consoleUrl: nil) })
    }

    func snapshot(_ req: Request, _ ctx: APIContext) async throws -> SnapshotVmResponse {
        let vm = try await ownedVM(ctx)
        let body = try await req.body.collect(upTo: 1 << 20)
        let obj = try Self.object(body, allowed: ["name", "persistence"], what: "SnapshotVmRequest")
        struct Body: Decodable { var persistence: SnapshotPersistence? }
        let persistence = body.readableBytes > 0 ? try JSONDecoder().decode(Body.self, from: Data(buffer: body)).persistence : nil
        let name = try Self.optionalName(obj["name"])
        let s = try await engine.snapshot(vm, account: ctx.account, name: name, persistence: persistence ?? .sticky)
        return SnapshotVmResponse(snapshotId: s.id, sourceVmId: vm.id)
    }

    /// The guest path after `/files/`: absolute, without `..` or NUL (the agent checks again).
    static func filePath(_ ctx: APIContext) throws -> String {
        let parts = ctx.parameters.getCatchAll().map(String.init)
        let path = "/" + parts.joined(separator: "/")
        guard !parts.isEmpty, !parts.contains(".."), !path.contains("\0"), path.utf8.count <= 4096 else {
            throw APIError(.badRequest, "FILES_BAD_REQUEST", "'\(path.prefix(200))' is not a usable path (absolute, no '..')")
        }
        return path
    }

    /// A file's content (utf8 when it is valid UTF-8, else base64), or a directory's entries.
    func getFile(_ req: Request, _ ctx: APIContext) async throws -> Response {
        let vm = try await ownedVM(ctx)
        let path = try Self.filePath(ctx)
        let found: GuestFile
        do { found = try await engine.readFile(vm, path, wake: .resumeSuspended) } catch let e as FurcateError where e.code == .notFound {
            throw APIError(.notFound, "FILE_NOT_FOUND", "no file \(path) in VM \(vm.id)")
        } catch let e as FurcateError where e.code == .tooLarge {
            throw APIError(.badRequest, "FILES_BAD_REQUEST", e.message)
        }
        switch found {
        case .directory(let es):
            return try DirectoryListing(files: es.map { FileInfo(name: $0.name, kind: $0.kind == .directory ? "directory" : "file") }).response(from: req, context: ctx)
        case .file(let data):
            let text = String(data: data, encoding: .utf8)
            return try FileContent(content: text ?? data.base64EncodedString(), encoding: text == nil ? "base64" : "utf8").response(from: req, context: ctx)
        }
    }

    func putFile(_ req: Request, _ ctx: APIContext) async throws -> Empty {
        let vm = try await ownedVM(ctx)
        let path = try Self.filePath(ctx)
        let body = try await req.decode(as: WriteFileRequest.self, context: ctx)
        let data: Data
        switch body.encoding ?? "utf8" {
        case "utf8", "utf-8": data = Data(body.content.utf8)
        case "base64":
            guard let d = Data(base64Encoded: body.content) else { throw APIError(.badRequest, "FILES_BAD_REQUEST", "content is not valid base64") }
            data = d
        case let e: throw APIError(.badRequest, "FILES_BAD_REQUEST", "encoding must be utf8 or base64, not '\(e.prefix(40))'")
        }
        try await engine.writeFile(vm, path, data, wake: .resumeSuspended)
        return Empty()
    }

    func start(_ req: Request, _ ctx: APIContext) async throws -> StartedVmResponse {
        let vm = try await ownedVM(ctx)
        let settings = try VMSettings(try Self.object(try await req.body.collect(upTo: 1 << 20), allowed: VMSettings.fields, what: "StartVmRequest"))
        switch vm.state {
        case .running: break
        case .suspended: _ = try await engine.vms.resume(vm.id)
        default: throw APIError(.badRequest, "VM_NOT_STARTABLE", "VM \(vm.id) is \(vm.state.rawValue); only a suspended VM starts again")
        }
        if let idle = settings.idleTimeoutSeconds, var p = try await engine.policies.policy(vm.id) {
            p.idleTimeoutSeconds = idle
            try await engine.policies.set(vm.id, p)
        }
        try await awaitReady(vm.id, settings)
        return StartedVmResponse(id: vm.id, domains: [])
    }

    /// The VM named in the path, if the caller's account owns it; else 404 as for a missing one.
    func ownedVM(_ ctx: APIContext) async throws -> VMInfo {
        let id = try ctx.parameters.require("vm_id")
        guard let vm = try await engine.ownedVM(id, account: ctx.account) else {
            throw APIError(.notFound, "VM_NOT_FOUND", "no VM \(id.prefix(40))")
        }
        return vm
    }

    func info(_ vm: VMInfo, name: String?, policy: VMPolicy?) -> VmInfo {
        VmInfo(
            id: vm.id, name: name, state: vm.state.rawValue, createdAt: Self.iso(vm.createdAt), snapshotId: vm.parentSnapshot,
            persistence: policy?.persistence, deleted: false, createdDeclaratively: false)
    }

    /// `limit`/`offset` (paging, after filters), `vmState`, `search` (in ids and names),
    /// `includeDeleted` (deleted VMs are gone here, so it changes nothing). Counts are of all
    /// the caller's VMs.
    func list(_ req: Request, _ ctx: APIContext) async throws -> ListVmsResponse {
        let q = req.uri.queryParameters
        let limit = try Self.intQuery(req, "limit", range: 0...Int(Int32.max))
        let offset = try Self.intQuery(req, "offset", range: 0...Int(Int32.max)) ?? 0
        let state: VMState?
        if let s = q["vmState"] {
            guard let v = VMState(rawValue: String(s)) else { throw APIError(.badRequest, "BAD_REQUEST", "vmState must be one of the VMState values") }
            state = v
        } else {
            state = nil
        }
        if let d = q["includeDeleted"], !["true", "false"].contains(d.lowercased()) {
            throw APIError(.badRequest, "BAD_REQUEST", "includeDeleted must be true or false")
        }
        let search = q["search"].map { String($0).lowercased() }
        var mine: [VmInfo] = []
        let owned = engine.owners.owned(by: ctx.account)
        let policies = try await engine.policies.all()
        for vm in await engine.vms.list() { if let name = owned[vm.id] { mine.append(info(vm, name: name, policy: policies[vm.id])) } }
        func count(_ s: VMState) -> Int { mine.filter { $0.state == s.rawValue }.count }
        let shown = mine.filter {
            (state == nil || $0.state == state!.rawValue)
                && (search == nil || search!.isEmpty || $0.id.contains(search!) || ($0.name?.lowercased().contains(search!) ?? false))
        }
        let page = Array(shown.dropFirst(offset).prefix(limit ?? Int.max))
        return ListVmsResponse(
            vms: page, totalCount: mine.count, buildingCount: count(.building), runningCount: count(.running),
            startingCount: count(.starting), suspendingCount: count(.suspending), suspendedCount: count(.suspended),
            stoppedCount: count(.stopped), lostCount: count(.lost))
    }

    func create(_ req: Request, _ ctx: APIContext) async throws -> CreateVmResponse {
        let obj = try Self.legacyFields(try Self.object(try await req.body.collect(upTo: 1 << 20), allowed: Self.createFields, what: "CreateVmRequest"))
        var snapshotId: String?
        if let s = obj["snapshotId"], !(s is NSNull) {
            guard let id = s as? String else { throw APIError(.badRequest, "BAD_REQUEST", "snapshotId must be a string") }
            snapshotId = id
        }
        try Self.checkVMSpec(obj["spec"])
        let persistence = try Self.vmPersistence(obj["persistence"])
        // The request's own settings, else its spec's outer layer's, else its snapshot's.
        var settings = try VMSettings(obj)
        if let outer = (obj["spec"] as? [String: Any])?["snapshot"] as? [String: Any] { settings = settings.over(try VMSettings(outer)) }
        let snap: String
        var shownSnapshot = snapshotId
        func present(_ k: String) -> Bool { obj[k] != nil && !(obj[k] is NSNull) }
        if present("spec") || Self.layerFields.contains(where: present) {
            let built = try await buildForCreate(obj, ctx)
            (snap, shownSnapshot) = (built.target, built.id)
        } else if let s = snapshotId {
            if let idle = try engine.owners.snapshot(s)?.idleTimeoutSeconds, settings.idleTimeoutSeconds == nil, engine.owners.owner(s) == ctx.account {
                settings.idleTimeoutSeconds = idle
            }
            do { snap = try await engine.bootable(.snapshot(s), account: ctx.account) } catch let e as FurcateError where e.code == .notFound {
                throw APIError(.notFound, "SNAPSHOT_NOT_FOUND", e.message)
            }
        } else {
            snap = try await engine.bootable(.defaultImage, account: ctx.account)
        }
        let name = try Self.optionalName(obj["name"])
        let policy = VMPolicy(persistence: persistence, idleTimeoutSeconds: settings.idleTimeoutSeconds ?? engine.defaultIdleTimeoutSeconds)
        let vm = try await engine.createVM(NewVM(account: ctx.account, snapshot: snap, name: name, policy: policy))
        try await awaitReady(vm.id, settings)
        return CreateVmResponse(id: vm.id, domains: [], consoleUrl: nil, snapshotId: shownSnapshot ?? snap)
    }

    /// `spec` is a VmSpec: an object whose `name` (a label for the spec) is a string and whose
    /// `snapshot` is a SnapshotSpec (checked when it is decoded). (Found by schemathesis: a
    /// `spec.name` of `{}` was accepted.)
    static func checkVMSpec(_ spec: Any?) throws {
        guard let spec, !(spec is NSNull) else { return }
        guard let o = spec as? [String: Any] else { throw APIError(.badRequest, "BAD_REQUEST", "spec must be an object (a VmSpec)") }
        if let n = o["name"], !(n is NSNull || n is String) { throw APIError(.badRequest, "BAD_REQUEST", "spec.name must be a string") }
        if let s = o["snapshot"], !(s is NSNull || s is [String: Any]) { throw APIError(.badRequest, "BAD_REQUEST", "spec.snapshot must be an object (a SnapshotSpec)") }
    }

    /// The snapshot a create request's contents describe: its own layer fields over `spec`
    /// (or `snapshotId`, or the default image), built — or found cached — before the VM starts.
    /// - Throws: 400 `BUILD_FAILED` with the build's reason.
    func buildForCreate(_ obj: [String: Any], _ ctx: APIContext) async throws -> (id: String, target: String) {
        var outer: [String: Any] = [:]
        for k in Self.layerFields.union(["snapshotId"]) where obj[k] != nil && !(obj[k] is NSNull) { outer[k] = obj[k] }
        let specObject: [String: Any]
        switch (obj["spec"], outer.keys.contains { Self.layerFields.contains($0) }) {
        case (let inner as [String: Any], false) where outer["snapshotId"] == nil: specObject = inner
        case (let inner as [String: Any], _):
            outer["snapshot"] = inner
            specObject = outer
        case (nil, _), (is NSNull, _): specObject = outer
        default: throw APIError(.badRequest, "BAD_REQUEST", "spec must be an object")
        }
        let spec = try JSONDecoder().decode(FreestyleSnapshotSpec.self, from: JSONSerialization.data(withJSONObject: specObject))
        let defaultBase = BuildRecipe.Base.recipe(BuildService.defaultImageRecipe(rootfsTarball: engine.defaultImage))
        let recipe = try await engine.resolveBases(try spec.recipe(defaultBase: defaultBase), account: ctx.account)
        var creds: RegistryCredentials?
        if let c = obj["dockerCredentials"], !(c is NSNull) {
            // (JSONSerialization traps on a top-level string: check the shape first.)
            guard let d = c as? [String: Any] else { throw APIError(.badRequest, "BAD_REQUEST", "dockerCredentials must be an object") }
            creds = try JSONDecoder().decode(DockerCredentials.self, from: JSONSerialization.data(withJSONObject: d)).registryCredentials
        }
        let s = try await engine.startSnapshotBuild(recipe, account: ctx.account, credentials: creds) { _ in }
        let build = try await engine.builds.wait(s.buildId!)
        guard build.state == .succeeded, let target = build.snapshotId else {
            throw APIError(.badRequest, "BUILD_FAILED", "building the VM's contents failed: \(build.failureReason ?? "unknown reason") (build \(build.buildId))")
        }
        // A cache hit yields bytes the caller already has a snapshot of: answer with that one.
        for other in try engine.owners.snapshots() where other.account == ctx.account && other.id != s.id && !other.deleted {
            if await engine.resolve(other).target == target {
                try engine.owners.removeSnapshot(s.id)
                return (other.id, target)
            }
        }
        return (s.id, target)
    }

    func get(_ ctx: APIContext) async throws -> GetVmResponse {
        let vm = try await ownedVM(ctx)
        return GetVmResponse(
            id: vm.id, name: engine.owners.name(vm.id), state: vm.state.rawValue, createdAt: Self.iso(vm.createdAt), snapshotId: vm.parentSnapshot)
    }

    func delete(_ ctx: APIContext) async throws -> IdResponse {
        let vm = try await ownedVM(ctx)
        try await engine.forgetVM(vm.id)
        return IdResponse(id: vm.id)
    }

    func exec(_ req: Request, _ ctx: APIContext) async throws -> ExecAwaitVmResponse {
        let vm = try await ownedVM(ctx)
        let raw = try await req.body.collect(upTo: 8 << 20)
        _ = try Self.object(raw, allowed: ["command", "terminal", "timeoutMs"], what: "ExecAwaitRequest")
        let body = try JSONDecoder().decode(ExecAwaitRequest.self, from: Data(buffer: raw))
        // 0 or absent: the default (5 minutes); longer than an hour: an hour.
        let timeout = min(body.timeoutMs.flatMap { $0 > 0 ? $0 : nil } ?? 300_000, 3_600_000)
        if let t = body.timeoutMs, t < 0 { throw APIError(.badRequest, "BAD_REQUEST", "timeoutMs must not be negative") }
        if let t = body.terminal {
            let name = try Self.guestName(t, what: "terminal")
            do {
                let r = try await engine.execInTerminal(vm, terminal: name, body.command, timeoutMs: timeout, wake: .resumeSuspended)
                return ExecAwaitVmResponse(stdout: r.output, stderr: "", statusCode: r.status)
            } catch let e as FurcateError where e.code == .timedOut {
                throw APIError(.requestTimeout, "EXEC_TIMED_OUT", e.message)
            }
        }
        let r = try await engine.guest(vm, wake: .resumeSuspended).exec(ExecRequest(command: body.command, timeoutMs: timeout))
        if r.timedOut {
            throw APIError(.requestTimeout, "EXEC_TIMED_OUT", "the command did not finish within \(timeout) ms (it was killed)")
        }
        return ExecAwaitVmResponse(
            stdout: String(decoding: r.stdout, as: UTF8.self), stderr: String(decoding: r.stderr, as: UTF8.self),
            statusCode: r.exitCode.map(Int.init) ?? (128 + Int(r.signal ?? 9)))
    }
}
