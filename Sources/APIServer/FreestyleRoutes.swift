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
        var createdAt, snapshotId: String?
        var persistence: VMPersistence?
        var deleted, createdDeclaratively: Bool
        /// Furcate's: why a lost VM was lost, and what was kept.
        var lostReason: String?
    }
    struct ListVmsResponse: ResponseCodable {
        var vms: [VmInfo]
        var totalCount, buildingCount, runningCount, startingCount, suspendingCount, suspendedCount, stoppedCount,
            lostCount: Int
    }
    struct CreateVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
        var consoleUrl, snapshotId: String?
    }
    struct IdResponse: ResponseCodable { var id: String }
    struct ExecAwaitVmResponse: ResponseCodable {
        var stdout, stderr: String?
        var statusCode: Int?
    }

    struct ForkedVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
        var consoleUrl: String?
    }
    struct ForkVmResponse: ResponseCodable {
        var vmId: String
        var forks: [ForkedVmResponse]
    }
    struct SnapshotVmResponse: ResponseCodable { var snapshotId, sourceVmId: String }
    struct StopVmResponse: ResponseCodable { var vmId, vmInstanceId: String }
    struct SuspendVmResponse: ResponseCodable { var id, vmInstanceId, snapshotLayerId: String }
    struct StartedVmResponse: ResponseCodable {
        var id: String
        var domains: [String]
    }
    struct WaitVmResponse: ResponseCodable { var id, exitStatus: String }

    struct FileInfo: Codable { var name, kind: String }
    struct FileContent: ResponseCodable { var content, encoding: String }
    struct DirectoryListing: ResponseCodable { var files: [FileInfo] }
    struct WriteFileRequest: Decodable {
        var content: String
        var encoding: String?
    }
    struct Empty: ResponseCodable {}

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
            _ = try await engine.stop(vm)
            return StopVmResponse(vmId: vm.id, vmInstanceId: vm.id)
        }
        v1.post("vms/{vm_id}/kill") { _, ctx in
            let vm = try await ownedVM(ctx)
            _ = try await engine.kill(vm)
            return IdResponse(id: vm.id)
        }
        v1.post("vms/{vm_id}/suspend") { _, ctx in
            let vm = try await ownedVM(ctx)
            let s = try await engine.suspend(vm)
            return SuspendVmResponse(
                id: vm.id, vmInstanceId: vm.id, snapshotLayerId: "sl-" + (s.suspendedSnapshot ?? "").dropFirst(3))
        }
        v1.post("vms/{vm_id}/start") { req, ctx in try await start(req, ctx) }
        v1.get("vms/{vm_id}/files/**") { req, ctx in try await getFile(req, ctx) }
        v1.put("vms/{vm_id}/files/**") { req, ctx in try await putFile(req, ctx) }
        registerSnapshots(on: v1)
        registerGuest(on: v1)
        v1.post("vms/{vm_id}/await") { _, ctx in
            let vm = try await ownedVM(ctx)
            // Only a running VM has an exit to wait for; any other answers its state at once.
            let done = try await engine.awaitExit(vm, timeout: .seconds(3600))
            return WaitVmResponse(id: vm.id, exitStatus: done.state.rawValue)
        }
    }

    /// With `waitForReadySignal` (the default), waits until the VM's guest agent answers — up
    /// to `readySignalTimeoutSeconds` (0 or unset: 120 s).
    /// - Throws: 504 `READY_SIGNAL_TIMED_OUT`; the VM is left as it is.
    func awaitReady(_ id: String, _ settings: VMSettings) async throws {
        guard settings.waitForReadySignal ?? true else { return }
        let seconds = settings.readySignalTimeoutSeconds.flatMap { $0 > 0 ? $0 : nil } ?? 120
        do { try await engine.awaitReady(id, timeout: .seconds(seconds)) } catch let e as FurcateError
            where e.code == .timedOut
        {
            throw APIError(
                .gatewayTimeout, "READY_SIGNAL_TIMED_OUT",
                "VM \(id) did not signal ready within \(seconds) s; it is still there (GET /v1/vms/\(id))")
        }
    }

    func fork(_ req: Request, _ ctx: APIContext) async throws -> ForkVmResponse {
        let vm = try await ownedVM(ctx)
        let body = try RequestBodies.decode(ForkVmRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        let r = try await engine.fork(vm, account: ctx.account, count: body.count ?? 1)
        return ForkVmResponse(
            vmId: vm.id,
            forks: r.forks.map { ForkedVmResponse(id: $0.id, domains: engine.hostNames(of: $0.id), consoleUrl: nil) })
    }

    func snapshot(_ req: Request, _ ctx: APIContext) async throws -> SnapshotVmResponse {
        let vm = try await ownedVM(ctx)
        let body = try RequestBodies.decode(SnapshotVmRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        let s = try await engine.snapshot(
            vm, account: ctx.account, name: body.name, persistence: body.persistence ?? .sticky)
        return SnapshotVmResponse(snapshotId: s.id, sourceVmId: vm.id)
    }

    /// The guest path after `/files/`: absolute, without `..` or NUL (the agent checks again).
    static func filePath(_ ctx: APIContext) throws -> String {
        let parts = ctx.parameters.getCatchAll().map(String.init)
        let path = "/" + parts.joined(separator: "/")
        guard !parts.isEmpty, !parts.contains(".."), !path.contains("\0"), path.utf8.count <= 4096 else {
            throw APIError(
                .badRequest, "FILES_BAD_REQUEST", "'\(path.prefix(200))' is not a usable path (absolute, no '..')")
        }
        return path
    }

    /// A file's content (utf8 when it is valid UTF-8, else base64), or a directory's entries.
    func getFile(_ req: Request, _ ctx: APIContext) async throws -> Response {
        let vm = try await ownedVM(ctx)
        let path = try Self.filePath(ctx)
        let found: GuestFile
        do { found = try await engine.readFile(vm, path, wake: .resumeSuspended) } catch let e as FurcateError
            where e.code == .notFound
        {
            throw APIError(.notFound, "FILE_NOT_FOUND", "no file \(path) in VM \(vm.id)")
        } catch let e as FurcateError where e.code == .tooLarge {
            throw APIError(.badRequest, "FILES_BAD_REQUEST", e.message)
        }
        switch found {
        case .directory(let es):
            return try DirectoryListing(
                files: es.map { FileInfo(name: $0.name, kind: $0.kind == .directory ? "directory" : "file") }
            ).response(from: req, context: ctx)
        case .file(let data):
            let text = String(data: data, encoding: .utf8)
            return try FileContent(
                content: text ?? data.base64EncodedString(), encoding: text == nil ? "base64" : "utf8"
            ).response(from: req, context: ctx)
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
            guard let d = Data(base64Encoded: body.content) else {
                throw APIError(.badRequest, "FILES_BAD_REQUEST", "content is not valid base64")
            }
            data = d
        case let e:
            throw APIError(.badRequest, "FILES_BAD_REQUEST", "encoding must be utf8 or base64, not '\(e.prefix(40))'")
        }
        try await engine.writeFile(vm, path, data, wake: .resumeSuspended)
        return Empty()
    }

    func start(_ req: Request, _ ctx: APIContext) async throws -> StartedVmResponse {
        let vm = try await ownedVM(ctx)
        let settings = try RequestBodies.decode(VMSettings.self, from: try await req.body.collect(upTo: 1 << 20))
        do { _ = try await engine.start(vm) } catch let e as FurcateError where e.code == .invalidState {
            throw APIError(.badRequest, "VM_NOT_STARTABLE", e.message)
        }
        if let idle = settings.idleTimeoutSeconds { try await engine.setIdleTimeout(vm.id, seconds: idle) }
        try await awaitReady(vm.id, settings)
        return StartedVmResponse(id: vm.id, domains: engine.hostNames(of: vm.id))
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
            id: vm.id, name: name, state: vm.state.rawValue, createdAt: Self.iso(vm.createdAt),
            snapshotId: vm.parentSnapshot,
            persistence: policy?.persistence, deleted: false, createdDeclaratively: false, lostReason: vm.lostReason)
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
            guard let v = VMState(rawValue: String(s)) else {
                throw APIError(.badRequest, "BAD_REQUEST", "vmState must be one of the VMState values")
            }
            state = v
        } else {
            state = nil
        }
        if let d = q["includeDeleted"], !["true", "false"].contains(d.lowercased()) {
            throw APIError(.badRequest, "BAD_REQUEST", "includeDeleted must be true or false")
        }
        let search = q["search"].map { String($0).lowercased() }
        let mine = try await engine.vms(of: ctx.account).map { info($0.vm, name: $0.name, policy: $0.policy) }
        func count(_ s: VMState) -> Int { mine.filter { $0.state == s.rawValue }.count }
        let shown = mine.filter { vm in
            let found =
                search.map { $0.isEmpty || vm.id.contains($0) || (vm.name?.lowercased().contains($0) ?? false) } ?? true
            return found && (state.map { vm.state == $0.rawValue } ?? true)
        }
        let page = Array(shown.dropFirst(offset).prefix(limit ?? Int.max))
        return ListVmsResponse(
            vms: page, totalCount: mine.count, buildingCount: count(.building), runningCount: count(.running),
            startingCount: count(.starting), suspendingCount: count(.suspending), suspendedCount: count(.suspended),
            stoppedCount: count(.stopped), lostCount: count(.lost))
    }

    func create(_ req: Request, _ ctx: APIContext) async throws -> CreateVmResponse {
        let body = try RequestBodies.decode(CreateVmRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        var settings = body.settings
        let snap: String
        var shownSnapshot = body.snapshotId
        if let contents = body.contents {
            let recipe = try await engine.recipe(contents, account: ctx.account)
            do {
                let built = try await engine.buildAndWait(
                    recipe, account: ctx.account, credentials: body.dockerCredentials?.registryCredentials)
                (snap, shownSnapshot) = (built.target, built.id)
            } catch let e as FurcateError where e.code == .buildFailed {
                throw APIError(.badRequest, "BUILD_FAILED", e.message)
            }
        } else if let s = body.snapshotId {
            if let idle = try engine.owners.snapshot(s)?.idleTimeoutSeconds, settings.idleTimeoutSeconds == nil,
                engine.owners.owner(s) == ctx.account
            {
                settings.idleTimeoutSeconds = idle
            }
            do { snap = try await engine.bootable(.snapshot(s), account: ctx.account) } catch let e as FurcateError
                where e.code == .notFound
            {
                throw APIError(.notFound, "SNAPSHOT_NOT_FOUND", e.message)
            }
        } else {
            snap = try await engine.bootable(.defaultImage, account: ctx.account)
        }
        let policy = VMPolicy(
            persistence: body.persistence,
            idleTimeoutSeconds: settings.idleTimeoutSeconds ?? engine.defaultIdleTimeoutSeconds)
        var new = NewVM(account: ctx.account, snapshot: snap, name: body.name, policy: policy)
        new.exposedPorts = body.exposedPorts
        let vm = try await engine.createVM(new)
        try await awaitReady(vm.id, settings)
        return CreateVmResponse(
            id: vm.id, domains: engine.hostNames(of: vm.id), consoleUrl: nil, snapshotId: shownSnapshot ?? snap)
    }

    /// The document's `GetVmResponse`, rendered as the list's `VmInfo` (a superset of it).
    func get(_ ctx: APIContext) async throws -> VmInfo {
        let vm = try await ownedVM(ctx)
        return info(vm, name: engine.owners.name(vm.id), policy: try await engine.policies.policy(vm.id))
    }

    func delete(_ ctx: APIContext) async throws -> IdResponse {
        let vm = try await ownedVM(ctx)
        try await engine.forgetVM(vm.id)
        return IdResponse(id: vm.id)
    }

    func exec(_ req: Request, _ ctx: APIContext) async throws -> ExecAwaitVmResponse {
        let vm = try await ownedVM(ctx)
        let body = try RequestBodies.decode(ExecAwaitRequest.self, from: try await req.body.collect(upTo: 8 << 20))
        // 0 or absent: the default (5 minutes); longer than an hour: an hour.
        let timeout = min(body.timeoutMs.flatMap { $0 > 0 ? $0 : nil } ?? 300_000, 3_600_000)
        if let t = body.terminal {
            let name = try Self.guestName(t, what: "terminal")
            do {
                let r = try await engine.execInTerminal(
                    vm, terminal: name, body.command, timeoutMs: timeout, wake: .resumeSuspended)
                return ExecAwaitVmResponse(stdout: r.output, stderr: "", statusCode: r.status)
            } catch let e as FurcateError where e.code == .timedOut {
                throw APIError(.requestTimeout, "EXEC_TIMED_OUT", e.message)
            }
        }
        let r = try await engine.guest(vm, wake: .resumeSuspended).exec(
            ExecRequest(command: body.command, timeoutMs: timeout))
        if r.timedOut {
            throw APIError(
                .requestTimeout, "EXEC_TIMED_OUT", "the command did not finish within \(timeout) ms (it was killed)")
        }
        return ExecAwaitVmResponse(
            stdout: String(decoding: r.stdout, as: UTF8.self), stderr: String(decoding: r.stderr, as: UTF8.self),
            statusCode: r.exitCode.map(Int.init) ?? (128 + Int(r.signal ?? 9)))
    }
}
