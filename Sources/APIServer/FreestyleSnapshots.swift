import Builds
import Foundation
import FurcateCore
import FurcateEngine
import Hummingbird
import Images
import VMService

/// Freestyle's snapshots and builds: `/v1/vms/snapshots…`, `/v1/vms/builds…`, `/v1/vms/{id}/build`.
extension FreestyleRoutes {
    struct SnapshotInfoResponse: ResponseCodable {
        var snapshotId, state: String
        var sourceVmId, accountId: String?
        var createdAt: String
        var name: String?
        var failed, cancelled, lost: Bool
        var failureReason: String?
        var deleted: Bool
        var snapshotPersistence: SnapshotPersistence
        var buildId, templateHash: String?
        var vcpuCount, memSizeMib, rootfsSizeMb: Int?
        // hypeman's fields (seed 003), where the dialect allows extra properties.
        var compression: SnapshotCompression?
        var compressionState: String?
        var compressedSizeBytes, uncompressedSizeBytes: UInt64?
    }
    struct ListSnapshotsResponse: ResponseCodable {
        var snapshots: [SnapshotInfoResponse]
        var totalCount, buildingCount, readyCount, failedCount, cancelledCount, lostCount, deletedCount: Int
    }
    struct CreateSnapshotResponse: ResponseCodable { var snapshotId: String }
    struct DeleteSnapshotResponse: ResponseCodable { var snapshot_id: String }
    struct UpdateSnapshotResponse: ResponseCodable {
        var snapshot_id: String
        var name: String?
    }
    struct BuildRecordResponse: ResponseCodable {
        var buildId, accountId, state: String
        var templateHash, failureReason: String?
        var plannedPhases: [String]
        var startedAt: String
        var finishedAt: String?
        var updatedAt: String
        var snapshotId: String?
    }
    struct BuildPhaseResponse: Codable {
        var phaseId, buildId, name: String
        var snapshotId: String?
        var startedAt: String
    }
    struct ListBuildPhasesResponse: ResponseCodable { var phases: [BuildPhaseResponse] }

    static func iso(_ t: Double) -> String { Date(timeIntervalSince1970: t).ISO8601Format() }

    func registerSnapshots(on v1: RouterGroup<APIContext>) {
        v1.get("vms/snapshots") { req, ctx in try await listSnapshots(req, ctx) }
        v1.post("vms/snapshots") { req, ctx in try await createSnapshot(req, ctx) }
        v1.get("vms/snapshots/{snapshot_id}") { _, ctx in
            snapshotResponse(try await ownedSnapshot(ctx, deleted: true))
        }
        v1.delete("vms/snapshots/{snapshot_id}") { _, ctx in
            let s = try await ownedSnapshot(ctx, deleted: true)
            do { try await engine.deleteSnapshot(s.record) } catch let e as FurcateError where e.code == .invalidState {
                throw APIError(.conflict, "SNAPSHOT_ALREADY_DELETED", e.message)
            }
            return DeleteSnapshotResponse(snapshot_id: s.record.id)
        }
        v1.patch("vms/snapshots/{snapshot_id}") { req, ctx in
            var s = try await ownedSnapshot(ctx).record
            let body = try await req.body.collect(upTo: 1 << 20)
            // The document requires a body here: none is not an empty update.
            guard body.readableBytes > 0 else { throw FieldProblem([], .notAnObject) }
            s.name = try RequestBodies.decode(UpdateSnapshotRequest.self, from: body).name
            s.updatedAt = Date().timeIntervalSince1970
            try engine.owners.saveSnapshot(s)
            return UpdateSnapshotResponse(snapshot_id: s.id, name: s.name)
        }
        v1.get("vms/builds/{build_id}") { _, ctx in Self.buildResponse(try await ownedBuild(ctx)) }
        v1.get("vms/builds/{build_id}/phases") { _, ctx in
            let b = try await ownedBuild(ctx)
            return ListBuildPhasesResponse(
                phases: b.phases.map {
                    BuildPhaseResponse(
                        phaseId: $0.phaseId, buildId: $0.buildId, name: $0.name, snapshotId: $0.snapshotId,
                        startedAt: Self.iso($0.startedAt))
                })
        }
        v1.get("vms/{vm_id}/build") { _, ctx in
            let vm = try await ownedVM(ctx)
            let mine = await engine.builds.list(account: ctx.account)
            guard
                let b = mine.last(where: {
                    $0.buildVM == vm.id || ($0.snapshotId != nil && $0.snapshotId == vm.parentSnapshot)
                })
            else {
                throw APIError(.notFound, "BUILD_NOT_FOUND", "VM \(vm.id) was not made by a build")
            }
            return Self.buildResponse(b)
        }
    }

