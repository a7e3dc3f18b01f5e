import Accounts
import Builds
import Foundation
import FurcateCore
import GuestAgentProtocol
import Hummingbird
import VMService

/// The Freestyle VMs dialect (`/v1`, seed 004): shapes as the document has them (camelCase).
struct FreestyleRoutes: Sendable {
    let engine: APIEngine

    struct VmInfo: ResponseCodable {
        var id: String
        var state: String
        var createdAt: String?
        var snapshotId: String?
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
        var state: String
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

    /// CreateVmRequest fields this server honours; any other field present is refused (400),
    /// never silently ignored.
    static let createFields: Set<String> = ["snapshotId", "name"]

    func register(on v1: RouterGroup<APIContext>) {
        v1.get("vms") { _, ctx in try await list(ctx) }
        v1.post("vms") { req, ctx in try await create(req, ctx) }
        v1.get("vms/{vm_id}") { _, ctx in try await get(ctx) }
        v1.delete("vms/{vm_id}") { _, ctx in try await delete(ctx) }
        v1.post("vms/{vm_id}/exec-await") { req, ctx in try await exec(req, ctx) }
    }

    /// The VM named in the path, if the caller's account owns it; else 404 as for a missing one.
    func ownedVM(_ ctx: APIContext) async throws -> VMInfo {
        let id = try ctx.parameters.require("vm_id")
        guard (try? VMID.validateVM(id)) != nil, try engine.owners.owner(id) == ctx.account, let vm = try? await engine.vms.info(id) else {
            throw APIError(.notFound, "VM_NOT_FOUND", "no VM \(id.prefix(40))")
        }
        return vm
    }

    static func info(_ vm: VMInfo) -> VmInfo {
        VmInfo(
            id: vm.id, state: vm.state.rawValue, createdAt: Date(timeIntervalSince1970: vm.createdAt).ISO8601Format(),
            snapshotId: vm.parentSnapshot, deleted: false, createdDeclaratively: false)
    }

    func list(_ ctx: APIContext) async throws -> ListVmsResponse {
        var mine: [VMInfo] = []
        for vm in await engine.vms.list() where try engine.owners.owner(vm.id) == ctx.account { mine.append(vm) }
        func count(_ s: VMState) -> Int { mine.filter { $0.state == s }.count }
        return ListVmsResponse(
            vms: mine.map(Self.info), totalCount: mine.count, buildingCount: count(.building), runningCount: count(.running),
            startingCount: count(.starting), suspendingCount: count(.suspending), suspendedCount: count(.suspended),
            stoppedCount: count(.stopped), lostCount: count(.lost))
    }

    func create(_ req: Request, _ ctx: APIContext) async throws -> CreateVmResponse {
        let body = try await req.body.collect(upTo: 1 << 20)
        var snapshotId: String?
        if body.readableBytes > 0 {
            guard let obj = try? JSONSerialization.jsonObject(with: Data(buffer: body)) as? [String: Any] else {
                throw APIError(.badRequest, "BAD_REQUEST", "the body must be a JSON object (CreateVmRequest)")
            }
            let unsupported = obj.filter { !($0.value is NSNull) }.keys.filter { !Self.createFields.contains($0) }.sorted()
            guard unsupported.isEmpty else {
                throw APIError(
                    .badRequest, "UNSUPPORTED_FIELD",
                    "this server does not honour \(unsupported.joined(separator: ", ")) yet (supported: \(Self.createFields.sorted().joined(separator: ", ")))")
            }
            if let s = obj["snapshotId"], !(s is NSNull) {
                guard let id = s as? String else { throw APIError(.badRequest, "BAD_REQUEST", "snapshotId must be a string") }
                snapshotId = id
            }
        }
        let snap: String
        if let s = snapshotId {
            guard (try? VMID.validateSnapshot(s)) != nil, try engine.owners.owner(s) == ctx.account || engine.owners.owner(s) == "*" else {
                throw APIError(.notFound, "SNAPSHOT_NOT_FOUND", "no snapshot \(s.prefix(40))")
            }
            snap = s
        } else {
            snap = try await engine.builds.defaultSnapshot(rootfsTarball: engine.defaultImage)
            try engine.owners.set(snap, account: "*")  // the default image's snapshot is everyone's
        }
        let vm = try await engine.vms.create(CreateVMRequest(snapshot: snap))
        try engine.owners.set(vm.id, account: ctx.account)
        return CreateVmResponse(id: vm.id, domains: [], consoleUrl: nil, snapshotId: snap)
    }

    func get(_ ctx: APIContext) async throws -> GetVmResponse {
        let vm = try await ownedVM(ctx)
        return GetVmResponse(id: vm.id, state: vm.state.rawValue)
    }

    func delete(_ ctx: APIContext) async throws -> IdResponse {
        let vm = try await ownedVM(ctx)
        try await engine.vms.delete(vm.id)
        try engine.owners.remove(vm.id)
        return IdResponse(id: vm.id)
    }

    func exec(_ req: Request, _ ctx: APIContext) async throws -> ExecAwaitVmResponse {
        let vm = try await ownedVM(ctx)
        let body = try await req.decode(as: ExecAwaitRequest.self, context: ctx)
        if let t = body.timeoutMs, !(1...3_600_000).contains(t) {
            throw APIError(.badRequest, "BAD_REQUEST", "timeoutMs must be 1 to 3600000, not \(t)")
        }
        guard body.terminal == nil else { throw APIError(.badRequest, "UNSUPPORTED_FIELD", "exec in a terminal is not supported yet") }
        let agent = try await engine.vms.agent(vm.id)
        let r = try await agent.exec(ExecRequest(command: body.command, timeoutMs: body.timeoutMs ?? 300_000))
        if r.timedOut {
            throw APIError(.requestTimeout, "EXEC_TIMED_OUT", "the command did not finish within \(body.timeoutMs ?? 300_000) ms (it was killed)")
        }
        return ExecAwaitVmResponse(
            stdout: String(decoding: r.stdout, as: UTF8.self), stderr: String(decoding: r.stderr, as: UTF8.self),
            statusCode: r.exitCode.map(Int.init) ?? (128 + Int(r.signal ?? 9)))
    }
}
