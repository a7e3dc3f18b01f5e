import Foundation
import FurcateCore
import RecordStore
import Synchronization

/// How long a snapshot is kept (Freestyle's SnapshotPersistence): `persistent` until deleted;
/// `sticky` ones (priority 0–10) are the first evicted, least recently used first, when an
/// account's snapshots pass its storage quota. Encoded as the document has it:
/// `{"type": "sticky", "priority": 5}`.
public enum SnapshotPersistence: Codable, Sendable, Equatable {
    case persistent
    case sticky(priority: Int)

    /// A sticky snapshot's default priority.
    public static let sticky = SnapshotPersistence.sticky(priority: 5)

    /// An eviction candidate's priority (lower goes first); nil for a persistent snapshot.
    public var stickyPriority: Int? {
        if case .sticky(let p) = self { return p }
        return nil
    }

    private enum Keys: String, CodingKey { case type, priority }

    /// - Throws: `.invalidArgument` naming the field for an unknown type or a priority out of 0–10.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let type = try c.decode(String.self, forKey: .type)
        switch type {
        case "persistent": self = .persistent
        case "sticky":
            let priority = try c.decodeIfPresent(Int.self, forKey: .priority) ?? 5
            guard (0...10).contains(priority) else {
                throw FurcateError(.invalidArgument, "persistence.priority must be an integer from 0 to 10")
            }
            self = .sticky(priority: priority)
        default:
            throw FurcateError(
                .invalidArgument, "persistence.type must be sticky or persistent, not '\(type.prefix(40))'")
        }
    }

    /// Encodes `{"type": …}` (with `priority` for sticky), the shape `init(from:)` reads.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        switch self {
        case .persistent: try c.encode("persistent", forKey: .type)
        case .sticky(let p):
            try c.encode("sticky", forKey: .type)
            try c.encode(p, forKey: .priority)
        }
    }
}

/// Whose a snapshot is, as InstaVM sorts them: the caller's own, or one it keeps as a base.
public enum SnapshotKind: String, Codable, Sendable {
    case user
    case system
}

/// Account names the engine gives a meaning.
public enum Account {
    /// The owner of what every account may use: the default image's snapshot.
    public static let everyone = "*"
}

/// A snapshot as an account knows it: who owns it, its name and persistence, and where its
/// bytes are — a VMService snapshot (`target`), directly or once its build (`buildId`)
/// succeeds. Builds may share a target (template-hash cache), so deleting a record frees the
/// bytes only when no other live record points at them.
public struct SnapshotRecord: Codable, Sendable {
    /// The API's snapshot id (`sc-…`).
    public var id: String
    /// The account that owns it.
    public var account: String
    /// The name its owner gave it.
    public var name: String?
    /// The VMService snapshot holding its bytes, for one taken of a VM (a build's is its build's).
    public var target: String?
    /// The build making it, for one made from a recipe.
    public var buildId: String?
    /// The VM it was taken of.
    public var sourceVmId: String?
    /// The OCI image an InstaVM snapshot was built from.
    public var ociImage: String?
    /// vCPUs its VMs get, as asked when it was built.
    public var vcpus: Int?
    /// Guest RAM its VMs get, in MiB, as asked when it was built.
    public var memoryMiB: Int?
    /// InstaVM's `type` (nil: user).
    public var kind: SnapshotKind?
    /// Whether it may be evicted under the storage quota (sticky) or is kept (persistent).
    public var persistence: SnapshotPersistence
    /// Soft-deleted: hidden from lists; its bytes go once nothing uses them.
    public var deleted: Bool
    /// When it was recorded, Unix seconds.
    public var createdAt: Double
    /// When it last changed, Unix seconds.
    public var updatedAt: Double
    /// When a VM was last made from it (the eviction order under a quota).
    public var lastUsedAt: Double?
    /// The idle timeout its spec gave VMs made from it (Freestyle `idleTimeoutSeconds`).
    public var idleTimeoutSeconds: Int?

