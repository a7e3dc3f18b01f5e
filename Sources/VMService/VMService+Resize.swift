import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor

extension VMService {
    /// Grows a running VM's root disk to `bytes` (QEMU resizes the store file and tells the
    /// guest), then grows its ext4 filesystem with the guest's `resize2fs` when it has one.
    /// Returns the old size and what the guest said.
    /// - Throws: `.invalidArgument` to shrink, `.invalidState` unless running, `.hypervisor`
    ///   when QEMU refuses.
    public func resizeDisk(_ id: String, to bytes: UInt64) async throws -> (oldBytes: UInt64, filesystem: String) {
        let old: UInt64 = try await withVM(id) {
            let vm = try info(id)
            guard vm.state == .running, let p = instances[id]?.process else {
                throw FurcateError(
                    .invalidState, "VM \(id) is \(vm.state.rawValue); only a running VM's disk is resized")
            }
            let old = try store.fileSize(vm.diskFile)
            guard bytes >= old else {
                throw FurcateError(
                    .invalidArgument, "the disk is \(old >> 20) MiB; it can grow, not shrink (asked \(bytes >> 20) MiB)"
                )
            }
            if bytes > old { try await p.resizeBlockDevice("root", to: bytes) }
            return old
        }
        guard bytes > old else { return (old, "unchanged") }
        let r = try await agent(id).exec(
            ExecRequest(
                command: "command -v resize2fs >/dev/null || exit 127; resize2fs /dev/vda 2>&1", timeoutMs: 300_000))
        switch r.exitCode {
        case 0: return (old, "ext4 grown with resize2fs")
        case 127: return (old, "the guest has no resize2fs; the filesystem keeps its size until it is grown inside")
        default: return (old, "resize2fs failed: " + String(decoding: r.stdout.suffix(300), as: UTF8.self))
        }
    }
}

extension VMService {
    /// Re-lays a running VM's storage for forking: the guest syncs and trims its filesystems,
    /// so blocks it freed leave the disk's map (discard reaches the store as holes) and later
    /// snapshots and forks carry only live data. Returns what it did, with sizes.
    /// - Throws: `.invalidState` unless running.
    public func optimize(_ id: String) async throws -> String {
        let vm = try info(id)
        guard vm.state == .running else {
            throw FurcateError(.invalidState, "VM \(id) is \(vm.state.rawValue); only a running VM is optimized")
        }
        let before = try allocatedBytes(vm.diskFile)
        let a = try await agent(id)
        let r = try await a.exec(
            ExecRequest(command: "sync; command -v fstrim >/dev/null || exit 127; fstrim -v / 2>&1", timeoutMs: 300_000)
        )
        try await a.sync()
        let after = try allocatedBytes(vm.diskFile)
        let trim: String
        switch r.exitCode {
        case 0:
            trim =
                "trimmed the root filesystem ("
                + String(decoding: r.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) + ")"
        case 127: trim = "the guest has no fstrim; synced only"
        default:
            trim =
                "fstrim failed: "
                + String(decoding: r.stdout.suffix(200), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return "synced the guest; \(trim); disk data in the store \(before >> 20) MiB → \(after >> 20) MiB"
    }

    /// Bytes of `name` that hold data (not holes).
    func allocatedBytes(_ name: String) throws -> UInt64 { try store.allocatedBytes(name) }
}

extension VMService {
    /// The bytes a snapshot's files hold in the store (data, not holes; before compression).
    public func snapshotStoredBytes(_ id: String) throws -> UInt64 {
        let s = try snapshotInfo(id)
        var total: UInt64 = 0
        for f in [s.memoryFile, s.diskFile, s.stateFile] where (try? store.fileExists(f)) == true {
            total += try allocatedBytes(f)
        }
        return total
    }

    /// The bytes a VM holds in the store: its disk and memory files while it has them, its
    /// suspension snapshot while suspended.
    public func vmStoredBytes(_ id: String) throws -> UInt64 {
        let vm = try info(id)
        var total: UInt64 = 0
        for f in [vm.diskFile, vm.memoryFile] where (try? store.fileExists(f)) == true {
            total += try allocatedBytes(f)
        }
        if let s = vm.suspendedSnapshot { total += (try? snapshotStoredBytes(s)) ?? 0 }
        return total
    }
}
