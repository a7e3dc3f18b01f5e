import FurcateCore
import VMNetwork

// VM networks (`VMServiceOptions.networks`): each VM and each pooled QEMU has one, by id, from
// its first launch until it is deleted (a pooled QEMU's becomes the VM's that takes it). The
// VM record keeps its place in the pool, so that a restarted server finds it again.
extension VMService {
    /// The network of `id`, made now with `policy` if it has none.
    /// - Throws: `.overCapacity` when the pool is full; what `NetworkHost.attach` throws.
    func ensureNetwork(_ id: String, policy: EgressPolicy) throws -> VMNetworkPlan {
        guard let net = options.networks else { throw FurcateError(.invalidState, "VM networks are off") }
        if !networksPrepared { recoverNetworks() }
        if let i = networkIndexes[id] {
            let p = try net.plan(i)
            return net.namespaceExists(p) ? p : try net.attach(i, policy: policy)
        }
        let used = Set(networkIndexes.values)
        guard let i = (0..<net.capacity).first(where: { !used.contains($0) }) else {
            throw FurcateError(
                .overCapacity, "the VM network pool \(net.options.pool) is full (\(net.capacity) networks)")
        }
        let p = try net.attach(i, policy: policy)
        networkIndexes[id] = i
        return p
    }

    /// Removes the network of `id` (its VM or pooled QEMU is gone).
    func releaseNetwork(_ id: String) {
        guard let net = options.networks, let i = networkIndexes.removeValue(forKey: id) else { return }
        do { try net.detach(i) } catch {
            logger.error("cannot remove a VM network", metadata: ["vm.id": "\(id)", "error": "\(error)"])
        }
    }

    /// At a graceful stop: the networks of VMs without a QEMU go (each keeps its place in the
    /// pool; its next launch makes the network again), and with none left the host's table:
    /// nothing of the VM networks stays while no server runs.
    func removeIdleNetworks() {
        guard let net = options.networks else { return }
        do {
            for (id, i) in networkIndexes where instances[id] == nil { try net.detach(i) }
            if networkIndexes.keys.allSatisfy({ instances[$0] == nil }) {
                try net.removeTable()
                networksPrepared = false
            }
        } catch {
            logger.error("cannot remove the VM networks at stop", metadata: ["error": "\(error)"])
        }
    }

    /// At start: the host's table made anew with the chains of the VMs that have networks,
    /// and every namespace and link of this host's tag that no VM holds removed (a dead
    /// server's pooled QEMUs, half-made VMs).
    func recoverNetworks() {
        guard let net = options.networks else { return }
        networksPrepared = true
        do {
            try net.prepare()
            let kept = Set(networkIndexes.values)
            for (id, i) in networkIndexes where net.namespaceExists(try net.plan(i)) {
                try net.restore(i, policy: vms[id].map { egressPolicy($0) } ?? options.egress)
            }
            let gone = try net.removeLeftovers(keeping: kept)
            if !gone.isEmpty {
                logger.warning("removed VM networks a previous server left", metadata: ["networks": "\(gone)"])
            }
        } catch {
            logger.error("cannot set the VM networks up again", metadata: ["error": "\(error)"])
        }
    }
}

// Egress policies: each VM's in its record (nil: the service's default), enforced by its
// network's chain; a change is one nft transaction, in force for the next packet.
extension VMService {
    /// What `vm`'s guest may reach: its own policy, or the service's default.
    public nonisolated func egressPolicy(_ vm: VMInfo) -> EgressPolicy { vm.egress ?? options.egress }

    /// - Throws: `.invalidArgument` for a bad policy, `.notConfigured` without VM networks
    ///   (user-mode networking cannot enforce one).
    nonisolated func checkEgress(_ policy: EgressPolicy) throws {
        try policy.validate()
        guard options.networks != nil else {
            throw FurcateError(
                .notConfigured,
                "this server runs guests on QEMU's user-mode network (--vm-network off), which enforces no egress policy; start it without --vm-network off to give each VM a network of its own"
            )
        }
    }

    /// Puts `vm`'s policy into its network's chain (when it has a network).
    func applyEgress(_ vm: VMInfo) throws {
        guard let net = options.networks, let i = networkIndexes[vm.id], net.namespaceExists(try net.plan(i)) else {
            return
        }
        try net.setPolicy(i, policy: egressPolicy(vm))
    }

    /// Sets what a VM's guest may reach (nil: the service's default), in force at once on a
    /// running VM; kept in its record, so suspend, resume, restarts and its snapshots keep it.
    /// - Throws: `.notFound`, `.invalidArgument`, `.notConfigured` without VM networks, `.io`
    ///   when the firewall refuses (the record is then unchanged).
    @discardableResult
    public func setEgress(_ id: String, _ policy: EgressPolicy?) async throws -> VMInfo {
        if let policy { try checkEgress(policy) } else { try checkEgress(options.egress) }
        return try await withVM(id) {
            var vm = try info(id)
            let old = vm
            vm.egress = policy
            try applyEgress(vm)
            do { try record(vm) } catch {
                try? applyEgress(old)
                throw error
            }
            return vm
        }
    }
}

extension VMService {
    /// Where the host reaches `id`'s guest (TCP to this address goes on to the guest: the
    /// ingress connects here); nil when it has no network of its own.
    public func guestAddress(_ id: String) -> IPv4Address? {
        guard let net = options.networks, let i = networkIndexes[id], let p = try? net.plan(i) else { return nil }
        return p.namespaceAddress
    }

    /// Whether VMs get networks of their own (without, nothing reaches a guest's ports).
    public nonisolated var hasVMNetworks: Bool { options.networks != nil }
}
