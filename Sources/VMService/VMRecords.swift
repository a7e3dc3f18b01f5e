import BlockStore
import Foundation
import FurcateCore
import Hypervisor
import RecordStore
import VMNetwork

/// A VM as persisted (`vms` table) and reported.
public struct VMInfo: Sendable, Codable, Equatable {
    /// 20 lowercase alphanumerics.
    public var id: String
    /// Where it is in its lifecycle (`VMState`'s transition table).
    public var state: VMState
    /// Guest RAM in MiB.
    public var memoryMiB: Int
    /// Virtual CPUs.
    public var vcpus: Int
    /// Whether its RAM is the shared memory file (a) or private over a read-only base (b).
    public var memoryMode: MemoryMode
    /// The snapshot it was forked or restored from, if any.
    public var parentSnapshot: String?
    /// While suspended: the snapshot holding its state.
    public var suspendedSnapshot: String?
    /// QEMU's pid while it runs.
    public var pid: Int32?
    /// It was running when the server shut down, and is resumed when it starts again.
    public var resumeOnStart: Bool
    /// Running, with its vCPUs paused (`pause`); a snapshot leaves it paused.
    public var paused: Bool = false
    /// While lost: why, and what was kept (its disk; never its memory).
    public var lostReason: String?
    /// Its place in the host's VM network pool (`VMServiceOptions.networks`): its namespace,
    /// links and firewall chain, kept until it is deleted. Nil on user-mode networking.
    public var networkIndex: Int?
    /// What its guest may reach (on its own network); nil: the service's default
    /// (`VMServiceOptions.egress`). Forks and restores get their snapshot's.
    public var egress: EgressPolicy?
    /// When it was made, Unix seconds.
    public var createdAt: Double
    /// The store file its root disk is (`vm-ID.disk`).
    public var diskFile: String { "vm-\(id).disk" }
    /// The store file its RAM is in mode a (`vm-ID.mem`).
    public var memoryFile: String { "vm-\(id).mem" }
}

/// An immutable snapshot of a VM (`snapshots` table): three store snapshots (memory, disk,
/// device state) named after it, and the machine shape a restore must match.
public struct SnapshotInfo: Sendable, Codable, Equatable {
    /// `sc-` and 20 lowercase alphanumerics.
    public var id: String
    /// The VM it was taken of.
    public var vmID: String
    /// The VM's guest RAM in MiB; a restore gets the same.
    public var memoryMiB: Int
    /// The VM's vCPUs; a restore gets the same.
    public var vcpus: Int
    /// Bytes of device state (the migration stream; without RAM unless `ramInStream`).
    public var deviceStateBytes: Int
    /// The migration stream carries the RAM itself and there is no memory file: a snapshot of
    /// a VM whose RAM was private (mode b), where QEMU cannot leave RAM out of the stream.
    public var ramInStream: Bool = false
    /// When it was taken, Unix seconds.
    public var createdAt: Double
    /// The VM's egress policy when it was taken (nil: the service's default): what the VMs
    /// restored from it start with.
    public var egress: EgressPolicy?
    /// Memory compression asked for (hypeman's model); nil: never asked.
    public var compression: SnapshotCompression?
    /// nil is `none`.
    public var compressionState: CompressionState?
    /// Why the last compression failed, when `compressionState` is `error`.
    public var compressionError: String?
    /// The memory payload's distinct blocks, raw and as stored, after the last compression.
    public var uncompressedSizeBytes: UInt64?
    /// The memory payload's distinct blocks as stored, after the last compression.
    public var compressedSizeBytes: UInt64?
    /// The store file holding the guest RAM: the memory file, or the stream when it carries RAM.
    public var memoryPayloadFile: String { ramInStream ? stateFile : memoryFile }
    /// The store snapshot of the guest RAM (when not in the stream).
    public var memoryFile: String { "\(id).mem" }
    /// The store snapshot of the root disk.
    public var diskFile: String { "\(id).disk" }
    /// The store snapshot of QEMU's device state (the migration stream).
    public var stateFile: String { "\(id).state" }
    /// A writable clone of the memory that mode-b forks map privately (QEMU opens its
    /// memory file read-write even when it maps it privately; store snapshots are read-only).
    public var privateBaseFile: String { "\(id).membase" }
}

