import BlockStore
import Foundation
import FurcateCore
import Hypervisor

/// The machine shape a pooled QEMU was started for: a restore must match it exactly.
struct PoolShape: Hashable, Sendable {
    var memoryMiB: Int
    var vcpus: Int
    var diskBytes: UInt64
}

/// A QEMU already spawned and waiting in `-incoming defer` on its own (empty) memory and disk
/// files, named for the VM it will become.
struct PoolEntry: Sendable {
    var id: String
    var process: QEMUProcess
}

/// Whether pool refills may start QEMUs.
enum PoolGate: Sendable {
    case open
    /// `drainWarmPool`: until the next `prewarm`.
    case drained
    /// `shutdown`: for good.
    case closed
}

// The warm pool: restores in memory mode a skip process start by taking a waiting QEMU. Its
// memory and disk files exist from spawn (QEMU opens them then); taking one replaces their
// contents with the snapshot's in O(1) (`replaceContents`; the mount drops the kernel's cached
// pages of them). The waiting QEMU has touched neither: it loads nothing before the stream.
// Mode b has no pool: its forks must all map the one base file of their snapshot, which is
// not known before the fork.
extension VMService {
    /// The pool a restore of `snap` in `mode` takes from, if any: mode a, RAM not in the stream.
    func poolShape(for snap: SnapshotInfo, mode: MemoryMode) -> PoolShape? {
        guard options.warmPoolSize > 0, mode == .shared, !snap.ramInStream,
            let disk = try? store.fileSize(snap.diskFile)
        else {
            return nil
        }
        return PoolShape(memoryMiB: snap.memoryMiB, vcpus: snap.vcpus, diskBytes: disk)
    }

    /// Takes a pooled QEMU for `shape`, if one waits. The caller refills (`refillPoolSoon`)
    /// once its restores are done.
    func takeFromPool(_ shape: PoolShape) -> PoolEntry? {
        guard options.warmPoolSize > 0 else { return nil }
        guard var entries = pool[shape], !entries.isEmpty else { return nil }
        let e = entries.removeFirst()
        pool[shape] = entries
        guard e.process.exitStatus == nil else { return nil }
        return e
    }

    /// Spawns pooled QEMUs for `shape` until `warmPoolSize` wait (one refill at a time).
    public func prewarm(memoryMiB: Int, vcpus: Int, diskBytes: UInt64) async {
        if poolGate == .drained { poolGate = .open }
        await refill(PoolShape(memoryMiB: memoryMiB, vcpus: vcpus, diskBytes: diskBytes))
    }

    /// How many pooled QEMUs wait for each shape (tests and benchmarks look).
    public func poolCount() -> Int { pool.values.reduce(0) { $0 + $1.count } }

    /// Refills, in the background, the pool restores of `snap` in `mode` take from.
    func refillPoolSoon(for snap: SnapshotInfo, mode: MemoryMode) {
        guard let shape = poolShape(for: snap, mode: mode) else { return }
        Task { await self.refill(shape) }
    }

    func refill(_ shape: PoolShape) async {
        guard options.warmPoolSize > 0, !refilling.contains(shape), poolGate == .open else { return }
        refilling.insert(shape)
        defer { refilling.remove(shape) }
        while (pool[shape]?.count ?? 0) < options.warmPoolSize && poolGate == .open {
            do {
                let e = try await spawnPooled(shape)
                // Drained while this one started (a shutdown): it must not outlive the pool.
                guard poolGate == .open else { return await discardPooled(e) }
                pool[shape, default: []].append(e)
            } catch {
                logger.warning("warm pool: cannot spawn", metadata: ["error": "\(error)"])
                return
            }
        }
    }

    private func spawnPooled(_ shape: PoolShape) async throws -> PoolEntry {
        let vm = VMInfo(
            id: VMID.newVM(), state: .starting, memoryMiB: shape.memoryMiB, vcpus: shape.vcpus, memoryMode: .shared,
            parentSnapshot: nil, suspendedSnapshot: nil, pid: nil, resumeOnStart: false,
            createdAt: Date().timeIntervalSince1970)
        do {
            try store.makeFile(vm.memoryFile, blockSize: options.memoryBlockSize, size: UInt64(shape.memoryMiB) << 20)
            try store.makeFile(vm.diskFile, blockSize: nil, size: shape.diskBytes)
            let p = try await launch(vm, memoryPath: path(file: vm.memoryFile), shared: true, incoming: true)
            return PoolEntry(id: vm.id, process: p)
        } catch {
            await discardFailed(vm)
            throw error
        }
    }

    /// Ends every pooled QEMU and removes its files (at shutdown; not an error when empty).
    /// No refill starts a QEMU after this (one starting meanwhile is ended) until `prewarm`.
    public func drainWarmPool() async {
        if poolGate == .open { poolGate = .drained }
        let all = pool.values.flatMap { $0 }
        pool.removeAll()
        for e in all { await discardPooled(e) }
    }

    private func discardPooled(_ e: PoolEntry) async {
        await e.process.kill()
        tearDown(e.id)
        for f in ["vm-\(e.id).mem", "vm-\(e.id).disk"] { try? store.deleteFile(f) }
        try? FileManager.default.removeItem(atPath: runDirectory(e.id))
        releaseNetwork(e.id)
    }

    /// Store files named for VMs the database does not know: pool entries or half-made VMs of
    /// a server that died. Removed at start.
    func removeOrphanFiles() {
        guard let names = try? store.listFiles().map(\.name) else { return }
        for n in names where n.hasPrefix("vm-") {
            let id = String(n.dropFirst(3).prefix(20))
            if vms[id] == nil {
                try? store.deleteFile(n)
                try? FileManager.default.removeItem(atPath: runDirectory(id))
            }
        }
        // A snapshot's files are made before its record: a server that died between the two
        // left files no record names.
        for n in names where n.hasPrefix("sc-") {
            let id = String(n.prefix { $0 != "." })
            if snapshots[id] == nil { try? store.deleteFile(n) }
        }
    }
}
