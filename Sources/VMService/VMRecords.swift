import Foundation
import FurcateCore
import GRDB
import Hypervisor

/// A VM as persisted (`vms` table) and reported.
public struct VMInfo: Sendable, Codable, Equatable {
    /// 20 lowercase alphanumerics.
    public var id: String
    public var state: VMState
    public var memoryMiB: Int
    public var vcpus: Int
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
    public var vmID: String
    public var memoryMiB: Int
    public var vcpus: Int
    /// Bytes of device state (the migration stream; without RAM unless `ramInStream`).
    public var deviceStateBytes: Int
    /// The migration stream carries the RAM itself and there is no memory file: a snapshot of
    /// a VM whose RAM was private (mode b), where QEMU cannot leave RAM out of the stream.
    public var ramInStream: Bool = false
    public var createdAt: Double
    public var memoryFile: String { "\(id).mem" }
    public var diskFile: String { "\(id).disk" }
    public var stateFile: String { "\(id).state" }
    /// A writable clone of the memory that mode-b forks map privately (QEMU opens its
    /// memory file read-write even when it maps it privately; store snapshots are read-only).
    public var privateBaseFile: String { "\(id).membase" }
}

/// Ids with one documented shape each.
public enum VMID {
    static let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")

    /// A new VM id: 20 lowercase alphanumerics.
    public static func newVM() -> String { String((0..<20).map { _ in alphabet.randomElement()! }) }
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
            throw FurcateError(.invalidArgument, "'\(id.prefix(40))' is not a snapshot id (sc- and 20 lowercase letters and digits)")
        }
    }
}

/// The VM database: SQLite (WAL) through GRDB, writes in immediate transactions.
final class VMDatabase: Sendable {
    let pool: DatabasePool

    init(path: String) throws {
        var config = Configuration()
        config.busyMode = .timeout(5)
        do {
            pool = try DatabasePool(path: path, configuration: config)
            var migrator = DatabaseMigrator()
            migrator.registerMigration("v1") { db in
                try db.execute(
                    sql: """
                        CREATE TABLE vms (id TEXT PRIMARY KEY, info BLOB NOT NULL);
                        CREATE TABLE snapshots (id TEXT PRIMARY KEY, vm_id TEXT NOT NULL, info BLOB NOT NULL);
                        """)
            }
            try migrator.migrate(pool)
        } catch {
            throw FurcateError(.io, "cannot open the VM database", path: path, underlying: UnderlyingMessage(error))
        }
    }

    func save(_ vm: VMInfo) throws {
        let data = try JSONEncoder().encode(vm)
        try write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO vms (id, info) VALUES (?, ?)", arguments: [vm.id, data])
        }
    }

    func save(_ s: SnapshotInfo) throws {
        let data = try JSONEncoder().encode(s)
        try write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO snapshots (id, vm_id, info) VALUES (?, ?, ?)", arguments: [s.id, s.vmID, data])
        }
    }

    func deleteVM(_ id: String) throws { try write { try $0.execute(sql: "DELETE FROM vms WHERE id = ?", arguments: [id]) } }
    func deleteSnapshot(_ id: String) throws {
        try write { try $0.execute(sql: "DELETE FROM snapshots WHERE id = ?", arguments: [id]) }
    }

    func vms() throws -> [VMInfo] { try all("vms") }
    func snapshots() throws -> [SnapshotInfo] { try all("snapshots") }

    private func all<T: Decodable>(_ table: String) throws -> [T] {
        do {
            return try pool.read { db in
                try Data.fetchAll(db, sql: "SELECT info FROM \(table) ORDER BY rowid").map { try JSONDecoder().decode(T.self, from: $0) }
            }
        } catch {
            throw FurcateError(.io, "cannot read the VM database (\(table))", path: pool.path, underlying: UnderlyingMessage(error))
        }
    }

    private func write(_ body: (Database) throws -> Void) throws {
        do { try pool.write(body) } catch {
            throw FurcateError(.io, "cannot write the VM database", path: pool.path, underlying: UnderlyingMessage(error))
        }
    }
}
