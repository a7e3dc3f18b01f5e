import FurcateCore
import VMService

/// One of an account's VMs with what the engine keeps about it.
public struct OwnedVM: Sendable {
    /// The VM as VMService reports it.
    public var vm: VMInfo
    /// The name its owner gave it, if any.
    public var name: String?
    /// Its persistence, lifetime and idle timeout, if it was given any.
    public var policy: VMPolicy?
}

/// The lifecycle use cases of an owned VM (a `VMInfo` from `ownedVM`): listing, stop, kill,
/// suspend, resume, waiting for its exit or its agent, and what changes a running VM's machine.
/// Each dialect renders these; none reaches VMService itself.
extension Engine {
    /// The account's VMs in VMService's order (oldest first), with names and policies.
    public func vms(of account: String) async throws -> [OwnedVM] {
        let owned = owners.owned(by: account)
        let policies = try await policies.all()
        return await vms.list().compactMap { vm in
            owned[vm.id].map { OwnedVM(vm: vm, name: $0, policy: policies[vm.id]) }
        }
    }

    /// The account's snapshot records, deleted ones included, in the order they were stored.
    public func snapshots(of account: String) throws -> [SnapshotRecord] {
        try owners.snapshots().filter { $0.account == account }
    }

    /// Stops a running VM: its guest is asked to power off, then its QEMU is ended.
    /// - Throws: `.vmNotRunning` when it is not running (a stop of a stopped VM is no error to
    ///   VMService, but every dialect that has a stop documents it as misuse).
    public func stop(_ vm: VMInfo) async throws -> VMInfo {
        guard vm.state == .running else {
            throw FurcateError(.vmNotRunning, "VM \(vm.id) is \(vm.state.rawValue), not running")
        }
        return try await vms.stop(vm.id)
    }

    /// Ends a VM's QEMU at once; its disk stays. Killing a VM that is not running is no error.
    public func kill(_ vm: VMInfo) async throws -> VMInfo { try await vms.kill(vm.id) }

    /// Suspends a running VM into the store (memory and device state), ending its QEMU.
    /// - Throws: `.invalidState` from VMService's transition table when it is not running.
    public func suspend(_ vm: VMInfo) async throws -> VMInfo { try await vms.suspend(vm.id) }

    /// Runs a VM again: a suspended one resumes (memory and all), a stopped or lost one boots
    /// again from its disk (a cold boot: what was only in its memory is gone); a running one is
    /// left as it is.
    /// - Throws: `.invalidState` for a VM on its way somewhere (starting, suspending,
    ///   building); `.notFound` when a stopped or lost VM's disk is gone.
    public func start(_ vm: VMInfo) async throws -> VMInfo {
        switch vm.state {
        case .running: return vm
        case .suspended: return try await vms.resume(vm.id).0
        case .stopped, .lost: return try await vms.start(vm.id)
        case .starting, .suspending, .building:
            throw FurcateError(
                .invalidState, "VM \(vm.id) is \(vm.state.rawValue); start it once that is over", operation: "start")
        }
    }

    /// Waits up to `timeout` for a running VM's QEMU to exit (the guest powered off); any
    /// other VM answers its state at once.
    public func awaitExit(_ vm: VMInfo, timeout: Duration) async throws -> VMInfo {
        guard vm.state == .running || vm.state == .starting else { return vm }
        return try await vms.awaitExit(vm.id, timeout: timeout)
    }

    /// Waits up to `timeout` until the VM's guest agent answers (its ready signal).
    /// - Throws: `.timedOut` when it does not; the VM is left as it is.
    public func awaitReady(_ id: String, timeout: Duration) async throws {
        _ = try await vms.agent(id, timeout: timeout)
    }

    /// Sets the idle timeout of a VM that has a policy; a VM without one is left as it is.
    public func setIdleTimeout(_ id: String, seconds: Int) async throws {
        guard var p = try await policies.policy(id) else { return }
        p.idleTimeoutSeconds = seconds
        try await policies.set(id, p)
    }

    /// Grows a running VM's disk to `bytes` and its filesystem with it.
    /// - Returns: the size before and the filesystem grown.
    public func resizeDisk(_ vm: VMInfo, to bytes: UInt64) async throws -> (oldBytes: UInt64, filesystem: String) {
        try await vms.resizeDisk(vm.id, to: bytes)
    }

    /// Re-lays a running VM's disk for forking (the guest syncs and trims it); answers what
    /// was done, with sizes.
    /// - Throws: `.invalidState` unless running.
    public func optimize(_ vm: VMInfo) async throws -> String { try await vms.optimize(vm.id) }

    /// What a VM restored from the VMService snapshot `id` (from `bootable`) runs on.
    public func machine(of id: String) async throws -> SnapshotInfo { try await vms.snapshotInfo(id) }

    /// The bytes a ready snapshot keeps in the store (memory, disk, device state); 0 for one
    /// that is not ready or whose data is gone.
    public func storedBytes(_ s: ResolvedSnapshot) async -> UInt64 {
        guard s.state == .ready, let t = s.target else { return 0 }
        return (try? await vms.snapshotStoredBytes(t)) ?? 0
    }
}

/// What a new server does before it serves: the records of operations the last one did not
/// finish are made whole or removed.
extension Engine {
    /// Deletes every VM no account owns: one an operation had made in VMService but not yet
    /// recorded as its account's when the last server died (a create's or a fork's; a build's
    /// VMs are ended by `BuildService.recover`, which runs first). Call it once VMService and
    /// the builds have recovered and before serving, when no operation is under way.
    /// - Returns: the ids deleted.
    public func removeUnownedVMs() async -> [String] {
        var removed: [String] = []
        for vm in await vms.list() where owners.owner(vm.id) == nil {
            do {
                try await vms.delete(vm.id)
                try await policies.remove(vm.id)
                removed.append(vm.id)
            } catch {
                continue  // left for the next start; it is not listed to any account meanwhile
            }
        }
        return removed
    }
}