/// Snapshot memory compression (hypeman's `SnapshotCompressionConfig`): zstd levels 1–19
/// (default 1) or lz4 levels 0–9 (default 0; 1–9 use LZ4 HC).
public struct SnapshotCompression: Codable, Sendable, Equatable {
    /// Whether memory is to be compressed at all.
    public var enabled: Bool
    /// `zstd` or `lz4`; nil: zstd.
    public var algorithm: String?
    /// The codec's level; nil: its default.
    public var level: Int?

    /// A compression setting; `validate` checks it.
    public init(enabled: Bool, algorithm: String? = nil, level: Int? = nil) {
        self.enabled = enabled
        self.algorithm = algorithm
        self.level = level
    }

    /// The store codec this asks for; `fallback` when disabled.
    /// - Throws: `.invalidArgument` for an unknown algorithm or a level out of its range.
    public func codec(fallback: Codec) throws -> Codec {
        guard enabled else { return fallback }
        switch algorithm ?? "zstd" {
        case "zstd":
            let l = level ?? 1
            guard (1...19).contains(l) else {
                throw FurcateError(.invalidArgument, "zstd compression level must be 1 to 19, not \(l)")
            }
            return .zstd(level: Int32(l))
        case "lz4":
            let l = level ?? 0
            guard (0...9).contains(l) else {
                throw FurcateError(.invalidArgument, "lz4 compression level must be 0 to 9, not \(l)")
            }
            return l == 0 ? .lz4 : .lz4hc(level: Int32(l))
        case let a:
            throw FurcateError(.invalidArgument, "compression algorithm must be zstd or lz4, not '\(a.prefix(40))'")
        }
    }
}

/// Where a snapshot's memory compression stands; nil on a snapshot is `none`.
public enum CompressionState: String, Codable, Sendable {
    case none, compressing, compressed, error
}

/// Ids with one documented shape each.
public enum VMID {
    static let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")

    /// A new VM id: 20 lowercase alphanumerics.
    public static func newVM() -> String { String((0..<20).map { _ in alphabet[Int.random(in: 0..<alphabet.count)] }) }
    /// A new snapshot id: `sc-` and 20 lowercase alphanumerics.
    public static func newSnapshot() -> String { "sc-" + newVM() }

    /// Checks an id accepted from outside.
    /// - Throws: `.invalidArgument` unless it has the VM id shape.
    public static func validateVM(_ id: String) throws {
        guard id.count == 20, id.allSatisfy({ alphabet.contains($0) }) else {
            throw FurcateError(.invalidArgument, "'\(id.prefix(40))' is not a VM id (20 lowercase letters and digits)")
        }
    }

    /// - Throws: `.invalidArgument` unless it has the snapshot id shape.
    public static func validateSnapshot(_ id: String) throws {
        guard id.hasPrefix("sc-"), (try? validateVM(String(id.dropFirst(3)))) != nil else {
            throw FurcateError(
                .invalidArgument, "'\(id.prefix(40))' is not a snapshot id (sc- and 20 lowercase letters and digits)")
        }
    }
}

/// The VM database: VMs and snapshots as JSON records (RecordStore).
final class VMDatabase: Sendable {
    private let db: RecordDatabase
    private static let vmTable = RecordTable("vms", value: "info")
    private static let snapshotTable = RecordTable("snapshots", value: "info", extra: ["vm_id"])

    init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "VM",
            migrations: [
                """
                CREATE TABLE vms (id TEXT PRIMARY KEY, info BLOB NOT NULL);
                CREATE TABLE snapshots (id TEXT PRIMARY KEY, vm_id TEXT NOT NULL, info BLOB NOT NULL);
                """
            ])
    }

    func save(_ vm: VMInfo) throws { try db.save(Self.vmTable, key: vm.id, vm) }
    func save(_ s: SnapshotInfo) throws { try db.save(Self.snapshotTable, key: s.id, s, extra: [s.vmID]) }
    func deleteVM(_ id: String) throws { try db.delete(Self.vmTable, key: id) }
    func deleteSnapshot(_ id: String) throws { try db.delete(Self.snapshotTable, key: id) }
    func vms() throws -> [VMInfo] { try db.all(Self.vmTable) }
    func snapshots() throws -> [SnapshotInfo] { try db.all(Self.snapshotTable) }
}
