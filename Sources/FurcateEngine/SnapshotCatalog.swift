import Builds
import Foundation
import FurcateCore
import Images
import VMService

/// A snapshot record with its live state: building, ready, failed, lost — from its build, or
/// from whether its bytes still exist.
public struct ResolvedSnapshot: Sendable {
    /// The stored record.
    public var record: SnapshotRecord
    /// Building, ready, failed, cancelled or lost.
    public var state: SnapshotStateTag
    /// The VMService snapshot holding the bytes, once ready.
    public var target: String?
    /// Why it failed or was lost.
    public var failureReason: String?
    /// The build making it, for one made from a recipe.
    public var build: BuildRecord?
    /// The VMService snapshot's details, once ready.
    public var info: SnapshotInfo?
}

/// The snapshot catalogue every dialect shares: records made from VM snapshots and from builds,
/// resolution of an API id to usable bytes, soft deletion.
extension Engine {
    /// The record with its live state: from its build, or lost when its bytes are gone.
    public func resolve(_ s: SnapshotRecord) async -> ResolvedSnapshot {
        var r = ResolvedSnapshot(record: s, state: .ready, target: s.target)
        if let b = s.buildId, let build = try? await builds.record(b) {
            r.build = build
            r.state = build.snapshotState
            r.failureReason = build.failureReason
            r.target = build.state == .succeeded ? build.snapshotId : nil
        }
        if r.state == .ready {
            if let t = r.target, let info = try? await vms.snapshotInfo(t) {
                r.info = info
            } else {
                r.state = .lost
                r.failureReason = r.failureReason ?? "the snapshot's data is gone"
            }
        }
        return r
    }

    /// The caller's snapshot record (not deleted unless `deleted`), or nil as for a missing one.
    public func ownedSnapshot(_ id: String, account: String, deleted: Bool = false) async throws -> ResolvedSnapshot? {
        guard id.utf8.count <= 64, let s = try owners.snapshot(id), s.account == account, deleted || !s.deleted else {
            return nil
        }
        return await resolve(s)
    }

    /// The VMService snapshot to boot for an API snapshot id the caller may use: its own, or
    /// one recorded as everyone's (`*`, the default image). Marks the snapshot used (LRU).
    /// - Throws: `.notFound` for a missing or foreign id, `.invalidState` while it builds or
    ///   when it failed.
    public func usableSnapshot(_ id: String, account: String) async throws -> String {
        if (try? VMID.validateSnapshot(id)) != nil, owners.owner(id) == Account.everyone, try owners.snapshot(id) == nil
        {
            return id
        }
        guard let r = try await ownedSnapshot(id, account: account) else {
            throw FurcateError(.notFound, "no snapshot \(id.prefix(64))")
        }
        guard r.state == .ready, let t = r.target else {
            throw FurcateError(
                .invalidState, "snapshot \(id) is \(r.state.rawValue)\(r.failureReason.map { ": " + $0 } ?? "")")
        }
        var s = r.record
        s.lastUsedAt = Date().timeIntervalSince1970
        try owners.saveSnapshot(s)
        return t
    }

    /// Records a snapshot taken of a VM for `account`.
    @discardableResult
    public func recordVMSnapshot(
        _ info: SnapshotInfo, account: String, name: String? = nil, configure: (inout SnapshotRecord) -> Void = { _ in }
    ) throws -> SnapshotRecord {
        var s = SnapshotRecord(id: info.id, account: account, target: info.id, sourceVmId: info.vmID)
        s.name = name
        s.vcpus = info.vcpus
        s.memoryMiB = info.memoryMiB
        configure(&s)
        try owners.saveSnapshot(s)
        return s
    }

    /// Starts a build for `account` and records the snapshot it will produce (state building).
    public func startSnapshotBuild(
        _ recipe: BuildRecipe, account: String, credentials: RegistryCredentials? = nil,
        configure: (inout SnapshotRecord) -> Void
    ) async throws -> SnapshotRecord {
        let build = try await builds.start(recipe, account: account, credentials: credentials)
        try owners.set(build.buildId, account: account)
        var s = SnapshotRecord(id: VMID.newSnapshot(), account: account, buildId: build.buildId)
        s.vcpus = recipe.vcpus
        s.memoryMiB = recipe.memoryMiB
        configure(&s)
        try owners.saveSnapshot(s)
        return s
    }

    /// The recipe of a Freestyle SnapshotSpec for `account`: on Furcate's default image when
    /// it names no base, with the snapshot ids it names resolved to the caller's snapshots.
    /// - Throws: `.invalidArgument` naming the field; `.notFound` for a snapshot not the caller's.
    public func recipe(_ spec: FreestyleSnapshotSpec, account: String) async throws -> BuildRecipe {
        let defaultBase = BuildRecipe.Base.recipe(BuildService.defaultImageRecipe(rootfsTarball: defaultImage))
        return try await resolveBases(try spec.recipe(defaultBase: defaultBase), account: account)
    }

    /// Builds `recipe` for `account` and waits: the snapshot (recorded as the caller's) and the
    /// bytes it names. A cache hit on contents the caller already has a snapshot of answers
    /// with that snapshot (no second record).
    /// - Throws: `.buildFailed` with the build's reason.
    public func buildAndWait(_ recipe: BuildRecipe, account: String, credentials: RegistryCredentials?) async throws
        -> (id: String, target: String)
    {
        let s = try await startSnapshotBuild(recipe, account: account, credentials: credentials) { _ in }
        guard let buildId = s.buildId else { throw FurcateError(.internalError, "snapshot \(s.id) has no build") }
        let build = try await builds.wait(buildId)
        guard build.state == .succeeded, let target = build.snapshotId else {
            throw FurcateError(
                .buildFailed,
                "building the VM's contents failed: \(build.failureReason ?? "unknown reason") (build \(build.buildId))"
            )
        }
        for other in try owners.snapshots() where other.account == account && other.id != s.id && !other.deleted {
            if await resolve(other).target == target {
                try owners.removeSnapshot(s.id)
                return (other.id, target)
            }
        }
        return (s.id, target)
    }

    /// Replaces every `.snapshot` base in a recipe by the bytes the caller's API id names.
    public func resolveBases(_ recipe: BuildRecipe, account: String) async throws -> BuildRecipe {
        var r = recipe
        switch recipe.base {
        case .snapshot(let id): r.base = .snapshot(try await usableSnapshot(id, account: account))
        case .recipe(let inner): r.base = .recipe(try await resolveBases(inner, account: account))
        case .image: break
        }
        return r
    }

    /// Soft-deletes a snapshot: the record stays (deleted), the bytes are freed unless another
    /// live record or a VM still uses them.
    /// - Throws: `.invalidState` when it is already deleted.
    public func deleteSnapshot(_ s: SnapshotRecord) async throws {
        guard !s.deleted else { throw FurcateError(.invalidState, "snapshot \(s.id) is already deleted") }
        var d = s
        d.deleted = true
        d.updatedAt = Date().timeIntervalSince1970
        try owners.saveSnapshot(d)
        guard let target = await resolve(s).target else { return }
        for o in try owners.snapshots() where o.id != s.id && !o.deleted {
            if await resolve(o).target == target { return }
        }
        if await vms.list().contains(where: { $0.parentSnapshot == target && $0.state != .stopped && $0.state != .lost }
        ) {
            return
        }
        try? await vms.deleteSnapshot(target)
    }
}
