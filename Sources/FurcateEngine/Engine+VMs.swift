import Builds
import Foundation
import FurcateCore
import Hypervisor
import VMService

/// Where a new VM's disk and memory come from.
public enum VMSource: Sendable, Equatable {
    /// A snapshot the account may use, by its id (its own, or everyone's).
    case snapshot(String)
    /// The default image (Debian 12 with systemd), built once and shared by every account.
    case defaultImage
}

/// A VM to make for an account.
public struct NewVM: Sendable {
    /// The account the VM will belong to.
    public var account: String
    /// What VMService boots (an image) or restores (a snapshot, from `Engine.bootable`).
    public var machine: CreateVMRequest
    /// The name its owner gives it, if any.
    public var name: String?
    /// Its persistence, lifetime and idle timeout.
    public var policy: VMPolicy
    /// Variables set in the guest's environment before the VM is handed over.
    public var environment: [String: String]?
    /// Guest ports the ingress forwards to (`Engine.expose`).
    public var exposedPorts: [ExposedPort] = []

    /// A VM of `machine` for `account`.
    public init(
        account: String, machine: CreateVMRequest, name: String? = nil, policy: VMPolicy,
        environment: [String: String]? = nil
    ) {
        self.account = account
        self.machine = machine
        self.name = name
        self.policy = policy
        self.environment = environment
    }

    /// A VM restored from the VMService snapshot `snapshot` (from `Engine.bootable`).
    public init(
        account: String, snapshot: String, name: String? = nil, policy: VMPolicy, environment: [String: String]? = nil
    ) {
        self.init(
            account: account, machine: CreateVMRequest(snapshot: snapshot), name: name, policy: policy,
            environment: environment)
    }
}

/// A guest port a new VM exposes through the ingress.
public struct ExposedPort: Sendable, Equatable {
    /// The guest's TCP port.
    public var port: Int
    /// Anyone may open it (else only requests with the owner's key).
    public var isPublic: Bool
    /// A host name of the owner's own for it, besides `{vm-id}-{port}.{public domain}`.
    public var domain: String?

    /// A port to expose.
    public init(port: Int, isPublic: Bool, domain: String? = nil) {
        self.port = port
        self.isPublic = isPublic
        self.domain = domain
    }
}

/// Whether a guest operation may resume a suspended VM first.
public enum WakePolicy: Sendable {
    /// Resume a suspended VM (Freestyle: VMs suspended when idle wake on the next request).
    case resumeSuspended
    /// Only a running (or starting) VM: a suspended one is `.vmNotRunning` (InstaVM: resuming
    /// is the caller's explicit call).
    case requireRunning
}

/// The VM use cases: create, fork, snapshot, delete, the guest of a VM.
extension Engine {
    /// The caller's VM, or nil as for a missing one (a foreign or malformed id included). Looking
    /// a VM up counts as its activity.
    public func ownedVM(_ id: String, account: String) async throws -> VMInfo? {
        guard (try? VMID.validateVM(id)) != nil, owners.owner(id) == account else { return nil }
        await policies.touch(id)
        return try? await vms.info(id)
    }

    /// Runs `body` as a request on VM `id` by `account`: while it runs the VM is busy (an idle
    /// timeout waits for every request on it to end). A malformed, missing or foreign id is
    /// not counted.
    public func duringRequest<T: Sendable>(on id: String, account: String, _ body: () async throws -> T) async throws
        -> T
    {
        guard (try? VMID.validateVM(id)) != nil, owners.owner(id) == account else { return try await body() }
        await policies.begin(id)
        do {
            let r = try await body()
            await policies.end(id)
            return r
        } catch {
            await policies.end(id)
            throw error
        }
    }

    /// The VMService snapshot a new VM of `account` restores.
    /// - Throws: `.notFound` for a missing or foreign snapshot, `.invalidState` while it builds
    ///   or when it failed.
    public func bootable(_ source: VMSource, account: String) async throws -> String {
        switch source {
        case .snapshot(let id): return try await usableSnapshot(id, account: account)
        case .defaultImage:
            let snap = try await builds.defaultSnapshot(rootfsTarball: defaultImage)
            try owners.set(snap, account: Account.everyone)
            return snap
        }
    }