    func ownedSnapshot(_ ctx: APIContext, deleted: Bool = false) async throws -> ResolvedSnapshot {
        let id = try ctx.parameters.require("snapshot_id")
        guard let s = try await engine.ownedSnapshot(id, account: ctx.account, deleted: deleted) else {
            throw APIError(.notFound, "SNAPSHOT_NOT_FOUND", "no snapshot \(id.prefix(64))")
        }
        return s
    }

    func ownedBuild(_ ctx: APIContext) async throws -> BuildRecord {
        let id = try ctx.parameters.require("build_id")
        guard id.utf8.count <= 64, let b = try? await engine.builds.record(id), b.account == ctx.account else {
            throw APIError(.notFound, "BUILD_NOT_FOUND", "no build \(id.prefix(64))")
        }
        return b
    }

    static func buildResponse(_ b: BuildRecord) -> BuildRecordResponse {
        BuildRecordResponse(
            buildId: b.buildId, accountId: b.account, state: b.state.rawValue, templateHash: b.templateHash,
            failureReason: b.failureReason,
            plannedPhases: b.plannedPhases, startedAt: iso(b.startedAt), finishedAt: b.finishedAt.map(iso),
            updatedAt: iso(b.updatedAt),
            snapshotId: b.snapshotId)
    }

    func snapshotResponse(_ r: ResolvedSnapshot) -> SnapshotInfoResponse {
        let s = r.record
        return SnapshotInfoResponse(
            snapshotId: s.id, state: r.state.rawValue, sourceVmId: s.sourceVmId, accountId: s.account,
            createdAt: Self.iso(s.createdAt),
            name: s.name, failed: r.state == .failed, cancelled: r.state == .cancelled, lost: r.state == .lost,
            failureReason: r.failureReason,
            deleted: s.deleted, snapshotPersistence: s.persistence, buildId: s.buildId,
            templateHash: r.build?.templateHash,
            vcpuCount: r.info?.vcpus ?? s.vcpus, memSizeMib: r.info?.memoryMiB ?? s.memoryMiB, rootfsSizeMb: nil,
            compression: r.info?.compression, compressionState: r.info?.compressionState?.rawValue,
            compressedSizeBytes: r.info?.compressedSizeBytes, uncompressedSizeBytes: r.info?.uncompressedSizeBytes)
    }

    func listSnapshots(_ req: Request, _ ctx: APIContext) async throws -> ListSnapshotsResponse {
        func flag(_ name: String) throws -> Bool {
            guard let v = req.uri.queryParameters[Substring(name)] else { return false }
            switch v.lowercased() {
            case "true", "1": return true
            case "false", "0": return false
            default: throw APIError(.badRequest, "BAD_REQUEST", "\(name) must be true or false")
            }
        }
        let (deleted, failed, building) = (
            try flag("includeDeleted"), try flag("includeFailed"), try flag("includeBuilding")
        )
        var all: [ResolvedSnapshot] = []
        for s in try engine.snapshots(of: ctx.account) { all.append(await engine.resolve(s)) }
        func count(_ t: SnapshotStateTag) -> Int { all.filter { !$0.record.deleted && $0.state == t }.count }
        let shown = all.filter {
            $0.record.deleted
                ? deleted
                : (failed || ($0.state != .failed && $0.state != .lost && $0.state != .cancelled))
                    && (building || $0.state != .building)
        }
        return ListSnapshotsResponse(
            snapshots: shown.map(snapshotResponse), totalCount: shown.count, buildingCount: count(.building),
            readyCount: count(.ready),
            failedCount: count(.failed), cancelledCount: count(.cancelled), lostCount: count(.lost),
            deletedCount: all.filter(\.record.deleted).count)
    }

    func createSnapshot(_ req: Request, _ ctx: APIContext) async throws -> CreateSnapshotResponse {
        let b = try RequestBodies.decode(CreateSnapshotRequest.self, from: try await req.body.collect(upTo: 8 << 20))
        guard let spec = b.spec else { throw FieldProblem(["spec"], .missing) }
        let persistence = b.persistence ?? .persistent
        let s = try await engine.startSnapshotBuild(
            try await engine.recipe(spec, account: ctx.account), account: ctx.account,
            credentials: b.dockerCredentials?.registryCredentials
        ) {
            $0.name = b.name
            $0.persistence = persistence
            $0.idleTimeoutSeconds = spec.idleTimeoutSeconds
        }
        return CreateSnapshotResponse(snapshotId: s.id)
    }
}
