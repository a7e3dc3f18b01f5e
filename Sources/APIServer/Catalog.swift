import Foundation
import FurcateCore
import RecordStore

/// How long a snapshot is kept (Freestyle's SnapshotPersistence): `persistent` until deleted;
/// `sticky` ones (priority 0–10) are the first evicted, least recently used first, when an
/// account's snapshots pass its storage quota.
public struct SnapshotPersistence: Codable, Sendable, Equatable {
    public var type: String
    public var priority: Int?

    public static let persistent = SnapshotPersistence(type: "persistent", priority: nil)
}

/// A snapshot as the API knows it: who owns it, its name and persistence, and where its bytes
/// are — a VMService snapshot (`target`), directly or once its build (`buildId`) succeeds.
/// Builds may share a target (template-hash cache), so deleting an API snapshot frees the
/// bytes only when no other live record points at them.
public struct APISnapshot: Codable, Sendable {
    public var id: String
    public var account: String
    public var name: String?
    public var target: String?
    public var buildId: String?
    public var sourceVmId: String?
    /// The OCI image an InstaVM snapshot was built from.
    public var ociImage: String?
    public var vcpus: Int?
    public var memoryMiB: Int?
    /// InstaVM's `type`: user or system.
    public var kind: String?
    public var persistence: SnapshotPersistence
    public var deleted: Bool
    public var createdAt: Double
    public var updatedAt: Double
    public var lastUsedAt: Double?

    public init(id: String, account: String, target: String? = nil, buildId: String? = nil, sourceVmId: String? = nil) {
        self.id = id
        self.account = account
        self.target = target
        self.buildId = buildId
        self.sourceVmId = sourceVmId
        persistence = .persistent
        deleted = false
        createdAt = Date().timeIntervalSince1970
        updatedAt = createdAt
    }
}

/// Who owns what (`owners.sqlite`): the owning account of every VM, snapshot and build, and
/// the API's snapshot records. Another account's resource is answered exactly as a missing one.
public final class OwnerStore: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("owners")
    private static let snapshotTable = RecordTable("api_snapshots")
    struct Owner: Codable {
        var account: String
        /// A VM's name (Freestyle `name`).
        var name: String?
    }

    public init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "owner",
            migrations: [
                "CREATE TABLE owners (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
                "CREATE TABLE api_snapshots (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
            ])
    }

    public func set(_ id: String, account: String, name: String? = nil) throws { try db.save(Self.table, key: id, Owner(account: account, name: name)) }
    public func owner(_ id: String) throws -> String? { try db.get(Self.table, key: id, as: Owner.self)?.account }
    /// A resource's name, if it was given one.
    public func name(_ id: String) throws -> String? { try db.get(Self.table, key: id, as: Owner.self)?.name }
    public func remove(_ id: String) throws { try db.delete(Self.table, key: id) }

    /// Records a snapshot (and its owner).
    public func saveSnapshot(_ s: APISnapshot) throws {
        try db.save(Self.snapshotTable, key: s.id, s)
        try set(s.id, account: s.account)
    }

    /// Forgets a snapshot record entirely (one that duplicated another).
    public func removeSnapshot(_ id: String) throws {
        try db.delete(Self.snapshotTable, key: id)
        try remove(id)
    }

    public func snapshot(_ id: String) throws -> APISnapshot? { try db.get(Self.snapshotTable, key: id, as: APISnapshot.self) }

    /// Every snapshot record, oldest first.
    public func snapshots() throws -> [APISnapshot] { try db.all(Self.snapshotTable) }
}

/// A JSON integer from `JSONSerialization`: not a boolean (Foundation answers `true as? Int`
/// with 1) and not a fraction.
func jsonInteger(_ v: Any?) -> Int? {
    guard let n = v as? NSNumber else { return nil }
    switch String(cString: n.objCType) {
    case "c", "d", "f": return nil
    default: return n.intValue
    }
}

/// A JSON boolean from `JSONSerialization` (not the numbers 0 and 1).
func jsonBool(_ v: Any?) -> Bool? {
    guard let n = v as? NSNumber, String(cString: n.objCType) == "c" else { return nil }
    return n.boolValue
}