    /// Makes a VM for its account with its name, policy and environment. A VM that cannot be
    /// given all of them is deleted again: nothing half-made stays.
    public func createVM(_ r: NewVM) async throws -> VMInfo {
        for d in r.exposedPorts.compactMap(\.domain) { _ = try checkCustomDomain(d, for: nil) }
        let vm = try await vms.create(r.machine)
        try await completing([vm.id]) {
            try owners.set(vm.id, account: r.account, name: r.name)
            if let env = r.environment, !env.isEmpty { try await vms.agent(vm.id).setEnvironment(env) }
            try await policies.set(vm.id, r.policy)
            for e in r.exposedPorts {
                try expose(vm, port: e.port, isPublic: e.isPublic, account: r.account, domain: e.domain)
            }
        }
        return vm
    }

    /// Runs `body`, which finishes the VMs `ids` just made (owner, environment, policy,
    /// records); when it fails they are deleted again with whatever was recorded for them, so
    /// a use case that fails leaves nothing half-made.
    func completing<T>(_ ids: [String], _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            for id in ids { try? await forgetVM(id) }
            throw error
        }
    }

    /// Forks a running VM `count` ways for its owner: each fork is the caller's, with the
    /// parent's policy (a parent without one: forks without one), and the snapshot taken on the
    /// way is recorded as the caller's.
    public func fork(
        _ vm: VMInfo, account: String, count: Int, snapshotName: String? = nil, snapshotKind: SnapshotKind? = nil
    ) async throws -> (
        forks: [VMInfo], snapshot: SnapshotRecord
    ) {
        let r = try await vms.fork(vm.id, count: count, newIdentity: true)
        do {
            return try await completing(r.vms.map(\.id)) {
                let policy = try await policies.policy(vm.id)
                for f in r.vms {
                    try owners.set(f.id, account: account)
                    if let policy { try await policies.set(f.id, policy) }
                }
                try copyExposures(from: vm.id, to: r.vms, account: account)
                let s = try recordVMSnapshot(r.snapshot, account: account, name: snapshotName) {
                    $0.kind = snapshotKind
                }
                return (r.vms, s)
            }
        } catch {
            // The forks are gone; the snapshot they were made from has no record and no user.
            try? await vms.deleteSnapshot(r.snapshot.id)
            throw error
        }
    }

    /// Snapshots a VM for its owner and records the snapshot.
    public func snapshot(
        _ vm: VMInfo, account: String, name: String? = nil, persistence: SnapshotPersistence, kind: SnapshotKind? = nil
    ) async throws -> SnapshotRecord {
        let s = try await vms.snapshot(vm.id)
        return try recordVMSnapshot(s, account: account, name: name) {
            $0.persistence = persistence
            $0.kind = kind
        }
    }

    /// Deletes a VM with everything the engine kept about it.
    public func forgetVM(_ id: String) async throws {
        try await vms.delete(id)
        try owners.remove(id)
        try await policies.remove(id)
        try removeExposures(of: id)
    }

    /// The guest of a VM a request needs running; counts as the VM's activity.
    /// - Throws: `.vmNotRunning` when the VM is neither running nor starting (nor, with
    ///   `.resumeSuspended`, suspended).
    public func guest(_ vm: VMInfo, wake: WakePolicy) async throws -> Guest {
        Guest(agent: try await agentClient(vm, wake: wake))
    }

    /// `guest`'s agent, for the engine's own guest use cases.
    func agentClient(_ vm: VMInfo, wake: WakePolicy) async throws -> AgentClient {
        switch (vm.state, wake) {
        case (.running, _), (.starting, _): break
        case (.suspended, .resumeSuspended): _ = try await vms.resume(vm.id)
        default: throw FurcateError(.vmNotRunning, "VM \(vm.id) is \(vm.state.rawValue), not running")
        }
        await policies.touch(vm.id)
        return try await vms.agent(vm.id)
    }
}
