import Foundation
import FurcateCore
import GRDB

/// The kind of a named store object.
public enum FileKind: Int, Sendable, Codable {
    /// A mutable file.
    case file = 0
    /// An immutable snapshot.
    case snapshot = 1

    /// `file` or `snapshot`, as listings print it.
    public var name: String { self == .file ? "file" : "snapshot" }
}

/// A files-table row.
struct FileRow: Sendable {
    var id: Int64
    var name: String
    var kind: FileKind
    var root: BlockID
    var size: UInt64
    var blockSize: Int
    var codec: Codec
    var createdAt: Double
    var modifiedAt: Double
    var generation: Int64
}

/// The SQLite index of a store (WAL mode, synchronous=FULL): which blocks exist and where, the
/// tree nodes, the named files and snapshots, quarantined blocks. Every write is one IMMEDIATE
/// transaction that rolls back whole on error; content rows are inserted with INSERT OR IGNORE.
final class StoreIndex: Sendable {
    static let formatVersion = 1
    let pool: DatabasePool
    let path: String

    init(path: String, create: Bool) throws {
        self.path = path
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.prepareDatabase { db in
            // FULL: a commit is durable once it returns, also across power loss.
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        if !create && !FileManager.default.fileExists(atPath: path) {
            throw FurcateError(.notAStore, "no store index", path: path)
        }
        do {
            pool = try DatabasePool(path: path, configuration: config)
        } catch {
            throw StoreIndex.map(error, "open index", path)
        }
        try migrate()
    }

    private func migrate() throws {
        var m = DatabaseMigrator()
        m.registerMigration("v1") { db in
            try db.execute(
                sql: """
                    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE blocks(
                        id BLOB PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
                        stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL, codec INTEGER NOT NULL
                    ) WITHOUT ROWID;
                    CREATE INDEX blocks_by_pack ON blocks(pack);
                    CREATE TABLE nodes(id BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
                    CREATE TABLE files(
                        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                        kind INTEGER NOT NULL, root BLOB NOT NULL, size INTEGER NOT NULL,
                        block_size INTEGER NOT NULL, codec TEXT NOT NULL,
                        created_at REAL NOT NULL, modified_at REAL NOT NULL,
                        generation INTEGER NOT NULL DEFAULT 0
                    );
                    CREATE TABLE quarantine(
                        id BLOB PRIMARY KEY, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
                        stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL, codec INTEGER NOT NULL,
                        reason TEXT NOT NULL, at REAL NOT NULL
                    ) WITHOUT ROWID;
                    """)
            try db.execute(
                sql: "INSERT INTO meta(key, value) VALUES ('format_version', ?)",
                arguments: ["\(StoreIndex.formatVersion)"])
        }
        do {
            try m.migrate(pool)
        } catch {
            throw StoreIndex.map(error, "migrate index", path)
        }
    }

    /// Runs a read.
    func read<T>(_ what: String, _ body: (Database) throws -> T) throws -> T {
        do { return try pool.read(body) } catch { throw StoreIndex.map(error, what, path) }
    }

    /// Runs one IMMEDIATE write transaction.
    func write<T>(_ what: String, _ body: (Database) throws -> T) throws -> T {
        do { return try pool.write(body) } catch { throw StoreIndex.map(error, what, path) }
    }

    /// Converts SQLite errors into `FurcateError`, keeping our own errors as they are.
    static func map(_ error: any Error, _ what: String, _ path: String) -> FurcateError {
        if let e = error as? FurcateError { return e }
        if let e = error as? DatabaseError {
            switch e.resultCode {
            case .SQLITE_FULL:
                return FurcateError(
                    .diskFull, "disk full while updating the store index", path: path, operation: what, underlying: e)
            case .SQLITE_CORRUPT, .SQLITE_NOTADB:
                return FurcateError(.damaged, "store index is damaged", path: path, operation: what, underlying: e)
            case .SQLITE_BUSY, .SQLITE_LOCKED:
                return FurcateError(.busy, "store index is busy", path: path, operation: what, underlying: e)
            default:
                break
            }
        }
        return FurcateError(.io, "\(what) failed", path: path, operation: what, underlying: UnderlyingMessage(error))
    }

    // MARK: meta

    func meta(_ db: Database, _ key: String) throws -> String? {
        try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = ?", arguments: [key])
    }

    func setMeta(_ db: Database, _ key: String, _ value: String) throws {
        try db.execute(sql: "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", arguments: [key, value])
    }

    // MARK: blocks

    static func location(_ row: Row) -> BlockLocation {
        BlockLocation(
            pack: row["pack"], offset: UInt64(row["offset"] as Int64), storedLength: UInt32(row["stored_len"] as Int64),
            rawLength: UInt32(row["raw_len"] as Int64), codecTag: UInt8(row["codec"] as Int64))
    }

    /// Hot path (every block-cache miss and dedup check): a cached prepared statement.
    func location(_ db: Database, _ id: BlockID) throws -> BlockLocation? {
        let st = try db.cachedStatement(sql: "SELECT pack, offset, stored_len, raw_len, codec FROM blocks WHERE id = ?")
        return try Row.fetchOne(st, arguments: [Data(id.bytes)]).map(Self.location)
    }

    func insertBlock(_ db: Database, _ id: BlockID, _ l: BlockLocation) throws {
        try db.execute(
            sql: "INSERT OR IGNORE INTO blocks(id, pack, offset, stored_len, raw_len, codec) VALUES (?, ?, ?, ?, ?, ?)",
            arguments: [
                Data(id.bytes), l.pack, Int64(l.offset), Int64(l.storedLength), Int64(l.rawLength), Int64(l.codecTag),
            ])
    }

    // MARK: nodes

    func nodeData(_ db: Database, _ id: BlockID) throws -> Data? {
        try Data.fetchOne(db.cachedStatement(sql: "SELECT data FROM nodes WHERE id = ?"), arguments: [Data(id.bytes)])
    }

    func insertNode(_ db: Database, _ id: BlockID, _ data: [UInt8]) throws {
        try db.execute(
            sql: "INSERT OR IGNORE INTO nodes(id, data) VALUES (?, ?)", arguments: [Data(id.bytes), Data(data)])
    }

    // MARK: files

    static let fileColumns = "id, name, kind, root, size, block_size, codec, created_at, modified_at, generation"

    static func fileRow(_ row: Row) throws -> FileRow {
        let rootData: Data = row["root"]
        guard let root = BlockID([UInt8](rootData)), let kind = FileKind(rawValue: row["kind"]) else {
            throw FurcateError(.damaged, "malformed files row '\(row["name"] as String)'")
        }
        return FileRow(
            id: row["id"], name: row["name"], kind: kind, root: root, size: UInt64(row["size"] as Int64),
            blockSize: row["block_size"], codec: (try? Codec(parsing: row["codec"])) ?? .none,
            createdAt: row["created_at"], modifiedAt: row["modified_at"], generation: row["generation"])
    }

    func file(_ db: Database, named name: String) throws -> FileRow? {
        try Row.fetchOne(db, sql: "SELECT \(Self.fileColumns) FROM files WHERE name = ?", arguments: [name]).map(
            Self.fileRow)
    }

    func files(_ db: Database) throws -> [FileRow] {
        try Row.fetchAll(db, sql: "SELECT \(Self.fileColumns) FROM files ORDER BY name").map(Self.fileRow)
    }

    /// Inserts a files row and returns its id.
    /// - Throws: `.exists` when the name is taken.
    func insertFile(
        _ db: Database, name: String, kind: FileKind, root: BlockID, size: UInt64, blockSize: Int, codec: Codec
    ) throws -> Int64 {
        if try file(db, named: name) != nil {
            throw FurcateError(.exists, "'\(name)' exists already")
        }
        let now = Date().timeIntervalSince1970
        try db.execute(
            sql: """
                INSERT INTO files(name, kind, root, size, block_size, codec, created_at, modified_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """,
            arguments: [name, kind.rawValue, Data(root.bytes), Int64(size), blockSize, codec.description, now, now])
        return db.lastInsertedRowID
    }
}
