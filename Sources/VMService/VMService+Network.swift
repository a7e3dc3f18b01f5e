import FurcateCore
import VMNetwork

// VM networks (`VMServiceOptions.networks`): each VM and each pooled QEMU has one, by id, from
// its first launch until it is deleted (a pooled QEMU's becomes the VM's that takes it). The
// VM record keeps its place in the pool, so that a restarted server finds it again.
extension VMService {
    /// The network of `id`, made now if it has none (with the service's egress policy).
    /// - Throws: `.overCapacity` when the pool is full; what `NetworkHost.attach` throws.
    func ensureNetwork(_ id: String) throws -> VMNetworkPlan {
        guard let net = options.networks else { throw FurcateError(.invalidState, "VM networks are off") }
        if !networksPrepared { recoverNetworks() }
        if let i = networkIndexes[id] {
            let p = try net.plan(i)
            return net.namespaceExists(p) ? p : try net.attach(i, policy: options.egress)
        }
        let used = Set(networkIndexes.values)
        guard let i = (0..<net.capacity).first(where: { !used.contains($0) }) else {
            throw FurcateError(
                .overCapacity, "the VM network pool \(net.options.pool) is full (\(net.capacity) networks)")
        }
        let p = try net.attach(i, policy: options.egress)
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

    /// At start: the host's table made anew with the chains of the VMs that have networks,
    /// and every namespace and link of this host's tag that no VM holds removed (a dead
    /// server's pooled QEMUs, half-made VMs).
    func recoverNetworks() {
        guard let net = options.networks else { return }
        networksPrepared = true
        do {
            try net.prepare()
            let kept = Set(networkIndexes.values)
            for i in kept where net.namespaceExists(try net.plan(i)) {
                try net.restore(i, policy: options.egress)
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