    /// A persistent record of `id` for `account`, made now.
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
/// the accounts' snapshot records. Another account's resource is answered exactly as a missing one.
public final class OwnerStore: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("owners")
    private static let snapshotTable = RecordTable("api_snapshots")
    private static let policyTable = RecordTable("vm_policies")
    private static let exposureTable = RecordTable("exposures")
    struct Owner: Codable {
        var account: String
        /// A VM's name (Freestyle `name`).
        var name: String?
    }
    /// Every owner row, and each account's ids: read once, written through (one server owns
    /// the data directory). Listing an account's 1,000 VMs read and decoded 1,000 rows per
    /// request before (`furcate bench api`).
    private struct Cache {
        var owners: [String: Owner] = [:]
        var byAccount: [String: Set<String>] = [:]

        mutating func set(_ id: String, _ o: Owner?) {
            if let old = owners[id] { byAccount[old.account]?.remove(id) }
            owners[id] = o
            if let o { byAccount[o.account, default: []].insert(id) }
        }
    }
    private let cache: Mutex<Cache>
    private let exposureCache: Mutex<[String: Exposure]>

    /// Opens (creating) the owner database at `path`.
    /// - Throws: `.io` naming the database.
    public init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "owner",
            migrations: [
                "CREATE TABLE owners (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
                "CREATE TABLE api_snapshots (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
                "CREATE TABLE vm_policies (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
                "CREATE TABLE exposures (id TEXT PRIMARY KEY, record BLOB NOT NULL)",
            ])
        var c = Cache()
        for (id, o) in try db.allKeyed(Self.table, as: Owner.self) { c.set(id, o) }
        cache = Mutex(c)
        let exposed: [Exposure] = try db.all(Self.exposureTable)
        exposureCache = Mutex(Dictionary(exposed.map { ($0.id, $0) }) { a, _ in a })
    }

    /// Records `account` as the owner of resource `id`, with its name.
    public func set(_ id: String, account: String, name: String? = nil) throws {
        let o = Owner(account: account, name: name)
        try db.save(Self.table, key: id, o)
        cache.withLock { $0.set(id, o) }
    }
    /// Every resource id `account` owns, with its name (VMs, snapshots and builds alike).
    public func owned(by account: String) -> [String: String?] {
        cache.withLock { c in
            var r: [String: String?] = [:]
            for id in c.byAccount[account] ?? [] { r[id] = .some(c.owners[id]?.name) }
            return r
        }
    }
    /// The account owning resource `id`, if any.
    public func owner(_ id: String) -> String? { cache.withLock { $0.owners[id]?.account } }
    /// A resource's name, if it was given one.
    public func name(_ id: String) -> String? { cache.withLock { $0.owners[id]?.name } }
    /// Forgets resource `id`'s owner; an unknown id is no error.
    public func remove(_ id: String) throws {
        try db.delete(Self.table, key: id)
        cache.withLock { $0.set(id, nil) }
    }

    /// Records a snapshot (and its owner).
    public func saveSnapshot(_ s: SnapshotRecord) throws {
        try db.save(Self.snapshotTable, key: s.id, s)
        try set(s.id, account: s.account)
    }

    /// Forgets a snapshot record entirely (one that duplicated another).
    public func removeSnapshot(_ id: String) throws {
        try db.delete(Self.snapshotTable, key: id)
        try remove(id)
    }

    /// The snapshot record `id`, deleted or not.
    public func snapshot(_ id: String) throws -> SnapshotRecord? {
        try db.get(Self.snapshotTable, key: id, as: SnapshotRecord.self)
    }

    func savePolicy(_ id: String, _ p: VMPolicy) throws { try db.save(Self.policyTable, key: id, p) }
    func allPolicies() throws -> [String: VMPolicy] {
        Dictionary(try db.allKeyed(Self.policyTable, as: VMPolicy.self)) { a, _ in a }
    }
    func removePolicy(_ id: String) throws { try db.delete(Self.policyTable, key: id) }

    /// Records (or replaces) an exposed port.
    func saveExposure(_ e: Exposure) throws {
        try db.save(Self.exposureTable, key: e.id, e)
        exposureCache.withLock { $0[e.id] = e }
    }
    /// Every exposed port (read once, written through: the ingress asks on every connection).
    func exposures() -> [Exposure] { exposureCache.withLock { Array($0.values) } }
    /// Forgets an exposed port; an unknown id is no error.
    func removeExposure(_ id: String) throws {
        try db.delete(Self.exposureTable, key: id)
        _ = exposureCache.withLock { $0.removeValue(forKey: id) }
    }

    /// Every snapshot record, oldest first.
    public func snapshots() throws -> [SnapshotRecord] { try db.all(Self.snapshotTable) }
}
